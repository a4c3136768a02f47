//! What an answer looks like beyond plain text: content parts (text and images) in the
//! request, `response_format` (json_object, json_schema) and the JSON generated from a
//! schema, and what the answer-shaping markers do to it.
//!
//! The JSON answer for a json_schema request is generated from the schema alone, so it is
//! deterministic and satisfies the schema:
//! - object: every property of `properties`, in the schema's order (not only the required);
//! - string: `"<property name>: echo: <user text>"` cut to `maxLength` characters and padded
//!   with `.` to `minLength`; choice i ≥ 1 appends ` #<i+1>` (the text is cut before the
//!   suffix so it still fits `maxLength`); `format` date-time, date, time, duration, email,
//!   hostname, ipv4, ipv6, uuid and uri give a fixed valid value instead; `pattern` is not
//!   honoured;
//! - `const` → its value; `enum` → its first value;
//! - integer → `minimum` (or just above `exclusiveMinimum`), else 1, kept under `maximum`
//!   and rounded up to `multipleOf`; number → the same with 1.5;
//! - boolean → true; null → null;
//! - array → `minItems` items (else 1, at most `maxItems`) generated from `items`;
//! - `$ref` (a `#/...` pointer into the root, so `#/$defs/X` and `#/definitions/X`), `anyOf`,
//!   `oneOf`, `allOf` → the first alternative; a `type` list → its first type that is not
//!   `"null"`; no `type` → object if `properties`, array if `items`, else string.
//!
//! A recursive schema is cut off after `MAX_DEPTH` levels of nesting: arrays get `minItems`
//! (default 0) items there and alternatives prefer a non-`$ref` one.

use serde_json::{Map, Number, Value};

/// The text a refusal carries, as OpenAI's models word it.
pub(crate) const REFUSAL: &str = "I'm sorry, but I can't help with that.";

/// Image tokens in the prompt estimate: OpenAI's flat figure for `detail: low`, and for
/// `high`/`auto` the figure of a 512×512 image at high detail (85 base + 4 tiles × 170).
pub(crate) const IMAGE_TOKENS_LOW: u64 = 85;
pub(crate) const IMAGE_TOKENS_HIGH: u64 = 765;

const MAX_DEPTH: usize = 12;

/// What one message's `content` holds once validated.
#[derive(Default)]
pub(crate) struct Content {
    /// The text parts joined with a space (a string content as it is).
    pub text: String,
    /// Image parts, in order.
    pub images: Vec<Image>,
}

pub(crate) struct Image {
    pub url: String,
    /// `low`, `high` or `auto` (the default).
    pub detail: String,
}

impl Content {
    /// Text tokens are counted by the caller; this is what the images add.
    pub fn image_tokens(&self) -> u64 {
        self.images
            .iter()
            .map(|i| {
                if i.detail == "low" {
                    IMAGE_TOKENS_LOW
                } else {
                    IMAGE_TOKENS_HIGH
                }
            })
            .sum()
    }

    /// The text an answer echoes: the text, then ` [image detail=<d> <url's first 40
    /// chars>… (<url length> chars)]` for each image in order.
    pub fn echo(&self) -> String {
        let mut s = self.text.clone();
        for i in &self.images {
            let head: String = i.url.chars().take(40).collect();
            s.push_str(&format!(
                " [image detail={} {head}… ({} chars)]",
                i.detail,
                i.url.chars().count()
            ));
        }
        s
    }
}

/// A JSON type's name the way OpenAI's "got a … instead" messages say it.
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a decimal",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn invalid_type(what: &str, expected: &str, got: &Value) -> String {
    format!(
        "Invalid type for '{what}': expected {expected}, but got {} instead.",
        type_name(got)
    )
}

