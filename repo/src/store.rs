//! Storage backends behind one small interface: put, get (whole or a byte
//! range), list (a key prefix, sorted), delete.
//!
//! Two backends: S3-compatible stores through object_store's
//! `AmazonS3` (`s3://bucket/prefix?endpoint=…&region=…`), and a local or NFS
//! directory (`file:///path`). The backends make exactly one attempt per call
//! (object_store's own retries are switched off); retry with backoff, and all
//! other policy, lives above them in [`with_retry`].
//!
//! Keys are relative to the URL's prefix: for `s3://bucket/pre`, key
//! `cdp/v1/x` is the object `pre/cdp/v1/x`; for `file:///srv/cdp`, it is the
//! file `/srv/cdp/cdp/v1/x`. A key is one or more `/`-separated components of
//! `[A-Za-z0-9._+=,:@-]`, none empty and none starting with `.`.
//!
//! An object appears atomically: the `file://` backend writes into
//! `<root>/.cdp-staging/`, fsyncs, then renames into place (and fsyncs the
//! directory); an S3 PUT is atomic by itself.

use std::fmt;
use std::future::Future;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as OsPath;
use object_store::{ClientOptions, ObjectStore, RetryConfig};
use thiserror::Error;

/// Any error, as the cause of a [`StoreError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong, as a kind the caller can branch on. Each carries the
/// target URL and the key (or operation) as context. `Display` is one clear
/// line; the underlying error, where there is one, is the `source()`.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The object does not exist.
    #[error("{url}: no object {key}")]
    NotFound { url: String, key: String },

    /// The storage could not be reached: connection refused or reset,
    /// timeout, name resolution, NFS server gone. Retrying may help.
    #[error("{url}: {op} {key}: cannot reach the storage ({detail}); {hint}")]
    Unreachable {
        url: String,
        op: &'static str,
        key: String,
        detail: String,
        /// What to look at ("is the S3 endpoint up…?").
        hint: &'static str,
        #[source]
        source: BoxError,
    },

    /// The server answered with a server-side failure (HTTP 5xx, SlowDown).
    /// Retrying may help.
    #[error("{url}: {op} {key}: the storage server failed ({detail}); retrying may help")]
    Server {
        url: String,
        op: &'static str,
        key: String,
        detail: String,
        #[source]
        source: BoxError,
    },

    /// The credentials were refused or lack a permission. Permanent.
    #[error("{url}: {op} {key}: access denied ({detail}); check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or the target's credentials file) and the bucket's policy")]
    Auth {
        url: String,
        op: &'static str,
        key: String,
        detail: String,
        #[source]
        source: BoxError,
    },

    /// The target URL or the credentials configuration is wrong: unknown
    /// scheme or query key, missing directory, unreadable credentials file,
    /// a bucket that does not exist. Permanent.
    #[error("{url}: {message}")]
    Config { url: String, message: String },

    /// A key that is not valid (`..`, a leading `/`, an empty component…).
    #[error("{url}: invalid key {key:?}: {reason}")]
    InvalidKey {
        url: String,
        key: String,
        reason: &'static str,
    },

    /// Anything else (a full disk, a bad request, a range outside the
    /// object). Permanent.
    #[error("{url}: {op} {key}: {detail}")]
    Other {
        url: String,
        op: &'static str,
        key: String,
        detail: String,
        #[source]
        source: Option<BoxError>,
    },
}

impl StoreError {
    /// True if retrying the same call may succeed (the storage is
    /// unreachable or failed on its side); false for permanent errors.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Unreachable { .. } | StoreError::Server { .. }
        )
    }

    /// The target URL the error is about.
    pub fn url(&self) -> &str {
        match self {
            StoreError::NotFound { url, .. }
            | StoreError::Unreachable { url, .. }
            | StoreError::Server { url, .. }
            | StoreError::Auth { url, .. }
            | StoreError::Config { url, .. }
            | StoreError::InvalidKey { url, .. }
            | StoreError::Other { url, .. } => url,
        }
    }
}

/// One object of a listing.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ObjectMeta {
    /// The key, relative to the target's prefix (as given to `put`).
    pub key: String,
    pub size: u64,
}

/// The one interface a storage backend implements. Each call is one attempt:
/// backends never retry. [`Store`] validates keys before calling a backend,
/// so a backend sees only valid keys and prefixes.
pub trait Backend: Send + Sync + fmt::Debug {
    /// Store `data` under `key`, atomically: readers see the whole object or
    /// none. An existing object is replaced.
    fn put<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, Result<(), StoreError>>;
    /// The whole object, or `range` of it (which must lie inside the object).
    fn get<'a>(
        &'a self,
        key: &'a str,
        range: Option<Range<u64>>,
    ) -> BoxFuture<'a, Result<Bytes, StoreError>>;
    /// Every object whose key starts with `prefix`, in any order.
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<ObjectMeta>, StoreError>>;
    /// Remove an object; removing a missing object succeeds.
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Free bytes at the target, where the backend can tell.
    fn free_space(&self) -> Option<u64>;
    /// A cheap check that the target is reachable, exists and the
    /// credentials work.
    fn check(&self) -> BoxFuture<'_, Result<(), StoreError>>;
}

/// A storage target. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    url: Arc<str>,
    backend: Arc<dyn Backend>,
}

