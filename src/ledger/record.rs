//! The output record: one per row, one JSON line.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::chat::Usage;
use crate::provider::ErrorKind;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Error,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RecordError {
    pub kind: ErrorKind,
    pub status: Option<u16>,
    #[serde(default)]
    pub message: String,
}

/// Where a copied record came from: an earlier row with a byte-identical request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CopiedFrom {
    pub row: u64,
    pub id: String,
}

/// One choice of a row's completion.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Variant {
    pub completion: String,
    pub finish_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

/// A completion that was not kept.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InvalidAttempt {
    /// 1 = the first request for the row.
    pub attempt: u32,
    pub variant: u32,
    pub problems: Vec<String>,
}

/// One finished row. `row` comes first: a canonical line starts with it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub row: u64,
    pub id: String,
    pub status: Status,
    // What may be missing from a line another tool wrote is defaulted, exactly as the
    // journal's parser (`journal::parse_line`) defaults it: one idea of what a record holds.
    #[serde(default)]
    pub input: Map<String, Value>,
    pub completion: Option<String>,
    pub finish_reason: Option<String>,
    pub model: Option<String>,
    #[serde(default, deserialize_with = "usage_as_written")]
    pub usage: Option<Usage>,
    pub cost_usd: Option<f64>,
    /// What the prompt cache saved on this row against its prompt at the input rate (negative
    /// when a cache write cost more than it saved); absent when nothing was cached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_saved_usd: Option<f64>,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub latency_ms: u64,
    /// Hash of the request's identity (`request` module); `None` when the row never got as
    /// far as a request.
    pub fingerprint: Option<String>,
    pub error: Option<RecordError>,
    /// Set on a row that was not sent because an earlier row made the same request; such a
    /// record costs nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copied_from: Option<CopiedFrom>,
    /// The worst-case cost of attempts the server may have billed without giving a usable
    /// completion (a timeout after sending, a stream cut off, an unusable 200).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unconfirmed_usd: Option<f64>,
    /// `batch` when the Batch API answered the row (online rows leave it out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<crate::chat::Mode>,
    /// The batch that answered the row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<String>,
    /// When the row finished (UTC, RFC 3339, milliseconds): what the report's charts over
    /// time are drawn from. Absent in records written before it was added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// The completion parsed as JSON, when the job asks for JSON (`[output] schema`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    /// Every choice when the job asks for several (`[model] n`); `completion` is the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variants: Option<Vec<Variant>>,
    /// Completions that broke the schema or a check and were asked for again: on which
    /// attempt, which variant, and what was wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalid_attempts: Option<Vec<InvalidAttempt>>,
    /// Streamed: milliseconds to the first token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<u64>,
    /// Fields another tool added to the line: kept as they are.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A line's usage, every count defaulted to 0 (a line another tool trimmed still reads).
#[derive(Debug, Deserialize)]
pub struct LineUsage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
    #[serde(default)]
    pub cached_tokens: Option<u64>,
    #[serde(default)]
    pub cache_write_tokens: Option<u64>,
    #[serde(default)]
    pub cache_write_1h_tokens: Option<u64>,
    #[serde(default)]
    pub reasoning_tokens: Option<u64>,
    #[serde(default)]
    pub estimated: bool,
}

impl LineUsage {
    pub fn usage(&self) -> crate::chat::Usage {
        crate::chat::Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            total_tokens: self.total_tokens,
            cached_tokens: self.cached_tokens,
            cache_write_tokens: self.cache_write_tokens,
            cache_write_1h_tokens: self.cache_write_1h_tokens,
            reasoning_tokens: self.reasoning_tokens,
            estimated: self.estimated,
        }
    }
}

/// A record's usage with every count defaulted to 0, as the journal's parser reads it.
fn usage_as_written<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Usage>, D::Error> {
    Ok(Option::<LineUsage>::deserialize(d)?.map(|u| u.usage()))
}

