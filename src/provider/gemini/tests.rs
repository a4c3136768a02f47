use super::*;
use crate::provider::Wire;

fn msg(role: Role, text: &str) -> Message {
    Message {
        role,
        name: None,
        content: text.into(),
    }
}

fn body(msgs: &[Message], params: &Params) -> Value {
    let raw = serde_json::value::to_raw_value(msgs).unwrap();
    serde_json::from_slice(&GeminiWire.body("gemini-2.5-flash", msgs, &raw, params)).unwrap()
}

#[test]
fn system_goes_to_system_instruction_and_params_to_generation_config() {
    let mut extra = Map::new();
    extra.insert("topK".into(), json!(5));
    extra.insert("safetySettings".into(), json!([]));
    let p = Params {
        max_tokens: Some(200),
        temperature: Some(0.3),
        top_p: Some(0.9),
        seed: Some(7),
        n: Some(3),
        stop: Some(crate::chat::Stop::One("END".into())),
        extra,
        ..Params::default()
    };
    let v = body(
        &[
            msg(Role::System, "rules"),
            msg(Role::User, "row 1"),
            msg(Role::Assistant, "ok"),
            msg(Role::User, "more"),
        ],
        &p,
    );
    assert_eq!(
        v["systemInstruction"],
        json!({"parts": [{"text": "rules"}]})
    );
    assert_eq!(
        v["contents"][0],
        json!({"role": "user", "parts": [{"text": "row 1"}]})
    );
    assert_eq!(v["contents"][1]["role"], "model");
    let g = &v["generationConfig"];
    assert_eq!(g["maxOutputTokens"], 200);
    assert_eq!(g["temperature"], 0.3);
    assert_eq!(g["topP"], 0.9);
    assert_eq!(
        g["topK"], 5,
        "a generationConfig field from extra goes inside it"
    );
    assert_eq!(g["seed"], 7);
    assert_eq!(g["candidateCount"], 3);
    assert_eq!(g["stopSequences"], json!(["END"]));
    assert_eq!(
        v["safetySettings"],
        json!([]),
        "other extra fields go on top"
    );
    assert!(v.get("model").is_none() && v.get("stream").is_none());
    // A re-ask for 2 choices changes only the count.
    let raw = serde_json::to_vec(&v).unwrap();
    let again: Value =
        serde_json::from_slice(&GeminiWire.with_choices(&raw.into(), 2, true)).unwrap();
    assert_eq!(again["generationConfig"]["candidateCount"], 2);
    assert_eq!(again["contents"], v["contents"]);
}

#[test]
fn a_schema_is_response_json_schema_and_images_are_inline_or_file_data() {
    let schema = json!({"type": "object", "properties": {"a": {"type": "string"}},
                        "additionalProperties": false});
    let p = Params {
        response_format: Some(
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}),
        ),
        ..Params::default()
    };
    let v = body(&[msg(Role::User, "x")], &p);
    assert_eq!(
        v["generationConfig"]["responseMimeType"],
        "application/json"
    );
    assert_eq!(v["generationConfig"]["responseJsonSchema"], schema);
    let img = |url: &str| Part::ImageUrl {
        image_url: crate::chat::ImageUrl {
            url: url.into(),
            detail: None,
            size: None,
        },
    };
    let b = parts(&Content::Parts(vec![
        img("data:image/png;base64,AAAA"),
        img("https://x/y.webp?z=1"),
    ]));
    assert_eq!(
        b[0],
        json!({"inlineData": {"mimeType": "image/png", "data": "AAAA"}})
    );
    assert_eq!(
        b[1],
        json!({"fileData": {"mimeType": "image/webp", "fileUri": "https://x/y.webp?z=1"}})
    );
}

