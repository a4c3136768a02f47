//! What a message holds besides template text: a row's own messages array (`from = "FIELD"`),
//! and images (https URLs, or files sent as base64 data URLs) as `image_url` parts.
//! Every error here is the row's, never the job's: the text says what is wrong with which
//! element or path, and the renderer adds the message, the builder the file and row.

use std::path::Path;

use base64::Engine as _;
use serde_json::Value;

use crate::chat::{is_name, Content, Detail, ImageUrl, Message, Part, Role};
use crate::input::json_kind;

/// The messages a row field holds: a JSON array (a JSONL field), or the JSON text of one (a
/// CSV cell, or a JSONL string). Each element is `{role, content, name?}`, with role system,
/// user or assistant and content a string or an array of parts.
pub fn conversation(field: &str, value: Option<&Value>) -> Result<Vec<Message>, String> {
    let parsed;
    let items = match value {
        None => return Err(format!("field `{field}` is missing from the row")),
        Some(Value::Array(a)) => a,
        Some(Value::String(s)) => {
            parsed = serde_json::from_str::<Value>(s).map_err(|e| {
                format!(
                    "field `{field}` is not a JSON array of messages ({e}): {}",
                    clip(s)
                )
            })?;
            match &parsed {
                Value::Array(a) => a,
                other => {
                    return Err(format!(
                        "field `{field}` holds {}, not an array of messages",
                        json_kind(other)
                    ))
                }
            }
        }
        Some(other) => {
            return Err(format!(
                "field `{field}` is {}, not an array of messages",
                json_kind(other)
            ))
        }
    };
    if items.is_empty() {
        return Err(format!(
            "field `{field}` holds no messages (an empty array)"
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, v)| message(v).map_err(|e| format!("field `{field}`, message [{i}]: {e}")))
        .collect()
}

fn message(v: &Value) -> Result<Message, String> {
    let Value::Object(m) = v else {
        return Err(format!(
            "is {}, not an object {{role, content}}",
            json_kind(v)
        ));
    };
    if let Some(k) = m
        .keys()
        .find(|k| !matches!(k.as_str(), "role" | "content" | "name"))
    {
        return Err(format!(
            "has `{k}`; a message takes `role`, `content` and `name` only"
        ));
    }
    let role = match m.get("role") {
        Some(Value::String(r)) => match r.as_str() {
            "system" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            _ => return Err(format!("role `{r}` is not system, user or assistant")),
        },
        None => return Err("has no `role`".into()),
        Some(other) => return Err(format!("role is {}, not a string", json_kind(other))),
    };
    let name = match m.get("name") {
        None | Some(Value::Null) => None,
        Some(Value::String(n)) if is_name(n) => Some(n.clone()),
        Some(_) => return Err("`name` is not 1 to 64 letters, digits, `_` or `-`".into()),
    };
    let content = match m.get("content") {
        Some(Value::String(s)) => Content::Text(s.clone()),
        Some(Value::Array(parts)) if parts.is_empty() => {
            return Err("content is an empty array".into())
        }
        Some(Value::Array(parts)) => Content::Parts(
            parts
                .iter()
                .enumerate()
                .map(|(j, p)| part(p).map_err(|e| format!("content part [{j}]: {e}")))
                .collect::<Result<_, _>>()?,
        ),
        None | Some(Value::Null) => return Err("has no `content`".into()),
        Some(other) => {
            return Err(format!(
                "content is {}, not a string or an array of parts",
                json_kind(other)
            ))
        }
    };
    if role != Role::User && content.has_images() {
        return Err(format!(
            "images go in user messages; the API takes none in a {} message",
            role.as_str()
        ));
    }
    Ok(Message {
        role,
        name,
        content,
    })
}

/// One content part of a conversation: `{"type":"text","text":…}` or
/// `{"type":"image_url","image_url":{"url":…,"detail"?:…}}`, the URL https or data.
fn part(v: &Value) -> Result<Part, String> {
    let p: Part = serde_json::from_value(v.clone()).map_err(|e| {
        format!(
            "is not a text part or an image_url part ({e}): {}",
            clip(&v.to_string())
        )
    })?;
    match p {
        Part::Text { text } => Ok(Part::Text { text }),
        Part::ImageUrl { image_url } => {
            let image_url = remote(&image_url.url, image_url.detail)?.ok_or_else(|| {
                format!("`{}` is not an https or data: URL", clip(&image_url.url))
            })?;
            Ok(Part::ImageUrl { image_url })
        }
    }
}

/// An image as its template rendered it: an https URL (sent as is), a data URL, or a file's
/// path (relative to `dir`, the input file's folder) read into a data URL.
pub fn image(src: &str, dir: &Path, detail: Option<Detail>) -> Result<ImageUrl, String> {
    if src.is_empty() {
        return Err("renders to nothing: no image path or URL".into());
    }
    if let Some(img) = remote(src, detail)? {
        return Ok(img);
    }
    let path = dir.join(src);
    let bytes = read_image_file(&path)?;
    let (url, size) = data_url(&bytes).map_err(|e| format!("image `{}`: {e}", path.display()))?;
    Ok(ImageUrl {
        url,
        detail,
        size: Some(size),
    })
}

/// The largest image file read: the API's own limit for an image, 20 MB.
pub const MAX_IMAGE_BYTES: u64 = 20 * 1024 * 1024;

/// An image file's bytes. Only a regular file is read (a row naming `/dev/zero` or a FIFO
/// would grow the process or hang it), and only up to [`MAX_IMAGE_BYTES`].
fn read_image_file(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let cannot = |e: &dyn std::fmt::Display| format!("cannot read image `{}`: {e}", path.display());
    let meta = std::fs::metadata(path).map_err(|e| cannot(&e))?;
    if !meta.is_file() {
        return Err(cannot(&"not a regular file"));
    }
    if meta.len() > MAX_IMAGE_BYTES {
        return Err(cannot(&format_args!(
            "{} bytes, over the limit of {MAX_IMAGE_BYTES} (20 MB)",
            meta.len()
        )));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // Read at most one byte past the limit: a file that grew since is still refused.
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_IMAGE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| cannot(&e))?;
    if bytes.len() as u64 > MAX_IMAGE_BYTES {
        return Err(cannot(&"over the limit of 20 MB"));
    }
    Ok(bytes)
}

/// `Some` for a URL the API fetches or reads itself; `None` for what must be a file path;
/// an error for a URL it cannot take.
fn remote(src: &str, detail: Option<Detail>) -> Result<Option<ImageUrl>, String> {
    let lower = src.get(..8).unwrap_or(src).to_ascii_lowercase();
    if lower.starts_with("https://") {
        return Ok(Some(ImageUrl {
            url: src.to_string(),
            detail,
            // Not fetched: a dry run sends nothing over the network.
            size: None,
        }));
    }
    if lower.starts_with("http://") {
        return Err(format!(
            "`{}`: images are sent by https URL (or as a file); the API does not fetch http://",
            clip(src)
        ));
    }
    if lower.starts_with("data:") {
        let (bytes, declared) = decode_data_url(src)?;
        let (_, size) = data_url(&bytes).map_err(|e| format!("the data URL's image {e}"))?;
        let held = sniff(&bytes).unwrap_or_default();
        if !declared.eq_ignore_ascii_case(held) {
            return Err(format!("a data URL that says {declared} holds an {held}"));
        }
        return Ok(Some(ImageUrl {
            url: src.to_string(),
            detail,
            size: Some(size),
        }));
    }
    // An object on a store (`s3://b/img/1.png`): fetched, within the API's limit.
    if crate::store::is_url(src) && !lower.starts_with("file://") {
        let bytes =
            crate::store::stage::read(src, MAX_IMAGE_BYTES).map_err(|e| format!("image: {e}"))?;
        let (url, size) = data_url(&bytes).map_err(|e| format!("image `{}`: {e}", clip(src)))?;
        return Ok(Some(ImageUrl {
            url,
            detail,
            size: Some(size),
        }));
    }
    // `ftp://…`: not a path either.
    if let Some((scheme, _)) = src.split_once("://") {
        if !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '+')
        {
            return Err(format!(
                "`{}` is not an https URL or a file path",
                clip(src)
            ));
        }
    }
    Ok(None)
}

