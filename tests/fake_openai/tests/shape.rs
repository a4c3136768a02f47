//! Answers beyond plain text, over real HTTP: json_schema and json_object answers, the
//! answer-shaping markers (`badjsonout`, `schemabreak`, `refusal`, `long`, with `@choice`
//! and `:n`), `n` choices (plain, structured, streamed), image parts, and a batch line with
//! a schema.

use fake_openai::{Config, FakeServer};
use serde_json::{json, Value};

use crate::common::{body, parse_jsonl, post, Api};

/// An ad: the README's worked example, with a nested `$defs` object and an enum.
fn ad_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "headline": {"type": "string", "maxLength": 30},
            "description": {"type": "string", "maxLength": 90, "minLength": 10},
            "cta": {"type": "string", "enum": ["Buy now", "Learn more"]},
            "price": {"type": "number", "minimum": 0},
            "stock": {"type": "integer", "minimum": 5, "maximum": 9},
            "featured": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 2},
            "seller": {"$ref": "#/$defs/seller"},
            "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        },
        "required": ["headline", "description", "cta", "price", "stock", "featured", "tags", "seller", "note"],
        "additionalProperties": false,
        "$defs": {
            "seller": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "rating": {"type": "integer", "minimum": 1}},
                "required": ["name", "rating"],
                "additionalProperties": false,
            },
        },
    })
}

const AD_KEYS: [&str; 9] = [
    "headline",
    "description",
    "cta",
    "price",
    "stock",
    "featured",
    "tags",
    "seller",
    "note",
];

fn with_schema(mut b: Value, schema: &Value) -> Value {
    b["response_format"] = json!({"type": "json_schema", "json_schema": {
        "name": "ad", "strict": true, "schema": schema,
    }});
    b
}

async fn ok(server: &FakeServer, b: &Value) -> Value {
    let r = post(server, b).await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

fn content(v: &Value, i: usize) -> &str {
    v["choices"][i]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("choice {i} has no content: {v}"))
}

fn ceil4(s: &str) -> u64 {
    s.chars().count().div_ceil(4) as u64
}

/// A tiny JSON Schema check, enough for the schemas here: the first rule broken, as
/// `path: rule`.
fn check(v: &Value, s: &Value, root: &Value, path: &str) -> Result<(), String> {
    if let Some(r) = s.get("$ref").and_then(Value::as_str) {
        let target = root.pointer(r.strip_prefix('#').unwrap()).unwrap();
        return check(v, target, root, path);
    }
    if let Some(alts) = s.get("anyOf").and_then(Value::as_array) {
        return match alts.iter().any(|a| check(v, a, root, path).is_ok()) {
            true => Ok(()),
            false => Err(format!("{path}: anyOf")),
        };
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            return Err(format!("{path}: enum"));
        }
    }
    let ty = s.get("type").and_then(Value::as_str);
    let type_ok = match ty {
        None => true,
        Some("object") => v.is_object(),
        Some("array") => v.is_array(),
        Some("string") => v.is_string(),
        Some("integer") => v.is_i64() || v.is_u64(),
        Some("number") => v.is_number(),
        Some("boolean") => v.is_boolean(),
        Some("null") => v.is_null(),
        Some(t) => panic!("type {t}"),
    };
    if !type_ok {
        return Err(format!("{path}: type"));
    }
    let num = |k: &str| s.get(k).and_then(Value::as_f64);
    if let Some(x) = v.as_f64() {
        if num("minimum").is_some_and(|m| x < m) || num("maximum").is_some_and(|m| x > m) {
            return Err(format!("{path}: range"));
        }
    }
    if let Some(t) = v.as_str() {
        let n = t.chars().count() as f64;
        if num("maxLength").is_some_and(|m| n > m) || num("minLength").is_some_and(|m| n < m) {
            return Err(format!("{path}: length"));
        }
    }
    if let Some(a) = v.as_array() {
        if num("minItems").is_some_and(|m| (a.len() as f64) < m) {
            return Err(format!("{path}: minItems"));
        }
        for (i, x) in a.iter().enumerate() {
            check(x, &s["items"], root, &format!("{path}/{i}"))?;
        }
    }
    if let Some(o) = v.as_object() {
        let props = s.get("properties").and_then(Value::as_object);
        for r in s
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if !o.contains_key(r.as_str().unwrap()) {
                return Err(format!("{path}: required {r}"));
            }
        }
        for (k, x) in o {
            match props.and_then(|p| p.get(k)) {
                Some(ps) => check(x, ps, root, &format!("{path}/{k}"))?,
                None if s["additionalProperties"] == false => {
                    return Err(format!("{path}: additionalProperties {k}"))
                }
                None => {}
            }
        }
    }
    Ok(())
}

