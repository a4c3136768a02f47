//! Shards: one job split across processes or machines with no coordinator. Each row belongs
//! to exactly one shard, chosen by a hash of its stable key (its id, else its request's
//! content), never its position, so a rescheduled shard gets the same rows from an input
//! re-exported in another order. Each shard writes its own output; `output::merge` joins them.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Shard `k` of `n`, 1-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub k: u32,
    pub n: u32,
}

impl Shard {
    /// `K/N`, 1 ≤ K ≤ N.
    pub fn parse(s: &str) -> Result<Shard, String> {
        let (k, n) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}`: a shard is K/N, e.g. 2/8"))?;
        let k: u32 = k
            .trim()
            .parse()
            .map_err(|_| format!("`{s}`: K is not a number"))?;
        let n: u32 = n
            .trim()
            .parse()
            .map_err(|_| format!("`{s}`: N is not a number"))?;
        Shard::new(k, n).ok_or_else(|| format!("`{s}`: K must be between 1 and N"))
    }

    pub fn new(k: u32, n: u32) -> Option<Shard> {
        (n >= 1 && (1..=n).contains(&k)).then_some(Shard { k, n })
    }

    /// Shard K of `--shards N`, K from `JOB_COMPLETION_INDEX` (Kubernetes Indexed Jobs set it
    /// 0-based: index i is shard i+1).
    pub fn from_env(n: u32) -> Result<Shard, String> {
        let v = std::env::var("JOB_COMPLETION_INDEX").map_err(|_| {
            format!(
                "--shards {n} without --shard needs JOB_COMPLETION_INDEX (0 to {}), as a \
                 Kubernetes Indexed Job sets it",
                n.saturating_sub(1)
            )
        })?;
        let i: u32 = v
            .trim()
            .parse()
            .map_err(|_| format!("JOB_COMPLETION_INDEX=`{v}` is not a number"))?;
        Shard::new(i + 1, n).ok_or_else(|| {
            format!(
                "JOB_COMPLETION_INDEX={i} is out of range for --shards {n} (0 to {})",
                n.saturating_sub(1)
            )
        })
    }

    /// Whether a row with this key is this shard's.
    pub fn owns(&self, key: u64) -> bool {
        key % u64::from(self.n) == u64::from(self.k - 1)
    }

    /// `out/x.jsonl` → `out/x.shard-2-of-8.jsonl`.
    pub fn path(&self, p: &Path) -> PathBuf {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tag = format!("shard-{}-of-{}", self.k, self.n);
        let name = match name.rsplit_once('.') {
            Some((stem, ext)) if !stem.is_empty() => format!("{stem}.{tag}.{ext}"),
            _ => format!("{name}.{tag}"),
        };
        p.with_file_name(name)
    }

    /// `out/x.shard-2-of-8.csv` → `out/x.csv`: the name `path` was given (a name without
    /// this shard's tag is returned as it is).
    pub fn whole(&self, p: &Path) -> PathBuf {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tag = format!(".shard-{}-of-{}", self.k, self.n);
        match name.rfind(&tag) {
            Some(i) => p.with_file_name(format!("{}{}", &name[..i], &name[i + tag.len()..])),
            None => p.to_path_buf(),
        }
    }
}

fn first8(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"))
}

/// The key of a row with an id: the same id is the same row, wherever it is in the input.
pub fn id_key(id: &str) -> u64 {
    first8(&Sha256::digest([b"id\0", id.as_bytes()].concat()))
}

/// The key of a row without an id: its request's content (the rendered messages). Not the
/// whole fingerprint, which also names who answers: shards pointed at different endpoints
/// must still agree on whose row is whose.
pub fn content_key(messages: &[crate::chat::Message]) -> u64 {
    let json = serde_json::to_vec(messages).expect("messages serialize");
    first8(&Sha256::digest([b"messages\0".as_slice(), &json].concat()))
}

/// The key of a row that cannot be read or rendered: its row number (all it has).
pub fn row_key(row: u64) -> u64 {
    first8(&Sha256::digest(
        [b"row\0".as_slice(), &row.to_le_bytes()].concat(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_paths_and_parsing() {
        let s = Shard::parse("2/8").unwrap();
        assert_eq!(
            s.path(Path::new("out/x.jsonl")),
            PathBuf::from("out/x.shard-2-of-8.jsonl")
        );
        for p in ["out/x.csv", "out/x", "out/.x", "out/a.b.csv"] {
            let p = Path::new(p);
            assert_eq!(s.whole(&s.path(p)), p, "whole undoes path");
        }
        assert_eq!(s.whole(Path::new("out/x.csv")), PathBuf::from("out/x.csv"));
        assert!(Shard::parse("0/8").is_err());
        assert!(Shard::parse("9/8").is_err());
        assert!(Shard::parse("1").is_err());
    }

    #[test]
    fn every_key_belongs_to_exactly_one_shard() {
        for key in (0..1000u64).map(|i| id_key(&i.to_string())) {
            let owners = (1..=7)
                .filter(|&k| Shard::new(k, 7).unwrap().owns(key))
                .count();
            assert_eq!(owners, 1);
        }
    }
}
