//! What is made from records once they are written: the CSV export, the Parquet table, the
//! HTML report, the merge of shard outputs. Reads records; never imports the run.

pub mod csv;
pub mod html;
pub mod merge;
pub mod parquet;