/// How long `check()` may take before the target counts as unreachable.
const CHECK_TIMEOUT: Duration = Duration::from_secs(15);
/// Connection set-up timeout of the S3 client.
const S3_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Whole-request timeout of the S3 client (a large PUT over a slow link must fit).
const S3_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// What to look at when an S3 target cannot be reached.
const S3_HINT: &str = "is the S3 endpoint up and its address right?";
/// What to look at when a `file://` target cannot be reached.
const FILE_HINT: &str = "is the file system mounted and, for NFS, its server up?";
/// Query keys an `s3://` URL may carry.
const S3_QUERY_KEYS: &[&str] = &["endpoint", "region"];
/// The staging directory of the `file://` backend, under the root.
const STAGING_DIR: &str = ".cdp-staging";
/// Staging files older than this are leftovers of interrupted puts.
const STAGING_MAX_AGE: Duration = Duration::from_secs(3600);

impl Store {
    /// Open a target URL: `file:///abs/path` or
    /// `s3://bucket/prefix?endpoint=http://127.0.0.1:9000&region=us-east-1`.
    ///
    /// S3 credentials come from `credentials_file` if given (an AWS-style INI
    /// file; the profile is `$AWS_PROFILE` or `default`), else from
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`;
    /// never from the URL. Unknown query keys are an error. Opening does no
    /// I/O on S3 (see [`Store::check`]); a `file://` root must be an existing
    /// directory.
    /// Open a configured target (`[target.NAME]`: its URL and credentials file).
    pub fn for_target(t: &cdp_core::config::Target) -> Result<Store, StoreError> {
        Store::open(&t.url, t.credentials_file.as_deref())
    }

    pub fn open(url: &str, credentials_file: Option<&Path>) -> Result<Store, StoreError> {
        let config = |message: String| StoreError::Config {
            url: url.to_string(),
            message,
        };
        let parsed = url::Url::parse(url).map_err(|e| config(format!("not a valid URL: {e}")))?;
        let backend: Arc<dyn Backend> = match parsed.scheme() {
            "file" => {
                if credentials_file.is_some() {
                    return Err(config("a file:// target takes no credentials file".into()));
                }
                Arc::new(FileBackend::open(url, &parsed)?)
            }
            "s3" => Arc::new(S3Backend::open(url, &parsed, credentials_file)?),
            other => {
                return Err(config(format!(
                    "unsupported scheme {other:?}: use file:///path or s3://bucket/prefix?endpoint=…&region=…"
                )))
            }
        };
        Ok(Store {
            url: url.into(),
            backend,
        })
    }

    /// A store over any backend (tests use this to inject faults).
    pub fn from_backend(url: &str, backend: Arc<dyn Backend>) -> Store {
        Store {
            url: url.into(),
            backend,
        }
    }

    /// The target URL, as given to `open`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Store `data` under `key`, atomically. An existing object is replaced.
    pub async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        self.valid_key(key)?;
        self.backend.put(key, data).await
    }

    /// The whole object.
    pub async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        self.valid_key(key)?;
        self.backend.get(key, None).await
    }

    /// Bytes `range` of the object; the range must lie inside the object.
    pub async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        self.valid_key(key)?;
        if range.start > range.end {
            return Err(StoreError::Other {
                url: self.url.to_string(),
                op: "get range",
                key: key.to_string(),
                detail: format!("reversed range {range:?}"),
                source: None,
            });
        }
        if range.start == range.end {
            return Ok(Bytes::new());
        }
        self.backend.get(key, Some(range)).await
    }

    /// All objects whose key starts with `prefix`, sorted by key, with
    /// sizes. Use a "directory" prefix ending in `/` (such as
    /// `cdp/v1/vms/U/vda/journal/`): `a/b/` lists `a/b/c` but not `a/bc`.
    /// The empty prefix lists everything.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        self.valid_prefix(prefix)?;
        let mut out = self.backend.list(prefix).await?;
        out.retain(|o| o.key.starts_with(prefix));
        out.sort();
        out.dedup_by(|a, b| a.key == b.key);
        Ok(out)
    }

    /// Remove an object. Removing a missing object succeeds.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.valid_key(key)?;
        self.backend.delete(key).await
    }

    /// Free bytes where the backend can tell (`file://`: statvfs of the
    /// root), else None.
    pub fn free_space(&self) -> Option<u64> {
        self.backend.free_space()
    }

    /// A cheap check that the target is reachable and the credentials work:
    /// for S3 one LIST of the prefix (which also proves the bucket exists),
    /// for `file://` that the root is a writable directory. Bounded in time.
    pub async fn check(&self) -> Result<(), StoreError> {
        match tokio::time::timeout(CHECK_TIMEOUT, self.backend.check()).await {
            Ok(r) => r,
            Err(elapsed) => Err(StoreError::Unreachable {
                url: self.url.to_string(),
                op: "check",
                key: "target".into(),
                detail: format!("no answer within {CHECK_TIMEOUT:?}"),
                hint: if self.url.starts_with("s3:") {
                    S3_HINT
                } else {
                    FILE_HINT
                },
                source: Box::new(elapsed),
            }),
        }
    }

    fn valid_key(&self, key: &str) -> Result<(), StoreError> {
        check_key(key, false).map_err(|reason| StoreError::InvalidKey {
            url: self.url.to_string(),
            key: key.to_string(),
            reason,
        })
    }

    fn valid_prefix(&self, prefix: &str) -> Result<(), StoreError> {
        check_key(prefix, true).map_err(|reason| StoreError::InvalidKey {
            url: self.url.to_string(),
            key: prefix.to_string(),
            reason,
        })
    }
}

