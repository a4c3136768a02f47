//! JSON Schema → GBNF (llama.cpp's grammar format), so the embedded model can only write JSON
//! that has the job's shape. Pure Rust, no llama.cpp: the job checks its schema with it when it
//! loads, and the local provider hands the grammar to llama.cpp's grammar sampler.
//!
//! What the grammar enforces, for the subset of JSON Schema it understands:
//! - `type` (one or a list), `enum`, `const`, `anyOf` / `oneOf` (as alternatives: oneOf's "only
//!   one" is left to the validator), `allOf` with one member, `$ref` to `#…` (recursion too);
//! - objects: `properties` in schema order, the `required` ones always there, the others
//!   optional; no other key is written (`additionalProperties` is honoured by writing none), an
//!   object without `properties` is a map whose values follow `additionalProperties`;
//! - arrays: `items`, `minItems`, `maxItems`;
//! - strings: `minLength`, `maxLength` (up to [`MAX_REPEAT`]), `format` date, time, date-time,
//!   uuid;
//! - integers: `minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum` (exact digit
//!   ranges); numbers: `minimum = 0`;
//! - annotations (`title`, `description`, `default`, `examples`, …) are ignored.
//!
//! Anything else (`pattern`, `uniqueItems`, `multipleOf`, `not`, `if`, `patternProperties`,
//! `minProperties`, a bound on a number other than `minimum = 0`, …) is an error naming the
//! keyword and where it is: the grammar would let the model break it, and a schema the
//! grammar cannot hold is refused rather than silently unenforced.
//!
//! Whitespace between tokens is limited to one space, or one newline and up to 20 spaces or
//! tabs (as llama.cpp's own converter), so a model cannot spend its tokens on blank lines;
//! number literals have at most 16 digits before and after the point for the same reason.
//!
//! The files: this one holds the converter, its shared rules and the keywords that pick a
//! branch (`$ref`, `const`, `enum`, `anyOf` / `oneOf` / `allOf`); `types.rs` the rule for each
//! `type`; `ranges.rs` the exact digit patterns of an integer range.

mod ranges;
mod types;

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use serde_json::{Map, Value};

/// Longest `minLength` / `maxLength` / `minItems` / `maxItems` written into the grammar:
/// llama.cpp's `MAX_REPETITION_THRESHOLD`. Its parser refuses a larger minimum and, worse,
/// reads a larger maximum as no maximum at all, so a bigger bound is refused here instead.
pub const MAX_REPEAT: u64 = 2000;
/// Digits of an unbounded number's integer and fraction parts.
const MAX_DIGITS: u32 = 16;

/// A schema the grammar cannot hold, and where in it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", if path.is_empty() { String::new() } else { format!("at `{path}`: ") })]
pub struct GrammarError {
    /// JSON Pointer into the schema ("" for the root).
    pub path: String,
    pub message: String,
}

/// The grammar for a request's `response_format`: `None` for plain text.
pub fn for_response_format(rf: &Value) -> Result<Option<String>, GrammarError> {
    let err = |m: &str| GrammarError {
        path: String::new(),
        message: m.to_string(),
    };
    match rf.get("type").and_then(Value::as_str) {
        None | Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json_object())),
        Some("json_schema") => {
            let schema = rf
                .get("json_schema")
                .and_then(|j| j.get("schema"))
                .ok_or_else(|| err("response_format json_schema without a schema"))?;
            from_schema(schema).map(Some)
        }
        Some(other) => Err(err(&format!("unknown response_format type `{other}`"))),
    }
}

/// Any JSON object (`response_format = "json_object"`).
pub fn json_object() -> String {
    let mut c = Converter::new(&Value::Null);
    let root = c.generic("object");
    c.finish(&root)
}

/// The grammar for one JSON Schema: its `root` rule writes exactly one value.
pub fn from_schema(schema: &Value) -> Result<String, GrammarError> {
    let mut c = Converter::new(schema);
    let root = c.visit(schema, "", "doc")?;
    Ok(c.finish(&root))
}

