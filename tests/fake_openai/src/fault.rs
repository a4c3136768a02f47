//! The `FAULT:<kind>[:<n>]` marker grammar found in message text.

/// What a marker asks the server to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FaultKind {
    /// Plain HTTP error statuses: 400, 401, 403, 404, 422, 429, 500, 503.
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
        "400" | "401" | "403" | "404" | "422" | "429" | "500" | "503" => {
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

#[cfg(test)]
mod tests {
    use super::*;

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