/// Validate a key, or (with `prefix`) a list prefix: the empty string, or
/// a key whose last component may be empty or partial.
fn check_key(key: &str, prefix: bool) -> Result<(), &'static str> {
    if key.is_empty() {
        return if prefix { Ok(()) } else { Err("empty key") };
    }
    if key.len() > 1024 {
        return Err("longer than 1024 bytes");
    }
    if key.starts_with('/') {
        return Err("leading '/'");
    }
    let parts: Vec<&str> = key.split('/').collect();
    let n = parts.len();
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == n;
        if part.is_empty() {
            if prefix && last {
                continue;
            }
            return Err(if last {
                "trailing '/'"
            } else {
                "empty component ('//')"
            });
        }
        if *part == ".." || *part == "." {
            return Err("'.' or '..' component");
        }
        if part.starts_with('.') {
            return Err("a component starts with '.'");
        }
        if !part
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+=,:@-".contains(&b))
        {
            return Err("characters outside [A-Za-z0-9._+=,:@-]");
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Retry, above the backends.

/// Told of each retry: (what, the error, attempts so far, the wait before the next).
pub type OnRetry = Arc<dyn Fn(&str, &StoreError, u32, Duration) + Send + Sync>;

/// How [`with_retry`] retries transient failures: exponential backoff from
/// `initial_delay`, doubling up to `max_delay`, with ±20% jitter, until
/// `max_attempts` attempts were made or the next wait would end after
/// `deadline` (counted from the first attempt).
#[derive(Clone)]
pub struct RetryPolicy {
    pub initial_delay: Duration,
    pub max_delay: Duration,
    /// Attempts in all, the first included (at least 1).
    pub max_attempts: u32,
    pub deadline: Duration,
    /// Called before each wait: (what, the error, attempts so far, the wait).
    pub on_retry: Option<OnRetry>,
}

impl Default for RetryPolicy {
    /// 100 ms doubling to 5 s, at most 10 attempts within 30 s.
    fn default() -> Self {
        RetryPolicy {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            max_attempts: 10,
            deadline: Duration::from_secs(30),
            on_retry: None,
        }
    }
}

impl fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("initial_delay", &self.initial_delay)
            .field("max_delay", &self.max_delay)
            .field("max_attempts", &self.max_attempts)
            .field("deadline", &self.deadline)
            .field("on_retry", &self.on_retry.is_some())
            .finish()
    }
}

impl RetryPolicy {
    /// No retry: one attempt.
    pub fn none() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..Default::default()
        }
    }
}

/// A factor in [0.8, 1.2) from a cheap, non-cryptographic source.
fn jitter() -> f64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    let mut x = nanos ^ COUNTER.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    0.8 + 0.4 * ((x >> 11) as f64 / (1u64 << 53) as f64)
}

/// Run `f` until it succeeds, returns a permanent error, or the policy's
/// attempts or deadline run out; transient errors ([`StoreError::is_transient`])
/// are retried with exponential backoff. The last error is returned as it was.
/// `what` names the operation for `policy.on_retry`.
pub async fn with_retry<T, F, Fut>(
    what: &str,
    policy: &RetryPolicy,
    mut f: F,
) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let start = Instant::now();
    let mut delay = policy.initial_delay;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let err = match f().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        if !err.is_transient() || attempts >= policy.max_attempts.max(1) {
            return Err(err);
        }
        let wait = delay.mul_f64(jitter()).min(policy.max_delay);
        if start.elapsed() + wait > policy.deadline {
            return Err(err);
        }
        if let Some(cb) = &policy.on_retry {
            cb(what, &err, attempts, wait);
        }
        tokio::time::sleep(wait).await;
        delay = (delay * 2).min(policy.max_delay);
    }
}

// ---------------------------------------------------------------------------
// S3-compatible backend.

struct S3Backend {
    url: String,
    store: AmazonS3,
    bucket: String,
    /// The URL's prefix without slashes at either end ("" for none).
    prefix: String,
    endpoint: String,
}

impl fmt::Debug for S3Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Backend")
            .field("url", &self.url)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

struct Credentials {
    key_id: String,
    secret: String,
    token: Option<String>,
}