#[test]
fn usage_counts_cached_inside_the_prompt_and_thoughts_as_output() {
    let c = parse_response(
        br#"{"candidates":[{"content":{"role":"model","parts":[{"text":"thinking","thought":true},{"text":"a"},{"text":"b"}]},"finishReason":"MAX_TOKENS","index":0}],
            "usageMetadata":{"promptTokenCount":1000,"candidatesTokenCount":4,"cachedContentTokenCount":600,"thoughtsTokenCount":10,"totalTokenCount":1014},
            "modelVersion":"gemini-2.5-flash"}"#,
    )
    .unwrap();
    assert_eq!(c.text, "ab");
    assert_eq!(c.finish_reason.as_deref(), Some("length"));
    assert_eq!(c.model.as_deref(), Some("gemini-2.5-flash"));
    let u = c.usage.unwrap();
    assert_eq!(
        (u.prompt_tokens, u.completion_tokens, u.total_tokens),
        (1000, 14, 1014)
    );
    assert_eq!((u.cached_tokens, u.reasoning_tokens), (Some(600), Some(10)));
}

#[test]
fn blocked_answers_and_prompts_are_refusals_and_candidates_are_choices() {
    let c = parse_response(
        br#"{"candidates":[{"content":{"parts":[{"text":"x"}]},"finishReason":"STOP","index":0},
                            {"finishReason":"SAFETY","index":1}]}"#,
    )
    .unwrap();
    let all = c.all_choices();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].text, "x");
    assert!(all[0].refusal.is_none());
    assert!(all[1].refusal.as_deref().unwrap().contains("SAFETY"));
    let b = parse_response(br#"{"promptFeedback":{"blockReason":"PROHIBITED_CONTENT"},"usageMetadata":{"promptTokenCount":9}}"#)
        .unwrap();
    assert!(b.refusal.as_deref().unwrap().contains("PROHIBITED_CONTENT"));
    assert_eq!(b.usage.unwrap().prompt_tokens, 9);
    assert_eq!(
        parse_response(b"{\"candidates\": [").unwrap_err().kind,
        ErrorKind::InvalidResponse
    );
    assert_eq!(
        parse_response(b"{}").unwrap_err().kind,
        ErrorKind::InvalidResponse
    );
}

#[test]
fn a_stream_adds_up_its_chunks_and_one_cut_short_is_retried() {
    let chunks = [
        r#"data: {"candidates":[{"content":{"parts":[{"text":"Hel"}],"role":"model"},"index":0}],"modelVersion":"gemini-2.5-flash"}"#,
        "",
        r#"data: {"candidates":[{"content":{"parts":[{"text":"lo"}],"role":"model"},"finishReason":"STOP","index":0}],"usageMetadata":{"promptTokenCount":7,"candidatesTokenCount":2}}"#,
    ];
    let mut acc = StreamAcc::default();
    for l in chunks {
        acc.line(l.as_bytes(), None).unwrap();
    }
    let c = acc.finish(std::time::Instant::now()).unwrap();
    assert_eq!(c.text, "Hello");
    assert_eq!(c.finish_reason.as_deref(), Some("stop"));
    assert_eq!(c.usage.unwrap().prompt_tokens, 7);
    assert!(c.ttft_ms.is_some());

    let mut cut = StreamAcc::default();
    cut.line(chunks[0].as_bytes(), None).unwrap();
    let e = cut.finish(std::time::Instant::now()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidResponse);
    assert!(e.maybe_billed);
    let mut err = StreamAcc::default();
    let e = err
        .line(
            br#"data: {"error":{"code":503,"message":"overloaded","status":"UNAVAILABLE"}}"#,
            None,
        )
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Server);
    assert!(e.maybe_billed && e.message.contains("UNAVAILABLE"));
}

