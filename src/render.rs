//! Tera templates, loaded once per run: a row's fields → the job's chat messages.
//! Templates see only the row; `get_env` is replaced so no environment value (the API key
//! included) can reach a prompt, and only files under the template folders are loaded.
//! What is not template text (a row's own messages array, image files and URLs) is read by
//! `content`.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use tera::ast::{Expr, ExprVal, FunctionCall, LogicExpr, LogicOperator, MacroDefinition, Node};
use tera::{Context, Tera};

use crate::chat::{Content, Message, Part};
use crate::error::Error;
use crate::job::{Job, MessageSource, MessageSpec};

/// Template file extensions picked up from the template folders.
const EXTENSIONS: &[&str] = &["tera", "j2", "jinja", "txt", "md", "html", "prompt"];

pub struct Renderer {
    tera: Tera,
    /// The job's `[[messages]]`, in order.
    messages: Vec<Compiled>,
    /// Where relative image paths start: the input file's folder.
    image_dir: PathBuf,
}

/// One `[[messages]]` entry, ready to render.
enum Compiled {
    Templated {
        /// Its role, name and image detail.
        spec: MessageSpec,
        /// The Tera template that renders its text.
        template: String,
        /// The Tera templates that render its images' URLs or paths, in order.
        images: Vec<String>,
    },
    /// `from = "FIELD"`: the messages the row's field holds.
    Field { field: String, index: usize },
}

impl Renderer {
    pub fn new(job: &Job) -> Result<Renderer, Error> {
        let mut tera = Tera::default();
        tera.autoescape_on(vec![]); // prompts are plain text, not HTML
        tera.register_function("get_env", |_: &HashMap<String, Value>| {
            Err(tera::Error::msg(
                "get_env is disabled in promptmill templates",
            ))
        });
        let mut files: Vec<(PathBuf, Option<String>)> = Vec::new();
        let mut seen = BTreeSet::new();
        for dir in &job.template_dirs {
            collect_templates(dir, dir, &mut files, &mut seen)?;
        }
        tera.add_template_files(files)
            .map_err(|e| template_error("templates", e))?;
        let mut messages = Vec::with_capacity(job.messages.len());
        for (i, spec) in job.messages.iter().enumerate() {
            let template = match &spec.source {
                MessageSource::Field(field) => {
                    messages.push(Compiled::Field {
                        field: field.clone(),
                        index: i,
                    });
                    continue;
                }
                MessageSource::Template(t) => {
                    if !tera.get_template_names().any(|n| n == t) {
                        let folders: Vec<String> = job
                            .template_dirs
                            .iter()
                            .map(|d| d.display().to_string())
                            .collect();
                        return Err(Error::Job {
                            path: job.file.clone(),
                            field: format!("messages[{i}].template"),
                            message: format!(
                                "template `{t}` not found in the template folders ({})",
                                if folders.is_empty() {
                                    "none exist".to_string()
                                } else {
                                    folders.join(", ")
                                }
                            ),
                        });
                    }
                    t.clone()
                }
                MessageSource::Inline(content) => {
                    let name = format!("{}#messages[{i}].content", job.file.display());
                    tera.add_raw_template(&name, content)
                        .map_err(|e| template_error(&name, e))?;
                    name
                }
            };
            let mut images = Vec::with_capacity(spec.images.len());
            for (j, src) in spec.images.iter().enumerate() {
                let name = format!("{}#messages[{i}].images[{j}]", job.file.display());
                tera.add_raw_template(&name, src)
                    .map_err(|e| template_error(&name, e))?;
                images.push(name);
            }
            messages.push(Compiled::Templated {
                spec: spec.clone(),
                template,
                images,
            });
        }
        // stdin's rows name files from the working folder.
        let image_dir = match job.input.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        Ok(Renderer {
            tera,
            messages,
            image_dir,
        })
    }