impl S3Backend {
    fn open(
        url: &str,
        parsed: &url::Url,
        credentials_file: Option<&Path>,
    ) -> Result<S3Backend, StoreError> {
        let config = |message: String| StoreError::Config {
            url: url.to_string(),
            message,
        };
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(config(
                "credentials never go in the URL: use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the target's credentials file"
                    .into(),
            ));
        }
        if parsed.port().is_some() {
            return Err(config(
                "an s3:// URL names a bucket, not host:port; put the server in ?endpoint=".into(),
            ));
        }
        if parsed.fragment().is_some() {
            return Err(config("unexpected '#' fragment".into()));
        }
        let bucket = parsed.host_str().unwrap_or("").to_string();
        if bucket.is_empty() {
            return Err(config("no bucket: use s3://bucket/prefix".into()));
        }
        let prefix = parsed.path().trim_matches('/').to_string();
        if !prefix.is_empty() {
            check_key(&prefix, false)
                .map_err(|r| config(format!("invalid prefix {prefix:?}: {r}")))?;
        }
        let mut endpoint = None;
        let mut region = None;
        for (k, v) in parsed.query_pairs() {
            let slot = match k.as_ref() {
                "endpoint" => &mut endpoint,
                "region" => &mut region,
                other => {
                    return Err(config(format!(
                        "unknown query key {other:?} (known: {})",
                        S3_QUERY_KEYS.join(", ")
                    )))
                }
            };
            if slot.replace(v.into_owned()).is_some() {
                return Err(config(format!("query key {k:?} given twice")));
            }
        }
        if let Some(e) = &endpoint {
            let eu = url::Url::parse(e)
                .map_err(|err| config(format!("endpoint {e:?} is not a URL: {err}")))?;
            if !matches!(eu.scheme(), "http" | "https") || eu.host_str().is_none() {
                return Err(config(format!(
                    "endpoint {e:?} must be http://host:port or https://host"
                )));
            }
        }
        let region = region.unwrap_or_else(|| "us-east-1".to_string());
        let creds = match credentials_file {
            Some(p) => read_credentials_file(p).map_err(config)?,
            None => credentials_from_env().map_err(config)?,
        };

        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&bucket)
            .with_region(&region)
            .with_access_key_id(creds.key_id)
            .with_secret_access_key(creds.secret)
            // Payloads are signed (x-amz-content-sha256 is the body's SHA-256,
            // object_store's default): the server checks every PUT body.
            .with_unsigned_payload(false)
            // One attempt per call: retry lives above the backend.
            .with_retry(RetryConfig {
                max_retries: 0,
                retry_timeout: Duration::ZERO,
                ..Default::default()
            })
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(true)
                    .with_connect_timeout(S3_CONNECT_TIMEOUT)
                    .with_timeout(S3_REQUEST_TIMEOUT),
            );
        if let Some(t) = creds.token {
            b = b.with_token(t);
        }
        if let Some(e) = &endpoint {
            // Custom endpoints (MinIO, Ceph RGW, moto) take path-style requests.
            b = b.with_endpoint(e).with_virtual_hosted_style_request(false);
        }
        let store = b
            .build()
            .map_err(|e| config(format!("cannot set up the S3 client: {e}")))?;
        Ok(S3Backend {
            url: url.to_string(),
            store,
            bucket,
            prefix,
            endpoint: endpoint.unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com")),
        })
    }

    fn path(&self, key: &str) -> OsPath {
        if self.prefix.is_empty() {
            OsPath::from_iter(key.split('/'))
        } else {
            OsPath::from_iter(self.prefix.split('/').chain(key.split('/')))
        }
    }

    /// The key of an object path, relative to the prefix.
    fn key_of(&self, p: &OsPath) -> Option<String> {
        let s = p.as_ref();
        if self.prefix.is_empty() {
            Some(s.to_string())
        } else {
            s.strip_prefix(&self.prefix)?
                .strip_prefix('/')
                .map(str::to_string)
        }
    }

    fn err(&self, op: &'static str, key: &str, e: object_store::Error) -> StoreError {
        classify_s3(&self.url, &self.bucket, &self.endpoint, op, key, e)
    }
}

fn credentials_from_env() -> Result<Credentials, String> {
    let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    match (get("AWS_ACCESS_KEY_ID"), get("AWS_SECRET_ACCESS_KEY")) {
        (Some(key_id), Some(secret)) => Ok(Credentials {
            key_id,
            secret,
            token: get("AWS_SESSION_TOKEN"),
        }),
        (Some(_), None) => Err("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not".into()),
        (None, Some(_)) => Err("AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not".into()),
        (None, None) => Err(
            "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or name a credentials file in the target"
                .into(),
        ),
    }
}

/// Read an AWS-style INI credentials file: the section `$AWS_PROFILE` (or
/// `default`) with `aws_access_key_id`, `aws_secret_access_key` and
/// optionally `aws_session_token`.
fn read_credentials_file(path: &Path) -> Result<Credentials, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the credentials file {}: {e}", path.display()))?;
    let profile = std::env::var("AWS_PROFILE")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "default".to_string());
    let mut section: Option<String> = None;
    let (mut key_id, mut secret, mut token) = (None, None, None);
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.trim();
            let name = name.strip_prefix("profile ").unwrap_or(name).trim();
            section = Some(name.to_string());
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(format!(
                "{}:{}: expected `key = value` or `[profile]`",
                path.display(),
                n + 1
            ));
        };
        if section.as_deref() != Some(profile.as_str()) {
            continue;
        }
        let v = v.trim().to_string();
        match k.trim().to_ascii_lowercase().as_str() {
            "aws_access_key_id" => key_id = Some(v),
            "aws_secret_access_key" => secret = Some(v),
            "aws_session_token" => token = Some(v),
            _ => {}
        }
    }
    match (key_id, secret) {
        (Some(key_id), Some(secret)) if !key_id.is_empty() && !secret.is_empty() => Ok(Credentials {
            key_id,
            secret,
            token: token.filter(|t| !t.is_empty()),
        }),
        _ => Err(format!(
            "the credentials file {} has no aws_access_key_id and aws_secret_access_key in [{profile}]",
            path.display()
        )),
    }
}

/// The S3 error code and message in an error's text (`<Code>…</Code>`,
/// `<Message>…</Message>` of the response body), if any.
fn s3_error_code(text: &str) -> Option<String> {
    let between = |open: &str, close: &str| {
        let a = text.find(open)? + open.len();
        let b = text[a..].find(close)? + a;
        Some(text[a..b].trim().to_string())
    };
    let code = between("<Code>", "</Code>")?;
    Some(match between("<Message>", "</Message>") {
        Some(m) if !m.is_empty() => format!("{code}: {m}"),
        _ => code,
    })
}

/// The innermost cause of an error, the most specific message.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(s) = cur.source() {
        cur = s;
    }
    cur.to_string()
}

fn io_kind_unreachable(k: std::io::ErrorKind) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        k,
        K::ConnectionRefused
            | K::ConnectionReset
            | K::ConnectionAborted
            | K::NotConnected
            | K::AddrNotAvailable
            | K::BrokenPipe
            | K::TimedOut
            | K::UnexpectedEof
            | K::HostUnreachable
            | K::NetworkUnreachable
            | K::NetworkDown
    )
}

