//! Content beyond one string per message, through the real binary against the fake server:
//! conversations spliced from a row field, images as `image_url` parts (files as data URLs),
//! their row errors, the dry run's image tokens, and text-only requests unchanged to the byte.

use base64::Engine as _;
use serde_json::{json, Value};

use crate::util::*;

/// A 1×1 PNG, whole (signature, IHDR, IDAT, IEND).
const PNG_1X1: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";

fn png_1x1() -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(PNG_1X1)
        .unwrap()
}

/// A PNG's signature and header alone: all a dimension read needs.
fn png_header(w: u32, h: u32) -> Vec<u8> {
    let mut b = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
    b.extend_from_slice(&w.to_be_bytes());
    b.extend_from_slice(&h.to_be_bytes());
    b.extend_from_slice(&[8, 6, 0, 0, 0, 0, 0, 0, 0]);
    b
}

/// A JPEG's start and a baseline frame header (SOF0) of `w`×`h`.
fn jpeg_header(w: u16, h: u16) -> Vec<u8> {
    let mut b = vec![0xFF, 0xD8, 0xFF, 0xC0, 0x00, 0x11, 0x08];
    b.extend_from_slice(&h.to_be_bytes());
    b.extend_from_slice(&w.to_be_bytes());
    b.extend_from_slice(&[3, 1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1, 0xFF, 0xD9]);
    b
}

fn job_file(f: &Fixture, input: &str, messages: &str, model: &str) -> std::path::PathBuf {
    f.write(
        "job.toml",
        format!(
            r#"
[input]
path = "{input}"
{messages}
[model]
{model}
max_tokens = 20

[run]
concurrency = 2
max_retries = 0
timeout_s = 5

[output]
path = "out/result.jsonl"
"#
        ),
    )
}

const CHAT_MESSAGES: &str = r#"
[[messages]]
role = "system"
content = "Translate every turn into {{ lang }}."

[[messages]]
from = "chat"

[[messages]]
role = "user"
content = "Now {{ lang }}, please."
"#;

#[test]
fn a_conversation_field_is_spliced_between_templated_messages_in_order() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let chat = json!([
        {"role": "system", "content": "You sell shoes."},
        {"role": "user", "name": "ann", "content": "Do you have red ones?"},
        {"role": "assistant", "content": "Yes, in all sizes."},
        {"role": "user", "content": [{"type": "text", "text": "Size"}, {"type": "text", "text": "42?"}]}
    ]);
    f.write(
        "chats.jsonl",
        format!("{}\n", json!({"lang": "French", "chat": chat})),
    );
    let model = format!("name = \"gpt-4o-mini\"\nbase_url = \"{}\"", s.base_url());
    let job = job_file(&f, "chats.jsonl", CHAT_MESSAGES, &model);
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let bodies = s.requests();
    assert_eq!(bodies.len(), 1);
    let mut want = vec![json!({"role": "system", "content": "Translate every turn into French."})];
    want.extend(chat.as_array().unwrap().iter().cloned());
    want.push(json!({"role": "user", "content": "Now French, please."}));
    assert_eq!(bodies[0]["messages"], Value::Array(want));
    let recs = f.records();
    assert_eq!(recs[0]["completion"], "echo: Now French, please.");

    // The inserted messages are part of the request's identity: another conversation is
    // another request, the same one is done already.
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(s.requests().len(), 1, "a rerun sends nothing");
    let changed = json!([{"role": "user", "content": "Do you have blue ones?"}]);
    f.write(
        "chats.jsonl",
        format!("{}\n", json!({"lang": "French", "chat": changed})),
    );
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(s.requests().len(), 2, "another conversation is sent");
}

#[test]
fn bad_conversation_arrays_are_row_errors_naming_field_and_row() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let rows = [
        json!({"lang": "German", "chat": [{"role": "user", "content": "one"}]}),
        json!({"lang": "German", "chat": "[{\"role\": \"user\", oops"}),
        json!({"lang": "German", "chat": {"role": "user", "content": "x"}}),
        json!({"lang": "German", "chat": [{"role": "robot", "content": "x"}]}),
        json!({"lang": "German", "chat": [{"role": "user"}]}),
        json!({"lang": "German"}),
        json!({"lang": "German", "chat": [{"role": "user", "content": "six"}]}),
    ];
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    f.write("chats.jsonl", text);
    let model = format!("name = \"gpt-4o-mini\"\nbase_url = \"{}\"", s.base_url());
    let job = job_file(&f, "chats.jsonl", CHAT_MESSAGES, &model);
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let recs = f.records();
    let status: Vec<&str> = recs.iter().map(|r| r["status"].as_str().unwrap()).collect();
    assert_eq!(
        status,
        ["ok", "error", "error", "error", "error", "error", "ok"]
    );
    assert_eq!(s.requests().len(), 2, "only the good rows are sent");
    let wants = [
        (2, "is not a JSON array of messages"),
        (3, "is an object, not an array of messages"),
        (
            4,
            "message [0]: role `robot` is not system, user or assistant",
        ),
        (5, "message [0]: has no `content`"),
        (6, "field `chat` is missing from the row"),
    ];
    for (row, want) in wants {
        let rec = &recs[row - 1];
        assert_eq!(rec["error"]["kind"], "input");
        let m = rec["error"]["message"].as_str().unwrap();
        assert!(
            m.contains("chats.jsonl")
                && m.contains(&format!("row {row}:"))
                && m.contains("messages[1].from")
                && m.contains("`chat`")
                && m.contains(want),
            "row {row}: {m}"
        );
    }
}

