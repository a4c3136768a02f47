//! The Files and Batches endpoints over real HTTP: upload, create, the test's clock,
//! validation, expiry, cancellation, error lines, listing, auto-advance and Azure's routes.

use std::collections::HashMap;

use fake_openai::{Config, FakeServer};
use serde_json::{json, Value};

use crate::common::{body, jsonl, Api, KEY};

fn line(custom_id: &str, content: &str) -> Value {
    json!({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body(content)})
}

fn keyed(server_config: Config) -> Config {
    Config {
        require_key: Some(KEY.into()),
        ..server_config
    }
}

fn by_custom_id(lines: &[Value]) -> HashMap<String, Value> {
    let mut m = HashMap::new();
    for l in lines {
        let id = l["custom_id"].as_str().unwrap().to_string();
        assert!(m.insert(id, l.clone()).is_none(), "custom_id twice: {l}");
    }
    m
}

fn status(b: &Value) -> &str {
    b["status"].as_str().unwrap()
}

fn counts(b: &Value) -> (u64, u64, u64) {
    let c = &b["request_counts"];
    (
        c["total"].as_u64().unwrap(),
        c["completed"].as_u64().unwrap(),
        c["failed"].as_u64().unwrap(),
    )
}

#[tokio::test]
async fn full_round_trip() {
    let server = FakeServer::start(keyed(Config::default())).await;
    let api = Api::openai(&server);
    let input: Vec<Value> = (0..5)
        .map(|i| line(&format!("row-{i}"), &format!("hello number {i}")))
        .collect();
    let bytes = jsonl(&input);
    let file = api.upload(&bytes).await;
    assert_eq!(file["object"], "file");
    assert_eq!(file["purpose"], "batch");
    assert_eq!(file["status"], "processed");
    assert_eq!(file["filename"], "input.jsonl");
    assert_eq!(file["bytes"], bytes.len());
    assert!(file["id"].as_str().unwrap().starts_with("file-"));
    assert!(file["created_at"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(
        api.get(&format!("/files/{}", file["id"].as_str().unwrap()))
            .await,
        (200, file.clone())
    );
    assert_eq!(
        server.file_content(file["id"].as_str().unwrap()),
        Some(bytes.clone())
    );

    let b = api.create(&file["id"], "/v1/chat/completions").await;
    assert_eq!(b["object"], "batch");
    assert_eq!(status(&b), "validating");
    assert!(b["id"].as_str().unwrap().starts_with("batch_"));
    assert_eq!(b["input_file_id"], file["id"]);
    assert_eq!(b["endpoint"], "/v1/chat/completions");
    assert_eq!(b["completion_window"], "24h");
    assert_eq!(b["metadata"], json!({"job": "test"}));
    assert_eq!(b["errors"], Value::Null);
    assert_eq!(b["output_file_id"], Value::Null);
    assert_eq!(b["error_file_id"], Value::Null);
    assert_eq!(
        b["expires_at"].as_u64().unwrap(),
        b["created_at"].as_u64().unwrap() + 86_400
    );
    for k in [
        "in_progress_at",
        "finalizing_at",
        "completed_at",
        "failed_at",
        "expired_at",
        "cancelling_at",
        "cancelled_at",
    ] {
        assert_eq!(b[k], Value::Null, "{k}");
    }
    // Nothing moves until the test says so.
    assert_eq!(status(&api.batch(&b["id"]).await), "validating");

    server.advance_batches();
    let b1 = api.batch(&b["id"]).await;
    assert_eq!(status(&b1), "in_progress");
    assert!(b1["in_progress_at"].is_u64());
    assert_eq!(counts(&b1), (5, 0, 0));
    server.advance_batches();
    let b2 = api.batch(&b["id"]).await;
    assert_eq!(status(&b2), "finalizing");
    assert!(b2["finalizing_at"].is_u64());
    assert_eq!(counts(&b2), (5, 5, 0));
    assert_eq!(
        b2["output_file_id"],
        Value::Null,
        "files are written on completion"
    );
    server.advance_batches();
    let done = api.batch(&b["id"]).await;
    assert_eq!(status(&done), "completed");
    assert!(done["completed_at"].is_u64());
    assert_eq!(done["error_file_id"], Value::Null);
    assert_eq!(server.batches(), vec![done.clone()]);
    // Terminal: further steps change nothing.
    server.advance_batches();
    assert_eq!(api.batch(&b["id"]).await, done);

    let out_id = done["output_file_id"].as_str().unwrap();
    let files = server.files();
    let out_file = files.iter().find(|f| f["id"] == out_id).unwrap();
    assert_eq!(out_file["purpose"], "batch_output");
    let out = api.lines(&done["output_file_id"]).await;
    assert_eq!(out.len(), 5);
    let order: Vec<&str> = out
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    assert_ne!(
        order,
        ["row-0", "row-1", "row-2", "row-3", "row-4"],
        "results must come out of order"
    );
    let got = by_custom_id(&out);

    // Same completion as the chat route gives for the same body.
    for (i, l) in input.iter().enumerate() {
        let r = &got[&format!("row-{i}")];
        assert!(r["id"].as_str().unwrap().starts_with("batch_req_"));
        assert_eq!(r["error"], Value::Null);
        assert_eq!(r["response"]["status_code"], 200);
        assert!(r["response"]["request_id"]
            .as_str()
            .unwrap()
            .starts_with("req_"));
        let body = &r["response"]["body"];
        assert_eq!(body["object"], "chat.completion");
        let chat: Value = api
            .req(reqwest::Method::POST, "/chat/completions")
            .json(&l["body"])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(body["choices"], chat["choices"]);
        assert_eq!(body["usage"], chat["usage"]);
        assert_eq!(body["model"], chat["model"]);
    }

    let s = server.stats();
    assert_eq!(
        (s.files_uploaded, s.batches_created, s.batches_cancelled),
        (1, 1, 0)
    );
    assert_eq!(s.batch_requests_billed, 5);
    // requests/ok are chat requests only: the 5 comparisons above.
    assert_eq!((s.requests, s.ok), (5, 5));
    assert_eq!(server.requests().len(), 5);
    // The executed lines are recorded apart, whole.
    let executed = server.batch_requests();
    assert_eq!(executed.len(), 5);
    assert_eq!(by_custom_id(&executed).len(), 5);
    assert!(executed.iter().all(|l| input.contains(l)));
    let bodies = server.batch_bodies();
    assert_eq!(bodies.len(), 5);
    assert!(bodies.iter().all(|b| input.iter().any(|l| &l["body"] == b)));
    let sj = s.to_json();
    assert_eq!(sj["files_uploaded"], 1);
    assert_eq!(sj["batches_created"], 1);
    assert_eq!(sj["batch_requests_billed"], 5);
    assert_eq!(sj["batches_cancelled"], 0);

    // Files: listed newest first (the output file, then the upload), deleted, gone.
    let (st, list) = api.get("/files").await;
    assert_eq!(st, 200);
    assert_eq!(list["object"], "list");
    assert_eq!(list["has_more"], false);
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [out_id, file["id"].as_str().unwrap()]);
    let (_, only_batch) = api.get("/files?purpose=batch").await;
    assert_eq!(only_batch["data"], json!([file]));
    let r = api
        .req(reqwest::Method::DELETE, &format!("/files/{out_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"id": out_id, "object": "file", "deleted": true})
    );
    assert_eq!(api.get(&format!("/files/{out_id}")).await.0, 404);
    let r = api
        .req(reqwest::Method::GET, &format!("/files/{out_id}/content"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(server.file_content(out_id), None);
}

#[tokio::test]
async fn validation_failure_reports_every_bad_line() {
    let server = FakeServer::start(Config::default()).await;
    let api = Api::openai(&server);
    let mut wrong_method = line("m", "x");
    wrong_method["method"] = json!("GET");
    let mut wrong_url = line("u", "x");
    wrong_url["url"] = json!("/v1/embeddings");
    let mut other_model = line("o", "x");
    other_model["body"]["model"] = json!("gpt-4o");
    let mut no_model = line("nm", "x");
    no_model["body"].as_object_mut().unwrap().remove("model");
    let mut no_custom_id = line("", "x");
    no_custom_id.as_object_mut().unwrap().remove("custom_id");
    let mut text = Vec::new();
    text.extend_from_slice(&jsonl(&[line("ok-1", "fine")])); // line 1
    text.extend_from_slice(b"{not json\n"); // line 2
    text.extend_from_slice(b"\n"); // line 3, blank: skipped
    text.extend_from_slice(&jsonl(&[
        no_custom_id,                             // 4
        line("ok-1", "duplicate id"),             // 5
        wrong_method,                             // 6
        wrong_url,                                // 7
        other_model,                              // 8
        no_model,                                 // 9
        line("bad", "please FAULT:batchinvalid"), // 10
        line("ok-2", "fine too"),                 // 11
    ]));
    let b = api.upload(&text).await;
    let b = api.create(&b["id"], "/v1/chat/completions").await;
    server.advance_batches();
    let failed = api.batch(&b["id"]).await;
    assert_eq!(status(&failed), "failed");
    assert!(failed["failed_at"].is_u64());
    assert_eq!(failed["in_progress_at"], Value::Null);
    assert_eq!(failed["output_file_id"], Value::Null);
    assert_eq!(failed["error_file_id"], Value::Null);
    assert_eq!(counts(&failed), (0, 0, 0));
    assert_eq!(failed["errors"]["object"], "list");
    let errors = failed["errors"]["data"].as_array().unwrap();
    let got: Vec<(u64, &str)> = errors
        .iter()
        .map(|e| (e["line"].as_u64().unwrap(), e["code"].as_str().unwrap()))
        .collect();
    assert_eq!(
        got,
        [
            (2, "invalid_json_line"),
            (4, "missing_required_parameter"),
            (5, "duplicate_custom_id"),
            (6, "invalid_method"),
            (7, "invalid_url"),
            (8, "mismatched_model"),
            (9, "missing_required_parameter"),
            (10, "invalid_request"),
        ]
    );
    for e in errors {
        assert_eq!(e["param"], Value::Null);
        assert!(!e["message"].as_str().unwrap().is_empty());
    }
    assert!(errors[1]["message"].as_str().unwrap().contains("custom_id"));
    assert!(errors[5]["message"].as_str().unwrap().contains("gpt-4o"));
    // Nothing ran.
    assert_eq!(server.stats().batch_requests_billed, 0);
    assert!(server.batch_requests().is_empty());

    // An empty file fails too, with no line.
    let f = api.upload(b"\n").await;
    let b = api.create(&f["id"], "/v1/chat/completions").await;
    server.advance_batches();
    let failed = api.batch(&b["id"]).await;
    assert_eq!(status(&failed), "failed");
    assert_eq!(failed["errors"]["data"][0]["code"], "empty_file");
    assert_eq!(failed["errors"]["data"][0]["line"], Value::Null);

    // `FAULT:batchinvalid:1` fails the first validation only: a resubmission passes.
    let flaky = [
        line("a", "FAULT:batchinvalid:1 then fine"),
        line("b", "fine"),
    ];
    let b1 = api.submit(&flaky).await;
    server.complete_batches();
    let b1 = api.batch(&b1["id"]).await;
    assert_eq!(status(&b1), "failed");
    assert_eq!(b1["errors"]["data"][0]["line"], 1);
    let b2 = api.submit(&flaky).await;
    server.complete_batches();
    let b2 = api.batch(&b2["id"]).await;
    assert_eq!(status(&b2), "completed");
    assert_eq!(counts(&b2), (2, 2, 0));
}

#[tokio::test]
async fn expiry_keeps_answered_lines_and_expires_the_rest() {
    let server = FakeServer::start(Config {
        batch_lines_per_step: Some(1),
        ..Config::default()
    })
    .await;
    let api = Api::openai(&server);
    let input: Vec<Value> = (0..4)
        .map(|i| line(&format!("r{i}"), &format!("q{i}")))
        .collect();
    let b = api.submit(&input).await;
    server.advance_batches(); // in_progress
    server.advance_batches(); // one line answered
    let mid = api.batch(&b["id"]).await;
    assert_eq!(status(&mid), "in_progress");
    assert_eq!(counts(&mid), (4, 1, 0));
    // And one still validating: it expires with every line unanswered.
    let w = api.submit(&[line("w0", "x"), line("w1", "y")]).await;
    server.expire_batches();

    let exp = api.batch(&b["id"]).await;
    assert_eq!(status(&exp), "expired");
    assert!(exp["expired_at"].is_u64());
    assert_eq!(exp["completed_at"], Value::Null);
    assert_eq!(counts(&exp), (4, 1, 0));
    let out = api.lines(&exp["output_file_id"]).await;
    assert_eq!(out.len(), 1);
    assert_eq!(out[0]["custom_id"], "r0");
    assert_eq!(out[0]["response"]["status_code"], 200);
    let err = by_custom_id(&api.lines(&exp["error_file_id"]).await);
    assert_eq!(err.len(), 3);
    for id in ["r1", "r2", "r3"] {
        let e = &err[id];
        assert!(e["id"].as_str().unwrap().starts_with("batch_req_"));
        assert_eq!(e["response"], Value::Null);
        assert_eq!(e["error"]["code"], "batch_expired");
        assert_eq!(
            e["error"]["message"],
            "This request could not be executed before the completion window expired."
        );
    }

    let wb = api.batch(&w["id"]).await;
    assert_eq!(status(&wb), "expired", "a validating batch expires too");
    assert_eq!(wb["output_file_id"], Value::Null);
    let werr = by_custom_id(&api.lines(&wb["error_file_id"]).await);
    assert_eq!(werr.len(), 2);
    assert_eq!(werr["w0"]["error"]["code"], "batch_expired");

    // The line answered before expiry is billed, the others not.
    let s = server.stats();
    assert_eq!(s.batch_requests_billed, 1);
    let usage = &out[0]["response"]["body"]["usage"];
    assert_eq!(
        s.billed_prompt_tokens,
        usage["prompt_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        s.billed_completion_tokens,
        usage["completion_tokens"].as_u64().unwrap()
    );

    // Expired is terminal.
    let (st, e) = api.cancel(&exp["id"]).await;
    assert_eq!(st, 400);
    assert_eq!(
        e["error"]["message"],
        "Cannot cancel a batch with status 'expired'."
    );
    server.advance_batches();
    assert_eq!(api.batch(&exp["id"]).await, exp);
}

#[tokio::test]
async fn cancel_keeps_answered_lines() {
    let server = FakeServer::start(Config {
        batch_lines_per_step: Some(2),
        ..Config::default()
    })
    .await;
    let api = Api::openai(&server);
    let input: Vec<Value> = (0..5)
        .map(|i| line(&format!("c{i}"), &format!("q{i}")))
        .collect();
    let b = api.submit(&input).await;
    server.advance_batches(); // in_progress
    server.advance_batches(); // 2 answered
    let (st, c) = api.cancel(&b["id"]).await;
    assert_eq!(st, 200);
    assert_eq!(status(&c), "cancelling");
    assert!(c["cancelling_at"].is_u64());
    // Cancelling again is harmless.
    let (st, c2) = api.cancel(&b["id"]).await;
    assert_eq!((st, status(&c2)), (200, "cancelling"));
    server.advance_batches();
    let done = api.batch(&b["id"]).await;
    assert_eq!(status(&done), "cancelled");
    assert!(done["cancelled_at"].is_u64());
    assert_eq!(counts(&done), (5, 2, 0));
    let out = by_custom_id(&api.lines(&done["output_file_id"]).await);
    assert_eq!(out.len(), 2);
    assert!(out.contains_key("c0") && out.contains_key("c1"));
    let err = by_custom_id(&api.lines(&done["error_file_id"]).await);
    assert_eq!(err.len(), 3);
    for id in ["c2", "c3", "c4"] {
        assert_eq!(err[id]["response"], Value::Null);
        assert_eq!(err[id]["error"]["code"], "batch_cancelled");
    }
    let (st, e) = api.cancel(&done["id"]).await;
    assert_eq!(st, 400);
    assert_eq!(
        e["error"]["message"],
        "Cannot cancel a batch with status 'cancelled'."
    );

    // Cancelled before validation: every line unanswered.
    let early = api.submit(&input[..2]).await;
    assert_eq!(api.cancel(&early["id"]).await.0, 200);
    server.advance_batches();
    let early = api.batch(&early["id"]).await;
    assert_eq!(status(&early), "cancelled");
    assert_eq!(early["output_file_id"], Value::Null);
    assert_eq!(api.lines(&early["error_file_id"]).await.len(), 2);

    // A completed batch cannot be cancelled.
    let full = api.submit(&input[..1]).await;
    server.complete_batches();
    let (st, e) = api.cancel(&full["id"]).await;
    assert_eq!(st, 400);
    assert_eq!(
        e["error"]["message"],
        "Cannot cancel a batch with status 'completed'."
    );
    assert_eq!(e["error"]["type"], "invalid_request_error");

    let s = server.stats();
    assert_eq!(s.batches_cancelled, 2);
    assert_eq!(s.batch_requests_billed, 3);
    assert_eq!(server.batch_requests().len(), 3);
}

#[tokio::test]
async fn non_2xx_lines_go_to_the_error_file_with_null_error() {
    let server = FakeServer::start(Config::default()).await;
    let api = Api::openai(&server);
    let mut no_messages = line("no-messages", "x");
    no_messages["body"]
        .as_object_mut()
        .unwrap()
        .remove("messages");
    let input = [
        line("ok", "fine"),
        line("f400", "FAULT:400"),
        line("f500", "FAULT:500"),
        line("f429", "FAULT:429"),
        line("reset", "FAULT:reset"),
        line("cut", "FAULT:cut"),
        line("nousage", "FAULT:nousage"),
        no_messages,
    ];
    let b = api.submit(&input).await;
    server.complete_batches();
    let done = api.batch(&b["id"]).await;
    assert_eq!(status(&done), "completed");
    assert_eq!(counts(&done), (8, 2, 6));
    let out = by_custom_id(&api.lines(&done["output_file_id"]).await);
    assert_eq!(out.len(), 2);
    assert!(out["ok"]["response"]["body"]["usage"].is_object());
    assert!(out["nousage"]["response"]["body"].get("usage").is_none());
    let err = by_custom_id(&api.lines(&done["error_file_id"]).await);
    let codes: HashMap<&str, u64> = err
        .iter()
        .map(|(k, v)| (k.as_str(), v["response"]["status_code"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        codes,
        HashMap::from([
            ("f400", 400),
            ("f500", 500),
            ("f429", 429),
            ("reset", 500),
            ("cut", 500),
            ("no-messages", 400)
        ])
    );
    for e in err.values() {
        assert_eq!(
            e["error"],
            Value::Null,
            "OpenAI puts failed requests here with error null"
        );
        assert!(e["response"]["request_id"].is_string());
        assert!(e["response"]["body"]["error"]["message"].is_string());
    }
    assert_eq!(
        err["f400"]["response"]["body"]["error"]["code"],
        "context_length_exceeded"
    );
    assert_eq!(
        err["f429"]["response"]["body"]["error"]["code"],
        "rate_limit_exceeded"
    );
    assert_eq!(
        err["no-messages"]["response"]["body"]["error"]["param"],
        "messages"
    );
    // Batch lines are not chat requests.
    let s = server.stats();
    assert_eq!((s.requests, s.ok, s.faults, s.rejected), (0, 0, 0, 0));
    assert_eq!(s.batch_requests_billed, 2);
}

#[tokio::test]
async fn all_failed_batch_has_no_output_file() {
    let server = FakeServer::start(Config::default()).await;
    let api = Api::openai(&server);
    let b = api
        .submit(&[line("a", "FAULT:500"), line("b", "FAULT:quota")])
        .await;
    server.complete_batches();
    let done = api.batch(&b["id"]).await;
    assert_eq!(status(&done), "completed");
    assert_eq!(counts(&done), (2, 0, 2));
    assert_eq!(done["output_file_id"], Value::Null);
    let err = by_custom_id(&api.lines(&done["error_file_id"]).await);
    assert_eq!(err["b"]["response"]["status_code"], 429);
    assert_eq!(
        err["b"]["response"]["body"]["error"]["code"],
        "insufficient_quota"
    );
    let s = server.stats();
    assert_eq!(s.batch_requests_billed, 0);
    assert_eq!((s.billed_prompt_tokens, s.billed_completion_tokens), (0, 0));
}

#[tokio::test]
async fn list_batches_newest_first_with_pagination() {
    let server = FakeServer::start(Config::default()).await;
    let api = Api::openai(&server);
    let (_, empty) = api.get("/batches").await;
    assert_eq!(
        empty,
        json!({"object": "list", "data": [], "first_id": null, "last_id": null, "has_more": false})
    );
    let f = api.upload(&jsonl(&[line("x", "y")])).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(api.create(&f["id"], "/v1/chat/completions").await["id"].clone());
    }
    ids.reverse(); // newest first
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let q = match &after {
            Some(a) => format!("/batches?limit=2&after={a}"),
            None => "/batches?limit=2".into(),
        };
        let (st, page) = api.get(&q).await;
        assert_eq!(st, 200);
        assert_eq!(page["object"], "list");
        let data = page["data"].as_array().unwrap();
        assert_eq!(page["first_id"], data[0]["id"]);
        assert_eq!(page["last_id"], data[data.len() - 1]["id"]);
        seen.extend(data.iter().map(|b| b["id"].clone()));
        pages += 1;
        if page["has_more"] == false {
            break;
        }
        after = Some(page["last_id"].as_str().unwrap().to_string());
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ids);
    let (_, all) = api.get("/batches").await;
    assert_eq!(all["data"].as_array().unwrap().len(), 5);
    assert_eq!(all["has_more"], false);
    assert_eq!(api.get("/batches?limit=0").await.0, 400);
}

#[tokio::test]
async fn auto_advance_completes_a_polled_batch() {
    let server = FakeServer::start(Config {
        batch_auto_advance: true,
        ..Config::default()
    })
    .await;
    let api = Api::openai(&server);
    let b = api.submit(&[line("a", "one"), line("b", "two")]).await;
    assert_eq!(status(&b), "validating");
    let mut statuses = Vec::new();
    for _ in 0..10 {
        let s = api.batch(&b["id"]).await;
        statuses.push(status(&s).to_string());
        if s["status"] == "completed" {
            assert_eq!(api.lines(&s["output_file_id"]).await.len(), 2);
            break;
        }
    }
    assert_eq!(statuses, ["in_progress", "finalizing", "completed"]);
    // Listing does not advance.
    let b2 = api.submit(&[line("c", "three")]).await;
    api.get("/batches").await;
    assert_eq!(server.batches()[1]["id"], b2["id"]);
    assert_eq!(server.batches()[1]["status"], "validating");
}

#[tokio::test]
async fn azure_prefix_api_key_and_admin_routes() {
    let server = FakeServer::start(keyed(Config::default())).await;
    let api = Api::azure(&server);
    let mut input = vec![line("az-1", "hello"), line("az-2", "there")];
    for l in &mut input {
        l["url"] = json!("/chat/completions");
        l["body"]["model"] = json!("my-deployment");
    }
    let f = api.upload(&jsonl(&input)).await;
    assert_eq!(f["purpose"], "batch");
    let b = api.create(&f["id"], "/chat/completions").await;
    assert_eq!(b["endpoint"], "/chat/completions");

    // The admin routes move batches for a test driving the binary.
    let client = reqwest::Client::new();
    let admin = format!("http://{}/_fake/batches", server.addr);
    let r: Value = client
        .post(format!("{admin}/advance"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["data"][0]["status"], "in_progress");
    let r: Value = client
        .post(format!("{admin}/complete"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["data"][0]["status"], "completed");
    let done = api.batch(&b["id"]).await;
    let out = by_custom_id(&api.lines(&done["output_file_id"]).await);
    assert_eq!(out["az-1"]["response"]["body"]["model"], "my-deployment");
    assert_eq!(
        out["az-2"]["response"]["body"]["choices"][0]["message"]["content"],
        "echo: there"
    );

    // Bearer works on /openai too; a wrong api-key gets Azure's 401; no key, OpenAI's.
    let ok = client
        .get(format!("http://{}/openai/batches", server.addr))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let bad = client
        .get(format!(
            "http://{}/openai/batches?api-version=2024-10-21",
            server.addr
        ))
        .header("api-key", "wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 401);
    assert_eq!(bad.json::<Value>().await.unwrap()["error"]["code"], "401");
    let none = client
        .get(format!("{}/files", server.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(none.status(), 401);
    assert_eq!(
        none.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_api_key"
    );
    let r = client.post(format!("{admin}/expire")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = client.post(format!("{admin}/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);

    // Endpoints: /openai takes /chat/completions, /v1 only /v1/chat/completions.
    let openai = Api::openai(&server);
    let r = openai
        .create_raw(&json!({"input_file_id": f["id"], "endpoint": "/chat/completions", "completion_window": "24h"}))
        .await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["param"], "endpoint");
}

#[tokio::test]
async fn upload_and_create_errors() {
    let server = FakeServer::start(Config {
        batch_max_file_bytes: Some(200),
        ..Config::default()
    })
    .await;
    let api = Api::openai(&server);
    let small = jsonl(&[line("a", "b")]);
    assert!(small.len() <= 200);
    let big = jsonl(&[line("a", "b"), line("c", "d")]);
    assert!(big.len() > 200);
    let f = api.upload(&small).await;

    let r = api.upload_raw(&small, "fine-tune").await;
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["param"],
        "purpose"
    );
    let r = api.upload_raw(&big, "batch").await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "file_too_large");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let r = api
        .req(reqwest::Method::POST, "/files")
        .json(&json!({"purpose": "batch"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(server.stats().files_uploaded, 1);

    let base = json!({"input_file_id": f["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"});
    for (k, v, param) in [
        ("input_file_id", json!("file-999"), "input_file_id"),
        ("endpoint", json!("/v1/embeddings"), "endpoint"),
        ("completion_window", json!("48h"), "completion_window"),
        ("metadata", json!("x"), "metadata"),
    ] {
        let mut b = base.clone();
        b[k] = v;
        let r = api.create_raw(&b).await;
        assert_eq!(r.status(), 400, "{k}");
        assert_eq!(r.json::<Value>().await.unwrap()["error"]["param"], param);
    }
    let r = api
        .req(reqwest::Method::POST, "/batches")
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(server.stats().batches_created, 0);
    assert_eq!(api.get("/batches/batch_77").await.0, 404);
    assert_eq!(api.get("/batches/nonsense").await.0, 404);
    assert_eq!(api.cancel(&json!("batch_77")).await.0, 404);
    assert_eq!(api.get("/files/file-77").await.0, 404);
    // The batch's metadata may be omitted.
    let r = api.create_raw(&base).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["metadata"], Value::Null);
    // Deleting the input file does not disturb a batch that already has it.
    let del = api
        .req(
            reqwest::Method::DELETE,
            &format!("/files/{}", f["id"].as_str().unwrap()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 200);
    server.complete_batches();
    assert_eq!(server.batches()[0]["status"], "completed");
}

#[tokio::test]
async fn billed_tokens_equal_the_output_files_usage() {
    let server = FakeServer::start(Config {
        batch_lines_per_step: Some(3),
        ..Config::default()
    })
    .await;
    let api = Api::openai(&server);
    let mut input: Vec<Value> = (0..7)
        .map(|i| line(&format!("t{i}"), &"words ".repeat(i + 1)))
        .collect();
    input.push(line("u", "FAULT:usage=1000,200,400,50"));
    input.push(line("e", "FAULT:500"));
    let mut capped = line("cap", "a long answer that gets cut by max_tokens");
    capped["body"]["max_tokens"] = json!(2);
    input.push(capped);
    let done_batch = api.submit(&input).await;
    // A second batch that expires part way: its answered lines count too.
    let partial: Vec<Value> = (0..6).map(|i| line(&format!("p{i}"), "partial")).collect();
    let partial = api.submit(&partial).await;
    server.advance_batches(); // both in_progress
    server.advance_batches(); // 3 lines each
    let (st, _) = api.cancel(&partial["id"]).await;
    assert_eq!(st, 200);
    server.complete_batches();

    let mut files = Vec::new();
    for id in [&done_batch["id"], &partial["id"]] {
        let b = api.batch(id).await;
        files.extend(api.lines(&b["output_file_id"]).await);
    }
    let (mut p, mut c) = (0, 0);
    for l in &files {
        let u = &l["response"]["body"]["usage"];
        p += u["prompt_tokens"].as_u64().unwrap();
        c += u["completion_tokens"].as_u64().unwrap();
    }
    let by_id = by_custom_id(&files);
    assert_eq!(
        by_id["u"]["response"]["body"]["usage"]["prompt_tokens"],
        1000
    );
    assert_eq!(
        by_id["cap"]["response"]["body"]["choices"][0]["finish_reason"],
        "length"
    );
    assert_eq!(files.len(), 9 + 3);
    let s = server.stats();
    assert_eq!(s.batch_requests_billed, files.len() as u64);
    assert_eq!((s.billed_prompt_tokens, s.billed_completion_tokens), (p, c));
}

/// `spawn_background` servers are driven from plain `#[test]`s: stepping batches from a
/// thread outside any runtime must work, whatever faults the lines carry.
#[test]
fn stepping_from_a_plain_thread_outside_any_runtime() {
    let server = fake_openai::spawn_background(Config::default());
    let input = [
        line("ok", "fine"),
        line("hang", "FAULT:hang"),
        line("reset", "FAULT:reset"),
        line("badjson", "FAULT:badjson"),
        line("slow", "FAULT:slow=5000"),
        line("s503", "FAULT:503"),
        line("s401", "FAULT:401"),
        line("empty", "FAULT:empty"),
    ];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let api = Api::openai(&server);
    let b = rt.block_on(api.submit(&input));
    let started = std::time::Instant::now();
    server.complete_batches();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "no line sleeps"
    );
    let done = rt.block_on(api.batch(&b["id"]));
    assert_eq!(status(&done), "completed");
    let out = by_custom_id(&rt.block_on(api.lines(&done["output_file_id"])));
    let err = by_custom_id(&rt.block_on(api.lines(&done["error_file_id"])));
    let mut ok: Vec<&str> = out.keys().map(String::as_str).collect();
    ok.sort();
    assert_eq!(ok, ["empty", "ok", "slow"]);
    let code = |k: &str| err[k]["response"]["status_code"].as_u64().unwrap();
    assert_eq!(
        [
            code("hang"),
            code("reset"),
            code("badjson"),
            code("s503"),
            code("s401")
        ],
        [500, 500, 500, 503, 401]
    );
    assert_eq!(out["empty"]["response"]["body"]["choices"], json!([]));
}

#[tokio::test]
async fn a_lost_create_answer_still_makes_the_batch() {
    let server = FakeServer::start(Config {
        batch_create_answers_lost: 1,
        ..Config::default()
    })
    .await;
    let api = Api::openai(&server);
    let f = api.upload(&jsonl(&[line("x", "y")])).await;
    let body = json!({
        "input_file_id": f["id"],
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
        "metadata": {"part": "p1"},
    });
    // The first create's connection is dropped with no answer …
    let lost = api
        .req(reqwest::Method::POST, "/batches")
        .json(&body)
        .send()
        .await;
    assert!(lost.is_err(), "the first create must lose its answer");
    // … yet the batch exists, with its metadata, and the next create is answered.
    let (_, list) = api.get("/batches").await;
    let data = list["data"].as_array().unwrap();
    assert_eq!(data.len(), 1);
    assert_eq!(data[0]["metadata"]["part"], "p1");
    assert_eq!(api.create_raw(&body).await.status(), 200);
    assert_eq!(server.stats().batches_created, 2);
}
