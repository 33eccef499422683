//! Test helpers: real S3-compatible servers on free loopback ports: moto's
//! server mode (a Python emulator, installed by `scripts/s3-server install`)
//! and a single-node Garage (a real distributed object store, installed by
//! `scripts/s3-server garage install`), see [`GarageServer`].
//!
//! moto runs from the venv's Python with a small launcher that
//! - creates the test's buckets before it starts to listen, so a restarted
//!   server (moto keeps everything in memory) has its buckets again the moment
//!   it answers;
//! - exits when the test process goes away (its stdin, a pipe from us, closes),
//!   so no server outlives a killed test.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to answer after start.
const START_TIMEOUT: Duration = Duration::from_secs(30);

const LAUNCHER: &str = r#"
import os, sys, threading

def _watch():
    try:
        sys.stdin.buffer.read()
    finally:
        os._exit(0)

threading.Thread(target=_watch, daemon=True).start()

from moto.core import DEFAULT_ACCOUNT_ID
from moto.s3.models import s3_backends

for b in filter(None, os.environ.get("CDP_MOTO_BUCKETS", "").split(",")):
    s3_backends[DEFAULT_ACCOUNT_ID]["aws"].create_bucket(b, "us-east-1")

from moto.server import main
main(["-H", "127.0.0.1", "-p", os.environ["CDP_MOTO_PORT"]])
"#;

/// Creates an IAM user allowed s3:* and prints its access key and secret.
const MAKE_USER: &str = r#"
import json, sys, boto3
iam = boto3.client("iam", endpoint_url=sys.argv[1], region_name="us-east-1",
                   aws_access_key_id="setup", aws_secret_access_key="setup")
