//! Whether a completion has the shape the job asks for: JSON that follows its schema, text
//! within its checks. A completion that does not is asked for again (`max_invalid` times);
//! what was wrong is kept, quoted with its path and rule.

use serde_json::{Map, Value};

use serde::Deserialize;

use crate::error::Error;

/// `[output.checks]`: what a plain-text completion must satisfy.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checks {
    pub max_chars: Option<usize>,
    pub min_chars: Option<usize>,
    pub max_words: Option<usize>,
    pub must_match: Option<String>,
    pub must_not_match: Option<String>,
    /// Each a Tera template over the row (`"{{ name }}"`) or a literal.
    #[serde(default)]
    pub must_contain: Vec<String>,
}

/// Validated `[output]` shape: the schema, the checks, and how often to ask again.
#[derive(Debug, Clone, Default)]
pub struct OutputShape {
    /// (name, schema) when the job has one.
    pub schema: Option<(String, serde_json::Value)>,
    /// JSON without a schema (`response_format = "json_object"`).
    pub json_object: bool,
    pub checks: Checks,
    pub max_invalid: u32,
}

impl OutputShape {
    pub fn is_empty(&self) -> bool {
        self.schema.is_none()
            && !self.json_object
            && self.checks.max_chars.is_none()
            && self.checks.min_chars.is_none()
            && self.checks.max_words.is_none()
            && self.checks.must_match.is_none()
            && self.checks.must_not_match.is_none()
            && self.checks.must_contain.is_empty()
    }
}

/// A job's shape, compiled once.
pub struct Shape {
    validator: Option<jsonschema::Validator>,
    json: bool,
    max_chars: Option<usize>,
    min_chars: Option<usize>,
    max_words: Option<usize>,
    must_match: Option<regex::Regex>,
    must_not_match: Option<regex::Regex>,
    /// `must_contain` entries, as templates named by their index.
    must_contain: Option<(tera::Tera, usize)>,
    pub max_invalid: u32,
}

/// What one choice is worth.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Fine; the parsed JSON when the job asks for JSON.
    Ok(Option<Value>),
    /// The model refused: not asked again.
    Refused(String),
    /// Broke the schema or a check: each problem with its path or check.
    Invalid(Vec<String>),
}

impl Shape {
    /// `None` when the job asks for nothing in particular.
    pub fn of(shape: &OutputShape, job_file: &std::path::Path) -> Result<Option<Shape>, Error> {
        Shape::compile(shape).map_err(|(field, message)| Error::Job {
            path: job_file.to_path_buf(),
            field,
            message,
        })
    }

    /// Compiles the schema, the regexes and the `must_contain` templates; an error names the
    /// job field and says what is wrong. The one place they are compiled: the job's load
    /// calls it too, to refuse a bad one before anything runs.
    pub fn compile(s: &OutputShape) -> Result<Option<Shape>, (String, String)> {
        if s.is_empty() {
            return Ok(None);
        }
        let bad = |field: &str, m: String| (field.to_string(), m);
        let validator = match &s.schema {
            Some((_, v)) => Some(
                jsonschema::validator_for(v)
                    .map_err(|e| bad("output.schema", format!("not a valid JSON Schema: {e}")))?,
            ),
            None => None,
        };
        let re = |field: &str, r: &Option<String>| {
            r.as_deref()
                .map(|r| regex::Regex::new(r).map_err(|e| bad(field, e.to_string())))
                .transpose()
        };
        let c = &s.checks;
        let must_contain = if c.must_contain.is_empty() {
            None
        } else {
            let mut t = tera::Tera::default();
            t.autoescape_on(vec![]);
            for (i, src) in c.must_contain.iter().enumerate() {
                t.add_raw_template(&i.to_string(), src)
                    .map_err(|e| bad(&format!("output.checks.must_contain[{i}]"), e.to_string()))?;
            }
            Some((t, c.must_contain.len()))
        };
        Ok(Some(Shape {
            json: validator.is_some() || s.json_object,
            validator,
            max_chars: c.max_chars,
            min_chars: c.min_chars,
            max_words: c.max_words,
            must_match: re("output.checks.must_match", &c.must_match)?,
            must_not_match: re("output.checks.must_not_match", &c.must_not_match)?,
            must_contain,
            max_invalid: s.max_invalid,
        }))
    }