/// `data:image/png;base64,…` → its bytes and declared type.
fn decode_data_url(src: &str) -> Result<(Vec<u8>, &str), String> {
    let rest = &src[5..];
    let (head, data) = rest
        .split_once(',')
        .ok_or_else(|| "a data URL without `,`".to_string())?;
    let mime = head
        .strip_suffix(";base64")
        .ok_or_else(|| "a data URL that is not base64".to_string())?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|e| format!("a data URL whose base64 does not decode: {e}"))?;
    Ok((bytes, mime))
}

/// A file's bytes → its `data:` URL and dimensions. The type comes from the bytes, never the
/// file's name: only what the API takes (PNG, JPEG, GIF, WebP) passes.
fn data_url(bytes: &[u8]) -> Result<(String, (u32, u32)), String> {
    let mime = sniff(bytes).ok_or_else(|| {
        "is not a PNG, JPEG, GIF or WebP image (the types the API takes)".to_string()
    })?;
    let size = imagesize::blob_size(bytes)
        .map_err(|e| format!("is a {mime} whose size cannot be read: {e}"))?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    let url = format!("data:{mime};base64,{b64}");
    Ok((url, (size.width as u32, size.height as u32)))
}

/// The image type from the file's first bytes.
fn sniff(b: &[u8]) -> Option<&'static str> {
    if b.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if b.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some("image/jpeg")
    } else if b.starts_with(b"GIF87a") || b.starts_with(b"GIF89a") {
        Some("image/gif")
    } else if b.len() >= 12 && &b[..4] == b"RIFF" && &b[8..12] == b"WEBP" {
        Some("image/webp")
    } else {
        None
    }
}

