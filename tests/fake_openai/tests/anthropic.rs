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

async fn batches(
    server: &FakeServer,
    method: &str,
    rest: &str,
    body: Option<&Value>,
) -> (u16, Value, String) {
    let url = format!("http://{}/v1/messages/batches{rest}", server.addr);
    let c = reqwest::Client::new();
    let mut rb = if method == "POST" {
        c.post(url)
    } else {
        c.get(url)
    };
    rb = rb.header("anthropic-version", "2023-06-01");
    if let Some(b) = body {
        rb = rb.json(b);
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
    )
}

fn request(id: &str, text: &str) -> Value {
    json!({"custom_id": id, "params": body(text)})
}

#[tokio::test]
async fn message_batches_run_on_the_tests_clock_and_answer_every_request_by_its_result_type() {
    let server = FakeServer::start(Config {
        batch_lines_per_step: Some(2),
        ..Config::default()
    })
    .await;
    // What the API refuses: a custom_id outside its pattern, a duplicate, a streamed request.
    for bad in [
        json!({"requests": [request("has space", "x")]}),
        json!({"requests": [request("a", "x"), request("a", "y")]}),
        json!({"requests": [{"custom_id": "s", "params": {"stream": true, "model": "m"}}]}),
        json!({"requests": []}),
    ] {
        let (st, v, _) = batches(&server, "POST", "", Some(&bad)).await;
        assert_eq!(st, 400, "{bad}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
    let reqs = json!({"requests": [request("ok-1", "hello"), request("bad-2", "no FAULT:400"),
        request("oops-3", "busy FAULT:500"), request("ok-4", "again")]});
    let (st, b, _) = batches(&server, "POST", "", Some(&reqs)).await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["type"], "message_batch");
    assert_eq!(b["processing_status"], "in_progress");
    assert_eq!(b["request_counts"]["processing"], 4);
    assert!(b["results_url"].is_null());
    let id = b["id"].as_str().unwrap().to_string();
    // Results are not there before the batch ends.
    let (st, _, _) = batches(&server, "GET", &format!("/{id}/results"), None).await;
    assert_eq!(st, 400);

    server.advance_batches(); // two requests answered
    let (_, b, _) = batches(&server, "GET", &format!("/{id}"), None).await;
    assert_eq!(b["processing_status"], "in_progress");
    assert_eq!(b["request_counts"]["processing"], 2);
    server.advance_batches();
    let (_, b, _) = batches(&server, "GET", &format!("/{id}"), None).await;
    assert_eq!(b["processing_status"], "ended");
    let c = &b["request_counts"];
    assert_eq!(
        (c["succeeded"].as_u64(), c["errored"].as_u64()),
        (Some(2), Some(2))
    );
    assert!(b["ended_at"].as_str().unwrap().ends_with('Z'));
    let url = b["results_url"].as_str().unwrap();
    assert_eq!(
        url,
        format!("http://{}/v1/messages/batches/{id}/results", server.addr)
    );
    let text = reqwest::Client::new()
        .get(url)
        .header("anthropic-version", "2023-06-01")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(
        lines[0]["custom_id"], "ok-4",
        "newest first: map by custom_id"
    );
    let by = |id: &str| lines.iter().find(|l| l["custom_id"] == id).unwrap()["result"].clone();
    assert_eq!(by("ok-1")["type"], "succeeded");
    assert!(
        by("ok-1")["message"]["usage"]["input_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert_eq!(
        by("bad-2")["error"]["error"]["type"],
        "invalid_request_error"
    );
    assert_eq!(by("oops-3")["error"]["error"]["type"], "api_error");
    assert_eq!(
        server.stats().batch_requests_billed,
        2,
        "only succeeded requests are billed"
    );

    // A second batch is cancelled after one step; a third expires untouched.
    let two = json!({"requests": [request("a", "1"), request("b", "2"), request("c", "3")]});
    let (_, b2, _) = batches(&server, "POST", "", Some(&two)).await;
    let id2 = b2["id"].as_str().unwrap().to_string();
    server.advance_batches();
    let (_, c2, _) = batches(&server, "POST", &format!("/{id2}/cancel"), None).await;
    assert_eq!(c2["processing_status"], "canceling");
    assert!(c2["cancel_initiated_at"].is_string());
    let (_, b3, _) = batches(&server, "POST", "", Some(&two)).await;
    let id3 = b3["id"].as_str().unwrap().to_string();
    server.expire_batches();
    server.advance_batches(); // canceling → ended
    let (_, c2, _) = batches(&server, "GET", &format!("/{id2}"), None).await;
    let (_, c3, _) = batches(&server, "GET", &format!("/{id3}"), None).await;
    assert_eq!(
        (
            c2["processing_status"].as_str(),
            c3["processing_status"].as_str()
        ),
        (Some("ended"), Some("ended"))
    );
    let counts = (&c2["request_counts"], &c3["request_counts"]);
    assert_eq!(
        (
            counts.0["succeeded"].as_u64(),
            counts.0["canceled"].as_u64()
        ),
        (Some(2), Some(1))
    );
    assert_eq!(
        (counts.1["succeeded"].as_u64(), counts.1["expired"].as_u64()),
        (Some(0), Some(3))
    );

    // The list: newest first, paged by after_id.
    let (_, page, _) = batches(&server, "GET", "?limit=2", None).await;
    let ids: Vec<&str> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![id3.as_str(), id2.as_str()]);
    assert_eq!(page["has_more"], true);
    let (_, rest, _) = batches(&server, "GET", &format!("?limit=2&after_id={id2}"), None).await;
    assert_eq!(rest["data"][0]["id"], id.as_str());
    assert_eq!(rest["has_more"], false);
}
