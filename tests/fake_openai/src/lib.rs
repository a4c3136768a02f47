//! Public API of the fake OpenAI server: `Config`, `Stats`, `FakeServer` and its accept loop.
//!
//! The server is served with hyper directly (one task per TCP connection) rather than
//! `axum::serve`, so that the `FAULT:reset` marker can drop a connection without any
//! HTTP response. Routing and responses live in `handler`; OpenAI's Files and Batches
//! endpoints, and the clock that moves batches, in `batch`; Anthropic's Messages API in
//! `anthropic`; Google's Gemini API in `gemini` and its Batch and Files APIs in
//! `gemini_batch`; content parts (images),
//! `response_format` and the JSON generated from a schema in `shape`.

mod anthropic;
mod anthropic_batch;
mod azure;
mod batch;
mod fault;
mod gcs;
mod gemini;
mod gemini_batch;
mod handler;
mod limiter;
mod shape;
mod tls;

pub use azure::AzureHit;
pub use tls::Tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};

/// How the fake server behaves. `Config::default()` is a fast, unlimited, recording server.
#[derive(Debug, Clone)]
pub struct Config {
    /// Sleep before every answer (after rate-limit admission; 429s from the limiter are
    /// immediate).
    pub latency_ms: u64,
    /// Requests per minute; None = unlimited.
    pub rpm: Option<u64>,
    /// Tokens per minute; None = unlimited.
    pub tpm: Option<u64>,
    /// Sliding window length in seconds; per-window limits are `rpm * window_s / 60`.
    pub window_s: f64,
    /// Model name to report in responses; None = echo the request's `model`.
    pub model: Option<String>,
    /// If set, requests need `Authorization: Bearer <key>`.
    pub require_key: Option<String>,
    /// Every n-th valid chat request (1-based, by arrival) answers 500.
    pub fail_every: Option<u64>,
    /// Keep every request body for `FakeServer::requests()`.
    pub record_bodies: bool,
    /// Answer every request as if it carried `FAULT:nousage`: a server that never reports
    /// usage and ignores `stream_options`.
    pub omit_usage: bool,
    /// Uploads (`POST /v1/files`) whose file is larger than this many bytes answer 400
    /// (`code: "file_too_large"`); None = no limit but the server's 512 MiB body cap.
    pub batch_max_file_bytes: Option<u64>,
    /// Batches move one step each time they are retrieved (`GET /v1/batches/{id}`), so a
    /// polling client sees them complete; otherwise they move only when the test says
    /// (`FakeServer::advance_batches` and friends, or `POST /_fake/batches/advance`).
    pub batch_auto_advance: bool,
    /// Lines of an `in_progress` batch answered per step; None = all of them in one step.
    /// `Some(0)` is taken as 1.
    pub batch_lines_per_step: Option<usize>,
    /// Serve HTTPS with this certificate and key instead of plain HTTP.
    pub tls: Option<Tls>,
    /// Azure OpenAI's routes (`/openai/deployments/{d}/chat/completions`) answer only requests
    /// whose `api-version` query is this one (404 "Resource not found" otherwise, as Azure does
    /// for a missing or unknown version). None: any version, or none, is taken.
    pub azure_api_version: Option<String>,
    /// The first this many `POST /v1/batches` make their batch and then lose the answer: the
    /// connection is dropped with no response, as when a proxy or the network fails after the
    /// server acted. A client that creates again makes a second batch of the same lines.
    pub batch_create_answers_lost: u64,
    /// The first this many `POST /v1/batches` answer 500 and make nothing.
    pub batch_create_failures: u64,
    /// The first this many reads on Anthropic's Message Batches routes (a retrieve, a list, a
    /// results download) answer 500 `api_error`: a client must retry them.
    pub batch_read_failures: u64,
    /// Where a Message Batch's `results_url` points (`http://HOST:PORT`); None: this server.
    /// A client must not send its key to another host.
    pub message_results_root: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            latency_ms: 0,
            rpm: None,
            tpm: None,
            window_s: 10.0,
            model: None,
            require_key: None,
            fail_every: None,
            record_bodies: true,
            omit_usage: false,
            batch_max_file_bytes: None,
            batch_auto_advance: false,
            batch_lines_per_step: None,
            tls: None,
            azure_api_version: None,
            batch_create_answers_lost: 0,
            batch_create_failures: 0,
            message_results_root: None,
            batch_read_failures: 0,
        }
    }
}

