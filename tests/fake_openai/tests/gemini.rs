//! Gemini's routes over real HTTP: generateContent's auth, answer and usage (with implicit
//! caching), its error shapes for injected faults, the SSE stream, and the Files and Batch
//! APIs on the test's clock (states, list by display name, cancel, a lost create).

use fake_openai::{Config, FakeServer};
use serde_json::{json, Value};

const KEY: &str = "AIza-fake-test-key";

async fn post(server: &FakeServer, path: &str, body: &Value, key: Option<&str>) -> (u16, Value) {
    let mut rb = reqwest::Client::new()
        .post(format!("{}{path}", server.root_url()))
        .json(body);
    if let Some(k) = key {
        rb = rb.header("x-goog-api-key", k);
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn generate(server: &FakeServer, body: &Value) -> (u16, Value) {
    post(
        server,
        "/v1beta/models/gemini-2.5-flash:generateContent",
        body,
        Some(KEY),
    )
    .await
}

fn body(system: &str, text: &str) -> Value {
    json!({
        "systemInstruction": {"parts": [{"text": system}]},
        "contents": [{"role": "user", "parts": [{"text": text}]}],
        "generationConfig": {"maxOutputTokens": 50},
    })
}

#[tokio::test]
async fn an_answer_has_candidates_a_finish_reason_and_usage_metadata() {
    let server = FakeServer::start(Config {
        require_key: Some(KEY.into()),
        ..Config::default()
    })
    .await;
    let (st, v) = generate(&server, &body("be brief", "hello")).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["candidates"][0]["content"]["role"], "model");
    assert_eq!(
        v["candidates"][0]["content"]["parts"][0]["text"],
        "echo: hello"
    );
    assert_eq!(v["candidates"][0]["finishReason"], "STOP");
    assert_eq!(v["modelVersion"], "gemini-2.5-flash");
    let u = &v["usageMetadata"];
    assert!(u["promptTokenCount"].as_u64().unwrap() > 0, "{u}");
    assert_eq!(
        u["totalTokenCount"].as_u64(),
        Some(u["promptTokenCount"].as_u64().unwrap() + u["candidatesTokenCount"].as_u64().unwrap())
    );
    // A wrong key is Google's 400 API_KEY_INVALID; none at all too.
    for key in [Some("wrong"), None] {
        let (st, v) = post(
            &server,
            "/v1beta/models/gemini-2.5-flash:generateContent",
            &body("be brief", "x"),
            key,
        )
        .await;
        assert_eq!(st, 400, "{v}");
        assert_eq!(v["error"]["details"][0]["reason"], "API_KEY_INVALID");
    }
    // candidateCount: one candidate each, indexed; MAX_TOKENS when cut by maxOutputTokens.
    let mut b = body("be brief", "twice");
    b["generationConfig"]["candidateCount"] = json!(2);
    let (_, v) = generate(&server, &b).await;
    assert_eq!(v["candidates"].as_array().unwrap().len(), 2);
    assert_eq!(v["candidates"][1]["index"], 1);
    b["generationConfig"] = json!({"maxOutputTokens": 1});
    let (_, v) = generate(&server, &b).await;
    assert_eq!(v["candidates"][0]["finishReason"], "MAX_TOKENS");
}

#[tokio::test]
async fn a_long_system_instruction_seen_before_is_read_from_the_implicit_cache() {
    let server = FakeServer::start(Config::default()).await;
    let long = "rules ".repeat(800);
    let (_, first) = generate(&server, &body(&long, "a")).await;
    assert!(first["usageMetadata"]
        .get("cachedContentTokenCount")
        .is_none());
    let (_, second) = generate(&server, &body(&long, "b")).await;
    let cached = second["usageMetadata"]["cachedContentTokenCount"]
        .as_u64()
        .unwrap();
    assert!(cached >= 1024, "{second}");
    // A short one is never cached.
    generate(&server, &body("short", "a")).await;
    let (_, v) = generate(&server, &body("short", "b")).await;
    assert!(v["usageMetadata"].get("cachedContentTokenCount").is_none());
    let st = server.stats();
    assert_eq!(st.requests, 4);
}

#[tokio::test]
async fn faults_answer_in_geminis_error_shape_with_retry_info() {
    let server = FakeServer::start(Config::default()).await;
    let (st, v) = generate(&server, &body("b", "x FAULT:429")).await;
    assert_eq!(st, 429);
    assert_eq!(v["error"]["status"], "RESOURCE_EXHAUSTED");
    let d = &v["error"]["details"][0];
    assert_eq!(d["@type"], "type.googleapis.com/google.rpc.RetryInfo");
    assert_eq!(d["retryDelay"], "1s");
    for (marker, code, status) in [
        ("FAULT:503", 503, "UNAVAILABLE"),
        ("FAULT:500", 500, "INTERNAL"),
        ("FAULT:400", 400, "INVALID_ARGUMENT"),
        ("FAULT:401", 401, "UNAUTHENTICATED"),
        ("FAULT:403", 403, "PERMISSION_DENIED"),
    ] {
        let (st, v) = generate(&server, &body("b", &format!("x {marker}"))).await;
        assert_eq!((st, v["error"]["status"].as_str()), (code, Some(status)));
    }
    let (_, v) = generate(&server, &body("b", "x FAULT:refusal")).await;
    assert_eq!(v["candidates"][0]["finishReason"], "SAFETY");
    assert!(v["candidates"][0].get("content").is_none());
    let (_, v) = generate(&server, &body("b", "x FAULT:blockprompt")).await;
    assert_eq!(v["promptFeedback"]["blockReason"], "SAFETY");
    assert!(v.get("candidates").is_none());
    // Only the answers are billed: the refusal's whole usage, the blocked prompt's prompt.
    let st = server.stats();
    assert_eq!(st.faults, 6);
    assert!(st.billed_prompt_tokens > 0);
}

#[tokio::test]
async fn a_stream_is_chunks_of_text_then_the_finish_reason_and_usage() {
    let server = FakeServer::start(Config::default()).await;
    let read = |text: &'static str| {
        let url = format!(
            "{}/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
            server.root_url()
        );
        async move {
            let r = reqwest::Client::new()
                .post(url)
                .json(&body("b", text))
                .send()
                .await
                .unwrap();
            assert_eq!(
                r.headers()["content-type"].to_str().unwrap(),
                "text/event-stream"
            );
            let t = r.text().await.unwrap();
            t.lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .map(|d| serde_json::from_str::<Value>(d).unwrap())
                .collect::<Vec<Value>>()
        }
    };
    let chunks = read("a longer sentence to stream").await;
    assert!(chunks.len() > 2);
    let text: String = chunks
        .iter()
        .filter_map(|c| c.pointer("/candidates/0/content/parts/0/text"))
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(text, "echo: a longer sentence to stream");
    let last = chunks.last().unwrap();
    assert_eq!(last["candidates"][0]["finishReason"], "STOP");
    assert!(last["usageMetadata"]["promptTokenCount"].is_u64());
    let cut = read("x FAULT:cut").await;
    assert!(cut
        .iter()
        .all(|c| c.pointer("/candidates/0/finishReason").is_none()));
    // The cut answer is billed like any other.
    assert_eq!(server.stats().ok, 2);
}

