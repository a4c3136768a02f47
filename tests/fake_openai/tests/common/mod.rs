//! What the fake server's HTTP tests share: a chat body, a POST to the chat endpoint, and a
//! client for the Files and Batches endpoints.

use fake_openai::FakeServer;
use reqwest::multipart::{Form, Part};
use serde_json::{json, Value};

/// A chat request: a system line and `content` as the user's.
pub fn body(content: &str) -> Value {
    json!({"model": "gpt-4o-mini", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": content},
    ]})
}

pub async fn post(server: &FakeServer, b: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/chat/completions", server.base_url()))
        .bearer_auth("sk-test")
        .json(b)
        .send()
        .await
        .expect("request")
}

pub const KEY: &str = "sk-batch-test-key-0001";

/// A client for one API prefix: `http://ADDR/v1` (OpenAI) or `http://ADDR/openai` (Azure).
pub struct Api {
    base: String,
    client: reqwest::Client,
    /// Send the key as `api-key` (Azure) rather than `Authorization: Bearer`.
    api_key_header: bool,
}

impl Api {
    pub fn openai(server: &FakeServer) -> Api {
        Api {
            base: server.base_url(),
            client: reqwest::Client::new(),
            api_key_header: false,
        }
    }

    pub fn azure(server: &FakeServer) -> Api {
        Api {
            base: format!("http://{}/openai", server.addr),
            client: reqwest::Client::new(),
            api_key_header: true,
        }
    }

    pub fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let url = format!("{}{path}", self.base);
        let rb = self.client.request(method, url);
        if self.api_key_header {
            rb.header("api-key", KEY)
                .query(&[("api-version", "2024-10-21")])
        } else {
            rb.bearer_auth(KEY)
        }
    }

    pub async fn upload_raw(&self, content: &[u8], purpose: &str) -> reqwest::Response {
        let form = Form::new().text("purpose", purpose.to_string()).part(
            "file",
            Part::bytes(content.to_vec()).file_name("input.jsonl"),
        );
        self.req(reqwest::Method::POST, "/files")
            .multipart(form)
            .send()
            .await
            .unwrap()
    }

    pub async fn upload(&self, content: &[u8]) -> Value {
        let r = self.upload_raw(content, "batch").await;
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }

    pub async fn create_raw(&self, body: &Value) -> reqwest::Response {
        self.req(reqwest::Method::POST, "/batches")
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn create(&self, file_id: &Value, endpoint: &str) -> Value {
        let r = self
            .create_raw(&json!({
                "input_file_id": file_id,
                "endpoint": endpoint,
                "completion_window": "24h",
                "metadata": {"job": "test"},
            }))
            .await;
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }

    /// Upload `lines` and create a batch on `/v1/chat/completions`.
    pub async fn submit(&self, lines: &[Value]) -> Value {
        let file = self.upload(&jsonl(lines)).await;
        self.create(&file["id"], "/v1/chat/completions").await
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self.req(reqwest::Method::GET, path).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap())
    }

    pub async fn batch(&self, id: &Value) -> Value {
        let (status, v) = self
            .get(&format!("/batches/{}", id.as_str().unwrap()))
            .await;
        assert_eq!(status, 200);
        v
    }

    pub async fn cancel(&self, id: &Value) -> (u16, Value) {
        let r = self
            .req(
                reqwest::Method::POST,
                &format!("/batches/{}/cancel", id.as_str().unwrap()),
            )
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap())
    }

    /// A file's lines (empty for a null id).
    pub async fn lines(&self, file_id: &Value) -> Vec<Value> {
        let Some(id) = file_id.as_str() else {
            return Vec::new();
        };
        let r = self
            .req(reqwest::Method::GET, &format!("/files/{id}/content"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "application/octet-stream");
        parse_jsonl(&r.bytes().await.unwrap())
    }
}

pub fn jsonl(lines: &[Value]) -> Vec<u8> {
    let mut out = Vec::new();
    for l in lines {
        out.extend_from_slice(l.to_string().as_bytes());
        out.push(b'\n');
    }
    out
}

pub fn parse_jsonl(bytes: &[u8]) -> Vec<Value> {
    std::str::from_utf8(bytes)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