iam.create_user(UserName="cdp")
iam.put_user_policy(UserName="cdp", PolicyName="s3", PolicyDocument=json.dumps(
    {"Version": "2012-10-17",
     "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
k = iam.create_access_key(UserName="cdp")["AccessKey"]
print(k["AccessKeyId"], k["SecretAccessKey"])
"#;

pub const INSTALL_HINT: &str = "install it with: scripts/s3-server install";

/// The moto venv: `$CDP_MOTO_VENV`, else `$HOME/.cache/cdp/moto-venv`.
pub fn moto_venv() -> PathBuf {
    if let Some(v) = std::env::var_os("CDP_MOTO_VENV") {
        return PathBuf::from(v);
    }
    let home = std::env::var_os("HOME").expect("HOME is not set");
    Path::new(&home).join(".cache/cdp/moto-venv")
}

fn venv_python() -> PathBuf {
    let venv = moto_venv();
    let py = venv.join("bin/python");
    if !venv.join(".cdp-installed").exists() || !py.exists() {
        panic!(
            "the S3 test server (moto) is not installed in {}; {INSTALL_HINT}",
            venv.display()
        );
    }
    py
}

/// A minimal unsigned HTTP/1.0 request to 127.0.0.1:`port`: (status, body).
pub fn http(port: u16, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, String)> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad HTTP answer: {text:.200}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// A loopback port nothing listens on (at the time of the call).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running moto server on 127.0.0.1.
pub struct S3Server {
    pub port: u16,
    buckets: Vec<String>,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl S3Server {
    /// Start a server on a free port, with these buckets, and wait until it
    /// answers.
    pub fn start(buckets: &[&str]) -> S3Server {
        let mut s = S3Server {
            port: free_port(),
            buckets: buckets.iter().map(|b| b.to_string()).collect(),
            child: None,
            dir: tempfile::tempdir().unwrap(),
        };
        s.spawn();
        s
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The target URL of `bucket/prefix` on this server.
    pub fn url(&self, bucket: &str, prefix: &str) -> String {
        format!(
            "s3://{bucket}/{prefix}?endpoint={}&region=us-east-1",
            self.endpoint()
        )
    }

    /// A credentials file (moto accepts any key unless auth is enabled).
    pub fn credentials_file(&self, key_id: &str, secret: &str) -> PathBuf {
        let p = self.dir.path().join(format!("credentials-{key_id}"));
        std::fs::write(
            &p,
            format!("[default]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n"),
        )
        .unwrap();
        p
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("moto.log")
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "server already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = Command::new(venv_python())
            .arg("-c")
            .arg(LAUNCHER)
            .env("CDP_MOTO_PORT", self.port.to_string())
            .env("CDP_MOTO_BUCKETS", self.buckets.join(","))
            .stdin(Stdio::piped())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start moto from {}: {e}; {INSTALL_HINT}",
                    moto_venv().display()
                )
            });
        self.child = Some(child);
        self.wait_ready();
    }

    /// Poll until an HTTP request gets an answer; no fixed sleeps.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("moto exited at start ({st}):\n{}", self.log_tail());
            }
            if let Ok((status, _)) = self.http("GET", "/", b"") {
                if status == 200 {
                    return;
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "moto did not answer on port {} within {START_TIMEOUT:?}:\n{}",
                    self.port,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// A minimal unsigned HTTP/1.0 request: (status, body).
    pub fn http(&self, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, String)> {
        http(self.port, method, path, body)
    }

    /// Kill the server (SIGKILL: a crash, not a shutdown) and wait for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start it again on the same port, with the same buckets (empty).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Create an IAM user allowed s3:*, then make moto check every request's
    /// credentials from now on. Returns (access key id, secret).
    pub fn enable_auth(&self) -> (String, String) {
        let out = Command::new(venv_python())
            .arg("-c")
            .arg(MAKE_USER)
            .arg(self.endpoint())
            .env_remove("AWS_PROFILE")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "creating the IAM user failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let mut it = text.split_whitespace();
        let (id, secret) = (
            it.next().unwrap().to_string(),
            it.next().unwrap().to_string(),
        );
        let (status, body) = self.http("POST", "/moto-api/reset-auth", b"0").unwrap();
        assert_eq!(status, 200, "reset-auth: {body}");
        (id, secret)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------
// Garage: a real S3-compatible object store, one node on loopback.

/// The Garage release the tests run (scripts/s3-server installs this one).
pub const GARAGE_VERSION: &str = "2.5.0";
pub const GARAGE_INSTALL_HINT: &str = "install it with: scripts/s3-server garage install \
     (cargo install garage --version 2.5.0 --locked into ~/.cache/cdp; \
     CDP_GARAGE_FROM=/path/to/garage adopts an existing build)";
/// The region Garage's S3 API is configured with (signatures name it).
pub const GARAGE_REGION: &str = "garage";
/// How long Garage may take to answer after start (it opens its database,
/// then the layout is assigned and applied).
const GARAGE_START_TIMEOUT: Duration = Duration::from_secs(60);

/// The garage binary: `$CDP_GARAGE_BIN`, else the one `scripts/s3-server
/// garage install` put in `$CDP_GARAGE_ROOT` (default
/// `$HOME/.cache/cdp/garage-<version>`). Panics with the install hint when
/// it is missing: a test that needs Garage fails, it never skips.
pub fn garage_bin() -> PathBuf {
    if let Some(b) = std::env::var_os("CDP_GARAGE_BIN") {
        let b = PathBuf::from(b);
        assert!(
            b.is_file(),
            "CDP_GARAGE_BIN={} does not exist; {GARAGE_INSTALL_HINT}",
            b.display()
        );
        return b;
    }
    let root = match std::env::var_os("CDP_GARAGE_ROOT") {
        Some(r) => PathBuf::from(r),
        None => {
            let home = std::env::var_os("HOME").expect("HOME is not set");
            Path::new(&home).join(format!(".cache/cdp/garage-{GARAGE_VERSION}"))
        }
    };
    let bin = root.join("bin/garage");
    if !root.join(".cdp-installed").exists() || !bin.is_file() {
        panic!(
            "the S3 test server Garage {GARAGE_VERSION} is not installed in {}; {GARAGE_INSTALL_HINT}",
            root.display()
        );
    }
    bin
}

/// A deterministic-enough unique hex string (no RNG dependency here).
fn unique_hex(len: usize) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut x = nanos ^ (u64::from(std::process::id()) << 32) ^ N.fetch_add(1, Ordering::Relaxed);
    let mut s = String::new();
    while s.len() < len {
        // splitmix64
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        s.push_str(&format!("{:016x}", z ^ (z >> 31)));
    }
    s.truncate(len);
    s
}

/// A single-node Garage on 127.0.0.1 (S3 API, RPC and admin API on free
/// ports), its metadata and data in a temporary directory; one access key
/// allowed read, write and owner on the test's buckets. The server is
/// killed (SIGKILL) when this is dropped, panics included; a watchdog (a
/// shell reading a pipe from the test process) kills it if the test
/// process dies first.
pub struct GarageServer {
    /// The S3 API's port.
    pub port: u16,
    rpc_port: u16,
    admin_port: u16,
    /// The access key allowed on the buckets.
    pub key_id: String,
    pub secret: String,
    child: Option<Child>,
    watchdog: Option<Child>,
    dir: tempfile::TempDir,
}

impl GarageServer {
    /// Start Garage, give the node its role (zone dc1, 1 GB), create the key
    /// and the buckets, and wait until the S3 API answers.
    pub fn start(buckets: &[&str]) -> GarageServer {
        let mut g = GarageServer {
            port: free_port(),
            rpc_port: free_port(),
            admin_port: free_port(),
            key_id: format!("GK{}", unique_hex(24)),
            secret: unique_hex(64),
            child: None,
            watchdog: None,
            dir: tempfile::tempdir().unwrap(),
        };
        g.write_config();
        g.spawn();
        let id = g.node_id();
        g.cli_ok(&["layout", "assign", "-z", "dc1", "-c", "1G", &id]);
        g.cli_ok(&["layout", "apply", "--version", "1"]);
        let (key_id, secret) = (g.key_id.clone(), g.secret.clone());
        g.cli_ok(&["key", "import", "-n", "cdp-test", &key_id, &secret, "--yes"]);
        for b in buckets {
            g.cli_ok(&["bucket", "create", b]);
            g.cli_ok(&[
                "bucket", "allow", "--read", "--write", "--owner", b, "--key", &key_id,
            ]);
        }
        g
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("garage.toml")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("garage.log")
    }

    fn write_config(&self) {
        let d = self.dir.path();
        std::fs::write(
            self.config_path(),
            format!(
                "metadata_dir = \"{meta}\"\n\
                 data_dir = \"{data}\"\n\
                 db_engine = \"sqlite\"\n\
                 replication_factor = 1\n\
                 rpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_secret = \"{secret}\"\n\
                 [s3_api]\n\
                 s3_region = \"{GARAGE_REGION}\"\n\
                 api_bind_addr = \"127.0.0.1:{s3}\"\n\
                 [admin]\n\
                 api_bind_addr = \"127.0.0.1:{admin}\"\n",
                meta = d.join("meta").display(),
                data = d.join("data").display(),
                rpc = self.rpc_port,
                secret = unique_hex(64),
                s3 = self.port,
                admin = self.admin_port,
            ),
        )
        .unwrap();
    }

    /// `garage -c CONFIG args…`, its output whatever the status.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(garage_bin())
            .arg("-c")
            .arg(self.config_path())
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run garage: {e}; {GARAGE_INSTALL_HINT}"))
    }

    /// [`GarageServer::cli`] that must succeed: its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "garage {args:?} failed ({}): {}\n{}\n--- server log ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn node_id(&self) -> String {
        let out = self.cli_ok(&["node", "id", "-q"]);
        let id = out.trim().split('@').next().unwrap_or("").to_string();
        assert!(
            id.len() >= 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "garage node id printed {out:?}"
        );
        id
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "garage already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = Command::new(garage_bin())
            .arg("-c")
            .arg(self.config_path())
            .arg("server")
            .env("RUST_LOG", "garage=info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start garage: {e}; {GARAGE_INSTALL_HINT}"));
        // The watchdog reads a pipe only this process holds: when the test
        // process dies (even by SIGKILL) the pipe closes and it kills Garage.
        let watchdog = Command::new("sh")
            .arg("-c")
            .arg("cat >/dev/null; kill -9 \"$1\" 2>/dev/null")
            .arg("garage-watchdog")
            .arg(child.id().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.watchdog = Some(watchdog);
        self.wait_ready();
    }

    /// Poll until `garage status` answers (the node is up and its RPC
    /// reachable) and the S3 port answers HTTP; no fixed sleeps.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + GARAGE_START_TIMEOUT;
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("garage exited at start ({st}):\n{}", self.log_tail());
            }
            let out = self.cli(&["status"]);
            if out.status.success() && http(self.port, "GET", "/", b"").is_ok() {
                return;
            }
            let last = String::from_utf8_lossy(&out.stderr);
            if Instant::now() > deadline {
                panic!(
                    "garage did not answer within {GARAGE_START_TIMEOUT:?} (last `garage status`: {last}):\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The target URL of `bucket/prefix` on this server.
    pub fn url(&self, bucket: &str, prefix: &str) -> String {
        format!(
            "s3://{bucket}/{prefix}?endpoint={}&region={GARAGE_REGION}",
            self.endpoint()
        )
    }

    /// A credentials file with the key allowed on the buckets.
    pub fn credentials(&self) -> PathBuf {
        self.credentials_file(&self.key_id, &self.secret)
    }

    /// A credentials file with any key and secret (named after the key).
    pub fn credentials_file(&self, key_id: &str, secret: &str) -> PathBuf {
        let p = self.dir.path().join(format!("credentials-{key_id}"));
        std::fs::write(
            &p,
            format!("[default]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n"),
        )
        .unwrap();
        p
    }

    /// Import another key, allowed `perms` ("--read", "--write", "--owner")
    /// on `bucket`: its credentials file.
    pub fn add_key(&self, bucket: &str, perms: &[&str]) -> PathBuf {
        let (id, secret) = (format!("GK{}", unique_hex(24)), unique_hex(64));
        self.cli_ok(&["key", "import", "-n", "cdp-extra", &id, &secret, "--yes"]);
        let mut args = vec!["bucket", "allow"];
        args.extend_from_slice(perms);
        args.extend_from_slice(&[bucket, "--key", &id]);
        self.cli_ok(&args);
        self.credentials_file(&id, &secret)
    }

    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Kill the server (SIGKILL: a crash, not a shutdown) and wait for it;
    /// its watchdog first (so it never signals a reused pid).
    pub fn stop(&mut self) {
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start it again on the same ports and directories: what it stored is
    /// still there (a real server, unlike moto).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for GarageServer {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("--- garage log (tail) ---\n{}", self.log_tail());
        }
    }
}
