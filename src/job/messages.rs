//! `[[messages]]` → `MessageSpec`: each message's role, name, text source and images, checked,
//! and the template folders a template is looked up in.

use std::path::{Path, PathBuf};

use super::raw::RawMessage;
use super::JobFile;
use crate::chat::{Detail, Role};
use crate::error::Error;

/// Where a message's text comes from.
#[derive(Debug, Clone)]
pub enum MessageSource {
    /// A template file's name as registered in Tera (its path under a template folder).
    Template(String),
    Inline(String),
    /// Not one message but every message of the array this row field holds (`from`).
    Field(String),
}

#[derive(Debug, Clone)]
pub struct MessageSpec {
    /// The templated message's role; a `Field` source's messages carry their own (this is
    /// then `User` and unused).
    pub role: Role,
    pub name: Option<String>,
    pub source: MessageSource,
    /// Inline Tera templates of the message's images (https URLs or file paths).
    pub images: Vec<String>,
    pub image_detail: Option<Detail>,
}

/// Every `[[messages]]` entry, checked in order; a job needs at least one.
pub(super) fn specs(jf: &JobFile, raw: Vec<RawMessage>) -> Result<Vec<MessageSpec>, Error> {
    if raw.is_empty() {
        return Err(jf.bad("messages", "the job has no [[messages]]".into()));
    }
    raw.into_iter()
        .enumerate()
        .map(|(i, m)| spec(jf, &format!("messages[{i}]"), m))
        .collect()
}

/// One message; `field` (`messages[i]`) names it in errors.
fn spec(jf: &JobFile, field: &str, mut m: RawMessage) -> Result<MessageSpec, Error> {
    if let Some(from) = m.from.take() {
        return from_field(jf, field, from, &m);
    }
    let Some(role) = m.role else {
        return Err(jf.bad(
            &format!("{field}.role"),
            "needs a `role` (system, developer, user, assistant), or `from` to insert \
             a row field's messages"
                .into(),
        ));
    };
    let images = m.images.unwrap_or_default();
    if !images.is_empty() && role != Role::User {
        return Err(jf.bad(
            &format!("{field}.images"),
            format!(
                "images go in user messages; the API takes none in a {} message",
                role.as_str()
            ),
        ));
    }
    if m.image_detail.is_some() && images.is_empty() {
        return Err(jf.bad(
            &format!("{field}.image_detail"),
            "sets how images are looked at, and the message has no `images`".into(),
        ));
    }
    let source = text_source(jf, field, m.template, m.content, !images.is_empty())?;
    if let Some(name) = &m.name {
        if !crate::chat::is_name(name) {
            return Err(jf.bad(
                &format!("{field}.name"),
                "a message name is 1 to 64 letters, digits, `_` or `-`".into(),
            ));
        }
    }
    Ok(MessageSpec {
        role,
        name: m.name,
        source,
        images,
        image_detail: m.image_detail,
    })
}

/// A `from` message: the row field's messages as they are, so it takes nothing else.
fn from_field(
    jf: &JobFile,
    field: &str,
    from: String,
    m: &RawMessage,
) -> Result<MessageSpec, Error> {
    let also = [
        ("role", m.role.is_some()),
        ("name", m.name.is_some()),
        ("template", m.template.is_some()),
        ("content", m.content.is_some()),
        ("images", m.images.is_some()),
        ("image_detail", m.image_detail.is_some()),
    ];
    if let Some((key, _)) = also.iter().find(|(_, set)| *set) {
        return Err(jf.bad(
            &format!("{field}.{key}"),
            "a `from` message inserts the row's messages as they are: it takes no \
             role, name, template, content or images"
                .into(),
        ));
    }
    if from.is_empty() {
        return Err(jf.bad(
            &format!("{field}.from"),
            "names the row field that holds the messages".into(),
        ));
    }
    Ok(MessageSpec {
        role: Role::User,
        name: None,
        source: MessageSource::Field(from),
        images: Vec::new(),
        image_detail: None,
    })
}

