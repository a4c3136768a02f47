//! A local Azure Blob server for the `az://` tests: Microsoft's Azurite (`azurite-blob`, from
//! npm, which `scripts/prepare.sh --test` installs) on 127.0.0.1, one per test, with the
//! emulator's well-known account; its blobs put, read and listed by `azurite.py` beside this
//! file (SharedKey signing, Python's standard library only).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Azurite {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Azurite {
    /// A fresh server, or `None` (with a note) where Azurite is not installed; under
    /// `CI=true` a missing Azurite is a failure, never a skip.
    pub fn start() -> Option<Azurite> {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("azurite-blob")
            .args([
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                &port.to_string(),
                "--silent",
            ])
            .args(["--skipApiVersionCheck", "--loose", "--location"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                assert!(
                    std::env::var("CI").map_or(true, |v| v != "true"),
                    "azurite-blob cannot start ({e}): `scripts/prepare.sh --test` installs it"
                );
                eprintln!("azurite-blob is not installed ({e}): this test did not run");
                return None;
            }
        };
        let a = Azurite {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "azurite-blob did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(a)
    }

    /// The variables that point `object_store` at this emulator.
    pub fn env(&self, c: &mut Command) {
        c.env("AZURE_STORAGE_USE_EMULATOR", "true").env(
            "AZURITE_BLOB_STORAGE_URL",
            format!("http://127.0.0.1:{}", self.port),
        );
    }

    fn script(&self, args: &[&str], stdin: &[u8]) -> (bool, Vec<u8>) {
        use std::io::Write;
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/util/azurite.py");
        let mut c = Command::new("python3")
            .arg(script)
            .arg(self.port.to_string())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(stdin).unwrap();
        let out = c.wait_with_output().unwrap();
        (out.status.success(), out.stdout)
    }

    pub fn container(&self, name: &str) {
        assert!(self.script(&["mkcontainer", name], b"").0);
    }

    pub fn put(&self, container: &str, blob: &str, body: &[u8]) {
        assert!(self.script(&["put", container, blob], body).0);
    }

    pub fn get(&self, container: &str, blob: &str) -> Option<Vec<u8>> {
        let (ok, out) = self.script(&["get", container, blob], b"");
        ok.then_some(out)
    }

    pub fn list(&self, container: &str) -> Vec<String> {
        let (ok, out) = self.script(&["list", container], b"");
        assert!(ok);
        String::from_utf8(out)
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