/// A snapshot of what the server has seen on `POST /v1/chat/completions` and the batch
/// endpoints. `requests`, `ok`, `rate_limited`, `faults`, `rejected` and `tokens_admitted`
/// count chat requests only, never batch lines; the billed token sums count both.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Every chat request, whatever its outcome (batch lines are not requests here).
    pub requests: u64,
    /// Normal 200 answers (including `usage=`, `slow=` and `nousage` markers, and the
    /// answer-shaping `badjsonout`, `schemabreak`, `refusal` and `long`).
    pub ok: u64,
    /// 429s from the rpm/tpm limiter (not `FAULT:429`).
    pub rate_limited: u64,
    /// Injected faults (every marker kind except `usage=`/`slow=`/`nousage` and the
    /// answer-shaping ones, plus `fail_every`).
    pub faults: u64,
    /// 400/401 from request validation or `require_key` (not from markers).
    pub rejected: u64,
    /// Sum of admitted requests' tokens (prompt estimate + max_tokens, or 16).
    pub tokens_admitted: u64,
    /// Prompt tokens of every answer that carried a completion, whether or not the client
    /// saw its usage: normal and `usage=` answers, streams, `nousage` and `cut` answers. The
    /// number is the one the answer's usage reports (or would have reported), so a client
    /// that records every usage it gets can compare its sum with this.
    pub billed_prompt_tokens: u64,
    /// Completion tokens of the same answers as `billed_prompt_tokens`, summed over all of an
    /// answer's choices (`n`), as its usage reports them.
    ///
    /// Both sums also count every batch line answered 200 (when it is answered, so the lines
    /// answered before a batch is cancelled or expires are in), with the usage its output
    /// line reports (or would have, for `FAULT:nousage`).
    pub billed_completion_tokens: u64,
    /// Requests billed whose answer the client never got (`hang`: the client gave up
    /// waiting, the generation is charged anyway). Not in the two token sums above, which
    /// count only answers that were sent.
    pub billed_unanswered: u64,
    /// Files accepted by `POST /v1/files`, or Gemini's finished resumable uploads (not the
    /// output, error or responses files batches write).
    pub files_uploaded: u64,
    /// Batches accepted by `POST /v1/batches` or Gemini's `…:batchGenerateContent`.
    pub batches_created: u64,
    /// Cancels accepted (`POST /v1/batches/{id}/cancel` that moved a batch to `cancelling`, or
    /// Gemini's `batches/{id}:cancel` of a batch not over).
    pub batches_cancelled: u64,
    /// Batch lines answered 200, counted as they are answered: a batch that is later
    /// cancelled or expires keeps the lines it answered billed.
    pub batch_requests_billed: u64,
    pub first_request_at: Option<Instant>,
    pub last_request_at: Option<Instant>,
}

impl Stats {
    /// Time from the first to the last request's arrival.
    pub fn elapsed(&self) -> Duration {
        match (self.first_request_at, self.last_request_at) {
            (Some(a), Some(b)) => b.saturating_duration_since(a),
            _ => Duration::ZERO,
        }
    }

    /// The JSON served on `GET /stats` and printed by the binary on exit.
    pub fn to_json(&self) -> serde_json::Value {
        let e = self.elapsed();
        serde_json::json!({
            "requests": self.requests,
            "ok": self.ok,
            "rate_limited": self.rate_limited,
            "faults": self.faults,
            "rejected": self.rejected,
            "tokens_admitted": self.tokens_admitted,
            "billed_prompt_tokens": self.billed_prompt_tokens,
            "billed_completion_tokens": self.billed_completion_tokens,
            "billed_unanswered": self.billed_unanswered,
            "files_uploaded": self.files_uploaded,
            "batches_created": self.batches_created,
            "batches_cancelled": self.batches_cancelled,
            "batch_requests_billed": self.batch_requests_billed,
            "elapsed_s": e.as_secs_f64(),
            "elapsed_ms": e.as_millis() as u64,
        })
    }
}

/// Lock-free counters; timestamps are nanoseconds since `epoch` plus one (0 = unset).
#[derive(Default)]
pub(crate) struct Counters {
    pub requests: AtomicU64,
    pub valid: AtomicU64,
    pub ok: AtomicU64,
    pub rate_limited: AtomicU64,
    pub faults: AtomicU64,
    pub rejected: AtomicU64,
    pub tokens_admitted: AtomicU64,
    pub billed_prompt_tokens: AtomicU64,
    pub billed_completion_tokens: AtomicU64,
    pub billed_unanswered: AtomicU64,
    pub files_uploaded: AtomicU64,
    pub batches_created: AtomicU64,
    pub batches_cancelled: AtomicU64,
    pub batch_requests_billed: AtomicU64,
    first: AtomicU64,
    last: AtomicU64,
}

