//! Load check: `cargo run -p fake_openai --release --example load -- [N] [CONCURRENCY] [BASE_URL]`
//! fires N chat requests at the given concurrency (in-process server if no URL) and prints req/s.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use fake_openai::{Config, FakeServer};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(20_000);
    let conc: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(64);
    let mut _server = None;
    let base = match args.get(3) {
        Some(u) => u.clone(),
        None => {
            let s = FakeServer::start(Config {
                record_bodies: false,
                ..Config::default()
            })
            .await;
            let u = s.base_url();
            _server = Some(s);
            u
        }
    };
    let url = format!("{base}/chat/completions");
    let client = reqwest::Client::new();
    let next = Arc::new(AtomicU64::new(0));
    let t = Instant::now();
    let workers: Vec<_> = (0..conc)
        .map(|_| {
            let (client, url, next) = (client.clone(), url.clone(), next.clone());
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < n {
                    let body = serde_json::json!({"model": "m", "max_tokens": 64,
                        "messages": [{"role": "user", "content": "Summarise this row of data please."}]});
                    let r = client.post(&url).json(&body).send().await.unwrap();
                    assert_eq!(r.status(), 200);
                    r.bytes().await.unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let e = t.elapsed().as_secs_f64();
    println!(
        "{n} requests, concurrency {conc}: {e:.2}s, {:.0} req/s",
        n as f64 / e
    );
}
