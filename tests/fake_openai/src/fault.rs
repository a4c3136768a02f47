//! The `FAULT:<kind>[:<n>]` marker grammar found in message text, and the answer-shaping
//! markers `FAULT:<shape>[@<choice>][:<n>]` (`badjsonout`, `schemabreak`, `refusal`, `long`).
//!
//! Markers are read from the text parts of every message. Of the `FAULT:<kind>` markers only
//! the first recognised one counts; every shape marker counts, so several can shape one
//! answer (a refusal wins over the others on its choice; `schemabreak` then `badjsonout`).
//! `@<choice>` (0-based) limits a shape marker to that choice, else it shapes all of them.
//! `:<n>` limits a marker to the first n requests with identical messages: a `<kind>` marker
//! counts every request that reaches it, a shape marker only requests that are answered
//! (not those a fault answered instead), and each shape marker has its own counter.

/// What a marker asks the server to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FaultKind {
    /// Plain HTTP error statuses: 400, 401, 403, 404, 413, 422, 429, 500, 503, 529 (413 and
    /// 529 are Anthropic's; OpenAI's route answers them as a 400).
    Status(u16),
    Quota,
    /// `flex429`: flex processing's 429 "resource unavailable" (code `resource_unavailable`),
    /// which is retried, unlike `quota`.
    FlexUnavailable,
    Reset,
    Hang,
    BadJson,
    Empty,
    /// Normal answer with these usage numbers: prompt, completion, cached, reasoning.
    Usage(u64, u64, u64, u64),
    /// Normal answer after this many extra milliseconds.
    Slow(u64),
    /// Normal answer without usage: no `usage` field, no usage chunk when streaming, like
    /// servers that ignore `stream_options`.
    NoUsage,
    /// Answer cut short: a stream ends after some content without `data: [DONE]`; a
    /// non-streamed body stops halfway and the connection drops.
    Cut,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Marker {
    pub kind: FaultKind,
    /// Applies to the first `n` requests with identical messages; None = always.
    pub times: Option<u64>,
}

const TAG: &str = "FAULT:";

/// First recognised marker in `text`, if any. Unknown kinds are skipped so prose that
/// merely mentions "FAULT:" does not break a request.
pub(crate) fn find_marker(text: &str) -> Option<Marker> {
    let mut rest = text;
    while let Some(pos) = rest.find(TAG) {
        rest = &rest[pos + TAG.len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '=' | ',' | ':' | '_')))
            .unwrap_or(rest.len());
        // Trailing punctuation belongs to the sentence, not the marker.
        let token = rest[..end].trim_end_matches([',', ':']);
        if let Some(m) = parse_token(token) {
            return Some(m);
        }
    }
    None
}

fn parse_token(token: &str) -> Option<Marker> {
    let (kind_s, times) = match token.split_once(':') {
        Some((k, n)) => (k, Some(n.parse::<u64>().ok()?)),
        None => (token, None),
    };
    let kind = match kind_s {
        "400" | "401" | "403" | "404" | "413" | "422" | "429" | "500" | "503" | "529" => {
            FaultKind::Status(kind_s.parse().ok()?)
        }
        "quota" => FaultKind::Quota,
        "flex429" => FaultKind::FlexUnavailable,
        "reset" => FaultKind::Reset,
        "hang" => FaultKind::Hang,
        "badjson" => FaultKind::BadJson,
        "empty" => FaultKind::Empty,
        "nousage" => FaultKind::NoUsage,
        "cut" => FaultKind::Cut,
        _ => {
            if let Some(v) = kind_s.strip_prefix("usage=") {
                let n: Vec<u64> = v
                    .split(',')
                    .map(|x| x.parse().ok())
                    .collect::<Option<_>>()?;
                match n[..] {
                    [p, c, cached, reasoning] => FaultKind::Usage(p, c, cached, reasoning),
                    _ => return None,
                }
            } else if let Some(v) = kind_s.strip_prefix("slow=") {
                FaultKind::Slow(v.parse().ok()?)
            } else {
                return None;
            }
        }
    };
    Some(Marker { kind, times })
}

/// What an answer-shaping marker does to a choice's answer. These are not faults: the
/// request is answered 200 and billed like any other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ShapeKind {
    /// `badjsonout`: a JSON answer (json_object / json_schema) loses its last character (the
    /// closing `}` of an object), so it no longer parses. No effect on plain text.
    BadJsonOut,
    /// `schemabreak`: a json_schema answer that parses but breaks the schema (first required
    /// property removed, else first property of a wrong type); a json_object answer becomes a
    /// JSON array. No effect on plain text.
    SchemaBreak,
    /// `refusal`: `message.content` null and `message.refusal` set, finish_reason `stop`, in
    /// any format.
    Refusal,
    /// `long`: a plain-text answer repeated (joined by a space) until it is at least 500
    /// characters. No effect on JSON answers.
    Long,
}