/// State shared by all connections of one server.
pub(crate) struct Shared {
    pub config: Config,
    pub epoch: Instant,
    pub counters: Counters,
    pub limiter: Option<limiter::Limiter>,
    pub bodies: Mutex<Vec<serde_json::Value>>,
    /// Marker hits per messages-hash, only touched for `FAULT:<kind>:<n>`.
    pub fault_hits: Mutex<HashMap<u64, u64>>,
    pub next_id: AtomicU64,
    /// Files and batches. Locked for a whole step, so lines are answered under it.
    pub batch: Mutex<batch::State>,
    /// Gemini's files and batches, moved by the same calls as OpenAI's.
    pub batch_gemini: Mutex<gemini_batch::State>,
    /// Every request on an Azure route: what its URL and auth headers were.
    pub azure_hits: Mutex<Vec<AzureHit>>,
    /// Anthropic's prompt cache: the hashes of the prefixes written so far (they never expire
    /// here; a test run is shorter than the 5-minute lifetime).
    pub prompt_cache: Mutex<std::collections::HashSet<u64>>,
    /// `http://127.0.0.1:PORT` (or `https://`): where result URLs point.
    pub root: String,
    /// Google Cloud Storage's objects, for the `gs://` tests.
    pub gcs: Mutex<gcs::State>,
}

impl Shared {
    /// Count an arriving chat request; returns its 1-based sequence number.
    pub fn on_request(&self) -> u64 {
        let ns = self.epoch.elapsed().as_nanos() as u64 + 1;
        let c = &self.counters;
        let _ = c
            .first
            .compare_exchange(0, ns, Ordering::Relaxed, Ordering::Relaxed);
        c.last.fetch_max(ns, Ordering::Relaxed);
        c.requests.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        let at = |v: u64| (v != 0).then(|| self.epoch + Duration::from_nanos(v - 1));
        Stats {
            requests: c.requests.load(Ordering::Relaxed),
            ok: c.ok.load(Ordering::Relaxed),
            rate_limited: c.rate_limited.load(Ordering::Relaxed),
            faults: c.faults.load(Ordering::Relaxed),
            rejected: c.rejected.load(Ordering::Relaxed),
            tokens_admitted: c.tokens_admitted.load(Ordering::Relaxed),
            billed_prompt_tokens: c.billed_prompt_tokens.load(Ordering::Relaxed),
            billed_completion_tokens: c.billed_completion_tokens.load(Ordering::Relaxed),
            billed_unanswered: c.billed_unanswered.load(Ordering::Relaxed),
            files_uploaded: c.files_uploaded.load(Ordering::Relaxed),
            batches_created: c.batches_created.load(Ordering::Relaxed),
            batches_cancelled: c.batches_cancelled.load(Ordering::Relaxed),
            batch_requests_billed: c.batch_requests_billed.load(Ordering::Relaxed),
            first_request_at: at(c.first.load(Ordering::Relaxed)),
            last_request_at: at(c.last.load(Ordering::Relaxed)),
        }
    }
}

/// Per-connection handle the `reset` fault uses to make the connection task drop the socket.
#[derive(Clone)]
pub(crate) struct ConnKill(pub Arc<Notify>);

/// A running fake server. Dropping it stops accepting, closes its connections, and (for
/// `spawn_background`) shuts its runtime down.
pub struct FakeServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    /// Dropping the sender is the shutdown signal for the accept loop and all connections.
    _shutdown: watch::Sender<()>,
}