    /// Renders one row's messages. The error names the message and the missing field.
    pub fn render(&self, fields: &Map<String, Value>) -> Result<Vec<Message>, String> {
        let ctx = Context::from_value(Value::Object(fields.clone()))
            .map_err(|e| format!("cannot use the row as template context: {e}"))?;
        let mut out = Vec::with_capacity(self.messages.len());
        for m in &self.messages {
            let (spec, template, images) = match m {
                Compiled::Templated {
                    spec,
                    template,
                    images,
                } => (spec, template, images),
                Compiled::Field { field, index } => {
                    let msgs = crate::content::conversation(field, fields.get(field))
                        .map_err(|e| format!("messages[{index}].from: {e}"))?;
                    out.extend(msgs);
                    continue;
                }
            };
            let text = self
                .tera
                .render(template, &ctx)
                .map_err(|e| render_error(template, &e))?;
            // Text alone stays a plain string: the request is byte for byte what it was
            // before messages could hold images.
            let content = if images.is_empty() {
                Content::Text(text)
            } else {
                let mut parts = Vec::with_capacity(images.len() + 1);
                if !text.is_empty() {
                    parts.push(Part::Text { text });
                }
                for name in images {
                    let src = self
                        .tera
                        .render(name, &ctx)
                        .map_err(|e| render_error(name, &e))?;
                    let image_url =
                        crate::content::image(src.trim(), &self.image_dir, spec.image_detail)
                            .map_err(|e| format!("template {name}: {e}"))?;
                    parts.push(Part::ImageUrl { image_url });
                }
                Content::Parts(parts)
            };
            out.push(Message {
                role: spec.role,
                name: spec.name.clone(),
                content,
            });
        }
        Ok(out)
    }

    /// Every row field a `from` message reads, each with the message that reads it.
    pub fn message_fields(&self) -> Vec<(String, String)> {
        self.messages
            .iter()
            .filter_map(|m| match m {
                Compiled::Field { field, index } => {
                    Some((field.clone(), format!("messages[{index}].from")))
                }
                Compiled::Templated { .. } => None,
            })
            .collect()
    }

    /// Every top-level variable the job's messages need from the row (through includes,
    /// macros and parents too), each with the template that reads it. A variable read only
    /// where it may be missing (behind `default(...)`, `x is defined`, a truthy `{% if x %}`)
    /// is optional and not listed.
    pub fn variables(&self) -> Vec<(String, String)> {
        let mut out = BTreeSet::new();
        let mut visited = BTreeSet::new();
        for m in &self.messages {
            if let Compiled::Templated {
                template, images, ..
            } = m
            {
                for name in std::iter::once(template).chain(images) {
                    self.template_vars(name, &mut visited, &mut out);
                }
            }
        }
        out.into_iter().collect()
    }

    fn template_vars(
        &self,
        name: &str,
        visited: &mut BTreeSet<String>,
        out: &mut BTreeSet<(String, String)>,
    ) {
        if !visited.insert(name.to_string()) {
            return;
        }
        let Ok(t) = self.tera.get_template(name) else {
            return;
        };
        let mut scope = Scope::default();
        let mut found = BTreeSet::new();
        let mut includes = Vec::new();
        walk_nodes(&t.ast, &mut scope, &mut found, &mut includes);
        for (_, m) in t.macros.iter() {
            walk_macro(m, &mut found, &mut includes);
        }
        for p in &t.parents {
            includes.push(p.clone());
        }
        for (file, _) in &t.imported_macro_files {
            includes.push(file.clone());
        }
        for v in found {
            out.insert((v, name.to_string()));
        }
        for inc in includes {
            self.template_vars(&inc, visited, out);
        }
    }
}

fn collect_templates(
    root: &Path,
    dir: &Path,
    files: &mut Vec<(PathBuf, Option<String>)>,
    seen: &mut BTreeSet<String>,
) -> Result<(), Error> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::Io {
        path: dir.to_path_buf(),
        source: e,
    })?;
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for p in paths {
        if p.is_dir() {
            collect_templates(root, &p, files, seen)?;
        } else if p
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| EXTENSIONS.contains(&e))
        {
            let rel = p
                .strip_prefix(root)
                .unwrap_or(&p)
                .to_string_lossy()
                .replace('\\', "/");
            // The job's own folder comes first, so its templates shadow the project's.
            if seen.insert(rel.clone()) {
                files.push((p, Some(rel)));
            }
        }
    }
    Ok(())
}