/// `FAULT:<shape>[@<choice>][:<n>]` found in message text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ShapeMarker {
    pub kind: ShapeKind,
    /// Only this choice (0-based index); None = every choice.
    pub choice: Option<u32>,
    /// Applies to the first `n` answered requests with identical messages; None = always.
    pub times: Option<u64>,
    /// The marker as written after `FAULT:` (keys its `:n` counter).
    pub token: String,
}

/// Every answer-shaping marker in `text`, in order. Other kinds (and unknown words) are
/// skipped; `find_marker` reads those.
pub(crate) fn find_shapes(text: &str, out: &mut Vec<ShapeMarker>) {
    let mut rest = text;
    while let Some(pos) = rest.find(TAG) {
        rest = &rest[pos + TAG.len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, ':' | '@' | '_')))
            .unwrap_or(rest.len());
        let token = rest[..end].trim_end_matches(':');
        if let Some(m) = parse_shape(token) {
            out.push(m);
        }
    }
}

fn parse_shape(token: &str) -> Option<ShapeMarker> {
    let (head, times) = match token.split_once(':') {
        Some((h, n)) => (h, Some(n.parse::<u64>().ok()?)),
        None => (token, None),
    };
    let (kind_s, choice) = match head.split_once('@') {
        Some((k, i)) => (k, Some(i.parse::<u32>().ok()?)),
        None => (head, None),
    };
    let kind = match kind_s {
        "badjsonout" => ShapeKind::BadJsonOut,
        "schemabreak" => ShapeKind::SchemaBreak,
        "refusal" => ShapeKind::Refusal,
        "long" => ShapeKind::Long,
        _ => return None,
    };
    Some(ShapeMarker {
        kind,
        choice,
        times,
        token: token.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shapes(text: &str) -> Vec<(ShapeKind, Option<u32>, Option<u64>)> {
        let mut v = Vec::new();
        find_shapes(text, &mut v);
        v.into_iter().map(|m| (m.kind, m.choice, m.times)).collect()
    }

    #[test]
    fn parses_shape_markers() {
        use ShapeKind::*;
        assert_eq!(shapes("hello FAULT:500"), vec![]);
        assert_eq!(shapes("x FAULT:refusal."), vec![(Refusal, None, None)]);
        assert_eq!(
            shapes("FAULT:schemabreak@1:1, then FAULT:badjsonout:2 and FAULT:long@0"),
            vec![
                (SchemaBreak, Some(1), Some(1)),
                (BadJsonOut, None, Some(2)),
                (Long, Some(0), None)
            ]
        );
        assert_eq!(shapes("FAULT:longer FAULT:long@x FAULT:refusal:y"), vec![]);
        // Shape markers are invisible to the fault grammar and the other way round.
        assert_eq!(find_marker("FAULT:refusal FAULT:schemabreak@1:1"), None);
        assert_eq!(
            find_marker("FAULT:refusal@1 FAULT:usage=1,2,3,4"),
            m(FaultKind::Usage(1, 2, 3, 4), None)
        );
    }

    fn m(kind: FaultKind, times: Option<u64>) -> Option<Marker> {
        Some(Marker { kind, times })
    }

    #[test]
    fn parses_markers() {
        assert_eq!(find_marker("hello"), None);
        assert_eq!(find_marker("x FAULT:500"), m(FaultKind::Status(500), None));
        assert_eq!(
            find_marker("please FAULT:500:2, thanks"),
            m(FaultKind::Status(500), Some(2))
        );
        assert_eq!(find_marker("FAULT:reset."), m(FaultKind::Reset, None));
        assert_eq!(find_marker("FAULT:quota:1"), m(FaultKind::Quota, Some(1)));
        assert_eq!(
            find_marker("FAULT:flex429:2."),
            m(FaultKind::FlexUnavailable, Some(2))
        );
        assert_eq!(
            find_marker("FAULT:usage=1000,200,400,50"),
            m(FaultKind::Usage(1000, 200, 400, 50), None)
        );
        assert_eq!(
            find_marker("FAULT:usage=1,2,3,4:3 end"),
            m(FaultKind::Usage(1, 2, 3, 4), Some(3))
        );
        assert_eq!(find_marker("FAULT:slow=30"), m(FaultKind::Slow(30), None));
        assert_eq!(
            find_marker("FAULT:nope then FAULT:hang"),
            m(FaultKind::Hang, None)
        );
        assert_eq!(find_marker("FAULT:usage=1,2"), None);
        assert_eq!(find_marker("FAULT:nousage"), m(FaultKind::NoUsage, None));
        assert_eq!(
            find_marker("FAULT:nousage:2."),
            m(FaultKind::NoUsage, Some(2))
        );
        assert_eq!(find_marker("FAULT:cut:1"), m(FaultKind::Cut, Some(1)));
        assert_eq!(find_marker("FAULT:cutting"), None);
    }
}
