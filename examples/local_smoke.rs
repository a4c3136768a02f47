//! Throughput check for the embedded model: 8 prompts × 64 tokens at concurrency 1 and 4,
//! printing generated tokens/s. Run: `cargo run --release --features local --example local_smoke [model.gguf]`.

use std::path::PathBuf;
use std::time::Instant;

use promptmill::chat::Params;
use promptmill::chat::{Message, Role};
use promptmill::provider::local::LocalModel;
use promptmill::provider::{Provider, Request};

const PROMPTS: [&str; 8] = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "Describe a busy market in the morning.",
    "Give advice to someone learning to cook.",
    "What makes a good friend?",
    "Describe the life cycle of a star.",
    "Write a letter to a future self.",
    "Explain why the sky is blue.",
];

#[tokio::main]
async fn main() {
    let path = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .or_else(promptmill::models::default_model_path)
        .expect("a model path");
    let params = Params {
        temperature: Some(0.7),
        max_tokens: Some(64),
        seed: Some(7),
        ..Params::default()
    };
    let requests: Vec<Request> = PROMPTS
        .iter()
        .map(|p| Request {
            messages: vec![Message {
                role: Role::User,
                name: None,
                content: p.to_string().into(),
            }],
            choices: 1,
            body: Default::default(),
        })
        .collect();

    for parallel in [1usize, 4] {
        let model = match LocalModel::load(&path, "local", &params, parallel, Default::default()) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(2);
            }
        };
        // Warm-up row, so page faults of the mmapped weights are not timed.
        let _ = model.complete(&requests[0]).await;
        let start = Instant::now();
        // `parallel` tasks each take rows from a shared queue, like the scheduler does.
        let next = std::sync::atomic::AtomicUsize::new(0);
        let worker = || async {
            let mut tokens = 0u64;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(req) = requests.get(i) else {
                    break tokens;
                };
                let c = model.complete(req).await.expect("completion");
                tokens += c.usage.map_or(0, |u| u.completion_tokens);
            }
        };
        let counts = futures::future::join_all((0..parallel).map(|_| worker())).await;
        let secs = start.elapsed().as_secs_f64();
        let generated: u64 = counts.iter().sum();
        println!(
            "parallel {parallel}: {} rows, {generated} tokens in {secs:.2}s = {:.1} tokens/s, {:.2} rows/s",
            requests.len(),
            generated as f64 / secs,
            requests.len() as f64 / secs
        );
    }
}
