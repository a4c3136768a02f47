//! The flex tier, Azure OpenAI and the networks in between, through the real binary: flex
//! requests and prices, Azure's URLs, key header and api-version, proxies from the
//! environment, and TLS with a private CA made for each test. Everything stays on 127.0.0.1.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};

use crate::util::*;

/// Every variable that could route the binary's requests or change its trusted roots: each
/// test sets only the ones it is about.
const NETWORK_VARS: &[&str] = &[
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
    "REQUEST_METHOD",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

fn cmd(f: &Fixture, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = f.cmd(args);
    for v in NETWORK_VARS {
        c.env_remove(v);
    }
    c.env_remove("AZURE_OPENAI_ENDPOINT");
    c.env("AZURE_OPENAI_API_KEY", KEY);
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

fn run(f: &Fixture, args: &[&str], env: &[(&str, &str)]) -> Ran {
    ran(cmd(f, args, env).output().unwrap())
}

fn assert_no_key(r: &Ran, f: &Fixture) {
    assert!(
        !r.stderr.contains(KEY),
        "the key leaked to stderr:\n{}",
        r.stderr
    );
    assert!(!r.stdout.contains(KEY), "the key leaked to stdout");
    for entry in walk(f.dir.path()) {
        let text = std::fs::read(&entry).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&text).contains(KEY),
            "the key leaked into {}",
            entry.display()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Flex

#[test]
fn flex_rows_ask_for_flex_are_priced_at_flex_rates_and_ride_out_resource_unavailable() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    f.write("data.csv", "text\nfirst\nsecond FAULT:flex429:2\nthird\n");
    let job = f.job(
        "data.csv",
        "{{ text }}",
        "service_tier = \"flex\"",
        "",
        &s.base_url(),
    );
    // The fixture's model is gpt-4o-mini, which has no flex rates; gpt-5-mini has.
    let text = std::fs::read_to_string(&job).unwrap();
    std::fs::write(&job, text.replace("gpt-4o-mini", "gpt-5-mini")).unwrap();

    let r = run(&f, &["run", job.to_str().unwrap()], &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);

    // Every request, the retried ones too, asked for flex.
    let bodies = s.requests();
    assert_eq!(
        bodies.len(),
        5,
        "three rows, two of them resource-unavailable first"
    );
    for b in &bodies {
        assert_eq!(b["service_tier"], "flex", "{b}");
    }

    let recs = f.records();
    assert_eq!(recs.len(), 3);
    for rec in &recs {
        assert_eq!(rec["status"], "ok", "{rec}");
        let u = &rec["usage"];
        let (p, c) = (
            u["prompt_tokens"].as_f64().unwrap(),
            u["completion_tokens"].as_f64().unwrap(),
        );
        // gpt-5-mini at flex (= batch) rates: $0.125 in, $1.00 out per 1M; online would be
        // $0.25 and $2.00.
        let flex = (p * 0.125 + c * 1.0) / 1e6;
        let cost = rec["cost_usd"].as_f64().unwrap();
        assert!((cost - flex).abs() < 1e-12, "{cost} vs flex {flex}");
        assert!((cost - (p * 0.25 + c * 2.0) / 1e6).abs() > 1e-9);
    }
    assert_eq!(recs[1]["attempts"], 3, "two 429s, then the answer");

    // Retried like a rate limit: counted as retries and 429s, never a quota stop.
    let sum = f.summary();
    assert_eq!(sum["retries"], 2, "{sum}");
    assert_eq!(sum["rate_limited"], 2, "{sum}");
    assert!(sum["stopped"].is_null(), "{sum}");
    assert!(!r.stderr.contains("quota"), "{}", r.stderr);
}

#[test]
fn flex_on_a_model_without_flex_rates_is_unpriced_not_mispriced() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    f.write("data.csv", csv_rows(2));
    // gpt-4o-mini offers no flex tier: neither its online nor its batch price is right.
    let job = f.job(
        "data.csv",
        "{{ text }}",
        "service_tier = \"flex\"",
        "",
        &s.base_url(),
    );
    let r = run(&f, &["run", job.to_str().unwrap()], &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for rec in f.records() {
        assert_eq!(rec["status"], "ok");
        assert!(rec["cost_usd"].is_null(), "{rec}");
    }
    assert!(
        r.stderr.contains("`gpt-4o-mini` at the flex tier"),
        "one warning names the model and the tier: {}",
        r.stderr
    );
}

// ---------------------------------------------------------------------------------------------
// Azure OpenAI

const API_VERSION: &str = "2024-10-21";

fn azure_job(f: &Fixture, resource: &str, model_extra: &str) -> PathBuf {
    f.write(
        "job.toml",
        format!(
            r#"
[input]
path = "data.csv"

[[messages]]
role = "user"
content = "{{{{ text }}}}"

[model]
provider = "azure"
base_url = "{resource}"
deployment = "mini-prod"
name = "gpt-4o-mini"
max_tokens = 20
{model_extra}

[run]
concurrency = 2
max_retries = 2
timeout_s = 5

[output]
path = "out/result.jsonl"
"#
        ),
    )
}

#[test]
fn an_azure_job_hits_the_deployment_with_its_api_key_and_api_version() {
    let s = spawn_background(Config {
        require_key: Some(KEY.into()),
        azure_api_version: Some(API_VERSION.into()),
        ..Config::default()
    });
    let f = Fixture::new();
    f.write("data.csv", csv_rows(5));
    let job = azure_job(
        &f,
        &s.root_url(),
        &format!("api_version = \"{API_VERSION}\""),
    );
    let r = run(&f, &["-vv", "run", job.to_str().unwrap()], &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);

    let hits = s.azure_hits();
    assert_eq!(hits.len(), 5);
    for h in &hits {
        assert_eq!(h.deployment, "mini-prod");
        assert_eq!(h.api_version.as_deref(), Some(API_VERSION));
        assert_eq!(
            h.api_key.as_deref(),
            Some(KEY),
            "the key in the api-key header"
        );
        assert_eq!(
            h.authorization, None,
            "no Authorization: Bearer on Azure keys"
        );
    }
    assert_eq!(
        s.stats().requests,
        5,
        "nothing went to /v1/chat/completions"
    );

    let recs = f.records();
    assert_eq!(recs.len(), 5);
    for rec in &recs {
        assert_eq!(rec["status"], "ok", "{rec}");
        // Azure answers with its deployment's model; the job's `name` prices it.
        assert_eq!(rec["model"], "mini-prod");
        let u = &rec["usage"];
        let want = (u["prompt_tokens"].as_f64().unwrap() * 0.15
            + u["completion_tokens"].as_f64().unwrap() * 0.60)
            / 1e6;
        assert!(
            (rec["cost_usd"].as_f64().unwrap() - want).abs() < 1e-12,
            "{rec}"
        );
    }
    assert_no_key(&r, &f);
}

#[test]
fn an_azure_bearer_token_goes_in_authorization() {
    let s = spawn_background(Config {
        require_key: Some(KEY.into()),
        ..Config::default()
    });
    let f = Fixture::new();
    f.write("data.csv", csv_rows(2));
    let job = azure_job(
        &f,
        &s.root_url(),
        &format!("api_version = \"{API_VERSION}\"\nauth = \"bearer\""),
    );
    let r = run(&f, &["run", job.to_str().unwrap()], &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for h in s.azure_hits() {
        assert_eq!(
            h.authorization.as_deref(),
            Some(format!("Bearer {KEY}").as_str())
        );
        assert_eq!(h.api_key, None);
    }
}

#[test]
fn the_azure_endpoint_may_come_from_the_environment() {
    let s = spawn_background(Config {
        require_key: Some(KEY.into()),
        azure_api_version: Some(API_VERSION.into()),
        ..Config::default()
    });
    let f = Fixture::new();
    f.write("data.csv", csv_rows(2));
    let job = azure_job(&f, "-", &format!("api_version = \"{API_VERSION}\""));
    let text = std::fs::read_to_string(&job)
        .unwrap()
        .replace("base_url = \"-\"\n", "");
    std::fs::write(&job, text).unwrap();
    let job = job.to_str().unwrap();

    let r = run(&f, &["validate", job], &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("AZURE_OPENAI_ENDPOINT"), "{}", r.stderr);

    let root = s.root_url();
    let r = run(&f, &["run", job], &[("AZURE_OPENAI_ENDPOINT", &root)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(s.azure_hits().len(), 2);
}

#[test]
fn a_wrong_api_version_stops_the_job_and_fails_no_row() {
    let s = spawn_background(Config {
        require_key: Some(KEY.into()),
        azure_api_version: Some(API_VERSION.into()),
        ..Config::default()
    });
    let f = Fixture::new();
    f.write("data.csv", csv_rows(6));
    let job = azure_job(&f, &s.root_url(), "api_version = \"2023-01-01\"");
    let r = run(&f, &["run", job.to_str().unwrap()], &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("Resource not found"), "{}", r.stderr);
    assert!(r.stderr.contains("api_version"), "{}", r.stderr);
    assert!(
        f.records().iter().all(|rec| rec["status"] != "error"),
        "no row is blamed for the job's URL"
    );
    assert!(
        s.stats().requests <= 2,
        "stopped at the first answer or two"
    );

    // Fixed: every row goes out, though none was marked for --retry-failed.
    let job = azure_job(
        &f,
        &s.root_url(),
        &format!("api_version = \"{API_VERSION}\""),
    );
    let r = run(&f, &["run", job.to_str().unwrap()], &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(f.records().len(), 6);
    assert!(f.records().iter().all(|rec| rec["status"] == "ok"));
}

#[test]
fn a_missing_api_version_or_deployment_is_a_job_error_naming_the_field() {
    let f = Fixture::new();
    f.write("data.csv", csv_rows(1));
    let job = azure_job(&f, "https://res.openai.azure.com", "");
    for command in ["validate", "run"] {
        let r = run(&f, &[command, job.to_str().unwrap()], &[]);
        assert_eq!(r.code, 2, "{}", r.stderr);
        assert!(r.stderr.contains("`model.api_version`"), "{}", r.stderr);
    }
    let text = std::fs::read_to_string(&job).unwrap().replace(
        "deployment = \"mini-prod\"\n",
        "api_version = \"2024-10-21\"\n",
    );
    std::fs::write(&job, text).unwrap();
    let r = run(&f, &["validate", job.to_str().unwrap()], &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("`model.deployment`"), "{}", r.stderr);
}

#[test]
fn a_wrong_azure_key_stops_the_job_without_showing_the_key() {
    let s = spawn_background(Config {
        require_key: Some("another-key-0123456789".into()),
        ..Config::default()
    });
    let f = Fixture::new();
    f.write("data.csv", csv_rows(3));
    let job = azure_job(
        &f,
        &s.root_url(),
        &format!("api_version = \"{API_VERSION}\""),
    );
    let r = run(&f, &["-vv", "run", job.to_str().unwrap()], &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("AZURE_OPENAI_API_KEY"), "{}", r.stderr);
    assert_no_key(&r, &f);
}

// ---------------------------------------------------------------------------------------------
// Proxies

/// A forward proxy on 127.0.0.1 that records each connection's request line: `CONNECT
/// host:port` tunnels (for https) and absolute-form requests (for http), passed on as they
/// are. Threads, not tasks: it lives as long as the test.
struct Proxy {
    port: u16,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Proxy {
    fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let log = log.clone();
                std::thread::spawn(move || Proxy::serve(conn, &log));
            }
        });
        Proxy { port, seen }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    fn serve(mut client: TcpStream, log: &Mutex<Vec<String>>) {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match client.read(&mut byte) {
                Ok(1) => head.push(byte[0]),
                _ => return,
            }
        }
        let text = String::from_utf8_lossy(&head).into_owned();
        let line = text.lines().next().unwrap_or("").to_string();
        log.lock().unwrap().push(line.clone());
        let mut parts = line.split(' ');
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let authority = if method == "CONNECT" {
            target.to_string()
        } else {
            // http://host:port/path → host:port; the origin server takes absolute-form.
            let rest = target.strip_prefix("http://").unwrap_or(target);
            rest.split('/').next().unwrap_or("").to_string()
        };
        let Ok(mut upstream) = TcpStream::connect(&authority) else {
            let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n");
            return;
        };
        if method == "CONNECT" {
            let _ = client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
        } else {
            let _ = upstream.write_all(&head);
        }
        let (mut c2, mut u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
        let up = std::thread::spawn(move || {
            let _ = std::io::copy(&mut c2, &mut u2);
            let _ = u2.shutdown(std::net::Shutdown::Write);
        });
        let _ = std::io::copy(&mut upstream, &mut client);
        let _ = client.shutdown(std::net::Shutdown::Write);
        let _ = up.join();
    }
}

#[test]
fn http_proxy_carries_the_requests_and_no_proxy_exempts_the_host() {
    let s = spawn_background(Config::default());
    let proxy = Proxy::start();
    let f = Fixture::new();
    f.write("data.csv", csv_rows(4));
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    let job = job.to_str().unwrap();

    // reqwest does not bypass loopback by itself: 127.0.0.1 goes through the proxy.
    let r = run(&f, &["run", job], &[("HTTP_PROXY", &proxy.url())]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(s.stats().requests, 4);
    let seen = proxy.seen();
    assert!(!seen.is_empty(), "nothing went through the proxy");
    let target = format!("POST http://{}/v1/chat/completions HTTP/1.1", s.addr);
    assert!(seen.iter().all(|l| l == &target), "{seen:?}");

    // NO_PROXY names the host: straight to the server.
    f.write("data.csv", csv_rows(8));
    let r = run(
        &f,
        &["run", job],
        &[("HTTP_PROXY", &proxy.url()), ("NO_PROXY", "127.0.0.1")],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(s.stats().requests, 8);
    assert_eq!(proxy.seen(), seen, "NO_PROXY was not honoured");
}

// ---------------------------------------------------------------------------------------------
// TLS and private CAs

/// A CA of the test's own, and the fake server's certificate for localhost and 127.0.0.1
/// signed by it: (CA PEM, server TLS config).
fn private_ca() -> (String, fake_openai::Tls) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "promptmill test corporate CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    leaf.distinguished_name
        .push(DnType::CommonName, "fake_openai");
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    (
        ca_cert.pem(),
        fake_openai::Tls {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        },
    )
}

fn tls_server() -> (FakeServer, String) {
    let (ca, tls) = private_ca();
    let s = spawn_background(Config {
        tls: Some(tls),
        ..Config::default()
    });
    assert!(s.base_url().starts_with("https://"));
    (s, ca)
}

#[test]
fn an_untrusted_certificate_stops_the_job_and_ca_file_lets_it_through() {
    let (s, ca) = tls_server();
    let f = Fixture::new();
    f.write("data.csv", csv_rows(3));
    f.write("certs/corp-ca.pem", &ca);
    let job = f.job("data.csv", "{{ text }}", "", "outage_s = 1", &s.base_url());
    let job = job.to_str().unwrap();

    let r = run(&f, &["run", job], &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("certificate"), "{}", r.stderr);
    assert!(
        r.stderr.contains("ca_file"),
        "the hint names the fix: {}",
        r.stderr
    );
    assert_eq!(s.stats().requests, 0, "no request got past the handshake");
    assert!(f.records().is_empty(), "nothing billed, nothing recorded");

    let text = std::fs::read_to_string(job).unwrap();
    std::fs::write(
        job,
        text.replace(
            "max_tokens = 20",
            "max_tokens = 20\nca_file = \"certs/corp-ca.pem\"",
        ),
    )
    .unwrap();
    let r = run(&f, &["run", job], &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(s.stats().requests, 3);
    assert!(f.records().iter().all(|rec| rec["status"] == "ok"));
}

#[test]
fn the_system_ca_store_is_trusted() {
    // SSL_CERT_FILE stands in for the system's store (rustls-native-certs reads it first).
    let (s, ca) = tls_server();
    let f = Fixture::new();
    f.write("data.csv", csv_rows(2));
    let store = f.write("system-store.pem", &ca);
    let job = f.job("data.csv", "{{ text }}", "", "outage_s = 1", &s.base_url());
    let r = run(
        &f,
        &["run", job.to_str().unwrap()],
        &[("SSL_CERT_FILE", store.to_str().unwrap())],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(s.stats().requests, 2);
}

#[test]
fn https_proxy_tunnels_to_a_private_ca_server() {
    let (s, ca) = tls_server();
    let proxy = Proxy::start();
    let f = Fixture::new();
    f.write("data.csv", csv_rows(3));
    f.write("corp-ca.pem", &ca);
    let job = f.job(
        "data.csv",
        "{{ text }}",
        "ca_file = \"corp-ca.pem\"",
        "",
        &s.base_url(),
    );
    let r = run(
        &f,
        &["run", job.to_str().unwrap()],
        &[("HTTPS_PROXY", &proxy.url())],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(s.stats().requests, 3);
    let seen = proxy.seen();
    assert!(!seen.is_empty());
    let connect = format!("CONNECT 127.0.0.1:{} HTTP/1.1", s.addr.port());
    assert!(seen.iter().all(|l| l == &connect), "{seen:?}");
}

#[test]
fn a_ca_file_that_is_not_a_certificate_is_a_job_error_naming_field_and_file() {
    let f = Fixture::new();
    f.write("data.csv", csv_rows(1));
    f.write("corp-ca.pem", "this is not PEM\n");
    let job = f.job(
        "data.csv",
        "{{ text }}",
        "ca_file = \"corp-ca.pem\"",
        "",
        "https://127.0.0.1:9/v1",
    );
    for command in ["validate", "run"] {
        let r = run(&f, &[command, job.to_str().unwrap()], &[]);
        assert_eq!(r.code, 2, "{}", r.stderr);
        assert!(r.stderr.contains("`model.ca_file`"), "{}", r.stderr);
        assert!(r.stderr.contains("corp-ca.pem"), "{}", r.stderr);
    }
}