/// Keywords that change nothing the grammar must write.
const ANNOTATIONS: &[&str] = &[
    "$schema",
    "$id",
    "$anchor",
    "$comment",
    "$defs",
    "definitions",
    "title",
    "description",
    "default",
    "examples",
    "deprecated",
    "readOnly",
    "writeOnly",
    "contentMediaType",
];

/// Keywords some branch of [`Converter::visit`] reads; any other is refused.
const HANDLED: &[&str] = &[
    "type",
    "enum",
    "const",
    "anyOf",
    "oneOf",
    "allOf",
    "$ref",
    "properties",
    "required",
    "additionalProperties",
    "unevaluatedProperties",
    "items",
    "minItems",
    "maxItems",
    "minLength",
    "maxLength",
    "format",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
];

struct Converter<'a> {
    root: &'a Value,
    /// (name, body) in the order they were made, `root` written first by `finish`.
    rules: Vec<(String, String)>,
    /// Body → name, so equal rules are written once.
    by_body: HashMap<String, String>,
    names: HashSet<String>,
    /// `$ref` target → its rule's name (reserved before the target is visited: recursion).
    refs: HashMap<String, String>,
    /// Generic rules (`ws`, `char`, any value, …) → their names.
    generic: HashMap<&'static str, String>,
}

fn fail<T>(path: &str, message: impl Into<String>) -> Result<T, GrammarError> {
    Err(GrammarError {
        path: path.to_string(),
        message: message.into(),
    })
}

impl<'a> Converter<'a> {
    fn new(root: &'a Value) -> Self {
        let mut names = HashSet::new();
        names.insert("root".to_string());
        Converter {
            root,
            rules: Vec::new(),
            by_body: HashMap::new(),
            names,
            refs: HashMap::new(),
            generic: HashMap::new(),
        }
    }

    fn finish(self, root: &str) -> String {
        let mut out = format!("root ::= {root}\n");
        for (name, body) in &self.rules {
            let _ = writeln!(out, "{name} ::= {body}");
        }
        out
    }

    /// A fresh rule name from a hint (GBNF names are letters, digits and `-`).
    fn fresh_name(&mut self, hint: &str) -> String {
        let mut base: String = hint
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        base = base.trim_matches('-').to_string();
        if base.is_empty() {
            base = "r".into();
        }
        base.truncate(48);
        let mut name = base.clone();
        let mut i = 1;
        while self.names.contains(&name) {
            i += 1;
            name = format!("{base}-{i}");
        }
        self.names.insert(name.clone());
        name
    }

    /// A rule with this body (one already made when the body is the same); its name.
    fn rule(&mut self, hint: &str, body: String) -> String {
        if let Some(name) = self.by_body.get(&body) {
            return name.clone();
        }
        let name = self.fresh_name(hint);
        self.by_body.insert(body.clone(), name.clone());
        self.rules.push((name.clone(), body));
        name
    }

