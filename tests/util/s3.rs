//! A local S3-compatible server for the object-store tests: moto's `moto_server` (PyPI's
//! `moto[server]`, which `scripts/prepare.sh --test` installs) on 127.0.0.1, one per test,
//! and a few plain HTTP calls to put, get and list its objects.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The secret the tests give promptmill: it must never appear in anything promptmill writes.
pub const SECRET: &str = "s3-SECRET-DO-NOT-LEAK-9876543210";

pub struct Moto {
    child: Child,
    pub port: u16,
}

impl Moto {
    /// A fresh server, or `None` (with a note) where moto is not installed; under `CI=true`
    /// a missing moto is a failure, never a skip.
    pub fn start() -> Option<Moto> {
        let port = free_port();
        let args = [
            "-H".to_string(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
        ];
        let spawn = |program: &str, pre: &[&str]| {
            Command::new(program)
                .args(pre)
                .args(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
        };
        // The script pip puts on PATH, else the module (a user install off PATH).
        let child = spawn("moto_server", &[]).or_else(|_| {
            let probe = Command::new("python3")
                .args(["-c", "import moto.server"])
                .status();
            match probe {
                Ok(s) if s.success() => spawn("python3", &["-m", "moto.server"]),
                _ => Err(std::io::Error::other(
                    "neither moto_server nor python3 -m moto.server",
                )),
            }
        });
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                assert!(
                    std::env::var("CI").map_or(true, |v| v != "true"),
                    "moto_server cannot start ({e}): `scripts/prepare.sh --test` installs it"
                );
                eprintln!("moto_server is not installed ({e}): this test did not run");
                return None;
            }
        };
        let m = Moto { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while m.request("GET", "/", b"").is_none() {
            assert!(Instant::now() < deadline, "moto_server did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(m)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The standard AWS variables pointing at this server.
    pub fn env(&self, c: &mut Command) {
        c.env("AWS_ENDPOINT_URL", self.endpoint())
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_ACCESS_KEY_ID", "AKIDTESTING")
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .env("AWS_REGION", "us-east-1");
    }

    pub fn bucket(&self, name: &str) {
        let (status, _) = self.request("PUT", &format!("/{name}"), b"").unwrap();
        assert_eq!(status, 200, "create bucket {name}");
    }

    pub fn put(&self, bucket: &str, key: &str, body: &[u8]) {
        let (status, _) = self
            .request("PUT", &format!("/{bucket}/{key}"), body)
            .unwrap();
        assert_eq!(status, 200, "put {bucket}/{key}");
    }

    pub fn get(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        match self.request("GET", &format!("/{bucket}/{key}"), b"") {
            Some((200, body)) => Some(body),
            _ => None,
        }
    }

    /// Keys under `prefix`, sorted.
    pub fn list(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let (status, body) = self
            .request(
                "GET",
                &format!("/{bucket}?list-type=2&prefix={prefix}&max-keys=1000"),
                b"",
            )
            .unwrap();
        assert_eq!(status, 200);
        let text = String::from_utf8_lossy(&body);
        let mut keys: Vec<String> = text
            .split("<Key>")
            .skip(1)
            .filter_map(|s| s.split_once("</Key>").map(|(k, _)| k.to_string()))
            .collect();
        keys.sort();
        keys
    }

    /// The lines of the records in an object.
    pub fn records(&self, bucket: &str, key: &str) -> Vec<serde_json::Value> {
        let body = self
            .get(bucket, key)
            .unwrap_or_else(|| panic!("no {bucket}/{key}"));
        String::from_utf8(body)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Every object in the bucket, concatenated: to look for what must not be there.
    pub fn everything(&self, bucket: &str) -> Vec<u8> {
        let mut all = Vec::new();
        for k in self.list(bucket, "") {
            all.extend(self.get(bucket, &k).unwrap_or_default());
        }
        all
    }

    fn request(&self, method: &str, path: &str, body: &[u8]) -> Option<(u16, Vec<u8>)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
        // moto checks no signature, but an unsigned GET is anonymous (and refused on a private
        // object): an Authorization header of the right shape makes it the test's own.
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\n\
             Authorization: AWS4-HMAC-SHA256 Credential=AKIDTESTING/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0\r\n\
             Connection: close\r\n\r\n",
            self.port,
            body.len()
        );
        s.write_all(head.as_bytes()).ok()?;
        s.write_all(body).ok()?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).ok()?;
        let split = resp.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&resp[..split]).into_owned();
        let status: u16 = head.split_whitespace().nth(1)?.parse().ok()?;
        let mut body = resp[split + 4..].to_vec();
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            body = dechunk(&body);
        }
        Some((status, body))
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(i) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..i]).trim(), 16).unwrap_or(0);
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[i + 2..i + 2 + n]);
        b = &b[i + 2 + n + 2..];
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