/// The start of a long value, for an error message.
fn clip(s: &str) -> String {
    const MAX: usize = 60;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::{json, Map};

    #[test]
    fn an_image_file_over_the_api_limit_is_refused_before_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.png");
        // Sparse: the size says 20 MB and one byte, nothing is written.
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_IMAGE_BYTES + 1)
            .unwrap();
        let e = image("big.png", dir.path(), None).unwrap_err();
        assert!(e.contains("over the limit"), "{e}");
        assert!(e.contains("big.png"), "{e}");
    }

    fn row(pairs: &[(&str, Value)]) -> Map<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    /// A 3×2 PNG (one IHDR is all a header read needs).
    pub(crate) fn png(w: u32, h: u32) -> Vec<u8> {
        let mut b = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        b.extend_from_slice(&w.to_be_bytes());
        b.extend_from_slice(&h.to_be_bytes());
        b.extend_from_slice(&[8, 6, 0, 0, 0, 0, 0, 0, 0]);
        b
    }

    #[test]
    fn a_conversation_is_an_array_or_its_json_text() {
        let arr = json!([
            {"role": "system", "content": "s"},
            {"role": "user", "name": "ann", "content": "u"},
            {"role": "assistant", "content": [{"type": "text", "text": "a"}]}
        ]);
        let from_array = conversation("c", Some(&arr)).unwrap();
        let from_text = conversation("c", Some(&Value::String(arr.to_string()))).unwrap();
        assert_eq!(from_array, from_text);
        assert_eq!(from_array.len(), 3);
        assert_eq!(from_array[1].name.as_deref(), Some("ann"));
        assert_eq!(
            serde_json::to_value(&from_array).unwrap(),
            arr,
            "sent as written"
        );
    }

    #[test]
    fn a_bad_conversation_says_what_is_wrong_where() {
        let r = row(&[
            ("text", json!("not json")),
            ("obj", json!({"role": "user"})),
            ("empty", json!([])),
            (
                "role",
                json!([{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}]),
            ),
            ("nocontent", json!([{"role": "user"}])),
            (
                "extra",
                json!([{"role": "user", "content": "x", "tool_calls": []}]),
            ),
            (
                "img",
                json!([{"role": "assistant", "content": [
                {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]),
            ),
            (
                "http",
                json!([{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]),
            ),
        ]);
        let cases = [
            ("missing", "field `missing` is missing from the row"),
            ("text", "field `text` is not a JSON array of messages"),
            ("obj", "field `obj` is an object, not an array of messages"),
            ("empty", "holds no messages"),
            (
                "role",
                "field `role`, message [1]: role `tool` is not system, user or assistant",
            ),
            ("nocontent", "message [0]: has no `content`"),
            ("extra", "has `tool_calls`"),
            ("img", "images go in user messages"),
            ("http", "does not fetch http://"),
        ];
        for (field, want) in cases {
            let e = conversation(field, r.get(field)).unwrap_err();
            assert!(e.contains(want), "{field}: {e}");
        }
    }

    #[test]
    fn a_file_becomes_a_data_url_of_its_sniffed_type() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.jpg"), png(3, 2)).unwrap();
        let img = image("a.jpg", dir.path(), Some(Detail::Low)).unwrap();
        assert!(
            img.url.starts_with("data:image/png;base64,iVBORw0KGgo"),
            "{}",
            img.url
        );
        assert_eq!(img.size, Some((3, 2)));
        assert_eq!(img.detail, Some(Detail::Low));
        // A data URL is taken as is, its size read too.
        let again = image(&img.url, Path::new("/nonexistent"), None).unwrap();
        assert_eq!((again.url, again.size), (img.url, Some((3, 2))));

        std::fs::write(dir.path().join("b.bmp"), b"BM\0\0\0\0").unwrap();
        let e = image("b.bmp", dir.path(), None).unwrap_err();
        assert!(
            e.contains("b.bmp") && e.contains("not a PNG, JPEG, GIF or WebP"),
            "{e}"
        );
        let e = image("nope.png", dir.path(), None).unwrap_err();
        assert!(e.contains("nope.png"), "{e}");
        assert!(image("", dir.path(), None)
            .unwrap_err()
            .contains("renders to nothing"));
        assert!(image("ftp://h/x.png", dir.path(), None).is_err());
        let https = image("https://h/x.png", dir.path(), None).unwrap();
        assert_eq!((https.url.as_str(), https.size), ("https://h/x.png", None));
    }
}