/// Read a message's content (already known to be a string, an array or null), checking each
/// part's shape as OpenAI does. `i` is the message's index, for the error messages.
pub(crate) fn read_content(
    i: usize,
    role: &str,
    content: Option<&Value>,
) -> Result<Content, String> {
    let parts = match content {
        Some(Value::String(s)) => {
            return Ok(Content {
                text: s.clone(),
                images: Vec::new(),
            })
        }
        Some(Value::Array(parts)) => parts,
        _ => return Ok(Content::default()),
    };
    let mut c = Content::default();
    let mut texts: Vec<&str> = Vec::new();
    for (j, p) in parts.iter().enumerate() {
        let at = format!("messages[{i}].content[{j}]");
        let Some(obj) = p.as_object() else {
            return Err(invalid_type(&at, "an object", p));
        };
        let typ = match obj.get("type") {
            Some(Value::String(t)) => t.as_str(),
            Some(v) => return Err(invalid_type(&format!("{at}.type"), "a string", v)),
            None => return Err(format!("Missing required parameter: '{at}.type'.")),
        };
        match typ {
            "text" => match obj.get("text") {
                Some(Value::String(t)) => texts.push(t),
                Some(v) => return Err(invalid_type(&format!("{at}.text"), "a string", v)),
                None => return Err(format!("Missing required parameter: '{at}.text'.")),
            },
            "refusal" if role == "assistant" => match obj.get("refusal") {
                Some(Value::String(_)) => {}
                Some(v) => return Err(invalid_type(&format!("{at}.refusal"), "a string", v)),
                None => return Err(format!("Missing required parameter: '{at}.refusal'.")),
            },
            "image_url" => {
                if role != "user" {
                    return Err(format!(
                        "Invalid '{at}': image URLs are only allowed for messages with role 'user', but this message with role '{role}' contains an image URL."
                    ));
                }
                let img = match obj.get("image_url") {
                    Some(Value::Object(o)) => o,
                    Some(v) => {
                        return Err(invalid_type(&format!("{at}.image_url"), "an object", v))
                    }
                    None => return Err(format!("Missing required parameter: '{at}.image_url'.")),
                };
                let url = match img.get("url") {
                    Some(Value::String(u)) => u,
                    Some(v) => {
                        return Err(invalid_type(&format!("{at}.image_url.url"), "a string", v))
                    }
                    None => {
                        return Err(format!("Missing required parameter: '{at}.image_url.url'."))
                    }
                };
                check_image_url(&format!("{at}.image_url.url"), url)?;
                let detail = match img.get("detail") {
                    None | Some(Value::Null) => "auto",
                    Some(Value::String(d)) if matches!(d.as_str(), "auto" | "low" | "high") => d,
                    Some(Value::String(d)) => {
                        return Err(format!(
                            "Invalid value: '{d}'. Supported values are: 'auto', 'low', and 'high'. (at '{at}.image_url.detail')"
                        ))
                    }
                    Some(v) => {
                        return Err(invalid_type(
                            &format!("{at}.image_url.detail"),
                            "a string",
                            v,
                        ))
                    }
                };
                c.images.push(Image {
                    url: url.clone(),
                    detail: detail.to_string(),
                });
            }
            other => {
                let supported = if role == "assistant" {
                    "'text' and 'refusal'"
                } else if role == "user" {
                    "'text' and 'image_url'"
                } else {
                    "'text'"
                };
                return Err(format!(
                    "Invalid value: '{other}'. Supported values are: {supported}. (at '{at}.type')"
                ));
            }
        }
    }
    c.text = texts.join(" ");
    Ok(c)
}

/// An image URL must be http(s) or a base64 data URL of an image, as OpenAI requires.
fn check_image_url(at: &str, url: &str) -> Result<(), String> {
    if url.starts_with("https://") || url.starts_with("http://") {
        return Ok(());
    }
    match url.strip_prefix("data:") {
        None => Err(format!(
            "Invalid '{at}': Expected a base64-encoded data URL with an image MIME type (e.g. 'data:image/png;base64,aW1nIGJ5dGVzIGhlcmU='), but got a value without the 'data:' prefix."
        )),
        Some(rest) => {
            let ok = rest
                .split_once(";base64,")
                .is_some_and(|(mime, _)| mime.starts_with("image/"));
            if ok {
                Ok(())
            } else {
                Err(format!(
                    "Invalid '{at}': Expected a base64-encoded data URL with an image MIME type (e.g. 'data:image/png;base64,aW1nIGJ5dGVzIGhlcmU='), but got an unsupported or malformed data URL."
                ))
            }
        }
    }
}

/// `response_format`, validated.
pub(crate) enum Format<'a> {
    Text,
    JsonObject,
    JsonSchema { name: &'a str, schema: &'a Value },
}