#[tokio::test]
async fn a_response_json_schema_is_answered_with_json_in_its_shape() {
    let server = FakeServer::start(Config::default()).await;
    let mut b = body("b", "boots");
    b["generationConfig"] = json!({"responseMimeType": "application/json",
        "responseJsonSchema": {"type": "object", "required": ["headline"],
            "properties": {"headline": {"type": "string"}}}});
    let (_, v) = generate(&server, &b).await;
    let text = v["candidates"][0]["content"]["parts"][0]["text"]
        .as_str()
        .unwrap();
    let doc: Value = serde_json::from_str(text).unwrap();
    assert!(doc["headline"].is_string(), "{doc}");
}

/// A resumable upload's two steps; the file's name.
async fn upload(server: &FakeServer, name: &str, content: &str) -> String {
    let c = reqwest::Client::new();
    let r = c
        .post(format!("{}/upload/v1beta/files", server.root_url()))
        .header("x-goog-upload-protocol", "resumable")
        .header("x-goog-upload-command", "start")
        .json(&json!({"file": {"displayName": name}}))
        .send()
        .await
        .unwrap();
    let url = r.headers()["x-goog-upload-url"]
        .to_str()
        .unwrap()
        .to_string();
    let v: Value = c
        .post(url)
        .header("x-goog-upload-command", "upload, finalize")
        .header("x-goog-upload-offset", "0")
        .body(content.to_string())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["file"]["name"].as_str().unwrap().to_string()
}