/// S3 error codes that mean the credentials were refused or lack a permission.
const S3_AUTH_CODES: &[&str] = &[
    "AccessDenied",
    "AccountProblem",
    "AllAccessDisabled",
    "ExpiredToken",
    "InvalidAccessKeyId",
    "InvalidSecurity",
    "InvalidToken",
    "SignatureDoesNotMatch",
    "TokenRefreshRequired",
];
/// S3 error codes of a server-side, transient failure.
const S3_SERVER_CODES: &[&str] = &[
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
];
/// HTTP statuses below 500 that are worth a retry: request timeout, too many requests.
const RETRY_STATUSES: &[u16] = &[408, 429];

/// The HTTP status in object_store's text of a client error
/// ("Client error with status 403 Forbidden: …"), which it does not expose
/// for every request (LIST errors keep it inside a private type).
fn http_status_in(text: &str) -> Option<u16> {
    let i = text.find("with status ")? + "with status ".len();
    let digits = text.get(i..i + 3)?;
    digits.parse().ok()
}

fn classify_s3(
    url: &str,
    bucket: &str,
    endpoint: &str,
    op: &'static str,
    key: &str,
    e: object_store::Error,
) -> StoreError {
    let text = e.to_string();
    let detail_text = s3_error_code(&text);
    let code = detail_text
        .as_deref()
        .map(|d| d.split(':').next().unwrap_or(d).trim().to_string());
    let code = code.as_deref();
    let mut status = http_status_in(&text);
    // Walk the chain: a reqwest error tells a connection failure or a timeout
    // from an HTTP status; an io error tells the socket's fate.
    let mut transport = false;
    {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(c) = cur {
            if let Some(r) = c.downcast_ref::<reqwest::Error>() {
                match r.status() {
                    Some(s) => status = status.or(Some(s.as_u16())),
                    None => {
                        transport |=
                            r.is_connect() || r.is_timeout() || r.is_request() || r.is_body()
                    }
                }
            }
            if let Some(io) = c.downcast_ref::<std::io::Error>() {
                transport |= io_kind_unreachable(io.kind());
            }
            cur = c.source();
        }
    }
    let is_not_found = matches!(e, object_store::Error::NotFound { .. });
    let is_denied = matches!(
        e,
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. }
    );
    let detail = |fallback: String| detail_text.clone().unwrap_or(fallback);
    let (url, key) = (url.to_string(), key.to_string());
    if code == Some("NoSuchBucket") {
        return StoreError::Config {
            url,
            message: format!("bucket {bucket:?} does not exist at {endpoint}; create it first"),
        };
    }
    if is_denied
        || code.is_some_and(|c| S3_AUTH_CODES.contains(&c))
        || matches!(status, Some(401 | 403))
    {
        return StoreError::Auth {
            url,
            op,
            key,
            detail: detail(format!("HTTP {}", status.unwrap_or(403))),
            source: Box::new(e),
        };
    }
    if is_not_found || code == Some("NoSuchKey") || status == Some(404) {
        return StoreError::NotFound { url, key };
    }
    if code.is_some_and(|c| S3_SERVER_CODES.contains(&c))
        || status.is_some_and(|s| (500..600).contains(&s) || RETRY_STATUSES.contains(&s))
    {
        let cause = root_cause(&e);
        return StoreError::Server {
            url,
            op,
            key,
            detail: detail(cause),
            source: Box::new(e),
        };
    }
    if transport {
        let cause = root_cause(&e);
        return StoreError::Unreachable {
            url,
            op,
            key,
            detail: format!("{endpoint}: {cause}"),
            hint: S3_HINT,
            source: Box::new(e),
        };
    }
    StoreError::Other {
        url,
        op,
        key,
        detail: detail(text),
        source: Some(Box::new(e)),
    }
}

fn to_usize(url: &str, key: &str, r: Range<u64>) -> Result<Range<usize>, StoreError> {
    match (usize::try_from(r.start), usize::try_from(r.end)) {
        (Ok(a), Ok(b)) => Ok(a..b),
        _ => Err(StoreError::Other {
            url: url.to_string(),
            op: "get range",
            key: key.to_string(),
            detail: format!("range {r:?} too large for this platform"),
            source: None,
        }),
    }
}

