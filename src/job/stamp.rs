//! A job's stamp: digests of what makes its requests, written beside its output so that
//! `merge` can refuse outputs of different jobs.

use sha2::{Digest, Sha256};

use super::{Job, MessageSource};
use crate::ledger::stamp::Stamp;

/// The stamp of the output this job writes; `input_columns`: a CSV input's header.
pub fn stamp(
    job: &Job,
    input_rows: Option<u64>,
    rows: Option<u64>,
    input_columns: Option<&[String]>,
) -> Stamp {
    let mut params = Sha256::new();
    params.update(serde_json::to_vec(&job.params).expect("serializes"));
    params.update(serde_json::to_vec(&job.params.extra).expect("serializes"));
    params.update(job.served.model.as_bytes());
    let mut messages = Sha256::new();
    for m in &job.messages {
        messages.update(format!("{:?}\0{:?}\0", m.role, m.name));
        match &m.source {
            MessageSource::Inline(c) => messages.update(c.as_bytes()),
            MessageSource::Field(f) => messages.update(format!("from:{f}").as_bytes()),
            MessageSource::Template(name) => {
                let text = job
                    .template_source(name)
                    .unwrap_or_else(|| name.as_bytes().to_vec());
                messages.update(&text);
            }
        }
        // Images only when a message has some: stamps of text-only jobs stay as they were.
        if !m.images.is_empty() {
            messages.update(format!("images:{:?}:{:?}", m.images, m.image_detail));
        }
        messages.update(b"\0");
    }
    Stamp {
        job: job
            .file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        model: job.served.model.clone(),
        params: digest16(params),
        messages: digest16(messages),
        shard: job.shard,
        input_rows,
        rows,
        csv: job.csv.as_ref().map(|c| {
            let whole = job.shard.map_or_else(|| c.clone(), |s| s.whole(c));
            let dir = job.output.parent().unwrap_or(std::path::Path::new(""));
            crate::ledger::files::relative_to(&whole, dir)
        }),
        csv_escape_formulas: job.csv_escape_formulas,
        csv_input_columns: input_columns.map(<[String]>::to_vec),
        csv_data_columns: csv_data_columns(job),
    }
}

/// The CSV's data columns: the schema's top-level properties, in its order.
pub fn csv_data_columns(job: &Job) -> Option<Vec<String>> {
    job.shape.schema.as_ref().and_then(|(_, v)| {
        v.get("properties")
            .and_then(serde_json::Value::as_object)
            .map(|p| p.keys().cloned().collect())
    })
}

fn digest16(h: Sha256) -> String {
    let d = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&d[..16]);
    crate::fingerprint::hex(&out)
}
