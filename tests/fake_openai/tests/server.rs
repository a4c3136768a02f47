//! End-to-end checks of the fake server over real HTTP (reqwest and raw TCP).

use std::time::Duration;

use fake_openai::{spawn_background, spawn_background_on, Config, FakeServer};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{body, post};

#[tokio::test]
async fn normal_completion() {
    let server = FakeServer::start(Config::default()).await;
    let r = post(&server, &body("hello world")).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-request-id"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "gpt-4o-mini");
    assert_eq!(v["choices"][0]["message"]["content"], "echo: hello world");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // P = (ceil(8/4)+3) + (ceil(11/4)+3) + 3 = 5 + 6 + 3; C = ceil(17/4).
    assert_eq!(v["usage"]["prompt_tokens"], 14);
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["usage"]["total_tokens"], 19);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let s = server.stats();
    assert_eq!((s.requests, s.ok, s.tokens_admitted), (1, 1, 14 + 16));
    assert_eq!(server.requests(), vec![body("hello world")]);
}

#[tokio::test]
async fn truncation_auth_and_validation() {
    let server = FakeServer::start(Config {
        require_key: Some("sk-secret-key-123456".into()),
        model: Some("fixed-model".into()),
        ..Config::default()
    })
    .await;
    // Wrong key: 401, key masked.
    let r = post(&server, &body("x")).await;
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_api_key");
    assert!(!v["error"]["message"].as_str().unwrap().contains("sk-test"));

    let client = reqwest::Client::new();
    let url = format!("{}/chat/completions", server.base_url());
    let mut b = body("abcdefghijkl");
    b["max_tokens"] = json!(2);
    let v: Value = client
        .post(&url)
        .bearer_auth("sk-secret-key-123456")
        .json(&b)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "echo: ab");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["model"], "fixed-model");

    let r = client
        .post(&url)
        .bearer_auth("sk-secret-key-123456")
        .json(&json!({"model": "m"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["param"], "messages");
    assert_eq!(server.stats().rejected, 2);
}

#[tokio::test]
async fn streaming_with_usage() {
    let server = FakeServer::start(Config::default()).await;
    let mut b = body("stream me please");
    b["stream"] = json!(true);
    b["stream_options"] = json!({"include_usage": true});
    let r = post(&server, &b).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let text = r.text().await.unwrap();
    let datas: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(*datas.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = datas[..datas.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "echo: stream me please");
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 6);
    let finishing = &chunks[chunks.len() - 2];
    assert_eq!(finishing["choices"][0]["finish_reason"], "stop");
    assert!(finishing["choices"][0]["delta"]["content"].is_string());
}

#[tokio::test]
async fn rpm_limit_gives_429_with_headers() {
    // 60 rpm over a 2 s window = 2 requests per window.
    let server = FakeServer::start(Config {
        rpm: Some(60),
        tpm: Some(600_000),
        window_s: 2.0,
        ..Config::default()
    })
    .await;
    for left in ["1", "0"] {
        let r = post(&server, &body("hi")).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-ratelimit-limit-requests"], "60");
        assert_eq!(r.headers()["x-ratelimit-remaining-requests"], left);
        assert_eq!(r.headers()["x-ratelimit-limit-tokens"], "600000");
        assert!(r.headers().contains_key("x-ratelimit-reset-requests"));
        assert!(r.headers().contains_key("x-ratelimit-reset-tokens"));
    }
    let r = post(&server, &body("hi")).await;
    assert_eq!(r.status(), 429);
    let ms: u64 = r.headers()["retry-after-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(ms > 1000 && ms <= 2000, "retry-after-ms {ms}");
    assert_eq!(r.headers()["retry-after"], "2");
    assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "0");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert_eq!(v["error"]["type"], "requests");
    let s = server.stats();
    assert_eq!((s.requests, s.ok, s.rate_limited), (3, 2, 1));
}

#[tokio::test]
async fn tpm_limit_gives_token_429() {
    // 600 tpm over 1 s = 10 tokens per window; one request costs 14 + 16.
    let server = FakeServer::start(Config {
        tpm: Some(600),
        window_s: 1.0,
        ..Config::default()
    })
    .await;
    let r = post(&server, &body("hello world")).await;
    assert_eq!(r.status(), 429);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "tokens");
    assert_eq!(server.stats().tokens_admitted, 0);
}

