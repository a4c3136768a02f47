//! The rule for each `type` a schema names: objects (properties in schema order, the
//! required ones always there), arrays, strings (lengths, formats), integers (exact ranges),
//! numbers, booleans and null.

use serde_json::{Map, Value};

use super::ranges::int_range;
use super::{fail, literal, number_body, Converter, GrammarError, MAX_DIGITS, MAX_REPEAT};

const TYPES: &[&str] = &[
    "object", "array", "string", "integer", "number", "boolean", "null",
];

const DATE: &str =
    r#"[0-9]{4} "-" ("0" [1-9] | "1" [0-2]) "-" ("0" [1-9] | [1-2] [0-9] | "3" [0-1])"#;
const TIME: &str = r#"([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ("." [0-9]{1,6})? ("Z" | [+-] ([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9])"#;

impl Converter<'_> {
    /// `type`, one or a list: each type's rule, as alternatives. No `type` and no other
    /// structural keyword: any value.
    pub(super) fn typed(
        &mut self,
        obj: &Map<String, Value>,
        structural: &[&str],
        path: &str,
        hint: &str,
    ) -> Result<String, GrammarError> {
        let types: Vec<&str> = match obj.get("type") {
            None => {
                if let Some(k) = structural.first() {
                    return fail(
                        path,
                        format!("`{k}` without a `type`: the grammar needs the type"),
                    );
                }
                return Ok(self.generic("value"));
            }
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
            Some(_) => return fail(&format!("{path}/type"), "`type` must be a string or a list"),
        };
        if types.is_empty() {
            return fail(&format!("{path}/type"), "`type` lists no type");
        }
        let mut alts = Vec::new();
        for t in &types {
            let alt = match *t {
                "object" => self.object(obj, path, hint)?,
                "array" => self.array(obj, path, hint)?,
                "string" => self.string(obj, path, hint)?,
                "integer" => self.integer(obj, path, hint)?,
                "number" => self.number(obj, path)?,
                "boolean" => self.generic("boolean"),
                "null" => self.generic("null"),
                other => {
                    return fail(
                        &format!("{path}/type"),
                        format!("unknown type `{other}` (one of {})", TYPES.join(", ")),
                    )
                }
            };
            alts.push(alt);
        }
        if alts.len() == 1 {
            Ok(alts.pop().expect("one"))
        } else {
            Ok(self.rule(hint, alts.join(" | ")))
        }
    }

    fn object(
        &mut self,
        obj: &Map<String, Value>,
        path: &str,
        hint: &str,
    ) -> Result<String, GrammarError> {
        let ws = self.generic("ws");
        let empty = Map::new();
        let props = properties(obj, path)?.unwrap_or(&empty);
        let required = required(obj, props, path)?;
        if let Some(u) = obj.get("unevaluatedProperties") {
            if !matches!(u, Value::Bool(_)) {
                return fail(
                    &format!("{path}/unevaluatedProperties"),
                    "only `true` or `false` is supported",
                );
            }
        }
        if props.is_empty() {
            self.map(obj, &ws, path, hint)
        } else {
            self.record(props, &required, &ws, path, hint)
        }
    }

    /// An object without `properties`: a map, string keys, values as `additionalProperties`
    /// says.
    fn map(
        &mut self,
        obj: &Map<String, Value>,
        ws: &str,
        path: &str,
        hint: &str,
    ) -> Result<String, GrammarError> {
        let value = match obj.get("additionalProperties") {
            Some(Value::Bool(false)) => return Ok(self.rule(hint, format!(r#""{{" {ws} "}}""#))),
            None | Some(Value::Bool(true)) => self.generic("value"),
            Some(s) => self.visit(
                s,
                &format!("{path}/additionalProperties"),
                &format!("{hint}-value"),
            )?,
        };
        let key = self.generic("string");
        let kv = format!(r#"{key} {ws} ":" {ws} {value} {ws}"#);
        Ok(self.rule(hint, format!(r#""{{" {ws} ({kv} ("," {ws} {kv})*)? "}}""#)))
    }

    /// An object with `properties`: each `"key": value`, then whitespace, in schema order; no
    /// other key.
    fn record(
        &mut self,
        props: &Map<String, Value>,
        required: &[&str],
        ws: &str,
        path: &str,
        hint: &str,
    ) -> Result<String, GrammarError> {
        let mut kvs = Vec::new();
        for (key, sub) in props {
            let sub_path = format!("{path}/properties/{}", escape_pointer(key));
            let value = self.visit(sub, &sub_path, &format!("{hint}-{key}"))?;
            let kv = format!(
                r#"{} {ws} ":" {ws} {value} {ws}"#,
                literal(&Value::String(key.clone()).to_string())
            );
            let kv = self.rule(&format!("{hint}-{key}-kv"), kv);
            kvs.push((kv, required.contains(&key.as_str())));
        }
        let keys: Vec<&String> = props.keys().collect();
        let tail = self.tails(&kvs, &keys, ws, hint);
        let members = members(&kvs, &tail);
        Ok(self.rule(hint, format!(r#""{{" {ws} {members} "}}""#)))
    }

    /// tail[j]: what may follow once property j is written: the later properties, each
    /// behind a comma ("" when there are none).
    fn tails(
        &mut self,
        kvs: &[(String, bool)],
        keys: &[&String],
        ws: &str,
        hint: &str,
    ) -> Vec<String> {
        let n = kvs.len();
        let mut tail: Vec<String> = vec![String::new(); n];
        for j in (0..n.saturating_sub(1)).rev() {
            let (kv, req) = &kvs[j + 1];
            let item = if *req {
                format!(r#""," {ws} {kv}"#)
            } else {
                format!(r#"("," {ws} {kv})?"#)
            };
            tail[j] = if tail[j + 1].is_empty() {
                item
            } else {
                let body = format!("{item} {}", tail[j + 1]);
                self.rule(&format!("{hint}-after-{}", keys[j]), body)
            };
        }
        tail
    }

    fn array(
        &mut self,
        obj: &Map<String, Value>,
        path: &str,
        hint: &str,
    ) -> Result<String, GrammarError> {
        let ws = self.generic("ws");
        let item = match obj.get("items") {
            None | Some(Value::Bool(true)) => self.generic("value"),
            Some(s) => self.visit(s, &format!("{path}/items"), &format!("{hint}-item"))?,
        };
        let min = count(obj, "minItems", path)?.unwrap_or(0);
        let max = count(obj, "maxItems", path)?;
        if let Some(max) = max {
            if max < min {
                return fail(path, format!("maxItems {max} is less than minItems {min}"));
            }
        }
        let body = match max {
            Some(0) => format!(r#""[" {ws} "]""#),
            _ => {
                let more = format!(r#"("," {ws} {item} {ws})"#);
                let reps = repeat(min.saturating_sub(1), max.map(|m| m - 1), path, "maxItems")?;
                let inner = format!("{item} {ws} {more}{reps}");
                if min == 0 {
                    format!(r#""[" {ws} ({inner})? "]""#)
                } else {
                    format!(r#""[" {ws} {inner} "]""#)
                }
            }
        };
        Ok(self.rule(hint, body))
    }

    fn string(
        &mut self,
        obj: &Map<String, Value>,
        path: &str,
        hint: &str,
    ) -> Result<String, GrammarError> {
        let min = count(obj, "minLength", path)?;
        let max = count(obj, "maxLength", path)?;
        if let Some(f) = obj.get("format") {
            let f = f.as_str().unwrap_or_default();
            if min.is_some() || max.is_some() {
                return fail(
                    path,
                    "`format` with minLength or maxLength is not supported",
                );
            }
            let body = match f {
                "date" => format!(r#""\"" {DATE} "\"""#),
                "time" => format!(r#""\"" {TIME} "\"""#),
                "date-time" => format!(r#""\"" {DATE} "T" {TIME} "\"""#),
                "uuid" => r#""\"" [0-9a-fA-F]{8} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{12} "\"""#.to_string(),
                other => {
                    return fail(
                        &format!("{path}/format"),
                        format!(
                            "format `{other}` cannot be enforced by a grammar (date, time, \
                             date-time and uuid can)"
                        ),
                    )
                }
            };
            return Ok(self.rule(&format!("{hint}-{f}"), body));
        }
        if min.is_none() && max.is_none() {
            return Ok(self.generic("string"));
        }
        let lo = min.unwrap_or(0);
        if let Some(hi) = max {
            if hi < lo {
                return fail(path, format!("maxLength {hi} is less than minLength {lo}"));
            }
        }
        let ch = self.generic("char");
        let reps = repeat(lo, max, path, "maxLength")?;
        Ok(self.rule(hint, format!(r#""\"" {ch}{reps} "\"""#)))
    }

    fn integer(
        &mut self,
        obj: &Map<String, Value>,
        path: &str,
        hint: &str,
    ) -> Result<String, GrammarError> {
        let bound = |k: &str| -> Result<Option<f64>, GrammarError> {
            match obj.get(k) {
                None => Ok(None),
                Some(v) => v.as_f64().map(Some).ok_or_else(|| GrammarError {
                    path: format!("{path}/{k}"),
                    message: format!("`{k}` must be a number"),
                }),
            }
        };
        let to_int = |v: f64| -> i64 { v.clamp(i64::MIN as f64, i64::MAX as f64) as i64 };
        let mut lo: Option<i64> = bound("minimum")?.map(|v| to_int(v.ceil()));
        if let Some(x) = bound("exclusiveMinimum")? {
            let x = to_int(x.floor()).saturating_add(1);
            lo = Some(lo.map_or(x, |l| l.max(x)));
        }
        let mut hi: Option<i64> = bound("maximum")?.map(|v| to_int(v.floor()));
        if let Some(x) = bound("exclusiveMaximum")? {
            let x = to_int(x.ceil()).saturating_sub(1);
            hi = Some(hi.map_or(x, |h| h.min(x)));
        }
        if lo.is_none() && hi.is_none() {
            let body = format!(r#""-"? ("0" | [1-9] [0-9]{{0,{}}})"#, MAX_DIGITS - 1);
            return Ok(self.rule("integer", body));
        }
        if let (Some(l), Some(h)) = (lo, hi) {
            if l > h {
                return fail(path, format!("no integer lies between {l} and {h}"));
            }
        }
        Ok(self.rule(hint, int_range(lo, hi)))
    }

    fn number(&mut self, obj: &Map<String, Value>, path: &str) -> Result<String, GrammarError> {
        for k in ["maximum", "exclusiveMinimum", "exclusiveMaximum"] {
            if obj.contains_key(k) {
                return fail(
                    &format!("{path}/{k}"),
                    format!(
                        "`{k}` on a number cannot be enforced by a grammar (on an integer \
                         it can)"
                    ),
                );
            }
        }
        match obj.get("minimum").map(|m| m.as_f64()) {
            None => Ok(self.generic("number")),
            Some(Some(0.0)) => Ok(self.rule("number-nonneg", number_body(false))),
            Some(_) => fail(
                &format!("{path}/minimum"),
                "on a number, only `minimum = 0` can be enforced by a grammar (on an \
                 integer any bound can)",
            ),
        }
    }
}

/// `properties`, when the schema has them.
fn properties<'s>(
    obj: &'s Map<String, Value>,
    path: &str,
) -> Result<Option<&'s Map<String, Value>>, GrammarError> {
    match obj.get("properties") {
        None => Ok(None),
        Some(Value::Object(p)) => Ok(Some(p)),
        Some(_) => fail(
            &format!("{path}/properties"),
            "`properties` must be an object",
        ),
    }
}

/// `required`: names that must each be in `properties` (the grammar needs their type).
fn required<'s>(
    obj: &'s Map<String, Value>,
    props: &Map<String, Value>,
    path: &str,
) -> Result<Vec<&'s str>, GrammarError> {
    let required: Vec<&str> = match obj.get("required") {
        None => Vec::new(),
        Some(Value::Array(r)) => r.iter().filter_map(Value::as_str).collect(),
        Some(_) => return fail(&format!("{path}/required"), "`required` must be a list"),
    };
    for r in &required {
        if !props.contains_key(*r) {
            return fail(
                &format!("{path}/required"),
                format!("`{r}` is required but not in `properties`: the grammar would not know its type"),
            );
        }
    }
    Ok(required)
}

/// What the object holds between its braces: the first property written is some j before
/// which every property is optional, then its tail; nothing at all when every property is.
fn members(kvs: &[(String, bool)], tail: &[String]) -> String {
    let mut firsts = Vec::new();
    let mut all_optional = true;
    for (j, (kv, req)) in kvs.iter().enumerate() {
        let tail = &tail[j];
        firsts.push(if tail.is_empty() {
            kv.clone()
        } else {
            format!("{kv} {tail}")
        });
        if *req {
            all_optional = false;
            break;
        }
    }
    let members = if firsts.len() == 1 {
        firsts.pop().expect("one")
    } else {
        format!("({})", firsts.join(" | "))
    };
    let opt = if all_optional { "?" } else { "" };
    if opt.is_empty() {
        members
    } else if members.starts_with('(') {
        format!("{members}?")
    } else {
        format!("({members})?")
    }
}

/// A non-negative count keyword (`minLength`, `maxItems`, …).
fn count(obj: &Map<String, Value>, key: &str, path: &str) -> Result<Option<u64>, GrammarError> {
    match obj.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .or_else(|| {
                v.as_f64()
                    .filter(|f| *f >= 0.0 && f.fract() == 0.0)
                    .map(|f| f as u64)
            })
            .map(Some)
            .ok_or_else(|| GrammarError {
                path: format!("{path}/{key}"),
                message: format!("`{key}` must be a non-negative integer"),
            }),
    }
}

/// `{lo,hi}` in GBNF (`*`, `+` where they say it).
fn repeat(lo: u64, hi: Option<u64>, path: &str, key: &str) -> Result<String, GrammarError> {
    if lo > MAX_REPEAT || hi.is_some_and(|h| h > MAX_REPEAT) {
        return fail(
            &format!("{path}/{key}"),
            format!("more than {MAX_REPEAT} is too many for a grammar; use a smaller bound"),
        );
    }
    Ok(match (lo, hi) {
        (0, None) => "*".into(),
        (1, None) => "+".into(),
        (l, None) => format!("{{{l},}}"),
        (l, Some(h)) if l == h => format!("{{{l}}}"),
        (l, Some(h)) => format!("{{{l},{h}}}"),
    })
}

/// `~` and `/` in a key, for a JSON Pointer.
fn escape_pointer(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}
