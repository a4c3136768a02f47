//! The split of batch input lines into files within the limits (the lines themselves are
//! each vendor's: `BatchApi::write_line`).

use crate::job::BatchLimits;

/// Splits lines into files within the limits: requests per file and bytes per file.
pub struct Splitter {
    pub(super) limits: BatchLimits,
    /// (requests, bytes) of each file so far.
    pub files: Vec<(u64, u64)>,
}

impl Splitter {
    pub fn new(limits: BatchLimits) -> Splitter {
        Splitter {
            limits,
            files: Vec::new(),
        }
    }

    /// A line longer than a whole file cannot be submitted.
    pub fn check(&self, len: u64) -> Result<(), String> {
        if len > self.limits.max_bytes_per_file {
            return Err(format!(
                "the request is {len} bytes as a batch line, over the file limit of {} bytes \
                 ([batch] max_bytes_per_file)",
                self.limits.max_bytes_per_file
            ));
        }
        Ok(())
    }

    /// Counts a line; `true` when it starts a new file.
    pub fn add(&mut self, len: u64) -> bool {
        let new = self.files.last().is_none_or(|&(n, b)| {
            n as usize >= self.limits.max_requests_per_file
                || b + len > self.limits.max_bytes_per_file
        });
        if new {
            self.files.push((0, 0));
        }
        let f = self.files.last_mut().expect("a file");
        f.0 += 1;
        f.1 += len;
        new
    }
}