    /// Judges one choice of a row's completion.
    pub fn judge(&self, text: &str, refusal: Option<&str>, row: &Map<String, Value>) -> Verdict {
        if let Some(r) = refusal {
            return Verdict::Refused(r.to_string());
        }
        let mut problems = Vec::new();
        let mut data = None;
        if self.json {
            match serde_json::from_str::<Value>(text) {
                Err(e) => problems.push(format!("not valid JSON: {e}")),
                Ok(v) => {
                    // The common case first: `is_valid` stops early and builds no errors.
                    if let Some(val) = self.validator.as_ref().filter(|val| !val.is_valid(&v)) {
                        for e in val.iter_errors(&v).take(5) {
                            let at = e.instance_path().to_string();
                            let at = if at.is_empty() { "/".to_string() } else { at };
                            problems.push(format!("{at}: {e} (schema rule {})", e.schema_path()));
                        }
                    }
                    data = Some(v);
                }
            }
        }
        let chars = text.chars().count();
        if let Some(m) = self.max_chars.filter(|&m| chars > m) {
            problems.push(format!("max_chars: {chars} characters, at most {m}"));
        }
        if let Some(m) = self.min_chars.filter(|&m| chars < m) {
            problems.push(format!("min_chars: {chars} characters, at least {m}"));
        }
        if let Some(m) = self.max_words {
            let words = text.split_whitespace().count();
            if words > m {
                problems.push(format!("max_words: {words} words, at most {m}"));
            }
        }
        if let Some(re) = &self.must_match {
            if !re.is_match(text) {
                problems.push(format!("must_match: does not match /{}/", re.as_str()));
            }
        }
        if let Some(re) = &self.must_not_match {
            if let Some(m) = re.find(text) {
                problems.push(format!(
                    "must_not_match: matches /{}/ at `{}`",
                    re.as_str(),
                    m.as_str()
                ));
            }
        }
        if let Some((tera, n)) = &self.must_contain {
            let ctx = tera::Context::from_value(Value::Object(row.clone())).unwrap_or_default();
            for i in 0..*n {
                match tera.render(&i.to_string(), &ctx) {
                    Ok(needle) if needle.is_empty() || text.contains(&needle) => {}
                    Ok(needle) => problems.push(format!("must_contain: `{needle}` is missing")),
                    Err(e) => problems.push(format!("must_contain[{i}]: {e}")),
                }
            }
        }
        if problems.is_empty() {
            Verdict::Ok(data)
        } else {
            Verdict::Invalid(problems)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(toml_output: &str) -> Shape {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("in.csv"), "name\nx\n").unwrap();
        let job = dir.path().join("j.toml");
        std::fs::write(
            &job,
            format!(
                "[input]\npath = \"in.csv\"\n[[messages]]\nrole = \"user\"\ncontent = \"{{{{ name }}}}\"\n\
                 [model]\nname = \"gpt-4o-mini\"\nbase_url = \"http://127.0.0.1:9/v1\"\n\
                 [output]\npath = \"o.jsonl\"\n{toml_output}\n"
            ),
        )
        .unwrap();
        let job = crate::job::Job::load(&job, &Default::default()).unwrap();
        Shape::of(&job.shape, &job.file).unwrap().unwrap()
    }

    fn row(name: &str) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("name".into(), Value::String(name.into()));
        m
    }

    #[test]
    fn schema_problems_name_the_path_and_the_rule() {
        let s = shape(
            "[output.schema]\ntype = \"object\"\nrequired = [\"headline\"]\n\
             [output.schema.properties.headline]\ntype = \"string\"\nmaxLength = 5\n",
        );
        assert!(matches!(
            s.judge(r#"{"headline":"Hi"}"#, None, &row("x")),
            Verdict::Ok(Some(_))
        ));
        match s.judge(r#"{"headline":"Too long"}"#, None, &row("x")) {
            Verdict::Invalid(p) => {
                assert!(p[0].contains("/headline"), "{p:?}");
                assert!(p[0].contains("maxLength"), "{p:?}");
            }
            v => panic!("{v:?}"),
        }
        assert!(matches!(s.judge("{", None, &row("x")), Verdict::Invalid(_)));
        assert!(matches!(
            s.judge("", Some("no"), &row("x")),
            Verdict::Refused(_)
        ));
    }

    #[test]
    fn checks_on_text() {
        let s = shape(
            "[output.checks]\nmax_chars = 30\nmin_chars = 3\nmax_words = 4\nmust_match = \"^[A-Z]\"\n\
             must_not_match = \"(?i)free\"\nmust_contain = [\"{{ name }}\"]\n",
        );
        assert_eq!(s.judge("Acme shoes", None, &row("Acme")), Verdict::Ok(None));
        let Verdict::Invalid(p) = s.judge("get free acme shoes now, really", None, &row("Acme"))
        else {
            panic!()
        };
        let all = p.join("; ");
        for want in [
            "max_chars",
            "max_words",
            "must_match",
            "must_not_match",
            "must_contain",
        ] {
            assert!(all.contains(want), "{want}: {all}");
        }
    }
}