#[tokio::test]
async fn fault_500_counts_per_message() {
    let server = FakeServer::start(Config::default()).await;
    let b = body("row 7 FAULT:500:2");
    for _ in 0..2 {
        let r = post(&server, &b).await;
        assert_eq!(r.status(), 500);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], "server_error");
    }
    let r = post(&server, &b).await;
    assert_eq!(r.status(), 200);
    // A different row with the same marker has its own counter.
    let r = post(&server, &body("row 8 FAULT:500:2")).await;
    assert_eq!(r.status(), 500);
    let s = server.stats();
    assert_eq!((s.requests, s.ok, s.faults), (4, 1, 3));
}

#[tokio::test]
async fn fault_statuses_and_headers() {
    let server = FakeServer::start(Config::default()).await;
    let r = post(&server, &body("FAULT:503")).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(r.headers()["retry-after-ms"], "50");
    let r = post(&server, &body("FAULT:429")).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after-ms"], "20");
    let r = post(&server, &body("FAULT:quota")).await;
    assert_eq!(r.status(), 429);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "insufficient_quota");
    for (m, code) in [("FAULT:401", 401), ("FAULT:403", 403), ("FAULT:400", 400)] {
        assert_eq!(post(&server, &body(m)).await.status(), code);
    }
    let r = post(&server, &body("FAULT:404")).await;
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "model_not_found");
    assert_eq!(post(&server, &body("FAULT:422")).await.status(), 422);
    let r = post(&server, &body("FAULT:empty")).await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"], json!([]));
}

#[tokio::test]
async fn reset_drops_connection_for_reqwest() {
    let server = FakeServer::start(Config::default()).await;
    let err = reqwest::Client::new()
        .post(format!("{}/chat/completions", server.base_url()))
        .json(&body("FAULT:reset"))
        .send()
        .await
        .expect_err("reset must be a transport error");
    assert!(err.status().is_none(), "{err:?}");
    assert!(err.is_request() || err.is_connect(), "{err:?}");
    assert_eq!(server.stats().faults, 1);
}

#[tokio::test]
async fn reset_sends_no_bytes_on_raw_tcp() {
    let server = FakeServer::start(Config::default()).await;
    let payload = body("FAULT:reset").to_string();
    let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
        payload.len(),
        payload
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    // EOF or a reset error; either way no HTTP bytes.
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("connection must close promptly");
    assert!(buf.is_empty(), "got {:?}", String::from_utf8_lossy(&buf));
    let _ = read;
}

#[tokio::test]
async fn badjson_and_usage_override() {
    let server = FakeServer::start(Config::default()).await;
    let r = post(&server, &body("FAULT:badjson")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let t = r.text().await.unwrap();
    assert!(serde_json::from_str::<Value>(&t).is_err());

    let r = post(&server, &body("x FAULT:usage=1000,200,400,50")).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200,
               "prompt_tokens_details": {"cached_tokens": 400},
               "completion_tokens_details": {"reasoning_tokens": 50}})
    );
    assert!(v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .starts_with("echo: x FAULT:usage"));
    let s = server.stats();
    assert_eq!((s.ok, s.faults), (1, 1));
}

