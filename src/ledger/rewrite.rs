//! A record rewritten for the row that takes it: renumbered, with the row's current id and
//! fields, or as a free copy of another row's answer.

use std::borrow::Cow;
use std::io::Write;
use std::path::Path;

use crate::error::Error;
use crate::ledger::journal;
use crate::ledger::record::{CopiedFrom, Record};

use super::Planned;

/// The record `line` (at `offset` in `path`) rewritten for the row `p` names: its number, id,
/// fields and fingerprint. `copy`: as a free copy of another row's answer, from the given row
/// (`None`: the row the record itself names).
pub(super) fn rewrite(
    line: &[u8],
    p: Planned,
    copy: Option<Option<u64>>,
    path: &Path,
    offset: u64,
) -> Result<Vec<u8>, Error> {
    if copy.is_none() && p.fingerprint.is_none() {
        if let Some(fast) = renumber(line, &p) {
            return Ok(fast);
        }
    }
    let mut r: Record = serde_json::from_slice(line.trim_ascii()).map_err(|err| Error::Input {
        path: path.to_path_buf(),
        message: format!("the record at byte {offset}: {err}"),
    })?;
    if let Some(from_row) = copy {
        r.copied_from = Some(CopiedFrom {
            row: from_row.unwrap_or(r.row),
            id: r.id.clone(),
        });
        r.usage = None;
        r.cost_usd = Some(0.0);
        r.unconfirmed_usd = None;
        r.attempts = 0;
        r.latency_ms = 0;
    }
    r.row = p.row;
    if let Some(id) = p.id {
        r.id = id;
    }
    if let Some(input) = p.input {
        r.input = input;
    }
    if let Some(fp) = p.fingerprint {
        r.fingerprint = Some(fp);
    }
    let mut s = serde_json::to_vec(&r).expect("a record serializes");
    s.push(b'\n');
    Ok(s)
}

/// A canonical line (as promptmill writes it: `{"row":N,"id":"…",…,"input":{…},…}`) with only
/// its number, id and fields replaced, by splicing bytes: what parsing the whole record and
/// writing it again gives, for a fraction of the work. `None` when the line is not laid out
/// so (the caller then rewrites it whole).
fn renumber(line: &[u8], p: &Planned) -> Option<Vec<u8>> {
    if !journal::is_canonical(line) {
        return None;
    }
    let text = std::str::from_utf8(line).ok()?;
    let l = journal::parse_line(line).ok()??;
    let (Cow::Borrowed(id), Some(input)) = (&l.id, l.input) else {
        return None;
    };
    let base = text.as_ptr() as usize;
    let id_start = id.as_ptr() as usize - base;
    let id_end = id_start + id.len();
    let in_start = input.get().as_ptr() as usize - base;
    let in_end = in_start + input.get().len();
    let head = format!("{{\"row\":{},\"id\":\"", l.row);
    if !text.starts_with(&head) || id_start != head.len() || in_start <= id_end {
        return None;
    }
    let mut out = Vec::with_capacity(line.len() + 64);
    write!(out, "{{\"row\":{},\"id\":", p.row).ok()?;
    serde_json::to_writer(&mut out, p.id.as_deref().unwrap_or(id)).ok()?;
    out.extend_from_slice(&line[id_end + 1..in_start]);
    match &p.input {
        Some(m) => serde_json::to_writer(&mut out, m).ok()?,
        None => out.extend_from_slice(input.get().as_bytes()),
    }
    out.extend_from_slice(&line[in_end..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spliced line is the line parsed whole and written again, byte for byte.
    #[test]
    fn a_renumbered_line_is_what_a_whole_rewrite_writes() {
        let fp = crate::fingerprint::hex(&[7; 16]);
        let mut r = Record::new(
            3,
            "a \"quoted\" id".into(),
            crate::ledger::record::Status::Ok,
            serde_json::from_str(r#"{"t":"x","n":1}"#).unwrap(),
            Some(fp.clone()),
            1,
            12,
        );
        r.completion = Some("c".into());
        r.cost_usd = Some(0.25);
        for id in ["plain", "a \"quoted\" id", "ünï"] {
            r.id = id.into();
            let mut line = serde_json::to_vec(&r).unwrap();
            line.push(b'\n');
            for (new_id, input) in [(None, None), (Some("9"), Some(r#"{"t":"y"}"#))] {
                let p = Planned {
                    row: 41,
                    fp: fp.clone(),
                    idh: 0,
                    id: new_id.map(String::from),
                    input: input.map(|i| serde_json::from_str(i).unwrap()),
                    fingerprint: None,
                };
                let fast = renumber(&line, &p);
                assert!(fast.is_some() || id.contains('"'), "{id}");
                let mut whole: Record = serde_json::from_slice(&line).unwrap();
                whole.row = 41;
                if let Some(i) = &p.id {
                    whole.id = i.clone();
                }
                if let Some(m) = &p.input {
                    whole.input = m.clone();
                }
                let mut want = serde_json::to_vec(&whole).unwrap();
                want.push(b'\n');
                if let Some(fast) = fast {
                    assert_eq!(
                        String::from_utf8_lossy(&fast),
                        String::from_utf8_lossy(&want)
                    );
                }
                assert_eq!(rewrite(&line, p, None, Path::new("o"), 0).unwrap(), want);
            }
        }
    }
}