#[test]
fn a_csv_cell_holding_json_is_a_conversation_and_validate_knows_the_column() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let chat = json!([{"role": "user", "content": "Where is my order, \"really\"?"}]).to_string();
    f.write(
        "chats.csv",
        format!(
            "id,lang,chat\nc1,Spanish,\"{}\"\n",
            chat.replace('"', "\"\"")
        ),
    );
    let model = format!("name = \"gpt-4o-mini\"\nbase_url = \"{}\"", s.base_url());
    let job = job_file(&f, "chats.csv", CHAT_MESSAGES, &model);
    let r = f.run(&["validate", "job.toml"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let body = &s.requests()[0];
    assert_eq!(
        body["messages"][1],
        json!({"role": "user", "content": "Where is my order, \"really\"?"})
    );
    assert_eq!(body["messages"].as_array().unwrap().len(), 3);

    // A field the input does not have is a problem validate lists.
    job_file(
        &f,
        "chats.csv",
        &CHAT_MESSAGES.replace("from = \"chat\"", "from = \"conversation\""),
        &model,
    );
    let r = f.run(&["validate", "job.toml"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("messages[1].from")
            && r.stderr.contains("`conversation` is not a column"),
        "{}",
        r.stderr
    );
}

const IMAGE_MESSAGES: &str = r#"
[[messages]]
role = "user"
content = "Describe {{ id }}."
images = ["{{ photo }}", "https://example.com/shoe.jpg"]
image_detail = "low"
"#;

#[test]
fn images_arrive_as_parts_files_as_data_urls_and_bad_ones_fail_their_row() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let png = png_1x1();
    f.write("data/photos/a.png", &png);
    let jpeg = jpeg_header(3, 2);
    let abs = f.write("elsewhere/b.photo", &jpeg);
    f.write("data/photos/c.txt", "not an image");
    f.write(
        "data/items.csv",
        format!(
            "id,photo\nr1,photos/a.png\nr2,photos/missing.png\nr3,http://example.com/x.png\nr4,{}\nr5,photos/c.txt\nr6,\n",
            abs.display()
        ),
    );
    let model = format!("name = \"gpt-4o-mini\"\nbase_url = \"{}\"", s.base_url());
    let job = job_file(&f, "data/items.csv", IMAGE_MESSAGES, &model);
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let recs = f.records();
    let status: Vec<&str> = recs.iter().map(|r| r["status"].as_str().unwrap()).collect();
    assert_eq!(status, ["ok", "error", "error", "ok", "error", "error"]);

    let b64 = base64::engine::general_purpose::STANDARD;
    let parts = |id: &str, url: String| {
        json!([
            {"type": "text", "text": format!("Describe {id}.")},
            {"type": "image_url", "image_url": {"url": url, "detail": "low"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/shoe.jpg", "detail": "low"}}
        ])
    };
    let bodies = s.requests();
    assert_eq!(bodies.len(), 2);
    let content_of = |id: &str| {
        bodies
            .iter()
            .map(|b| b["messages"][0]["content"].clone())
            .find(|c| c[0]["text"] == format!("Describe {id}."))
            .unwrap_or_else(|| panic!("{id}: {bodies:?}"))
    };
    assert_eq!(
        content_of("r1"),
        parts("r1", format!("data:image/png;base64,{}", b64.encode(&png)))
    );
    // An absolute path; the type is read from the bytes, not the name.
    assert_eq!(
        content_of("r4"),
        parts(
            "r4",
            format!("data:image/jpeg;base64,{}", b64.encode(&jpeg))
        )
    );
    // The server echoes the text parts, then each image it received, in order.
    let echo = recs[0]["completion"].as_str().unwrap();
    assert!(
        echo.starts_with("echo: Describe r1. [image detail=low data:image/png;base64,"),
        "{echo}"
    );

    let m = |row: usize| {
        recs[row - 1]["error"]["message"]
            .as_str()
            .unwrap()
            .to_string()
    };
    for row in [2, 3, 5, 6] {
        assert_eq!(recs[row - 1]["error"]["kind"], "input", "{}", m(row));
        assert!(
            m(row).contains("items.csv")
                && m(row).contains(&format!("row {row}:"))
                && m(row).contains("messages[0].images[0]"),
            "{}",
            m(row)
        );
    }
    assert!(m(2).contains("photos/missing.png"), "{}", m(2));
    assert!(
        m(3).contains("http://example.com/x.png") && m(3).contains("https"),
        "{}",
        m(3)
    );
    assert!(
        m(5).contains("photos/c.txt") && m(5).contains("not a PNG, JPEG, GIF or WebP"),
        "{}",
        m(5)
    );
    assert!(m(6).contains("renders to nothing"), "{}", m(6));
}

#[test]
fn images_on_the_local_model_are_a_job_error() {
    let f = Fixture::new();
    f.write("data/items.csv", "id,photo\nr1,a.png\n");
    f.write("m.gguf", b"");
    let job = job_file(
        &f,
        "data/items.csv",
        IMAGE_MESSAGES,
        "provider = \"local\"\npath = \"m.gguf\"",
    );
    for cmd in ["validate", "run"] {
        let r = f.run(&[cmd, job.to_str().unwrap()]);
        assert_eq!(r.code, 2, "{cmd}: {}", r.stderr);
        assert!(
            r.stderr.contains("messages[0].images") && r.stderr.contains("reads text only"),
            "{cmd}: {}",
            r.stderr
        );
    }
    assert!(!f.path("out/result.jsonl").exists());
}

#[test]
fn the_dry_run_counts_image_tokens_by_the_tile_rule() {
    let f = Fixture::new();
    f.write("data/square.png", png_header(1024, 1024));
    f.write("data/tall.png", png_header(2048, 4096));
    f.write("data/items.csv", "id,photo\nr1,square.png\nr2,tall.png\n");
    let messages = r#"
[[messages]]
role = "user"
content = "Low: {{ id }}"
images = ["{{ photo }}"]
image_detail = "low"

[[messages]]
role = "user"
images = ["{{ photo }}", "https://example.com/x.png"]
image_detail = "high"
"#;
    job_file(&f, "data/items.csv", messages, "name = \"gpt-4o\"");
    let r = f.run(&["estimate", "job.toml"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // Row 1: low 85, 1024² high → 768², 4 tiles: 765, the URL assumed 2048² → 765.
    // Row 2: low 85, 2048×4096 → 768×1536, 6 tiles: 1105, the URL 765.
    assert!(
        r.stdout.contains(
            "images            6 (3570 prompt tokens of the above, by OpenAI's tile rule; \
             2 https URLs not fetched, assumed 2048×2048 at high detail)"
        ),
        "{}",
        r.stdout
    );
    let prompt: u64 = r
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("prompt tokens"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(prompt > 3570, "{}", r.stdout);

    // gpt-4o-mini's rule: 2833 + 5667 per tile; no detail set is counted as high.
    let messages = r#"
[[messages]]
role = "user"
content = "Look."
images = ["{{ photo }}"]
"#;
    job_file(&f, "data/items.csv", messages, "name = \"gpt-4o-mini\"");
    let r = f.run(&["estimate", "job.toml", "--limit", "1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains(
            "images            1 (25501 prompt tokens of the above, by OpenAI's tile rule)"
        ),
        "{}",
        r.stdout
    );
}

/// `promptmill render job.toml --row 1` of this job on main before content could hold parts,
/// and the request line `promptmill export` wrote: a text-only job's requests and
/// fingerprints must not change, or every finished output would be paid for again.
const PINNED_FINGERPRINT: &str = "cdbabb5dbdf9bdcbd2f25c852f016b67";
const PINNED_EXPORT: &str = concat!(
    r#"{"custom_id":"r1-cdbabb5dbdf9bdcbd2f25c852f016b67-c20008b2d80fd5b3","method":"POST","#,
    r#""url":"/v1/chat/completions","body":{"model":"gpt-4o-mini","messages":[{"role":"system","#,
    r#""content":"You are terse."},{"role":"user","name":"ann","content":"Tone: warm. "#,
    r#"Say \"hi\" — ünïcode <b>&"}],"temperature":0.5,"max_tokens":20}}"#,
    "\n"
);

#[test]
fn a_text_only_job_keeps_its_request_body_and_fingerprint() {
    let f = Fixture::new();
    f.write(
        "data.csv",
        "id,text,tone\na1,\"Say \"\"hi\"\" — ünïcode <b>&\",warm\n",
    );
    f.write(
        "job.toml",
        r#"[input]
path = "data.csv"
id = "id"

[[messages]]
role = "system"
content = "You are terse."

[[messages]]
role = "user"
name = "ann"
content = "Tone: {{ tone }}. {{ text }}"

[model]
name = "gpt-4o-mini"
base_url = "http://127.0.0.1:9/v1"
max_tokens = 20
temperature = 0.5

[output]
path = "out/result.jsonl"
"#,
    );
    let r = f.run(&["render", "job.toml", "--row", "1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout
            .ends_with(&format!("--- fingerprint {PINNED_FINGERPRINT}\n")),
        "{}",
        r.stdout
    );
    let r = f.run(&["export", "job.toml", "-o", "req.jsonl"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        std::fs::read_to_string(f.path("req.jsonl")).unwrap(),
        PINNED_EXPORT
    );
}