    /// The shared rules: whitespace, string characters, and any JSON value.
    fn generic(&mut self, what: &'static str) -> String {
        if let Some(n) = self.generic.get(what) {
            return n.clone();
        }
        let body = match what {
            "ws" => r#"| " " | "\n" [ \t]{0,20}"#.to_string(),
            "char" => r#"[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})"#.into(),
            "string" => {
                let ch = self.generic("char");
                format!(r#""\"" {ch}* "\"""#)
            }
            "number" => number_body(true),
            "boolean" => r#""true" | "false""#.into(),
            "null" => r#""null""#.into(),
            "value" => {
                // Named before its body exists: object and array refer back to it.
                let name = self.fresh_name("value");
                self.generic.insert("value", name.clone());
                let parts = ["object", "array", "string", "number", "boolean", "null"]
                    .map(|k| self.generic(k));
                self.rules.push((name.clone(), parts.join(" | ")));
                return name;
            }
            "object" => {
                let (ws, s, v) = (
                    self.generic("ws"),
                    self.generic("string"),
                    self.generic("value"),
                );
                // Making `value` (first use) made this rule too: it refers back to it.
                if let Some(n) = self.generic.get("object") {
                    return n.clone();
                }
                let kv = format!(r#"{s} {ws} ":" {ws} {v} {ws}"#);
                format!(r#""{{" {ws} ({kv} ("," {ws} {kv})*)? "}}""#)
            }
            "array" => {
                let (ws, v) = (self.generic("ws"), self.generic("value"));
                // Making `value` (first use) made this rule too: it refers back to it.
                if let Some(n) = self.generic.get("array") {
                    return n.clone();
                }
                format!(r#""[" {ws} ({v} {ws} ("," {ws} {v} {ws})*)? "]""#)
            }
            _ => unreachable!("no generic rule {what}"),
        };
        let hint = match what {
            "object" | "array" | "string" | "number" | "boolean" | "null" => {
                format!("json-{what}")
            }
            w => w.to_string(),
        };
        let name = self.fresh_name(&hint);
        self.rules.push((name.clone(), body));
        self.generic.insert(what, name.clone());
        name
    }

    /// The grammar expression for `schema` (at `path`), a rule name when it is not trivial.
    fn visit(&mut self, schema: &Value, path: &str, hint: &str) -> Result<String, GrammarError> {
        let obj = match schema {
            Value::Bool(true) => return Ok(self.generic("value")),
            Value::Bool(false) => return fail(path, "the schema `false` admits no value"),
            Value::Object(o) => o,
            _ => return fail(path, "a schema must be an object or a boolean"),
        };
        let structural = structural_keys(obj, path)?;
        if let Some(r) = obj.get("$ref") {
            alone(&structural, "$ref", path)?;
            return self.reference(r, path);
        }
        if let Some(c) = obj.get("const") {
            alone(&structural, "const", path)?;
            return Ok(literal(&c.to_string()));
        }
        if let Some(e) = obj.get("enum") {
            return self.enumeration(e, &structural, path, hint);
        }
        for kw in ["anyOf", "oneOf", "allOf"] {
            if let Some(list) = obj.get(kw) {
                alone(&structural, kw, path)?;
                return self.combination(kw, list, path, hint);
            }
        }
        self.typed(obj, &structural, path, hint)
    }

    /// `enum`: one literal per value.
    fn enumeration(
        &mut self,
        e: &Value,
        structural: &[&str],
        path: &str,
        hint: &str,
    ) -> Result<String, GrammarError> {
        // `type` beside `enum` only narrows what the values already are.
        if let Some(other) = structural.iter().find(|k| !matches!(**k, "enum" | "type")) {
            return fail(path, format!("`{other}` beside `enum` is not supported"));
        }
        let Some(values) = e.as_array().filter(|v| !v.is_empty()) else {
            return fail(&format!("{path}/enum"), "`enum` must be a non-empty array");
        };
        let alts: Vec<String> = values.iter().map(|v| literal(&v.to_string())).collect();
        Ok(self.rule(hint, alts.join(" | ")))
    }

    /// `anyOf` / `oneOf` (`list`, under `kw`) as alternatives; `allOf` with one member as
    /// that member.
    fn combination(
        &mut self,
        kw: &str,
        list: &Value,
        path: &str,
        hint: &str,
    ) -> Result<String, GrammarError> {
        let Some(list) = list.as_array().filter(|l| !l.is_empty()) else {
            return fail(
                &format!("{path}/{kw}"),
                format!("`{kw}` must be a non-empty array"),
            );
        };
        if kw == "allOf" {
            if list.len() > 1 {
                return fail(
                    &format!("{path}/allOf"),
                    "`allOf` with more than one schema cannot be enforced by the local \
                     model's grammar; merge them into one",
                );
            }
            return self.visit(&list[0], &format!("{path}/allOf/0"), hint);
        }
        let mut alts = Vec::new();
        for (i, s) in list.iter().enumerate() {
            alts.push(self.visit(s, &format!("{path}/{kw}/{i}"), &format!("{hint}-{i}"))?);
        }
        Ok(self.rule(hint, alts.join(" | ")))
    }

    /// `$ref`: a JSON Pointer into this schema (`#`, `#/$defs/x`, …); its rule is named before
    /// the target is visited, so a recursive schema refers to itself.
    fn reference(&mut self, r: &Value, path: &str) -> Result<String, GrammarError> {
        let at = format!("{path}/$ref");
        let Some(r) = r.as_str() else {
            return fail(&at, "`$ref` must be a string");
        };
        if let Some(name) = self.refs.get(r) {
            return Ok(name.clone());
        }
        let Some(pointer) = r.strip_prefix('#') else {
            return fail(
                &at,
                format!("`{r}`: only references inside the schema (`#/…`) are supported"),
            );
        };
        let target = if pointer.is_empty() {
            Some(self.root)
        } else {
            let decoded = percent_decode(pointer);
            self.root.pointer(&decoded)
        };
        let Some(target) = target else {
            return fail(&at, format!("`{r}` points at nothing in the schema"));
        };
        let hint = r.rsplit('/').next().unwrap_or("ref").to_string();
        let name = self.fresh_name(if hint.is_empty() || hint == "#" {
            "root-ref"
        } else {
            &hint
        });
        self.refs.insert(r.to_string(), name.clone());
        let expr = self.visit(target, pointer, &format!("{hint}-body"))?;
        self.rules.push((name.clone(), expr));
        Ok(name)
    }
}

/// The keywords of a schema object that shape its value (annotations left out); an error
/// naming the first keyword the grammar cannot enforce.
fn structural_keys<'s>(
    obj: &'s Map<String, Value>,
    path: &str,
) -> Result<Vec<&'s str>, GrammarError> {
    for key in obj.keys() {
        if !HANDLED.contains(&key.as_str()) && !ANNOTATIONS.contains(&key.as_str()) {
            return fail(path, format!("`{key}` cannot be enforced by a grammar"));
        }
    }
    Ok(obj
        .keys()
        .map(String::as_str)
        .filter(|k| !ANNOTATIONS.contains(k))
        .collect())
}

/// `kw` must be the schema's only structural keyword.
fn alone(structural: &[&str], kw: &str, path: &str) -> Result<(), GrammarError> {
    match structural.iter().find(|k| **k != kw) {
        Some(other) => fail(
            path,
            format!(
                "`{kw}` beside `{other}` is not supported; move `{other}` into the \
                 `{kw}` alternatives"
            ),
        ),
        None => Ok(()),
    }
}

fn number_body(signed: bool) -> String {
    format!(
        r#"{}("0" | [1-9] [0-9]{{0,{d}}}) ("." [0-9]{{1,{f}}})? ([eE] [-+]? [0-9]{{1,3}})?"#,
        if signed { r#""-"? "# } else { "" },
        d = MAX_DIGITS - 1,
        f = MAX_DIGITS
    )
}

/// A GBNF string literal for `s`.
fn literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\x{:02X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `%XX` escapes in a `$ref` fragment.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(schema: Value) -> GrammarError {
        from_schema(&schema).expect_err("refused")
    }

    #[test]
    fn an_object_writes_its_properties_in_order_with_the_required_ones() {
        let g = from_schema(&json!({
            "type": "object",
            "properties": {
                "headline": {"type": "string", "maxLength": 30},
                "price": {"type": "number"},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}
            },
            "required": ["headline", "price", "tags"],
            "additionalProperties": false
        }))
        .unwrap();
        let root = g.lines().next().unwrap();
        assert_eq!(root, "root ::= doc");
        assert!(
            g.contains(r#"doc-headline ::= "\"" char{0,30} "\"""#),
            "{g}"
        );
        assert!(
            g.contains(r#"doc-headline-kv ::= "\"headline\"" ws ":" ws doc-headline ws"#),
            "{g}"
        );
        assert!(
            g.contains(r#"doc ::= "{" ws doc-headline-kv doc-after-headline "}""#),
            "{g}"
        );
        assert!(
            g.contains(r#"doc-after-headline ::= "," ws doc-price-kv "," ws doc-tags-kv"#),
            "{g}"
        );
        assert!(
            g.contains(r#"doc-tags ::= "[" ws (json-string ws ("," ws json-string ws){0,2})? "]""#),
            "{g}"
        );
    }

    #[test]
    fn optional_properties_may_be_left_out_with_their_commas() {
        let g = from_schema(&json!({
            "type": "object",
            "properties": {"a": {"type": "boolean"}, "b": {"type": "null"}, "c": {"type": "boolean"}},
            "required": ["b"]
        }))
        .unwrap();
        // a is optional and first; b is required: the object opens with a, or with b.
        assert!(
            g.contains(r#""{" ws (doc-a-kv doc-after-a | doc-b-kv ("," ws doc-c-kv)?) "}""#),
            "{g}"
        );
        assert!(
            g.contains(r#"doc-after-a ::= "," ws doc-b-kv ("," ws doc-c-kv)?"#),
            "{g}"
        );
        let none = from_schema(&json!({
            "type": "object", "properties": {"a": {"type": "boolean"}}
        }))
        .unwrap();
        assert!(none.contains(r#""{" ws (doc-a-kv)? "}""#), "{none}");
    }

    #[test]
    fn enums_consts_unions_and_nullable_types() {
        let g = from_schema(&json!({
            "type": "object",
            "properties": {
                "tone": {"enum": ["calm", "loud \"x\"", 3, null]},
                "k": {"const": {"a": [1]}},
                "v": {"anyOf": [{"type": "string", "maxLength": 2}, {"type": "integer"}]},
                "n": {"type": ["string", "null"]}
            },
            "required": ["tone", "k", "v", "n"]
        }))
        .unwrap();
        assert!(
            g.contains(r#"doc-tone ::= "\"calm\"" | "\"loud \\\"x\\\"\"" | "3" | "null""#),
            "{g}"
        );
        assert!(
            g.contains(r#"doc-k-kv ::= "\"k\"" ws ":" ws "{\"a\":[1]}" ws"#),
            "{g}"
        );
        assert!(g.contains("doc-v ::= doc-v-0 | integer"), "{g}");
        assert!(g.contains("doc-n ::= json-string | json-null"), "{g}");
    }

    #[test]
    fn references_and_recursion() {
        let g = from_schema(&json!({
            "type": "object",
            "$defs": {"node": {"type": "object", "properties": {
                "name": {"type": "string", "maxLength": 8},
                "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}
            }, "required": ["name", "children"]}},
            "properties": {"tree": {"$ref": "#/$defs/node"}},
            "required": ["tree"]
        }))
        .unwrap();
        assert!(
            g.contains(r#"doc-tree-kv ::= "\"tree\"" ws ":" ws node ws"#),
            "{g}"
        );
        assert!(g.contains("node ::= node-body"), "{g}");
        assert!(
            g.contains(r#"node-body-children ::= "[" ws (node ws"#),
            "{g}"
        );
        assert_eq!(
            err(json!({"type": "object", "properties": {"x": {"$ref": "#/$defs/nope"}}})).path,
            "/properties/x/$ref"
        );
        assert!(err(json!({"$ref": "other.json#/x"}))
            .message
            .contains("inside the schema"));
    }

    #[test]
    fn what_the_grammar_cannot_hold_is_refused_with_its_place() {
        for (schema, path, word) in [
            (
                json!({"type": "object", "properties": {"s": {"type": "string", "pattern": "^a"}}}),
                "/properties/s",
                "`pattern`",
            ),
            (
                json!({"type": "object", "properties": {"t": {"type": "array", "uniqueItems": true}}}),
                "/properties/t",
                "`uniqueItems`",
            ),
            (
                json!({"type": "object", "patternProperties": {"x": {}}}),
                "",
                "`patternProperties`",
            ),
            (
                json!({"type": "object", "properties": {"p": {"type": "number", "maximum": 5}}}),
                "/properties/p/maximum",
                "`maximum`",
            ),
            (
                json!({"type": "object", "properties": {"p": {"type": "number", "minimum": 1}}}),
                "/properties/p/minimum",
                "minimum = 0",
            ),
            (
                json!({"type": "object", "properties": {"p": {"type": "integer", "multipleOf": 2}}}),
                "/properties/p",
                "`multipleOf`",
            ),
            (
                json!({"type": "object", "properties": {"e": {"type": "string", "format": "email"}}}),
                "/properties/e/format",
                "email",
            ),
            (
                json!({"type": "object", "properties": {"a": {"allOf": [{"type": "string"}, {"maxLength": 3}]}}}),
                "/properties/a/allOf",
                "merge",
            ),
            (
                json!({"type": "object", "properties": {"a": {"maxLength": 3}}}),
                "/properties/a",
                "without a `type`",
            ),
            (
                json!({"type": "object", "required": ["ghost"], "properties": {}}),
                "/required",
                "`ghost`",
            ),
            (
                json!({"type": "object", "properties": {"s": {"type": "string", "maxLength": 100000}}}),
                "/properties/s/maxLength",
                "too many",
            ),
            (json!({"not": {"type": "null"}}), "", "`not`"),
        ] {
            let e = err(schema.clone());
            assert_eq!(e.path, path, "{schema}: {e}");
            assert!(e.to_string().contains(word), "{schema}: {e}");
        }
    }

    #[test]
    fn annotations_are_ignored() {
        let a = from_schema(&json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": "Ad", "description": "x",
            "type": "object",
            "properties": {"h": {"type": "string", "description": "headline", "examples": ["a"]}},
            "required": ["h"]
        }))
        .unwrap();
        let b = from_schema(&json!({
            "type": "object", "properties": {"h": {"type": "string"}}, "required": ["h"]
        }))
        .unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn string_lengths_and_formats() {
        let g = from_schema(&json!({"type": "object", "properties": {
            "a": {"type": "string", "minLength": 2, "maxLength": 2},
            "b": {"type": "string", "minLength": 1},
            "d": {"type": "string", "format": "date-time"},
            "i": {"type": "integer", "minimum": 1, "maximum": 5},
            "p": {"type": "number", "minimum": 0}
        }, "required": ["a", "b", "d", "i", "p"]}))
        .unwrap();
        assert!(g.contains(r#"doc-a ::= "\"" char{2} "\"""#), "{g}");
        assert!(g.contains(r#"doc-b ::= "\"" char+ "\"""#), "{g}");
        assert!(
            g.contains(r#"doc-d-date-time ::= "\"" [0-9]{4} "-""#),
            "{g}"
        );
        assert!(g.contains("doc-i ::= [1-5]"), "{g}");
        assert!(g.contains(r#"number-nonneg ::= ("0" | [1-9]"#), "{g}");
    }

    #[test]
    fn response_formats() {
        assert_eq!(for_response_format(&json!({"type": "text"})).unwrap(), None);
        let o = for_response_format(&json!({"type": "json_object"}))
            .unwrap()
            .unwrap();
        assert!(o.starts_with("root ::= json-object\n"), "{o}");
        assert!(
            o.contains("value ::= json-object | json-array | json-string"),
            "{o}"
        );
        let s = for_response_format(&json!({"type": "json_schema", "json_schema": {
            "name": "x", "strict": true, "schema": {"type": "object", "properties": {}}
        }}))
        .unwrap()
        .unwrap();
        assert!(s.starts_with("root ::= "), "{s}");
        assert!(for_response_format(&json!({"type": "json_schema"})).is_err());
    }

    #[test]
    fn literals_escape_what_gbnf_needs() {
        assert_eq!(literal("a\"b\\c\nd\u{1}é"), r#""a\"b\\c\nd\x01é""#);
    }
}