#[tokio::test]
async fn hang_trips_client_timeout_and_slow_delays() {
    let server = FakeServer::start(Config::default()).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let url = format!("{}/chat/completions", server.base_url());
    let err = client
        .post(&url)
        .json(&body("FAULT:hang"))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    let t = std::time::Instant::now();
    let r = client
        .post(&url)
        .json(&body("FAULT:slow=60"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(t.elapsed() >= Duration::from_millis(60));
}

#[tokio::test]
async fn stats_and_models_routes() {
    let server = FakeServer::start(Config::default()).await;
    post(&server, &body("a")).await;
    let base = format!("http://{}", server.addr);
    let v: Value = reqwest::get(format!("{base}/stats"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["requests"], 1);
    assert_eq!(v["ok"], 1);
    let v: Value = reqwest::get(format!("{base}/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "list");
}

#[test]
fn background_server_from_plain_test() {
    let server = spawn_background(Config {
        record_bodies: false,
        ..Config::default()
    });
    // Prove it serves without the caller's runtime: a tiny blocking HTTP/1.1 request.
    let out = post_blocking(server.addr, &body("bg").to_string());
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("echo: bg"));
    assert_eq!(server.stats().ok, 1);
    assert!(server.requests().is_empty());
    let addr = server.addr;
    drop(server);
    // After drop the listener goes away (give the runtime a moment to shut down).
    std::thread::sleep(Duration::from_millis(200));
    assert!(std::net::TcpStream::connect(addr).is_err());
}

#[tokio::test]
async fn reset_on_pooled_connection_is_still_an_error() {
    let server = FakeServer::start(Config::default()).await;
    let client = reqwest::Client::new();
    let url = format!("{}/chat/completions", server.base_url());
    // Warm a keep-alive connection so the reset hits a reused socket.
    let r = client.post(&url).json(&body("warm")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    let err = client
        .post(&url)
        .json(&body("FAULT:reset:1"))
        .send()
        .await
        .expect_err("reset must be a transport error");
    // reqwest reports hyper's IncompleteMessage as a request error.
    assert!(err.status().is_none() && err.is_request(), "{err:?}");
    // The marker had n=1, so the retry (a new connection) succeeds.
    let r = client
        .post(&url)
        .json(&body("FAULT:reset:1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// The `data:` payloads of an SSE body, in order.
fn sse_datas(text: &str) -> Vec<&str> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect()
}

fn streamed(content: &str) -> Value {
    let mut b = body(content);
    b["stream"] = json!(true);
    b["stream_options"] = json!({"include_usage": true});
    b
}

#[tokio::test]
async fn nousage_answers_without_usage_and_is_still_billed() {
    let server = FakeServer::start(Config::default()).await;
    // `:1`: the first request has no usage, the identical second one reports it.
    let r = post(&server, &body("FAULT:nousage:1")).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(v.get("usage").is_none(), "{v}");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "echo: FAULT:nousage:1"
    );
    let v: Value = post(&server, &body("FAULT:nousage:1"))
        .await
        .json()
        .await
        .unwrap();
    let (p, c) = (
        v["usage"]["prompt_tokens"].as_u64().unwrap(),
        v["usage"]["completion_tokens"].as_u64().unwrap(),
    );

    // Streaming: no usage chunk and no `usage: null` fields, though include_usage is set.
    let text = post(&server, &streamed("FAULT:nousage:9"))
        .await
        .text()
        .await
        .unwrap();
    let datas = sse_datas(&text);
    assert_eq!(*datas.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = datas[..datas.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(chunks.iter().all(|c| c.get("usage").is_none()), "{text}");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "echo: FAULT:nousage:9");

    let s = server.stats();
    assert_eq!((s.requests, s.ok, s.faults), (3, 3, 0));
    // Three answers of the same length, each billed what the second one reported.
    assert_eq!(s.billed_prompt_tokens, 3 * p);
    assert_eq!(s.billed_completion_tokens, 3 * c);
}

#[tokio::test]
async fn omit_usage_config_drops_usage_from_every_answer() {
    let server = FakeServer::start(Config {
        omit_usage: true,
        ..Config::default()
    })
    .await;
    let v: Value = post(&server, &body("hello world"))
        .await
        .json()
        .await
        .unwrap();
    assert!(v.get("usage").is_none(), "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], "echo: hello world");
    let text = post(&server, &streamed("hello world"))
        .await
        .text()
        .await
        .unwrap();
    assert!(!text.contains("usage"), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"));
    let s = server.stats();
    assert_eq!(s.ok, 2);
    // What the normal answer reports (see normal_completion), twice.
    assert_eq!(
        (s.billed_prompt_tokens, s.billed_completion_tokens),
        (28, 10)
    );
}

#[tokio::test]
async fn billing_counts_every_sent_completion_and_hung_requests_apart() {
    let server = FakeServer::start(Config::default()).await;
    post(&server, &body("hello world")).await; // 14 + 5
    post(&server, &body("x FAULT:usage=1000,200,400,50")).await;
    post(&server, &streamed("hello world"))
        .await
        .text()
        .await
        .unwrap();
    // Error answers carry no completion: not billed.
    post(&server, &body("FAULT:500")).await;
    post(&server, &body("FAULT:empty")).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let err = client
        .post(format!("{}/chat/completions", server.base_url()))
        .json(&body("FAULT:hang"))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");

    let s = server.stats();
    assert_eq!(s.billed_prompt_tokens, 14 + 1000 + 14);
    assert_eq!(s.billed_completion_tokens, 5 + 200 + 5);
    assert_eq!(s.billed_unanswered, 1);
    let v: Value = reqwest::get(format!("http://{}/stats", server.addr))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["billed_prompt_tokens"], 14 + 1000 + 14);
    assert_eq!(v["billed_completion_tokens"], 5 + 200 + 5);
    assert_eq!(v["billed_unanswered"], 1);
}

#[tokio::test]
async fn cut_stream_stops_before_done_and_is_billed() {
    let server = FakeServer::start(Config::default()).await;
    let r = post(&server, &streamed("stream me please FAULT:cut:1")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["connection"], "close");
    // The body ends cleanly: the client reads it all, and finds no end of stream in it.
    let text = r.text().await.unwrap();
    assert!(!text.contains("[DONE]"), "{text}");
    let chunks: Vec<Value> = sse_datas(&text)
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    // No finish_reason and no usage numbers (each chunk's `usage: null` is as usual).
    assert!(chunks
        .iter()
        .all(|c| c["choices"][0]["finish_reason"].is_null() && c["usage"].is_null()));
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    let full = "echo: stream me please FAULT:cut:1";
    assert!(
        !content.is_empty() && content.len() < full.len() && full.starts_with(&content),
        "{content:?}"
    );
    let s = server.stats();
    assert_eq!((s.ok, s.faults), (0, 1));

    // `:1`: the retry gets the whole answer, whose usage is what the cut one was billed.
    let text = post(&server, &streamed("stream me please FAULT:cut:1"))
        .await
        .text()
        .await
        .unwrap();
    let datas = sse_datas(&text);
    assert_eq!(*datas.last().unwrap(), "[DONE]");
    let usage: Value = serde_json::from_str(datas[datas.len() - 2]).unwrap();
    let s = server.stats();
    assert_eq!((s.ok, s.faults), (1, 1));
    assert_eq!(
        s.billed_prompt_tokens,
        2 * usage["usage"]["prompt_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        s.billed_completion_tokens,
        2 * usage["usage"]["completion_tokens"].as_u64().unwrap()
    );
}

#[tokio::test]
async fn cut_without_streaming_drops_the_body_halfway() {
    let server = FakeServer::start(Config::default()).await;
    let r = post(&server, &body("hello world FAULT:cut")).await;
    assert_eq!(r.status(), 200);
    // The head and half the body arrive, then the connection drops.
    let err = r
        .bytes()
        .await
        .expect_err("a cut body must be a read error");
    assert!(err.status().is_none(), "{err:?}");
    let s = server.stats();
    assert_eq!(s.faults, 1);
    assert!(s.billed_prompt_tokens > 0 && s.billed_completion_tokens > 0);
}

#[test]
fn background_server_on_a_chosen_port_after_an_outage() {
    // A free port: bind it, note it, let it go.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let err = std::net::TcpStream::connect(addr).expect_err("nothing listens yet");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);

    let server = spawn_background_on(Config::default(), addr).expect("bind the freed port");
    assert_eq!(server.addr, addr);
    let out = post_blocking(addr, &body("back").to_string());
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(server.stats().ok, 1);

    // A taken port is an error to handle, not a panic.
    let taken = spawn_background_on(Config::default(), addr)
        .err()
        .expect("the port is in use");
    assert_eq!(taken.kind(), std::io::ErrorKind::AddrInUse);
}

/// One chat request over a plain blocking socket, without the caller's runtime; the whole
/// raw response.
fn post_blocking(addr: std::net::SocketAddr, payload: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
        payload.len(),
        payload
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}
