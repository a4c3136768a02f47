//! Anthropic's Messages route over real HTTP: auth, the body it requires, the answer's shape
//! and usage (with the cache fields), and its error shapes for injected faults.

use fake_openai::{Config, FakeServer};
use serde_json::{json, Value};

async fn post(server: &FakeServer, body: &Value, key: Option<&str>) -> (u16, Value) {
    let mut rb = reqwest::Client::new()
        .post(format!("http://{}/v1/messages", server.addr))
        .header("anthropic-version", "2023-06-01")
        .json(body);
    if let Some(k) = key {
        rb = rb.header("x-api-key", k);
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn body(text: &str) -> Value {
    json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 50,
        "system": "You are terse.",
        "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}],
    })
}

#[tokio::test]
async fn an_answer_has_text_blocks_a_stop_reason_and_usage_with_cache_fields() {
    let server = FakeServer::start(Config::default()).await;
    let (st, v) = post(&server, &body("hello"), None).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert_eq!(v["model"], "claude-sonnet-4-5");
    assert_eq!(v["content"][0]["type"], "text");
    assert!(
        v["content"][0]["text"].as_str().unwrap().contains("hello"),
        "{v}"
    );
    assert_eq!(v["stop_reason"], "end_turn");
    let u = &v["usage"];
    assert!(u["input_tokens"].as_u64().unwrap() > 0);
    assert_eq!(u["cache_read_input_tokens"], 0);
    // Cached tokens are reported apart from the input tokens; the stats bill them all.
    let (_, v) = post(&server, &body("cached FAULT:usage=1000,20,600,0"), None).await;
    assert_eq!(v["usage"]["input_tokens"], 400);
    assert_eq!(v["usage"]["cache_read_input_tokens"], 600);
    assert_eq!(v["usage"]["output_tokens"], 20);
    let s = server.stats();
    assert_eq!(s.ok, 2);
    assert!(s.billed_prompt_tokens >= 1000);
    // `FAULT:long` fills max_tokens: the stop reason says so.
    let (_, v) = post(&server, &body("long FAULT:long"), None).await;
    assert_eq!(v["stop_reason"], "max_tokens", "{v}");
}

#[tokio::test]
async fn what_the_api_requires_is_required() {
    let server = FakeServer::start(Config {
        require_key: Some("sk-ant-test".into()),
        ..Config::default()
    })
    .await;
    let (st, v) = post(&server, &body("x"), Some("wrong")).await;
    assert_eq!(st, 401);
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "authentication_error");
    let mut b = body("x");
    b.as_object_mut().unwrap().remove("max_tokens");
    let (st, v) = post(&server, &b, Some("sk-ant-test")).await;
    assert_eq!(st, 400);
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_tokens"));
    // No anthropic-version header: refused.
    let r = reqwest::Client::new()
        .post(format!("http://{}/v1/messages", server.addr))
        .header("x-api-key", "sk-ant-test")
        .json(&body("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(server.stats().rejected, 3);
}

#[tokio::test]
async fn faults_come_back_as_the_apis_error_types() {
    let server = FakeServer::start(Config::default()).await;
    for (marker, status, typ) in [
        ("FAULT:400", 400, "invalid_request_error"),
        ("FAULT:403", 403, "permission_error"),
        ("FAULT:404", 404, "not_found_error"),
        ("FAULT:413", 413, "request_too_large"),
        ("FAULT:429", 429, "rate_limit_error"),
        ("FAULT:500", 500, "api_error"),
        ("FAULT:529", 529, "overloaded_error"),
        ("FAULT:503", 529, "overloaded_error"),
    ] {
        let (st, v) = post(&server, &body(marker), None).await;
        assert_eq!(
            (st, v["error"]["type"].as_str()),
            (status, Some(typ)),
            "{marker}: {v}"
        );
    }
    let r = reqwest::Client::new()
        .post(format!("http://{}/v1/messages", server.addr))
        .header("anthropic-version", "2023-06-01")
        .json(&body("FAULT:429"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(server.stats().faults, 9);
    assert_eq!(server.stats().billed_prompt_tokens, 0, "no fault is billed");
}

#[tokio::test]
async fn the_limiter_answers_with_anthropics_headers_and_refuses_with_a_rate_limit_error() {
    let server = FakeServer::start(Config {
        rpm: Some(60),
        tpm: Some(600_000),
        window_s: 1.0,
        ..Default::default()
    })
    .await;
    let send = || {
        reqwest::Client::new()
            .post(format!("http://{}/v1/messages", server.addr))
            .header("anthropic-version", "2023-06-01")
            .json(&body("hi"))
            .send()
    };
    let ok = send().await.unwrap();
    assert_eq!(ok.status(), 200);
    let h = ok.headers();
    assert_eq!(h["anthropic-ratelimit-requests-limit"], "60");
    assert_eq!(h["anthropic-ratelimit-requests-remaining"], "0");
    assert_eq!(h["anthropic-ratelimit-tokens-limit"], "600000");
    assert!(h.contains_key("anthropic-ratelimit-input-tokens-remaining"));
    // An RFC 3339 time, in UTC.
    let reset = h["anthropic-ratelimit-requests-reset"].to_str().unwrap();
    assert!(reset.contains('T') && reset.ends_with('Z'), "{reset}");
    // One request a one-second window: the next is refused at once.
    let refused = send().await.unwrap();
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    let v: Value = refused.json().await.unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
}