pub(crate) fn read_format(v: Option<&Value>) -> Result<Format<'_>, (String, &'static str)> {
    let obj = match v {
        None | Some(Value::Null) => return Ok(Format::Text),
        Some(Value::Object(o)) => o,
        Some(v) => {
            return Err((
                invalid_type("response_format", "an object", v),
                "response_format",
            ))
        }
    };
    let typ = match obj.get("type") {
        Some(Value::String(t)) => t.as_str(),
        Some(v) => {
            return Err((
                invalid_type("response_format.type", "a string", v),
                "response_format.type",
            ))
        }
        None => {
            return Err((
                "Missing required parameter: 'response_format.type'.".into(),
                "response_format.type",
            ))
        }
    };
    match typ {
        "text" => Ok(Format::Text),
        "json_object" => Ok(Format::JsonObject),
        "json_schema" => {
            const P: &str = "response_format.json_schema";
            let js = match obj.get("json_schema") {
                Some(Value::Object(o)) => o,
                Some(v) => return Err((invalid_type(P, "an object", v), P)),
                None => return Err((format!("Missing required parameter: '{P}'."), P)),
            };
            let name = match js.get("name") {
                Some(Value::String(n)) => n.as_str(),
                Some(v) => {
                    return Err((
                        invalid_type("response_format.json_schema.name", "a string", v),
                        "response_format.json_schema.name",
                    ))
                }
                None => {
                    return Err((
                        format!("Missing required parameter: '{P}.name'."),
                        "response_format.json_schema.name",
                    ))
                }
            };
            let name_ok = (1..=64).contains(&name.len())
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !name_ok {
                return Err((
                    format!("Invalid '{P}.name': string does not match pattern. Expected a string that matches the pattern '^[a-zA-Z0-9_-]{{1,64}}$', but got '{name}'."),
                    "response_format.json_schema.name",
                ));
            }
            let schema = match js.get("schema") {
                Some(s @ Value::Object(_)) => s,
                Some(v) => {
                    return Err((
                        invalid_type("response_format.json_schema.schema", "an object", v),
                        "response_format.json_schema.schema",
                    ))
                }
                None => {
                    return Err((
                        format!("Missing required parameter: '{P}.schema'."),
                        "response_format.json_schema.schema",
                    ))
                }
            };
            match js.get("strict") {
                None | Some(Value::Null | Value::Bool(_)) => {}
                Some(v) => {
                    return Err((
                        invalid_type("response_format.json_schema.strict", "a boolean", v),
                        "response_format.json_schema.strict",
                    ))
                }
            }
            Ok(Format::JsonSchema { name, schema })
        }
        other => Err((
            format!("Invalid value: '{other}'. Supported values are: 'text', 'json_object', and 'json_schema'."),
            "response_format.type",
        )),
    }
}

/// Generates answers from one schema.
pub(crate) struct Gen<'a> {
    root: &'a Value,
    /// The user text the strings echo.
    user: &'a str,
    /// ` #<i+1>` for choice i ≥ 1, else empty.
    suffix: String,
}

impl<'a> Gen<'a> {
    pub fn new(root: &'a Value, user: &'a str, choice: usize) -> Self {
        let suffix = if choice == 0 {
            String::new()
        } else {
            format!(" #{}", choice + 1)
        };
        Gen { root, user, suffix }
    }

