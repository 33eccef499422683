//! Test helpers: a real S3-compatible server (moto's server mode, installed by
//! `scripts/s3-server install`) on a free loopback port.
//!
//! The server runs from the venv's Python with a small launcher that
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
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            s,
            "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\n\r\n",
            self.port,
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