#[test]
fn errors_follow_the_apis_table() {
    let e = |status: u16, gstatus: &str, details: Value| {
        let body = json!({"error": {"code": status, "message": "m", "status": gstatus,
                                    "details": details}})
        .to_string();
        status_error(None, status, body.as_bytes())
    };
    assert_eq!(
        e(400, "INVALID_ARGUMENT", json!([])).kind,
        ErrorKind::BadRequest
    );
    assert_eq!(
        e(400, "FAILED_PRECONDITION", json!([])).kind,
        ErrorKind::BadRequest
    );
    assert_eq!(
        e(
            400,
            "INVALID_ARGUMENT",
            json!([{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "API_KEY_INVALID"}])
        )
        .kind,
        ErrorKind::Auth
    );
    assert_eq!(e(401, "UNAUTHENTICATED", json!([])).kind, ErrorKind::Auth);
    assert_eq!(e(403, "PERMISSION_DENIED", json!([])).kind, ErrorKind::Auth);
    assert_eq!(e(404, "NOT_FOUND", json!([])).kind, ErrorKind::BadRequest);
    assert_eq!(e(500, "INTERNAL", json!([])).kind, ErrorKind::Server);
    assert_eq!(e(503, "UNAVAILABLE", json!([])).kind, ErrorKind::Server);
    assert_eq!(
        e(504, "DEADLINE_EXCEEDED", json!([])).kind,
        ErrorKind::Server
    );
}

#[test]
fn retry_info_is_waited_and_a_spent_daily_quota_stops_the_job() {
    let e = |status: u16, gstatus: &str, details: Value| {
        let body = json!({"error": {"code": status, "message": "m", "status": gstatus,
                                    "details": details}})
        .to_string();
        status_error(None, status, body.as_bytes())
    };
    let retry = |d: &str| {
        e(
            429,
            "RESOURCE_EXHAUSTED",
            json!([{"@type": "type.googleapis.com/google.rpc.RetryInfo",
            "retryDelay": d}]),
        )
    };
    let r = retry("17s");
    assert_eq!(r.kind, ErrorKind::RateLimited);
    assert_eq!(r.retry_after, Some(Duration::from_secs(17)));
    assert!(r.message.contains("RESOURCE_EXHAUSTED"));
    assert_eq!(retry("1.5s").retry_after, Some(Duration::from_millis(1500)));
    assert_eq!(
        retry("99999s").retry_after,
        Some(crate::provider::MAX_SERVER_WAIT)
    );
    // A daily quota spent stops the job; a per-minute one is waited out.
    let quota = |id: &str| {
        e(
            429,
            "RESOURCE_EXHAUSTED",
            json!([
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure",
             "violations": [{"quotaMetric": "generate_content_requests", "quotaId": id}]},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "30s"}]),
        )
        .kind
    };
    assert_eq!(
        quota("GenerateRequestsPerDayPerProjectPerModel-FreeTier"),
        ErrorKind::Quota
    );
    assert_eq!(
        quota("GenerateRequestsPerMinutePerProjectPerModel"),
        ErrorKind::RateLimited
    );
    assert_eq!(status_error(None, 404, b"<html>").kind, ErrorKind::Endpoint);
    // streamGenerateContent answers its errors in an array.
    let arr = br#"[{"error":{"code":429,"message":"slow","status":"RESOURCE_EXHAUSTED"}}]"#;
    assert_eq!(status_error(None, 429, arr).kind, ErrorKind::RateLimited);
    let key = ApiKey::new("AIza-secret-123".into());
    let s = status_error(
        Some(&key),
        400,
        br#"{"error":{"code":400,"message":"API key not valid: AIza-secret-123","status":"INVALID_ARGUMENT"}}"#,
    );
    assert_eq!(s.kind, ErrorKind::Auth);
    assert!(!s.message.contains("AIza-secret-123"), "{}", s.message);
}

#[test]
fn a_model_name_becomes_its_resource() {
    assert_eq!(
        model_resource("gemini-2.5-flash"),
        "models/gemini-2.5-flash"
    );
    assert_eq!(
        model_resource("models/gemini-2.5-pro"),
        "models/gemini-2.5-pro"
    );
    assert_eq!(model_resource("tunedModels/my-tune"), "tunedModels/my-tune");
}