impl Record {
    /// A record finished now with what every record has; the caller sets the rest.
    pub fn new(
        row: u64,
        id: String,
        status: Status,
        input: Map<String, Value>,
        fingerprint: Option<String>,
        attempts: u32,
        latency_ms: u64,
    ) -> Record {
        Record {
            row,
            id,
            status,
            input,
            completion: None,
            finish_reason: None,
            model: None,
            usage: None,
            cost_usd: None,
            cache_saved_usd: None,
            attempts,
            latency_ms,
            fingerprint,
            error: None,
            copied_from: None,
            unconfirmed_usd: None,
            mode: None,
            batch_id: None,
            finished_at: Some(timestamp_now()),
            data: None,
            variants: None,
            invalid_attempts: None,
            ttft_ms: None,
            extra: Map::new(),
        }
    }
}

/// Now, as a record's `finished_at`.
pub fn timestamp_now() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    format_timestamp(ms)
}

/// Unix milliseconds → `2025-11-15T10:23:45.123Z`.
pub fn format_timestamp(unix_ms: i64) -> String {
    let (days, ms) = (
        unix_ms.div_euclid(86_400_000),
        unix_ms.rem_euclid(86_400_000),
    );
    let (y, m, d) = civil_from_days(days);
    let s = ms / 1000;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        s / 3600,
        s / 60 % 60,
        s % 60,
        ms % 1000
    )
}

/// An RFC 3339 time (`Z` or a `±HH:MM` offset, any fraction of a second) → Unix
/// milliseconds; `None` for anything else.
pub fn parse_timestamp(t: &str) -> Option<i64> {
    let b = t.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let s = b.get(r)?;
        s.iter().all(u8::is_ascii_digit).then_some(())?;
        std::str::from_utf8(s).ok()?.parse().ok()
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, s) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let mut i = 19;
    let mut ms = 0i64;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            if i - start < 3 {
                ms = ms * 10 + i64::from(b[i] - b'0');
            }
            i += 1;
        }
        if i == start {
            return None;
        }
        for _ in (i - start)..3 {
            ms *= 10;
        }
    }
    let offset_min = match b.get(i..)? {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), ..] if b.len() == i + 6 && b[i + 3] == b':' => {
            let v = num(i + 1..i + 3)? * 60 + num(i + 4..i + 6)?;
            if *sign == b'-' {
                -v
            } else {
                v
            }
        }
        _ => return None,
    };
    let days = days_from_civil(y, mo, d);
    Some(((days * 24 + h) * 60 + mi - offset_min) * 60_000 + s * 1000 + ms)
}

// Howard Hinnant's civil-calendar algorithms (proleptic Gregorian, days since 1970-01-01).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_and_read_other_tools_offsets() {
        for (ms, text) in [
            (0, "1970-01-01T00:00:00.000Z"),
            (951_782_400_000, "2000-02-29T00:00:00.000Z"),
            (1_763_202_225_123, "2025-11-15T10:23:45.123Z"),
            (-1, "1969-12-31T23:59:59.999Z"),
        ] {
            assert_eq!(format_timestamp(ms), text);
            assert_eq!(parse_timestamp(text), Some(ms), "{text}");
        }
        let t = 1_763_202_225_000;
        assert_eq!(parse_timestamp("2025-11-15T10:23:45Z"), Some(t));
        assert_eq!(parse_timestamp("2025-11-15T11:23:45+01:00"), Some(t));
        assert_eq!(parse_timestamp("2025-11-15T10:23:45.1Z"), Some(t + 100));
        assert_eq!(
            parse_timestamp("2025-11-15T10:23:45.123456Z"),
            Some(t + 123)
        );
        for bad in [
            "",
            "yesterday",
            "2025-11-15",
            "2025-13-15T10:23:45Z",
            "2025-11-15T10:23:45",
        ] {
            assert_eq!(parse_timestamp(bad), None, "{bad}");
        }
    }
}