/// Parse a structured answer and check it against `schema`.
fn valid(text: &str, schema: &Value) -> Value {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
    check(&v, schema, schema, "").unwrap_or_else(|e| panic!("{e}: {text}"));
    v
}

fn keys(v: &Value) -> Vec<&str> {
    v.as_object().unwrap().keys().map(String::as_str).collect()
}

#[tokio::test]
async fn json_schema_answer_satisfies_the_schema_in_its_order() {
    let server = FakeServer::start(Config::default()).await;
    let schema = ad_schema();
    let user = "Write an ad for the Acme Rocket Skates, our fastest model yet";
    let v = ok(&server, &with_schema(body(user), &schema)).await;
    let text = content(&v, 0);
    let ad = valid(text, &schema);
    assert_eq!(keys(&ad), AD_KEYS);
    // maxLength 30 cuts the echo; a short one is padded to minLength.
    assert_eq!(ad["headline"], "headline: echo: Write an ad fo");
    assert_eq!(ad["headline"].as_str().unwrap().chars().count(), 30);
    assert!(ad["description"]
        .as_str()
        .unwrap()
        .starts_with("description: echo: Write an ad for the Acme"));
    assert_eq!(ad["cta"], "Buy now");
    assert_eq!(ad["price"], 0.0);
    assert_eq!(ad["stock"], 5);
    assert_eq!(ad["featured"], true);
    assert_eq!(ad["tags"], json!(["tags: echo: ", "tags: echo: "]));
    assert_eq!(keys(&ad["seller"]), ["name", "rating"]);
    assert_eq!(ad["seller"]["name"], format!("name: echo: {user}"));
    assert_eq!(ad["note"], format!("note: echo: {user}"));
    assert_eq!(v["choices"][0]["message"]["refusal"], Value::Null);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"], ceil4(text));
    // The prompt estimate is the text's, as for a plain request.
    let plain = ok(&server, &body(user)).await;
    assert_eq!(v["usage"]["prompt_tokens"], plain["usage"]["prompt_tokens"]);
    assert_eq!(content(&plain, 0), format!("echo: {user}"));

    // max_tokens cuts a structured answer like any other: invalid JSON, finish "length".
    let mut b = with_schema(body(user), &schema);
    b["max_tokens"] = json!(5);
    let v = ok(&server, &b).await;
    assert_eq!(content(&v, 0), &text[..20]);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn json_object_and_response_format_validation() {
    let server = FakeServer::start(Config::default()).await;
    let mut b = body("give me JSON");
    b["response_format"] = json!({"type": "json_object"});
    let v = ok(&server, &b).await;
    assert_eq!(content(&v, 0), r#"{"text":"echo: give me JSON"}"#);
    b["response_format"] = json!({"type": "text"});
    assert_eq!(content(&ok(&server, &b).await, 0), "echo: give me JSON");

    let bad = [
        (
            json!({"type": "json_schema", "json_schema": {"name": "ad"}}),
            "response_format.json_schema.schema",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}),
            "response_format.json_schema.name",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "ad.json", "schema": {}}}),
            "response_format.json_schema.name",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "ad", "schema": "x"}}),
            "response_format.json_schema.schema",
        ),
        (
            json!({"type": "json_schema"}),
            "response_format.json_schema",
        ),
        (json!({"type": "yaml"}), "response_format.type"),
        (json!({}), "response_format.type"),
        (json!("json_object"), "response_format"),
    ];
    for (rf, param) in bad {
        b["response_format"] = rf.clone();
        let r = post(&server, &b).await;
        assert_eq!(r.status(), 400, "{rf}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["param"], param, "{rf}: {e}");
        assert_eq!(e["error"]["type"], "invalid_request_error");
    }
    assert_eq!(server.stats().rejected, 8);
}