impl Backend for S3Backend {
    fn put<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.store
                .put(&self.path(key), data.into())
                .await
                .map(|_| ())
                .map_err(|e| self.err("put", key, e))
        })
    }

    fn get<'a>(
        &'a self,
        key: &'a str,
        range: Option<Range<u64>>,
    ) -> BoxFuture<'a, Result<Bytes, StoreError>> {
        Box::pin(async move {
            let path = self.path(key);
            match range {
                None => {
                    let r = self
                        .store
                        .get(&path)
                        .await
                        .map_err(|e| self.err("get", key, e))?;
                    r.bytes().await.map_err(|e| self.err("get", key, e))
                }
                Some(range) => {
                    let want = range.end - range.start;
                    let r = to_usize(&self.url, key, range)?;
                    let b = self
                        .store
                        .get_range(&path, r)
                        .await
                        .map_err(|e| self.err("get range", key, e))?;
                    if b.len() as u64 != want {
                        return Err(StoreError::Other {
                            url: self.url.clone(),
                            op: "get range",
                            key: key.to_string(),
                            detail: format!(
                                "range outside the object: got {} of {want} bytes",
                                b.len()
                            ),
                            source: None,
                        });
                    }
                    Ok(b)
                }
            }
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<ObjectMeta>, StoreError>> {
        Box::pin(async move {
            // object_store lists whole path segments: list the directory part
            // of the prefix; Store::list filters the rest.
            let dir = prefix.rfind('/').map_or("", |i| &prefix[..i]);
            let dir_path = match (self.prefix.is_empty(), dir.is_empty()) {
                (true, true) => None,
                (false, true) => Some(OsPath::from_iter(self.prefix.split('/'))),
                (_, false) => Some(self.path(dir)),
            };
            let metas: Vec<object_store::ObjectMeta> = self
                .store
                .list(dir_path.as_ref())
                .try_collect()
                .await
                .map_err(|e| self.err("list", prefix, e))?;
            Ok(metas
                .into_iter()
                .filter_map(|m| {
                    Some(ObjectMeta {
                        key: self.key_of(&m.location)?,
                        size: m.size as u64,
                    })
                })
                .collect())
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            match self.store.delete(&self.path(key)).await {
                Ok(()) => Ok(()),
                Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(self.err("delete", key, e)),
            }
        })
    }

    fn free_space(&self) -> Option<u64> {
        None
    }

    fn check(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let p = (!self.prefix.is_empty()).then(|| OsPath::from_iter(self.prefix.split('/')));
            self.store
                .list_with_delimiter(p.as_ref())
                .await
                .map(|_| ())
                .map_err(|e| self.err("check", &format!("(LIST of prefix {:?})", self.prefix), e))
        })
    }
}

// ---------------------------------------------------------------------------
// file:// backend.

#[derive(Debug)]
struct FileBackend {
    url: String,
    root: PathBuf,
}