/// Tera's error chain, flattened: the cause says which line and what is wrong.
fn chain(e: &tera::Error) -> String {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

fn template_error(name: &str, e: tera::Error) -> Error {
    Error::Template {
        name: name.to_string(),
        message: chain(&e),
    }
}

fn render_error(name: &str, e: &tera::Error) -> String {
    let full = chain(e);
    // Tera says "Variable `x` not found in context while rendering 'name'": name the field.
    if let Some(start) = full.find("Variable `") {
        let rest = &full[start + 10..];
        if let Some(end) = rest.find('`') {
            return format!(
                "template {name}: field `{}` is missing from the row",
                &rest[..end]
            );
        }
    }
    format!("template {name}: {full}")
}

/// Names a read of which cannot fail for want of a row field.
#[derive(Default, Clone)]
struct Scope {
    /// Bound inside the template (loop variables, `set`, macro arguments): not row fields.
    bound: Vec<String>,
    /// Shown present by an enclosing condition (`x is defined`, a truthy `x`): the row
    /// must have them only where that condition holds, so they are optional.
    guarded: Vec<String>,
}

impl Scope {
    fn has(&self, n: &str) -> bool {
        self.bound.iter().chain(&self.guarded).any(|b| b == n)
            || n == "loop"
            || n == "__tera_context"
    }
}

/// The row field an identifier reads: `a` of `a.b[0]`.
fn root(id: &str) -> &str {
    id.split(['.', '[']).next().unwrap_or(id)
}

/// Names certainly present when the condition `e` evaluates to `value`.
fn proven(e: &Expr, value: bool) -> Vec<String> {
    // `not e` has `value` when `e` has the opposite.
    let value = value != e.negated;
    match &e.val {
        // A missing name reads as false in a condition, so true means present; unless a
        // `default` answers for the missing name.
        ExprVal::Ident(id) if value && !e.has_default_filter() => vec![root(id).to_string()],
        ExprVal::Test(t) => {
            let passed = value != t.negated;
            let present = match t.name.as_str() {
                "defined" => passed,
                "undefined" => !passed,
                _ => false,
            };
            if present {
                vec![root(&t.ident).to_string()]
            } else {
                Vec::new()
            }
        }
        ExprVal::Logic(l) => match (&l.operator, value) {
            // Both sides have the value: what either proves holds.
            (LogicOperator::And, true) | (LogicOperator::Or, false) => {
                let mut v = proven(&l.lhs, value);
                v.extend(proven(&l.rhs, value));
                v
            }
            // Either side may have given the value: only what both prove holds.
            (LogicOperator::And, false) | (LogicOperator::Or, true) => {
                let r = proven(&l.rhs, value);
                proven(&l.lhs, value)
                    .into_iter()
                    .filter(|n| r.contains(n))
                    .collect()
            }
            _ => Vec::new(),
        },
        _ => Vec::new(),
    }
}

fn walk_macro(m: &MacroDefinition, found: &mut BTreeSet<String>, includes: &mut Vec<String>) {
    let mut scope = Scope {
        bound: m.args.keys().cloned().collect(),
        ..Scope::default()
    };
    for e in m.args.values().flatten() {
        walk_expr(e, &scope, found);
    }
    walk_nodes(&m.body, &mut scope, found, includes);
}

fn walk_nodes(
    nodes: &[Node],
    scope: &mut Scope,
    found: &mut BTreeSet<String>,
    includes: &mut Vec<String>,
) {
    for n in nodes {
        match n {
            Node::VariableBlock(_, e) => walk_expr(e, scope, found),
            Node::Set(_, s) => {
                walk_expr(&s.value, scope, found);
                scope.bound.push(s.key.clone());
            }
            Node::FilterSection(_, f, _) => {
                walk_fn(&f.filter, scope, found);
                walk_nodes(&f.body, scope, found, includes);
            }
            Node::Block(_, b, _) => walk_nodes(&b.body, scope, found, includes),
            Node::Forloop(_, f, _) => {
                walk_expr(&f.container, scope, found);
                let mut inner = scope.clone();
                inner.bound.push(f.value.clone());
                if let Some(k) = &f.key {
                    inner.bound.push(k.clone());
                }
                walk_nodes(&f.body, &mut inner, found, includes);
                if let Some(e) = &f.empty_body {
                    walk_nodes(e, scope, found, includes);
                }
            }
            Node::If(i, _) => {
                // A branch runs when its condition is true and every earlier one was false.
                let outer = scope.guarded.len();
                for (_, cond, body) in &i.conditions {
                    walk_cond(cond, scope, found);
                    let before = scope.guarded.len();
                    scope.guarded.extend(proven(cond, true));
                    walk_nodes(body, scope, found, includes);
                    scope.guarded.truncate(before);
                    scope.guarded.extend(proven(cond, false));
                }
                if let Some((_, body)) = &i.otherwise {
                    walk_nodes(body, scope, found, includes);
                }
                scope.guarded.truncate(outer);
            }
            Node::Include(_, names, _) => includes.extend(names.iter().cloned()),
            _ => {}
        }
    }
}

fn walk_call(args: &HashMap<String, Expr>, scope: &Scope, found: &mut BTreeSet<String>) {
    for e in args.values() {
        walk_expr(e, scope, found);
    }
}

fn walk_fn(f: &FunctionCall, scope: &Scope, found: &mut BTreeSet<String>) {
    walk_call(&f.args, scope, found);
}

/// An expression Tera reads as a condition (an `if`, a side of `and`/`or`), where a missing
/// name is false instead of an error.
fn walk_cond(e: &Expr, scope: &Scope, found: &mut BTreeSet<String>) {
    match &e.val {
        ExprVal::Ident(_) => {
            for f in &e.filters {
                walk_fn(f, scope, found);
            }
        }
        _ => walk_expr(e, scope, found),
    }
}

/// Both sides of `and`/`or`, which Tera reads as conditions.
fn walk_and_or(l: &LogicExpr, scope: &Scope, found: &mut BTreeSet<String>) {
    walk_cond(&l.lhs, scope, found);
    // `and` reads its right side only when the left is true, `or` only when it is false.
    let mut right = scope.clone();
    right
        .guarded
        .extend(proven(&l.lhs, matches!(l.operator, LogicOperator::And)));
    walk_cond(&l.rhs, &right, found);
}

fn walk_expr(e: &Expr, scope: &Scope, found: &mut BTreeSet<String>) {
    for f in &e.filters {
        walk_fn(f, scope, found);
    }
    match &e.val {
        // A `default` first in line stands in for a missing field, and `not x` of a missing
        // `x` is true: neither requires the field. (A later `default` does not help: Tera
        // fails on the lookup first.)
        ExprVal::Ident(id) if !(e.negated || e.has_default_filter() || scope.has(root(id))) => {
            found.insert(root(id).to_string());
        }
        ExprVal::Math(m) => {
            walk_expr(&m.lhs, scope, found);
            walk_expr(&m.rhs, scope, found);
        }
        ExprVal::Logic(l) if matches!(l.operator, LogicOperator::And | LogicOperator::Or) => {
            walk_and_or(l, scope, found)
        }
        ExprVal::Logic(l) => {
            walk_expr(&l.lhs, scope, found);
            walk_expr(&l.rhs, scope, found);
        }
        ExprVal::Test(t) => {
            // `x is defined` asks whether the field exists: it does not require it.
            if t.name != "defined" && t.name != "undefined" && !scope.has(root(&t.ident)) {
                found.insert(root(&t.ident).to_string());
            }
            for a in &t.args {
                walk_expr(a, scope, found);
            }
        }
        ExprVal::MacroCall(m) => walk_call(&m.args, scope, found),
        ExprVal::FunctionCall(f) => walk_fn(f, scope, found),
        ExprVal::Array(a) => a.iter().for_each(|x| walk_expr(x, scope, found)),
        ExprVal::StringConcat(s) => {
            for v in &s.values {
                if let ExprVal::Ident(id) = v {
                    if !scope.has(root(id)) {
                        found.insert(root(id).to_string());
                    }
                }
            }
        }
        ExprVal::In(i) => {
            walk_expr(&i.lhs, scope, found);
            walk_expr(&i.rhs, scope, found);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::Role;

    fn renderer(src: &str) -> Renderer {
        let mut tera = Tera::default();
        tera.add_raw_template("t", src).unwrap();
        let spec = MessageSpec {
            role: Role::User,
            name: None,
            source: MessageSource::Inline(src.into()),
            images: Vec::new(),
            image_detail: None,
        };
        Renderer {
            tera,
            messages: vec![Compiled::Templated {
                spec,
                template: "t".into(),
                images: Vec::new(),
            }],
            image_dir: PathBuf::from("."),
        }
    }

    /// `src` needs exactly `want` from the row, and a row of just those fields renders: the
    /// walk agrees with what Tera does.
    fn needs(src: &str, want: &[&str]) {
        let r = renderer(src);
        let got: Vec<String> = r.variables().into_iter().map(|(v, _)| v).collect();
        assert_eq!(got, want, "{src}");
        let row: Map<String, Value> = want
            .iter()
            .map(|v| (v.to_string(), Value::from("v")))
            .collect();
        if let Err(e) = r.render(&row) {
            panic!("{src}: a row of {want:?} does not render: {e}");
        }
    }

    #[test]
    fn a_field_with_a_default_is_optional() {
        // The project's own jobs/translate.toml template, which validate used to refuse.
        needs(
            "Translate into {{ language | default(value=\"French\") }}.\n\n{{ text }}",
            &["text"],
        );
        needs("{{ tags.first | default(value=\"\") }}", &[]);
        needs(
            "{% for t in tags | default(value=[]) %}{{ t }}{% endfor %}",
            &[],
        );
        needs(
            "{% set tone = tone | default(value=\"neutral\") %}{{ tone }}",
            &[],
        );
    }

    #[test]
    fn a_default_after_another_filter_does_not_make_a_field_optional() {
        needs("{{ tone | upper | default(value=\"x\") }}", &["tone"]);
        // Tera looks the field up before any filter, so the row really needs it.
        assert!(renderer("{{ tone | upper | default(value=\"x\") }}")
            .render(&Map::new())
            .is_err());
        // The fallback itself is read when the field is missing.
        needs("{{ title | default(value=name) }}", &["name"]);
    }

    #[test]
    fn a_field_read_under_is_defined_is_optional() {
        needs(
            "{% if tone is defined %}Tone: {{ tone | upper }}.{% endif %}{{ text }}",
            &["text"],
        );
        needs(
            "{% if tone is defined and tone != \"\" %}{{ tone }}{% endif %}",
            &[],
        );
        needs(
            "{% if tone is undefined %}neutral{% else %}{{ tone }}{% endif %}",
            &[],
        );
        needs(
            "{% if a is not defined %}-{% elif a == \"y\" %}yes{% else %}{{ a }}{% endif %}",
            &[],
        );
        needs(
            "{% if not (a is defined) %}-{% else %}{{ a }}{% endif %}",
            &[],
        );
        needs(
            "{% if a is undefined or a == \"\" %}-{% else %}{{ a }}{% endif %}",
            &[],
        );
        needs(
            "{% if user.name is defined %}{{ user.name }}{% endif %}",
            &[],
        );
        needs(
            "{% if a is defined %}{% if b is defined %}{{ a }}{{ b }}{% endif %}{% endif %}",
            &[],
        );
    }

    #[test]
    fn a_truthy_test_of_a_missing_field_is_false_not_an_error() {
        needs("{% if notes %}Notes: {{ notes }}{% endif %}", &[]);
        needs(
            "{% if not notes %}none{% else %}{{ notes }}{% endif %}",
            &[],
        );
        needs("{% if notes | length %}{{ notes }}{% endif %}", &[]);
    }

    #[test]
    fn required_fields_are_still_reported() {
        // Outside the guarded branch, or after it.
        needs("{% if tone is defined %}{% endif %}{{ tone }}", &["tone"]);
        // A comparison reads the field; so does a test other than defined.
        needs("{% if x == \"a\" %}{{ y }}{% endif %}", &["x", "y"]);
        needs("{% if x is containing(\"a\") %}!{% endif %}", &["x"]);
        // Either side of `or` may be the defined one: neither is proven.
        needs(
            "{% if a is defined or b is defined %}{{ a }}{% endif %}",
            &["a"],
        );
        // `is defined` on one field guards only that field.
        needs("{% if a is defined %}{{ b }}{% endif %}", &["b"]);
        // A branch after a true `is defined` learns nothing.
        needs("{% if a is defined %}-{% else %}{{ a }}{% endif %}", &["a"]);
    }
}