#[tokio::test]
async fn badjsonout_schemabreak_and_refusal_markers() {
    let server = FakeServer::start(Config::default()).await;
    let schema = ad_schema();
    let clean = ok(&server, &with_schema(body("ad please"), &schema)).await;
    let clean_text = content(&clean, 0).to_string();

    // badjsonout: the valid document minus its last `}`.
    let v = ok(&server, &with_schema(body("ad FAULT:badjsonout"), &schema)).await;
    let text = content(&v, 0);
    assert!(serde_json::from_str::<Value>(text).is_err());
    let fixed: Value = serde_json::from_str(&format!("{text}}}")).unwrap();
    check(&fixed, &schema, &schema, "").unwrap();
    assert_eq!(v["usage"]["completion_tokens"], ceil4(text));

    // schemabreak: parses, but the first required property is gone.
    let v = ok(&server, &with_schema(body("ad FAULT:schemabreak"), &schema)).await;
    let broken: Value = serde_json::from_str(content(&v, 0)).unwrap();
    assert_eq!(
        check(&broken, &schema, &schema, ""),
        Err(r#": required "headline""#.into())
    );
    assert_eq!(keys(&broken), AD_KEYS[1..]);
    // No required property: the first one gets a wrong type.
    let loose = json!({"type": "object", "properties": {"title": {"type": "string"}, "n": {"type": "integer"}}});
    let v = ok(&server, &with_schema(body("FAULT:schemabreak"), &loose)).await;
    let broken: Value = serde_json::from_str(content(&v, 0)).unwrap();
    assert_eq!(broken, json!({"title": 12345, "n": 1}));
    // json_object: valid JSON that is not an object.
    let mut b = body("FAULT:schemabreak");
    b["response_format"] = json!({"type": "json_object"});
    assert_eq!(
        content(&ok(&server, &b).await, 0),
        r#"["echo: FAULT:schemabreak"]"#
    );
    b["messages"][1]["content"] = json!("FAULT:badjsonout");
    assert_eq!(
        content(&ok(&server, &b).await, 0),
        r#"{"text":"echo: FAULT:badjsonout""#
    );

    // refusal: content null, refusal text, finish stop, billed; also on plain requests.
    for b in [
        with_schema(body("ad FAULT:refusal"), &schema),
        body("x FAULT:refusal"),
    ] {
        let v = ok(&server, &b).await;
        let m = &v["choices"][0]["message"];
        assert_eq!(m["content"], Value::Null);
        assert_eq!(m["refusal"], "I'm sorry, but I can't help with that.");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(v["usage"]["completion_tokens"], 10);
    }

    // The markers do nothing to a plain answer, except refusal (above) and long.
    assert_eq!(
        content(&ok(&server, &body("FAULT:schemabreak")).await, 0),
        "echo: FAULT:schemabreak"
    );
    assert_eq!(
        content(&ok(&server, &body("FAULT:badjsonout")).await, 0),
        "echo: FAULT:badjsonout"
    );

    // Answer-shaping markers are answers: ok, not faults, and billed.
    let s = server.stats();
    assert_eq!((s.requests, s.ok, s.faults, s.rejected), (10, 10, 0, 0));
    assert!(clean_text.len() > 100);
}

#[tokio::test]
async fn long_marker_makes_plain_text_long() {
    let server = FakeServer::start(Config::default()).await;
    let v = ok(&server, &body("hi FAULT:long")).await;
    let text = content(&v, 0);
    let unit = "echo: hi FAULT:long";
    assert!(text.chars().count() >= 500, "{}", text.len());
    assert!(text.chars().count() < 500 + unit.len() + 1);
    assert!(text
        .split(' ')
        .collect::<Vec<_>>()
        .chunks(3)
        .all(|w| w.join(" ") == unit));
    assert_eq!(v["usage"]["completion_tokens"], ceil4(text));
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // max_tokens still cuts it.
    let mut b = body("hi FAULT:long");
    b["max_tokens"] = json!(50);
    let v = ok(&server, &b).await;
    assert_eq!(content(&v, 0).len(), 200);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    // `:1`: only the first request with these messages.
    let v = ok(&server, &body("FAULT:long:1")).await;
    assert!(content(&v, 0).len() >= 500);
    let v = ok(&server, &body("FAULT:long:1")).await;
    assert_eq!(content(&v, 0), "echo: FAULT:long:1");
    let s = server.stats();
    // 26 × 19 chars + 25 spaces = 519 → 130; 200 chars → 50; 27 × 18 + 26 = 512 → 128; 18 → 5.
    assert_eq!(s.billed_completion_tokens, 130 + 50 + 128 + 5);
}

#[tokio::test]
async fn n_choices_plain_and_structured() {
    let server = FakeServer::start(Config::default()).await;
    let mut b = body("hello");
    b["n"] = json!(3);
    let v = ok(&server, &b).await;
    let texts: Vec<&str> = (0..3).map(|i| content(&v, i)).collect();
    assert_eq!(texts, ["echo: hello", "echo: hello #2", "echo: hello #3"]);
    for i in 0..3 {
        assert_eq!(v["choices"][i]["index"], i);
        assert_eq!(v["choices"][i]["finish_reason"], "stop");
    }
    let single = ok(&server, &body("hello")).await;
    assert_eq!(
        v["usage"]["prompt_tokens"],
        single["usage"]["prompt_tokens"]
    );
    assert_eq!(v["usage"]["completion_tokens"], 3 + 4 + 4);
    let p = single["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(v["usage"]["total_tokens"], p + 11);

    // Structured: every choice valid, distinct, maxLength kept with the suffix inside it.
    let schema = ad_schema();
    let mut b = with_schema(body("A long request for three ad variants"), &schema);
    b["n"] = json!(3);
    let v = ok(&server, &b).await;
    let ads: Vec<Value> = (0..3).map(|i| valid(content(&v, i), &schema)).collect();
    assert_eq!(ads[0]["headline"], "headline: echo: A long request");
    assert_eq!(ads[1]["headline"], "headline: echo: A long requ #2");
    assert_eq!(ads[2]["headline"], "headline: echo: A long requ #3");
    assert_eq!(
        ads[2]["seller"]["name"],
        "name: echo: A long request for three ad variants #3"
    );
    assert_eq!(ads[1]["cta"], "Buy now");
    assert_ne!(ads[0], ads[1]);
    assert_ne!(ads[1], ads[2]);
    let sum: u64 = (0..3).map(|i| ceil4(content(&v, i))).sum();
    assert_eq!(v["usage"]["completion_tokens"], sum);

    // The limiter reserves n × max_tokens.
    let before = server.stats().tokens_admitted;
    let mut b = body("hello");
    b["n"] = json!(3);
    b["max_tokens"] = json!(10);
    ok(&server, &b).await;
    assert_eq!(server.stats().tokens_admitted - before, p + 30);

    // usage= overrides the totals, whatever n is.
    let mut b = body("x FAULT:usage=100,7,0,0");
    b["n"] = json!(2);
    let v = ok(&server, &b).await;
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(v["usage"]["completion_tokens"], 7);

    // Billed sums follow the usage answers reported.
    let s = server.stats();
    assert_eq!(s.billed_completion_tokens, 11 + 3 + sum + 11 + 7);

    for (n, msg) in [
        (json!(0), "below minimum"),
        (json!(129), "above maximum"),
        (json!(-1), "below minimum"),
        (json!(1.5), "decimal"),
        (json!("2"), "Invalid type"),
    ] {
        let mut b = body("x");
        b["n"] = n.clone();
        let r = post(&server, &b).await;
        assert_eq!(r.status(), 400, "{n}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["param"], "n");
        assert!(e["error"]["message"].as_str().unwrap().contains(msg), "{e}");
    }
    let mut b = body("x");
    b["n"] = json!(128);
    assert_eq!(
        ok(&server, &b).await["choices"][127]["message"]["content"],
        "echo: x #128"
    );
}

#[tokio::test]
async fn markers_per_choice_and_per_count() {
    let server = FakeServer::start(Config::default()).await;
    let schema = ad_schema();
    // @1:1 = only choice 1, only the first request with these messages.
    let mut b = with_schema(body("ad FAULT:schemabreak@1:1"), &schema);
    b["n"] = json!(3);
    let v = ok(&server, &b).await;
    valid(content(&v, 0), &schema);
    let broken: Value = serde_json::from_str(content(&v, 1)).unwrap();
    assert!(check(&broken, &schema, &schema, "").is_err());
    valid(content(&v, 2), &schema);
    let v = ok(&server, &b).await;
    for i in 0..3 {
        valid(content(&v, i), &schema);
    }

    // Without @: every choice. Several markers at once, each with its own count.
    let mut b = with_schema(body("ad FAULT:badjsonout:1 FAULT:refusal@2:2"), &schema);
    b["n"] = json!(3);
    let v = ok(&server, &b).await;
    assert!(serde_json::from_str::<Value>(content(&v, 0)).is_err());
    assert!(serde_json::from_str::<Value>(content(&v, 1)).is_err());
    assert_eq!(v["choices"][2]["message"]["content"], Value::Null);
    let v = ok(&server, &b).await;
    valid(content(&v, 0), &schema);
    valid(content(&v, 1), &schema);
    assert_eq!(
        v["choices"][2]["message"]["refusal"],
        "I'm sorry, but I can't help with that."
    );
    let v = ok(&server, &b).await;
    valid(content(&v, 2), &schema);

    // A request that faults does not use up a shape marker's count: the retry refuses.
    let b = body("x FAULT:500:1 FAULT:refusal:1");
    assert_eq!(post(&server, &b).await.status(), 500);
    let v = ok(&server, &b).await;
    assert_eq!(v["choices"][0]["message"]["content"], Value::Null);
    assert_eq!(
        content(&ok(&server, &b).await, 0),
        "echo: x FAULT:500:1 FAULT:refusal:1"
    );
    // A choice index beyond n touches nothing.
    let v = ok(&server, &body("x FAULT:refusal@3")).await;
    assert_eq!(content(&v, 0), "echo: x FAULT:refusal@3");
}

/// Per choice index: (content, refusal, finish_reason), put together from an SSE body; and
/// the usage chunk, which must be the last one.
#[allow(clippy::type_complexity)]
fn assemble(
    sse: &str,
) -> (
    Vec<(Option<String>, Option<String>, Option<String>)>,
    Option<Value>,
) {
    let datas: Vec<&str> = sse
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(datas.last(), Some(&"[DONE]"));
    let mut out: Vec<(Option<String>, Option<String>, Option<String>)> = Vec::new();
    let mut usage = None;
    for d in &datas[..datas.len() - 1] {
        assert!(usage.is_none(), "a chunk after the usage chunk");
        let v: Value = serde_json::from_str(d).unwrap();
        let choices = v["choices"].as_array().unwrap();
        if choices.is_empty() {
            usage = Some(v["usage"].clone());
            continue;
        }
        for c in choices {
            let i = c["index"].as_u64().unwrap() as usize;
            if out.len() <= i {
                out.resize(i + 1, (None, None, None));
            }
            let slot = &mut out[i];
            assert!(slot.2.is_none(), "a chunk after choice {i}'s finish_reason");
            for (key, acc) in [("content", &mut slot.0), ("refusal", &mut slot.1)] {
                if let Some(s) = c["delta"][key].as_str() {
                    acc.get_or_insert_with(String::new).push_str(s);
                }
            }
            if let Some(f) = c["finish_reason"].as_str() {
                slot.2 = Some(f.to_string());
            }
        }
    }
    (out, usage)
}

#[tokio::test]
async fn streaming_n_choices_matches_the_plain_answer() {
    let server = FakeServer::start(Config::default()).await;
    let schema = ad_schema();
    for (b, what) in [
        (body("stream two variants please"), "plain"),
        (with_schema(body("stream two ads"), &schema), "schema"),
        (body("x FAULT:refusal@1"), "refusal"),
    ] {
        let mut b = b;
        b["n"] = json!(2);
        let whole = ok(&server, &b).await;
        b["stream"] = json!(true);
        b["stream_options"] = json!({"include_usage": true});
        let r = post(&server, &b).await;
        assert_eq!(r.status(), 200);
        let sse = r.text().await.unwrap();
        let (choices, usage) = assemble(&sse);
        assert_eq!(choices.len(), 2, "{what}");
        for (i, (c, refusal, finish)) in choices.iter().enumerate() {
            let m = &whole["choices"][i]["message"];
            assert_eq!(c.as_deref(), m["content"].as_str(), "{what} {i}");
            assert_eq!(refusal.as_deref(), m["refusal"].as_str(), "{what} {i}");
            assert_eq!(
                finish.as_deref(),
                whole["choices"][i]["finish_reason"].as_str()
            );
        }
        assert_eq!(usage.as_ref(), Some(&whole["usage"]), "{what}");
        // Interleaved: after the role chunks, choice 0's first piece then choice 1's.
        let idx: Vec<u64> = sse
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter_map(|v| v["choices"][0]["index"].as_u64())
            .collect();
        assert_eq!(idx[..6], [0, 1, 0, 1, 0, 1], "{what}");
    }
    // `cut` with n = 2: the first half of each choice's pieces, then the stream stops.
    let mut b = body("twenty chars of text FAULT:cut");
    b["n"] = json!(2);
    b["stream"] = json!(true);
    let sse = post(&server, &b).await.text().await.unwrap();
    assert!(!sse.contains("[DONE]") && !sse.contains("\"finish_reason\":\"stop\""));
    let (choices, usage) = {
        let mut sse = sse.clone();
        sse.push_str("data: [DONE]\n\n");
        assemble(&sse)
    };
    assert_eq!(usage, None);
    // "echo: twenty chars of text FAULT:cut" is 36 chars, 9 pieces: 5 are sent.
    assert_eq!(choices[0].0.as_deref(), Some("echo: twenty chars o"));
    assert_eq!(choices[1].0.as_deref(), Some("echo: twenty chars o"));

    // A refusal streams as `delta.refusal`, after a role chunk that says so.
    let mut b = body("x FAULT:refusal");
    b["stream"] = json!(true);
    let sse = post(&server, &b).await.text().await.unwrap();
    let first = sse.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
    let v: Value = serde_json::from_str(first).unwrap();
    assert_eq!(
        v["choices"][0]["delta"],
        json!({"role": "assistant", "content": null, "refusal": ""})
    );
}

#[tokio::test]
async fn image_parts_are_echoed_in_order() {
    let server = FakeServer::start(Config::default()).await;
    let data_url = format!("data:image/jpeg;base64,{}", "QUJD".repeat(50));
    let b = json!({"model": "gpt-4o-mini", "messages": [
        {"role": "system", "content": [{"type": "text", "text": "describe"}]},
        {"role": "user", "content": [
            {"type": "text", "text": "What is"},
            {"type": "image_url", "image_url": {"url": "https://cdn.example.com/products/skates-front.png", "detail": "low"}},
            {"type": "image_url", "image_url": {"url": data_url}},
            {"type": "text", "text": "in these?"},
            {"type": "image_url", "image_url": {"url": "https://x.io/a.png", "detail": "high"}},
        ]},
    ]});
    let v = ok(&server, &b).await;
    assert_eq!(
        content(&v, 0),
        "echo: What is in these? \
         [image detail=low https://cdn.example.com/products/skates-… (49 chars)] \
         [image detail=auto data:image/jpeg;base64,QUJDQUJDQUJDQUJDQ… (223 chars)] \
         [image detail=high https://x.io/a.png… (18 chars)]"
    );
    // (ceil(8/4)+3) + (ceil(17/4)+3 + 85 + 765 + 765) + 3
    assert_eq!(
        v["usage"]["prompt_tokens"],
        5 + (5 + 3 + 85 + 765 + 765) + 3
    );
    let s = server.stats();
    assert_eq!(s.tokens_admitted, 5 + 1623 + 3 + 16);

    // The same in a json_schema answer's strings.
    let schema = json!({"type": "object", "properties": {"alt": {"type": "string"}}});
    let v = ok(&server, &with_schema(b.clone(), &schema)).await;
    let alt: Value = serde_json::from_str(content(&v, 0)).unwrap();
    assert!(alt["alt"]
        .as_str()
        .unwrap()
        .starts_with("alt: echo: What is in these? [image detail=low https://cdn"));

    // Bad part shapes: 400, naming the part.
    let bad = [
        (json!(["just a string"]), "messages[1].content[0]"),
        (json!([{"text": "no type"}]), "messages[1].content[0].type"),
        (
            json!([{"type": "text", "text": "ok"}, {"type": "text"}]),
            "messages[1].content[1].text",
        ),
        (
            json!([{"type": "text", "text": 5}]),
            "messages[1].content[0].text",
        ),
        (
            json!([{"type": "image_url"}]),
            "messages[1].content[0].image_url",
        ),
        (
            json!([{"type": "image_url", "image_url": "https://x.io/a.png"}]),
            "messages[1].content[0].image_url",
        ),
        (
            json!([{"type": "image_url", "image_url": {"detail": "low"}}]),
            "messages[1].content[0].image_url.url",
        ),
        (
            json!([{"type": "image_url", "image_url": {"url": "photos/a.png"}}]),
            "messages[1].content[0].image_url.url",
        ),
        (
            json!([{"type": "image_url", "image_url": {"url": "data:text/plain;base64,QQ=="}}]),
            "messages[1].content[0].image_url.url",
        ),
        (
            json!([{"type": "image_url", "image_url": {"url": "https://x.io/a.png", "detail": "ultra"}}]),
            "messages[1].content[0].image_url.detail",
        ),
        (
            json!([{"type": "video", "url": "x"}]),
            "messages[1].content[0].type",
        ),
    ];
    for (parts, at) in bad {
        let mut b = body("x");
        b["messages"][1]["content"] = parts.clone();
        let r = post(&server, &b).await;
        assert_eq!(r.status(), 400, "{parts}");
        let e: Value = r.json().await.unwrap();
        let msg = e["error"]["message"].as_str().unwrap();
        assert!(msg.contains(&format!("'{at}")), "{parts}: {msg}");
        assert_eq!(e["error"]["type"], "invalid_request_error");
    }
    // Images only in user messages.
    let mut b = body("x");
    b["messages"][0]["content"] =
        json!([{"type": "image_url", "image_url": {"url": "https://x.io/a.png"}}]);
    let r = post(&server, &b).await;
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("role 'system'"));
}

#[tokio::test]
async fn a_batch_line_with_a_schema_and_markers() {
    let server = FakeServer::start(Config::default()).await;
    let schema = ad_schema();
    let bodies = [
        with_schema(body("batch ad"), &schema),
        with_schema(body("batch ad FAULT:schemabreak"), &schema),
        with_schema(body("batch ad FAULT:refusal"), &schema),
        {
            let mut b = with_schema(body("batch ads"), &schema);
            b["n"] = json!(2);
            b
        },
    ];
    let lines: Vec<Value> = bodies
        .iter()
        .enumerate()
        .map(|(i, b)| json!({"custom_id": format!("r{i}"), "method": "POST", "url": "/v1/chat/completions", "body": b}))
        .collect();
    let batch = Api::openai(&server).submit(&lines).await;
    server.complete_batches();
    let batch = server
        .batches()
        .into_iter()
        .find(|b| b["id"] == batch["id"])
        .unwrap();
    assert_eq!(batch["status"], "completed");
    let out = server
        .file_content(batch["output_file_id"].as_str().unwrap())
        .unwrap();
    let lines = parse_jsonl(&out);
    assert_eq!(lines.len(), 4);
    let answer = |id: &str| {
        let l = lines.iter().find(|l| l["custom_id"] == id).unwrap();
        assert_eq!(l["response"]["status_code"], 200);
        l["response"]["body"].clone()
    };
    let v = answer("r0");
    let ad = valid(content(&v, 0), &schema);
    assert_eq!(ad["seller"]["name"], "name: echo: batch ad");
    // The chat endpoint gives the same answer for the same body.
    let chat = ok(&server, &bodies[0]).await;
    assert_eq!(content(&chat, 0), content(&v, 0));
    let v = answer("r1");
    let broken: Value = serde_json::from_str(content(&v, 0)).unwrap();
    assert!(check(&broken, &schema, &schema, "").is_err());
    let v = answer("r2");
    assert_eq!(
        v["choices"][0]["message"]["refusal"],
        "I'm sorry, but I can't help with that."
    );
    let v = answer("r3");
    assert_ne!(content(&v, 0), content(&v, 1));
    valid(content(&v, 1), &schema);
    // Billed as the output lines report.
    let billed: u64 = lines
        .iter()
        .map(|l| {
            l["response"]["body"]["usage"]["completion_tokens"]
                .as_u64()
                .unwrap()
        })
        .sum();
    let s = server.stats();
    assert_eq!(
        s.billed_completion_tokens,
        billed + chat["usage"]["completion_tokens"].as_u64().unwrap()
    );
}