impl FakeServer {
    /// Start on 127.0.0.1 with an ephemeral port, inside the current tokio runtime.
    pub async fn start(config: Config) -> FakeServer {
        Self::start_on(config, SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("fake_openai: bind 127.0.0.1:0")
    }

    /// Start on a given address (the binary uses this for `--port`).
    pub async fn start_on(config: Config, addr: SocketAddr) -> std::io::Result<FakeServer> {
        let acceptor = config.tls.as_ref().map(Tls::acceptor).transpose()?;
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let shared = Arc::new(Shared {
            root: format!("{scheme}://{addr}"),
            limiter: limiter::Limiter::new(config.rpm, config.tpm, config.window_s),
            config,
            epoch: Instant::now(),
            counters: Counters::default(),
            bodies: Mutex::new(Vec::new()),
            fault_hits: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            batch: Mutex::new(batch::State::default()),
            batch_gemini: Mutex::new(gemini_batch::State::default()),
            azure_hits: Mutex::new(Vec::new()),
            prompt_cache: Mutex::new(Default::default()),
            gcs: Mutex::new(Default::default()),
        });
        let (tx, rx) = watch::channel(());
        tokio::spawn(accept_loop(listener, shared.clone(), rx, acceptor));
        Ok(FakeServer {
            addr,
            shared,
            _shutdown: tx,
        })
    }

    /// `http://127.0.0.1:PORT/v1` (`https://` with `Config::tls`), ready to be used as an
    /// OpenAI base URL.
    pub fn base_url(&self) -> String {
        format!("{}/v1", self.root_url())
    }

    /// `http://127.0.0.1:PORT` (`https://` with `Config::tls`): where Azure OpenAI's resource
    /// endpoint would be, the base of `/openai/deployments/...`.
    pub fn root_url(&self) -> String {
        self.shared.root.clone()
    }

    /// Every Anthropic Message Batch, as `GET /v1/messages/batches/{id}` describes it.
    pub fn message_batches(&self) -> Vec<serde_json::Value> {
        let root = self.root_url();
        self.shared.batch.lock().unwrap().messages.objects(&root)
    }

    /// Every request of every Message Batch, oldest batch first: `{custom_id, params}`.
    pub fn message_batch_requests(&self) -> Vec<serde_json::Value> {
        self.shared.batch.lock().unwrap().messages.requests()
    }

    /// Every request on an Azure route, in arrival order.
    pub fn azure_hits(&self) -> Vec<AzureHit> {
        self.shared.azure_hits.lock().unwrap().clone()
    }

    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// Every chat request body received, in arrival order (empty unless
    /// `Config::record_bodies`). Bodies that are not JSON are stored as a JSON string.
    pub fn requests(&self) -> Vec<serde_json::Value> {
        self.shared.bodies.lock().unwrap().clone()
    }

    /// Every batch input line the server has executed (answered, whatever the status), as
    /// the whole line `{"custom_id", "method", "url", "body"}`, in the order they were
    /// answered (empty unless `Config::record_bodies`). Kept apart from `requests()`, which
    /// holds chat requests only; lines a batch never reached (failed validation, cancelled,
    /// expired) are not here.
    pub fn batch_requests(&self) -> Vec<serde_json::Value> {
        self.shared.batch.lock().unwrap().executed()
    }

    /// The `body` of each line in `batch_requests()`, same order: what a chat client would
    /// have sent as `requests()`.
    pub fn batch_bodies(&self) -> Vec<serde_json::Value> {
        self.batch_requests()
            .into_iter()
            .map(|mut l| l["body"].take())
            .collect()
    }

    /// Move every batch that is not finished one step: `validating` → `in_progress` (or
    /// `failed`, with `errors`), `in_progress` → answer up to `Config::batch_lines_per_step`
    /// more lines, then `finalizing` once all are answered, `finalizing` → `completed`
    /// (output and error files written), `cancelling` → `cancelled` (files written with the
    /// lines answered so far; the others get `batch_cancelled` error lines).
    pub fn advance_batches(&self) {
        self.shared.batch.lock().unwrap().advance_all(&self.shared);
        self.shared
            .batch_gemini
            .lock()
            .unwrap()
            .advance_all(&self.shared);
    }

    /// Every `validating`, `in_progress` or `finalizing` batch becomes `expired` now: the
    /// lines answered so far are in its output/error files, every other line is in the error
    /// file with `"response": null` and error code `batch_expired`.
    pub fn expire_batches(&self) {
        self.shared.batch.lock().unwrap().expire_all(&self.shared);
        self.shared.batch_gemini.lock().unwrap().expire_all();
    }

    /// `advance_batches` until every batch is finished (completed, failed, expired or
    /// cancelled).
    pub fn complete_batches(&self) {
        self.shared.batch.lock().unwrap().complete_all(&self.shared);
        self.shared
            .batch_gemini
            .lock()
            .unwrap()
            .complete_all(&self.shared);
    }

    /// Every Gemini batch as `GET /v1beta/batches/{id}` shows it (an Operation), oldest first.
    pub fn gemini_batches(&self) -> Vec<serde_json::Value> {
        self.shared.batch_gemini.lock().unwrap().operations()
    }

    /// A Gemini file's bytes (`files/upload-N`), uploads and responses files alike.
    pub fn gemini_file(&self, name: &str) -> Option<Vec<u8>> {
        self.shared.batch_gemini.lock().unwrap().file_content(name)
    }

    /// The fake Google Cloud Storage's root, for a service-account file's `gcs_base_url`.
    pub fn gcs_url(&self) -> String {
        format!("{}/gcs", self.shared.root)
    }

    /// Puts an object in the fake Google Cloud Storage.
    pub fn gcs_put(&self, bucket: &str, key: &str, data: &[u8]) {
        gcs::put_object(&self.shared, bucket, key, data.to_vec());
    }

    /// An object of the fake Google Cloud Storage.
    pub fn gcs_get(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        self.shared.gcs.lock().unwrap().get(bucket, key)
    }

    /// The keys of a bucket of the fake Google Cloud Storage, sorted.
    pub fn gcs_keys(&self, bucket: &str) -> Vec<String> {
        self.shared.gcs.lock().unwrap().keys(bucket)
    }

    /// Every batch object, as `GET /v1/batches/{id}` shows it, oldest first.
    pub fn batches(&self) -> Vec<serde_json::Value> {
        self.shared.batch.lock().unwrap().batches()
    }

    /// Every file object (uploads, then output and error files as batches write them, in
    /// creation order; deleted files are gone), without content.
    pub fn files(&self) -> Vec<serde_json::Value> {
        self.shared.batch.lock().unwrap().files()
    }

    /// A file's bytes, as `GET /v1/files/{id}/content` serves them.
    pub fn file_content(&self, id: &str) -> Option<Vec<u8>> {
        self.shared.batch.lock().unwrap().file_content(id)
    }
}

/// Start a server on its own multi-threaded runtime in a background thread, for plain
/// `#[test]` functions. Returns once the socket is listening; drop the result to stop it.
pub fn spawn_background(config: Config) -> FakeServer {
    spawn_background_on(config, SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("fake_openai: bind 127.0.0.1:0")
}

/// `spawn_background` on a chosen address, for outage tests: a test can run its client
/// against a port where nothing listens yet, then start the server on that same port.
/// The bind error (e.g. the port is taken) is returned, not a panic.
pub fn spawn_background_on(config: Config, addr: SocketAddr) -> std::io::Result<FakeServer> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("fake_openai".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("fake_openai: build runtime");
            rt.block_on(async move {
                let server = match FakeServer::start_on(config, addr).await {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let mut stop = server._shutdown.subscribe();
                let _ = tx.send(Ok(server));
                // Err once the caller drops the FakeServer (the sender).
                while stop.changed().await.is_ok() {}
            });
            // Dropping the runtime here cancels any connection still open (e.g. `hang`).
        })
        .map_err(|e| std::io::Error::other(format!("fake_openai: spawn thread: {e}")))?;
    rx.recv().unwrap_or_else(|_| {
        Err(std::io::Error::other(
            "fake_openai: runtime failed to start",
        ))
    })
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<()>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    loop {
        let stream = tokio::select! {
            r = stop.changed() => match r {
                Ok(()) => continue,
                Err(_) => return,
            },
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => {
                    // Usually EMFILE under load: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let stop = stop.clone();
        match &tls {
            None => {
                tokio::spawn(serve(stream, shared, stop));
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // A client that does not trust the certificate ends here, as it should.
                    if let Ok(s) = acceptor.accept(stream).await {
                        serve(s, shared, stop).await;
                    }
                });
            }
        }
    }
}

/// One connection, plain or TLS: HTTP/1.1 until the client, a `reset` fault or the shutdown
/// ends it.
async fn serve<S>(stream: S, shared: Arc<Shared>, mut stop: watch::Receiver<()>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let kill = ConnKill(Arc::new(Notify::new()));
    let k = kill.clone();
    let svc = service_fn(move |mut req| {
        req.extensions_mut().insert(k.clone());
        handler::route(shared.clone(), req)
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(stream), svc);
    // Leaving the select drops `conn` and with it the socket.
    tokio::select! {
        _ = conn => {}
        _ = kill.0.notified() => {}
        _ = async { while stop.changed().await.is_ok() {} } => {}
    }
}