    /// `$ref` resolved (a `#`-pointer into the root); anything else as it is. A ref that
    /// does not resolve is taken as `{}`.
    fn resolve(&self, mut s: &'a Value) -> &'a Value {
        static EMPTY: Value = Value::Null;
        for _ in 0..16 {
            match s.get("$ref").and_then(Value::as_str) {
                Some(r) => match r.strip_prefix('#') {
                    Some(ptr) => s = self.root.pointer(ptr).unwrap_or(&EMPTY),
                    None => return &EMPTY,
                },
                None => return s,
            }
        }
        &EMPTY
    }

    /// The schema that decides the value: refs followed, first alternative of
    /// anyOf/oneOf/allOf taken (a non-ref one when deep).
    fn pick(&self, s: &'a Value, depth: usize) -> &'a Value {
        let mut s = self.resolve(s);
        for _ in 0..16 {
            let alts = ["anyOf", "oneOf", "allOf"].iter().find_map(|k| {
                s.get(*k)
                    .and_then(Value::as_array)
                    .filter(|a| !a.is_empty())
            });
            let Some(alts) = alts else { return s };
            let alt = if depth >= MAX_DEPTH {
                alts.iter()
                    .find(|a| a.get("$ref").is_none())
                    .unwrap_or(&alts[0])
            } else {
                &alts[0]
            };
            s = self.resolve(alt);
        }
        s
    }

    /// The JSON value for schema `s`; `name` is the property it is for (strings echo it).
    pub fn value(&self, s: &'a Value, name: &str, depth: usize) -> Value {
        let s = self.pick(s, depth);
        if let Some(c) = s.get("const") {
            return c.clone();
        }
        if let Some(first) = s
            .get("enum")
            .and_then(Value::as_array)
            .and_then(|e| e.first())
        {
            return first.clone();
        }
        match schema_type(s) {
            "object" => {
                let mut m = Map::new();
                if let Some(props) = s.get("properties").and_then(Value::as_object) {
                    for (k, ps) in props {
                        m.insert(k.clone(), self.value(ps, k, depth + 1));
                    }
                }
                Value::Object(m)
            }
            "array" => {
                let min = s.get("minItems").and_then(Value::as_u64);
                let mut n = min.unwrap_or(if depth >= MAX_DEPTH { 0 } else { 1 });
                if let Some(max) = s.get("maxItems").and_then(Value::as_u64) {
                    n = n.min(max);
                }
                let items = s.get("items").unwrap_or(&Value::Null);
                Value::Array(
                    (0..n.min(1000))
                        .map(|_| self.value(items, name, depth + 1))
                        .collect(),
                )
            }
            "integer" => Value::Number(Number::from(integer(s))),
            "number" => Number::from_f64(number(s))
                .map(Value::Number)
                .unwrap_or(Value::Null),
            "boolean" => Value::Bool(true),
            "null" => Value::Null,
            _ => Value::String(self.string(s, name)),
        }
    }

    fn string(&self, s: &Value, name: &str) -> String {
        let fixed = match s.get("format").and_then(Value::as_str) {
            Some("date-time") => Some("2024-01-01T00:00:00Z"),
            Some("date") => Some("2024-01-01"),
            Some("time") => Some("12:00:00Z"),
            Some("duration") => Some("P1D"),
            Some("email") => Some("user@example.com"),
            Some("hostname") => Some("example.com"),
            Some("ipv4") => Some("192.0.2.1"),
            Some("ipv6") => Some("2001:db8::1"),
            Some("uuid") => Some("00000000-0000-4000-8000-000000000000"),
            Some("uri") => Some("https://example.com/"),
            _ => None,
        };
        if let Some(f) = fixed {
            return f.to_string();
        }
        let base = format!("{name}: echo: {}", self.user);
        let max = s
            .get("maxLength")
            .and_then(Value::as_u64)
            .map(|m| m as usize);
        let suffix_len = self.suffix.chars().count();
        let mut out = match max {
            Some(m) if m >= suffix_len => {
                let mut t = cut_chars(&base, m - suffix_len).to_string();
                t.push_str(&self.suffix);
                t
            }
            Some(m) => cut_chars(&format!("{base}{}", self.suffix), m).to_string(),
            None => format!("{base}{}", self.suffix),
        };
        if let Some(min) = s.get("minLength").and_then(Value::as_u64) {
            let have = out.chars().count();
            for _ in have..(min as usize) {
                out.push('.');
            }
        }
        out
    }
}

/// The first `n` characters of `s`.
pub(crate) fn cut_chars(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The type a value is generated as: the first non-null of a `type` list, or inferred.
fn schema_type(s: &Value) -> &str {
    match s.get("type") {
        Some(Value::String(t)) => t,
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .or_else(|| ts.iter().filter_map(Value::as_str).next())
            .unwrap_or("string"),
        _ if s.get("properties").is_some() => "object",
        _ if s.get("items").is_some() => "array",
        _ => "string",
    }
}

fn f(s: &Value, k: &str) -> Option<f64> {
    s.get(k).and_then(Value::as_f64)
}

fn integer(s: &Value) -> i64 {
    let mut v = match (f(s, "minimum"), f(s, "exclusiveMinimum")) {
        (Some(m), _) => m.ceil() as i64,
        (None, Some(e)) => e.floor() as i64 + 1,
        _ => 1,
    };
    if let Some(m) = f(s, "multipleOf").filter(|m| *m >= 1.0) {
        let m = m as i64;
        v = v.div_euclid(m) * m + if v.rem_euclid(m) == 0 { 0 } else { m };
    }
    if let Some(max) = f(s, "maximum") {
        v = v.min(max.floor() as i64);
    }
    if let Some(e) = f(s, "exclusiveMaximum") {
        v = v.min(e.ceil() as i64 - 1);
    }
    v
}

fn number(s: &Value) -> f64 {
    let mut v = match (f(s, "minimum"), f(s, "exclusiveMinimum")) {
        (Some(m), _) => m,
        (None, Some(e)) => e + 0.5,
        _ => 1.5,
    };
    if let Some(m) = f(s, "multipleOf").filter(|m| *m > 0.0) {
        v = (v / m).ceil() * m;
    }
    if let Some(max) = f(s, "maximum") {
        v = v.min(max);
    }
    if let Some(e) = f(s, "exclusiveMaximum") {
        if v >= e {
            v = e - 0.5;
        }
    }
    v
}

/// Make a generated document break its schema while staying valid JSON: the first
/// `required` property removed; without one, the first property given a value of a type
/// the property does not accept; with no properties (or a root that is not an object), the
/// whole document replaced by a value of a type the root does not accept.
pub(crate) fn break_schema(g: &Gen<'_>, root: &Value, doc: &mut Value) {
    let s = g.pick(root, 0);
    if let Value::Object(m) = doc {
        let first_required = s.get("required").and_then(Value::as_array).and_then(|r| {
            r.iter()
                .filter_map(Value::as_str)
                .find(|k| m.contains_key(*k))
        });
        if let Some(k) = first_required {
            let k = k.to_string();
            m.shift_remove(&k);
            return;
        }
        let props = s.get("properties").and_then(Value::as_object);
        if let Some((k, ps)) = props.and_then(|p| p.iter().next()) {
            m.insert(k.clone(), wrong_type(g, ps));
            return;
        }
    }
    *doc = wrong_type(g, root);
}

/// A value whose JSON type schema `s` does not accept (by its `type`, `const`, `enum` and
/// first-level alternatives).
fn wrong_type(g: &Gen<'_>, s: &Value) -> Value {
    let mut accepted: Vec<&str> = Vec::new();
    let s = g.resolve(s);
    let mut schemas = vec![s];
    for k in ["anyOf", "oneOf"] {
        if let Some(alts) = s.get(k).and_then(Value::as_array) {
            schemas.extend(alts.iter().map(|a| g.resolve(a)));
        }
    }
    for s in schemas {
        match s.get("type") {
            Some(Value::String(t)) => accepted.push(t),
            Some(Value::Array(ts)) => accepted.extend(ts.iter().filter_map(Value::as_str)),
            _ => {}
        }
        let values = s
            .get("enum")
            .and_then(Value::as_array)
            .map(|e| e.iter().collect::<Vec<_>>())
            .unwrap_or_default();
        for v in values.into_iter().chain(s.get("const")) {
            accepted.push(match v {
                Value::Null => "null",
                Value::Bool(_) => "boolean",
                Value::Number(_) => "number",
                Value::String(_) => "string",
                Value::Array(_) => "array",
                Value::Object(_) => "object",
            });
        }
    }
    let takes = |t: &str| accepted.contains(&t);
    if !takes("integer") && !takes("number") {
        Value::from(12345)
    } else if !takes("string") {
        Value::from("schemabreak")
    } else if !takes("boolean") {
        Value::Bool(false)
    } else if !takes("array") {
        Value::Array(Vec::new())
    } else if !takes("object") {
        Value::Object(Map::new())
    } else {
        Value::Null
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn gen(schema: &Value, user: &str, choice: usize) -> Value {
        Gen::new(schema, user, choice).value(schema, "root", 0)
    }

    #[test]
    fn generates_every_kind_in_schema_order() {
        let schema = json!({
            "type": "object",
            "properties": {
                "zeta": {"type": "string", "maxLength": 12},
                "alpha": {"type": "integer", "minimum": 3},
                "mid": {"type": "number"},
                "flag": {"type": "boolean"},
                "tone": {"enum": ["warm", "cold"]},
                "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
                "addr": {"$ref": "#/$defs/addr"},
                "maybe": {"anyOf": [{"type": "string", "minLength": 40}, {"type": "null"}]},
                "opt": {"type": ["null", "integer"], "maximum": 0},
                "when": {"type": "string", "format": "date"},
            },
            "required": ["zeta"],
            "$defs": {"addr": {"type": "object", "properties": {"city": {"type": "string"}}}},
        });
        let v = gen(&schema, "hi", 0);
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            ["zeta", "alpha", "mid", "flag", "tone", "tags", "addr", "maybe", "opt", "when"]
        );
        assert_eq!(v["zeta"], "zeta: echo: ");
        assert_eq!(v["alpha"], 3);
        assert_eq!(v["mid"], 1.5);
        assert_eq!(v["flag"], true);
        assert_eq!(v["tone"], "warm");
        assert_eq!(v["tags"], json!(["tags: echo: hi", "tags: echo: hi"]));
        assert_eq!(v["addr"], json!({"city": "city: echo: hi"}));
        assert_eq!(
            v["maybe"],
            format!("maybe: echo: hi{}", ".".repeat(40 - 15))
        );
        assert_eq!(v["opt"], 0);
        assert_eq!(v["when"], "2024-01-01");
        // Choice 2 keeps the suffix inside maxLength.
        let v = gen(&schema, "hi", 2);
        assert_eq!(v["zeta"], "zeta: ech #3");
        assert_eq!(v["tone"], "warm");
        assert_eq!(v["addr"]["city"], "city: echo: hi #3");
    }

    #[test]
    fn recursive_schemas_end() {
        let schema = json!({
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "children": {"type": "array", "items": {"$ref": "#"}},
            },
        });
        let v = gen(&schema, "x", 0);
        let mut depth = 0;
        let mut n = &v;
        while let Some(c) = n["children"].as_array().and_then(|a| a.first()) {
            n = c;
            depth += 1;
        }
        assert!((1..=MAX_DEPTH).contains(&depth), "{depth}");
    }

    #[test]
    fn breaking_a_schema() {
        let schema = json!({
            "type": "object",
            "properties": {"a": {"type": "string"}, "b": {"type": "integer"}},
            "required": ["b", "a"],
        });
        let g = Gen::new(&schema, "u", 0);
        let mut v = g.value(&schema, "", 0);
        break_schema(&g, &schema, &mut v);
        assert_eq!(v, json!({"a": "a: echo: u"}));

        let schema = json!({
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        });
        let g = Gen::new(&schema, "u", 0);
        let mut v = g.value(&schema, "", 0);
        break_schema(&g, &schema, &mut v);
        assert_eq!(v, json!({"a": "schemabreak", "b": 1}));

        let schema = json!({"type": "object"});
        let g = Gen::new(&schema, "u", 0);
        let mut v = g.value(&schema, "", 0);
        break_schema(&g, &schema, &mut v);
        assert_eq!(v, json!(12345));
    }

    #[test]
    fn content_parts() {
        let c = read_content(
            0,
            "user",
            Some(&json!([
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}},
                {"type": "text", "text": "here"},
                {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{}", "A".repeat(100))}},
            ])),
        )
        .unwrap();
        assert_eq!(c.text, "look here");
        assert_eq!(c.image_tokens(), 85 + 765);
        assert_eq!(
            c.echo(),
            "look here [image detail=low https://example.com/a.png… (25 chars)] [image detail=auto data:image/png;base64,AAAAAAAAAAAAAAAAAA… (122 chars)]"
        );
        let bad = |parts: Value, role: &str| read_content(3, role, Some(&parts)).err().unwrap();
        assert!(bad(json!(["x"]), "user").contains("'messages[3].content[0]'"));
        assert!(bad(json!([{"text": "x"}]), "user").contains("'messages[3].content[0].type'"));
        assert!(bad(
            json!([{"type": "text", "text": "a"}, {"type": "text"}]),
            "user"
        )
        .contains("'messages[3].content[1].text'"));
        assert!(bad(json!([{"type": "image_url"}]), "user").contains("content[0].image_url'"));
        assert!(bad(json!([{"type": "image_url", "image_url": {}}]), "user")
            .contains("content[0].image_url.url'"));
        assert!(bad(
            json!([{"type": "image_url", "image_url": {"url": "a.png"}}]),
            "user"
        )
        .contains("'data:' prefix"));
        assert!(bad(
            json!([{"type": "image_url", "image_url": {"url": "https://x", "detail": "mid"}}]),
            "user"
        )
        .contains("Invalid value: 'mid'"));
        assert!(bad(
            json!([{"type": "image_url", "image_url": {"url": "https://x"}}]),
            "system"
        )
        .contains("role 'system'"));
        assert!(bad(json!([{"type": "audio"}]), "user").contains("Invalid value: 'audio'"));
    }
}