/// A templated message's text: a template file or inline content, one of the two.
fn text_source(
    jf: &JobFile,
    field: &str,
    template: Option<String>,
    content: Option<String>,
    has_images: bool,
) -> Result<MessageSource, Error> {
    match (template, content) {
        (Some(t), None) if crate::store::is_url(&t) => {
            // Fetched with its folder by `store_template_dirs`; known by its file name there.
            let name = t.rsplit('/').next().unwrap_or_default();
            Ok(MessageSource::Template(name.to_string()))
        }
        (Some(t), None) => {
            let tp = Path::new(&t);
            if tp.is_absolute()
                || tp
                    .components()
                    .any(|c| c == std::path::Component::ParentDir)
            {
                return Err(jf.bad(
                    &format!("{field}.template"),
                    format!("template `{t}` must be a relative path inside a template folder"),
                ));
            }
            Ok(MessageSource::Template(t.replace('\\', "/")))
        }
        (None, Some(c)) => Ok(MessageSource::Inline(c)),
        (Some(_), Some(_)) => Err(jf.bad(
            field,
            "give either `template` or `content`, not both".into(),
        )),
        // An image needs no words beside it.
        (None, None) if has_images => Ok(MessageSource::Inline(String::new())),
        (None, None) => Err(jf.bad(field, "needs `template`, `content` or `from`".into())),
    }
}

/// The folders of templates named by object-store URL (`s3://b/templates/blog.tera`): each
/// folder fetched whole (so `{% include %}` finds its neighbours) and searched first.
pub(super) fn store_template_dirs(jf: &JobFile, names: &[String]) -> Result<Vec<PathBuf>, Error> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for t in names.iter().filter(|t| crate::store::is_url(t)) {
        let folder = match t.rsplit_once('/') {
            Some((dir, _)) => format!("{dir}/"),
            None => continue,
        };
        let local = if let Some(path) = folder.strip_prefix("file://") {
            PathBuf::from(path)
        } else {
            crate::store::stage::fetch_many(&folder)
                .map_err(|e| jf.bad("messages.template", e.to_string()))?
        };
        if !dirs.contains(&local) {
            dirs.push(local);
        }
    }
    Ok(dirs)
}

/// Template folders: the job's own, then the project's (beside jobs/, then the working folder).
pub(super) fn template_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut template_dirs: Vec<PathBuf> = Vec::new();
    for cand in [
        dir.join("templates"),
        dir.join("..").join("templates"),
        PathBuf::from("templates"),
    ] {
        if cand.is_dir() {
            let canon = cand.canonicalize().unwrap_or(cand);
            if !template_dirs.contains(&canon) {
                template_dirs.push(canon);
            }
        }
    }
    template_dirs
}

#[cfg(test)]
mod tests {
    use super::super::tests::{field_of, with_messages};
    use super::*;
    use crate::job::model::TEXT_ONLY_MODEL;

    #[test]
    fn from_and_images_are_checked_where_the_job_loads() {
        let ok = with_messages(
            "[[messages]]\nfrom = \"chat\"\n[[messages]]\nrole = \"user\"\n\
             images = [\"{{ p }}\"]\nimage_detail = \"low\"",
            "name = \"m\"",
        )
        .unwrap();
        assert!(matches!(&ok.messages[0].source, MessageSource::Field(f) if f == "chat"));
        assert_eq!(ok.messages[1].images, ["{{ p }}"]);
        assert_eq!(ok.messages[1].image_detail, Some(Detail::Low));
        let cases = [
            ("from = \"chat\"\nrole = \"user\"", "m", "messages[0].role"),
            (
                "from = \"chat\"\nimages = [\"x\"]",
                "m",
                "messages[0].images",
            ),
            ("from = \"\"", "m", "messages[0].from"),
            ("content = \"x\"", "m", "messages[0].role"),
            ("role = \"user\"", "m", "messages[0]"),
            (
                "role = \"system\"\nimages = [\"x\"]",
                "m",
                "messages[0].images",
            ),
            (
                "role = \"user\"\ncontent = \"x\"\nimage_detail = \"low\"",
                "m",
                "messages[0].image_detail",
            ),
        ];
        for (m, name, field) in cases {
            let e = with_messages(&format!("[[messages]]\n{m}"), &format!("name = \"{name}\""))
                .expect_err(m);
            assert_eq!(field_of(e), field, "{m}");
        }
        let local = with_messages(
            "[[messages]]\nrole = \"user\"\nimages = [\"x.png\"]",
            "provider = \"local\"\npath = \"m.gguf\"",
        );
        match local {
            Err(Error::Job { field, message, .. }) => {
                assert_eq!(field, "messages[0].images");
                assert_eq!(message, TEXT_ONLY_MODEL);
            }
            other => panic!("{other:?}"),
        }
    }
}