fn line(key: &str, text: &str) -> String {
    format!(
        "{}\n",
        json!({"key": key, "request": {"contents": [{"role": "user", "parts": [{"text": text}]}]}})
    )
}

async fn get(server: &FakeServer, path: &str) -> Value {
    reqwest::get(format!("{}{path}", server.root_url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_batch_moves_pending_running_succeeded_and_its_responses_file_has_every_key() {
    let server = FakeServer::start(Config::default()).await;
    let input = format!(
        "{}{}{}",
        line("k1", "a"),
        line("k2", "b FAULT:400"),
        line("k3", "c")
    );
    let file = upload(&server, "part-1.jsonl", &input).await;
    assert_eq!(server.gemini_file(&file).unwrap(), input.as_bytes());
    let files = get(&server, "/v1beta/files").await;
    assert_eq!(files["files"][0]["displayName"], "part-1.jsonl");
    let (st, op) = post(
        &server,
        "/v1beta/models/gemini-2.5-flash:batchGenerateContent",
        &json!({"batch": {"displayName": "pm-part=p1", "inputConfig": {"fileName": file}}}),
        None,
    )
    .await;
    assert_eq!(st, 200, "{op}");
    let name = op["name"].as_str().unwrap().to_string();
    assert_eq!(op["metadata"]["state"], "BATCH_STATE_PENDING");
    server.advance_batches();
    let b = get(&server, &format!("/v1beta/{name}")).await;
    assert_eq!(b["metadata"]["state"], "BATCH_STATE_RUNNING");
    server.complete_batches();
    let b = get(&server, &format!("/v1beta/{name}")).await;
    let m = &b["metadata"];
    assert_eq!(m["state"], "BATCH_STATE_SUCCEEDED");
    assert_eq!(m["batchStats"]["successfulRequestCount"], "2");
    assert_eq!(m["batchStats"]["failedRequestCount"], "1");
    assert_eq!(b["done"], true);
    let out = m["output"]["responsesFile"].as_str().unwrap();
    let text = reqwest::get(format!(
        "{}/download/v1beta/{out}:download?alt=media",
        server.root_url()
    ))
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["key"], "k1");
    assert!(lines[0]["response"]["usageMetadata"].is_object());
    assert_eq!(lines[1]["error"]["status"], "INVALID_ARGUMENT");
    let list = get(&server, "/v1beta/batches").await;
    assert_eq!(
        list["operations"][0]["metadata"]["displayName"],
        "pm-part=p1"
    );
    let st = server.stats();
    assert_eq!(
        (
            st.files_uploaded,
            st.batches_created,
            st.batch_requests_billed
        ),
        (1, 1, 2)
    );
    assert_eq!(st.requests, 0, "batch lines are not chat requests");
}

#[tokio::test]
async fn a_cancel_keeps_the_lines_answered_and_a_lost_create_still_makes_its_batch() {
    let server = FakeServer::start(Config {
        batch_lines_per_step: Some(1),
        batch_create_answers_lost: 1,
        ..Config::default()
    })
    .await;
    let file = upload(
        &server,
        "p.jsonl",
        &format!("{}{}", line("k1", "a"), line("k2", "b")),
    )
    .await;
    let create = json!({"batch": {"displayName": "pm-part=p9", "inputConfig": {"fileName": file}}});
    // The first create's answer is lost: the connection drops, the batch is made.
    let r = reqwest::Client::new()
        .post(format!(
            "{}/v1beta/models/gemini-2.5-flash:batchGenerateContent",
            server.root_url()
        ))
        .json(&create)
        .send()
        .await;
    assert!(r.is_err(), "the answer was lost");
    assert_eq!(server.stats().batches_created, 1);
    let ops = server.gemini_batches();
    let name = ops[0]["name"].as_str().unwrap().to_string();
    server.advance_batches(); // running
    server.advance_batches(); // one line answered
    let (st, _) = post(&server, &format!("/v1beta/{name}:cancel"), &json!({}), None).await;
    assert_eq!(st, 200);
    let b = get(&server, &format!("/v1beta/{name}")).await;
    assert_eq!(b["metadata"]["state"], "BATCH_STATE_CANCELLED");
    let out = b["metadata"]["output"]["responsesFile"].as_str().unwrap();
    let text = String::from_utf8(server.gemini_file(out).unwrap()).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    let st = server.stats();
    assert_eq!((st.batches_cancelled, st.batch_requests_billed), (1, 1));
}