impl FileBackend {
    fn open(url: &str, parsed: &url::Url) -> Result<FileBackend, StoreError> {
        let config = |message: String| StoreError::Config {
            url: url.to_string(),
            message,
        };
        if parsed.query().is_some() {
            let keys: Vec<String> = parsed.query_pairs().map(|(k, _)| k.into_owned()).collect();
            return Err(config(format!(
                "unknown query key(s) {keys:?}: a file:// URL takes none"
            )));
        }
        if parsed.fragment().is_some() {
            return Err(config("unexpected '#' fragment".into()));
        }
        match parsed.host_str() {
            None | Some("") | Some("localhost") => {}
            Some(h) => {
                return Err(config(format!(
                    "file:// URLs take an absolute path (file:///path), not a host ({h:?})"
                )))
            }
        }
        let root = parsed
            .to_file_path()
            .map_err(|()| config("not an absolute local path: use file:///path".into()))?;
        if let Some(e) = missing_root(url, &root) {
            return Err(e);
        }
        Ok(FileBackend {
            url: url.to_string(),
            root,
        })
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn err(&self, op: &'static str, key: &str, e: std::io::Error) -> StoreError {
        classify_io(&self.url, op, key, e)
    }

    /// Run blocking file system work off the async threads.
    async fn blocking<T, F>(&self, op: &'static str, key: &str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T, StoreError> + Send + 'static,
    {
        match tokio::task::spawn_blocking(f).await {
            Ok(r) => r,
            Err(e) => Err(StoreError::Other {
                url: self.url.clone(),
                op,
                key: key.to_string(),
                detail: format!("worker thread failed: {e}"),
                source: Some(Box::new(e)),
            }),
        }
    }
}

fn classify_io(url: &str, op: &'static str, key: &str, e: std::io::Error) -> StoreError {
    let (url, key) = (url.to_string(), key.to_string());
    let errno = e.raw_os_error().unwrap_or(0);
    if e.kind() == std::io::ErrorKind::NotFound {
        return StoreError::NotFound { url, key };
    }
    // NFS: a server gone or a stale handle may come back.
    if io_kind_unreachable(e.kind())
        || matches!(errno, libc::ESTALE | libc::EHOSTDOWN | libc::ENOLINK)
    {
        return StoreError::Unreachable {
            url,
            op,
            key,
            detail: e.to_string(),
            hint: FILE_HINT,
            source: Box::new(e),
        };
    }
    StoreError::Other {
        url,
        op,
        key,
        detail: e.to_string(),
        source: Some(Box::new(e)),
    }
}

/// The error for a root that is missing or not a directory, if it is.
fn missing_root(url: &str, root: &Path) -> Option<StoreError> {
    let config = |message: String| StoreError::Config {
        url: url.to_string(),
        message,
    };
    match std::fs::metadata(root) {
        Ok(m) if m.is_dir() => None,
        Ok(_) => Some(config(format!("{} is not a directory", root.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(config(format!(
            "directory {} does not exist: create it (or mount the share) first",
            root.display()
        ))),
        Err(e) => Some(classify_io(url, "open", "root", e)),
    }
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// A repository directory is written by two users: the VM's shipper runs
/// as QEMU's user, cdp-agent and cdpctl as root. A directory root creates
/// is handed to the owner of the repository's root directory, so the QEMU
/// user can always add objects beside root's.
fn give_to_root_owner(root: &Path, dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    let owner = std::fs::metadata(root)?;
    if owner.uid() == 0 && owner.gid() == 0 {
        return Ok(());
    }
    std::os::unix::fs::chown(dir, Some(owner.uid()), Some(owner.gid()))
}

/// Create `dir` and its missing ancestors below `root`, fsyncing each parent
/// whose entries changed, so the new directories survive a crash.
fn create_dirs_durably(root: &Path, dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut cur = dir;
    while !cur.is_dir() {
        // Never create the root itself: a missing root is a configuration
        // error (or an unmounted share), not something to paper over.
        if cur == root || !cur.starts_with(root) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{} does not exist", root.display()),
            ));
        }
        missing.push(cur.to_path_buf());
        match cur.parent() {
            Some(p) => cur = p,
            None => break,
        }
    }
    for d in missing.iter().rev() {
        match std::fs::create_dir(d) {
            Ok(()) => {
                give_to_root_owner(root, d)?;
                if let Some(p) = d.parent() {
                    fsync_dir(p)?;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && d.is_dir() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Remove what interrupted puts left in the staging directory. Only files
/// older than [`STAGING_MAX_AGE`]: another process may be writing right now.
fn remove_stale_staging(staging: &Path) {
    let Ok(rd) = std::fs::read_dir(staging) else {
        return;
    };
    for entry in rd.flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STAGING_MAX_AGE);
        if old {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn staging_name() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn file_put(root: &Path, dest: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let staging = root.join(STAGING_DIR);
    create_dirs_durably(root, &staging)?;
    let tmp = staging.join(staging_name());
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        let parent = dest.parent().unwrap_or(root);
        create_dirs_durably(root, parent)?;
        std::fs::rename(&tmp, dest)?;
        fsync_dir(parent)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn file_get(path: &Path, range: Option<Range<u64>>) -> std::io::Result<Result<Bytes, String>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let meta = f.metadata()?;
    if meta.is_dir() {
        return Err(std::io::Error::from(std::io::ErrorKind::NotFound));
    }
    let size = meta.len();
    let range = range.unwrap_or(0..size);
    if range.end > size {
        return Ok(Err(format!(
            "range outside the object: {}..{} of a {size}-byte object",
            range.start, range.end
        )));
    }
    let len = usize::try_from(range.end - range.start)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "range too large"))?;
    f.seek(SeekFrom::Start(range.start))?;
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf)?;
    Ok(Ok(Bytes::from(buf)))
}

fn file_list(root: &Path, dir: &str, out: &mut Vec<ObjectMeta>) -> std::io::Result<()> {
    let base = if dir.is_empty() {
        root.to_path_buf()
    } else {
        root.join(dir)
    };
    let rd = match std::fs::read_dir(&base) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        // A "directory" prefix that names a file lists nothing.
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in rd {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        // Hidden names are never keys: the staging directory, editor files.
        if name.starts_with('.') {
            continue;
        }
        let key = if dir.is_empty() {
            name.to_string()
        } else {
            format!("{dir}/{name}")
        };
        let ft = entry.file_type()?;
        if ft.is_dir() {
            file_list(root, &key, out)?;
        } else if ft.is_file() {
            let size = match entry.metadata() {
                Ok(m) => m.len(),
                // Deleted while listing.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            out.push(ObjectMeta { key, size });
        }
    }
    Ok(())
}

fn statvfs_free(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path and st a valid out-pointer.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

impl Backend for FileBackend {
    fn put<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let (root, dest, url, k) = (
                self.root.clone(),
                self.path(key),
                self.url.clone(),
                key.to_string(),
            );
            self.blocking("put", key, move || {
                file_put(&root, &dest, &data).map_err(|e| match missing_root(&url, &root) {
                    Some(err) => err,
                    None => classify_io(&url, "put", &k, e),
                })
            })
            .await
        })
    }

    fn get<'a>(
        &'a self,
        key: &'a str,
        range: Option<Range<u64>>,
    ) -> BoxFuture<'a, Result<Bytes, StoreError>> {
        Box::pin(async move {
            let path = self.path(key);
            let op = if range.is_some() { "get range" } else { "get" };
            let r = self
                .blocking(op, key, move || Ok(file_get(&path, range)))
                .await?
                .map_err(|e| self.err(op, key, e))?;
            r.map_err(|detail| StoreError::Other {
                url: self.url.clone(),
                op,
                key: key.to_string(),
                detail,
                source: None,
            })
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<ObjectMeta>, StoreError>> {
        Box::pin(async move {
            let dir = prefix.rfind('/').map_or("", |i| &prefix[..i]).to_string();
            let (root, url) = (self.root.clone(), self.url.clone());
            let out = self
                .blocking("list", prefix, move || {
                    // An absent root is not an empty repository.
                    if let Some(e) = missing_root(&url, &root) {
                        return Err(e);
                    }
                    let mut out = Vec::new();
                    Ok(file_list(&root, &dir, &mut out).map(|()| out))
                })
                .await?;
            out.map_err(|e| match e.kind() {
                // The listing itself is never "not found".
                std::io::ErrorKind::NotFound => StoreError::Other {
                    url: self.url.clone(),
                    op: "list",
                    key: prefix.to_string(),
                    detail: e.to_string(),
                    source: Some(Box::new(e)),
                },
                _ => self.err("list", prefix, e),
            })
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let path = self.path(key);
            let r = self
                .blocking("delete", key, move || Ok(std::fs::remove_file(&path)))
                .await?;
            match r {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(self.err("delete", key, e)),
            }
        })
    }

    fn free_space(&self) -> Option<u64> {
        statvfs_free(&self.root)
    }

    fn check(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let root = self.root.clone();
            let url = self.url.clone();
            self.blocking("check", "", move || {
                let config = |message: String| StoreError::Config {
                    url: url.clone(),
                    message,
                };
                if let Some(e) = missing_root(&url, &root) {
                    return Err(e);
                }
                // Writable? Create the staging directory and a probe file in it.
                let staging = root.join(STAGING_DIR);
                let probe = staging.join(format!("check-{}", staging_name()));
                let r = create_dirs_durably(&root, &staging)
                    .and_then(|()| std::fs::write(&probe, b"ok"));
                let _ = std::fs::remove_file(&probe);
                r.map_err(|e| {
                    config(format!("directory {} is not writable: {e}", root.display()))
                })?;
                remove_stale_staging(&staging);
                Ok(())
            })
            .await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        for ok in [
            "a",
            "cdp/v1/FORMAT",
            "cdp/v1/vms/u-1/vda/journal/0001-0002.seg.zst",
            "a:b/c=d,e@f+g",
        ] {
            assert_eq!(check_key(ok, false), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "/a",
            "a/",
            "a//b",
            "a/../b",
            "..",
            "./a",
            "a/.hidden",
            "a b",
            "a\\b",
            "a~b",
            "é",
        ] {
            assert!(check_key(bad, false).is_err(), "{bad:?} accepted");
        }
        for ok in ["", "a/", "a/b/", "a/b", "a/b/c"] {
            assert_eq!(check_key(ok, true), Ok(()), "{ok}");
        }
        for bad in ["/", "a//", "../", "a/../"] {
            assert!(check_key(bad, true).is_err(), "{bad:?} accepted");
        }
        assert!(check_key(&"a".repeat(1025), false).is_err());
    }

    #[test]
    fn credentials_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("creds");
        std::fs::write(
            &p,
            "# comment\n[other]\naws_access_key_id = X\n\n[default]\naws_access_key_id = AK\naws_secret_access_key=SK\n",
        )
        .unwrap();
        let c = read_credentials_file(&p).unwrap();
        assert_eq!(
            (c.key_id.as_str(), c.secret.as_str(), c.token),
            ("AK", "SK", None)
        );
        std::fs::write(&p, "[default]\naws_access_key_id = AK\n").unwrap();
        let e = read_credentials_file(&p).err().unwrap();
        assert!(e.contains("aws_secret_access_key"), "{e}");
        std::fs::write(&p, "garbage line\n").unwrap();
        assert!(read_credentials_file(&p).is_err());
        assert!(read_credentials_file(&d.path().join("missing")).is_err());
    }

    #[test]
    fn http_status() {
        assert_eq!(
            http_status_in("Client error with status 403 Forbidden: x"),
            Some(403)
        );
        assert_eq!(http_status_in("with status 4"), None);
        assert_eq!(http_status_in("nothing"), None);
    }

    #[test]
    fn s3_codes() {
        let t = "Client error with status 403 Forbidden: <?xml version=\"1.0\"?><Error><Code>InvalidAccessKeyId</Code><Message>The AWS Access Key Id you provided does not exist in our records.</Message></Error>";
        assert_eq!(
            s3_error_code(t).unwrap(),
            "InvalidAccessKeyId: The AWS Access Key Id you provided does not exist in our records."
        );
        assert_eq!(s3_error_code("nothing"), None);
    }

    #[test]
    fn jitter_in_bounds() {
        for _ in 0..1000 {
            let j = jitter();
            assert!((0.8..1.2).contains(&j), "{j}");
        }
    }

    /// Root writing into a repository QEMU's user owns (cdp-agent beside the
    /// VM's shipper) hands every directory it creates to that user.
    #[tokio::test]
    async fn directories_root_creates_go_to_the_repository_owner() {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "this test needs root (chown)"
        );
        let d = tempfile::tempdir().unwrap();
        let owner = (65534, 65534);
        std::os::unix::fs::chown(d.path(), Some(owner.0), Some(owner.1)).unwrap();
        let store = Store::open(&format!("file://{}", d.path().display()), None).unwrap();
        store
            .put("cdp/v1/vms/u/vda/journal/x.idx", Bytes::from_static(b"x"))
            .await
            .unwrap();
        for dir in ["cdp", "cdp/v1/vms/u/vda/journal", STAGING_DIR] {
            let m = std::fs::metadata(d.path().join(dir)).unwrap();
            assert_eq!((m.uid(), m.gid()), owner, "{dir}");
        }
    }

    #[tokio::test]
    async fn retry_stops_on_permanent_and_retries_transient() {
        let policy = RetryPolicy {
            initial_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(4),
            max_attempts: 5,
            deadline: Duration::from_secs(5),
            on_retry: None,
        };
        let unreachable = || StoreError::Unreachable {
            url: "u".into(),
            op: "get",
            key: "k".into(),
            detail: "refused".into(),
            hint: S3_HINT,
            source: "refused".into(),
        };
        // Transient, then success.
        let mut n = 0;
        let r = with_retry("x", &policy, || {
            n += 1;
            let fail = n < 3;
            async move {
                if fail {
                    Err(unreachable())
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(r.unwrap(), 3);
        // Permanent: one attempt.
        let mut n = 0;
        let r: Result<(), _> = with_retry("x", &policy, || {
            n += 1;
            async {
                Err(StoreError::NotFound {
                    url: "u".into(),
                    key: "k".into(),
                })
            }
        })
        .await;
        assert!(matches!(r, Err(StoreError::NotFound { .. })));
        assert_eq!(n, 1);
        // Transient forever: bounded attempts, the last error returned.
        let mut n = 0;
        let r: Result<(), _> = with_retry("x", &policy, || {
            n += 1;
            async { Err(unreachable()) }
        })
        .await;
        assert!(matches!(r, Err(StoreError::Unreachable { .. })));
        assert_eq!(n, 5);
    }
}
