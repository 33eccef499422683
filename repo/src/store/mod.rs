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
//! `<root>/.cdp-staging/`, fsyncs, then links it into place (and fsyncs the
//! directory); an S3 PUT is atomic by itself.
//!
//! Objects are created, never replaced ([`Store::put`]): an S3 PUT carries
//! `If-None-Match: *`, the `file://` backend links with `linkat`, which
//! never replaces. An object already there with the same bytes is success
//! (a re-upload after a crash); one with other bytes is
//! [`StoreError::Exists`] and stays as it was. Only retention, with the
//! prune credential, replaces ([`Store::replace`]) or deletes
//! (docs/CREDENTIALS.md).
//!
//! Layers, one file each: this module is the facade ([`Store`], [`StoreError`],
//! the [`Backend`] interface, key validation); [`retry`] runs a call again
//! on transient errors; `s3` and `file` are the two backends; `credentials`
//! reads S3 credentials from the environment or an AWS-style file.

use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use thiserror::Error;

mod credentials;
mod encrypted;
mod file;
pub mod retry;
mod s3;

pub use retry::{with_retry, OnRetry, RetryPolicy};

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

    /// The object is larger than any object of its kind may be (see
    /// [`crate::format::object_cap`]): it is not read. Permanent.
    #[error("{url}: object {key} is {size} bytes, more than the {max} an object of its kind may have: the repository is damaged or hostile; {}", crate::format::CORRUPT_HINT)]
    TooLarge {
        url: String,
        key: String,
        size: u64,
        max: u64,
    },

    /// A create-only put found an object with other bytes under its key: the
    /// object there is kept, never replaced. Permanent.
    #[error("{url}: {key} exists with other contents: objects are created, never replaced; the repository already holds a different object under this name (two writers, or a damaged or hostile repository)")]
    Exists { url: String, key: String },

    /// An object of an encrypted repository that does not open: changed,
    /// copied from another name, cut short, or sealed with another key.
    /// Permanent.
    #[error("{url}: {detail}")]
    Sealed {
        url: String,
        key: String,
        detail: String,
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
            | StoreError::TooLarge { url, .. }
            | StoreError::Exists { url, .. }
            | StoreError::Sealed { url, .. }
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

/// How a put treats an object already under its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PutMode {
    /// Create only: identical bytes there are success, other bytes are
    /// [`StoreError::Exists`] and the object there is kept.
    Create,
    /// Replace what is there (retention's own objects, with the prune
    /// credential).
    Replace,
}

/// The one interface a storage backend implements. Each call is one attempt:
/// backends never retry. [`Store`] validates keys before calling a backend,
/// so a backend sees only valid keys and prefixes.
pub(crate) trait Backend: Send + Sync + fmt::Debug {
    /// Store `data` under `key`, atomically: readers see the whole object or
    /// none. An existing object is kept or replaced as `mode` says.
    fn put<'a>(
        &'a self,
        key: &'a str,
        data: Bytes,
        mode: PutMode,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// The whole object, or `range` of it (which must lie inside the object).
    /// More than `max` bytes is [`StoreError::TooLarge`], found before the
    /// bytes are read.
    fn get<'a>(
        &'a self,
        key: &'a str,
        range: Option<Range<u64>>,
        max: u64,
    ) -> BoxFuture<'a, Result<Bytes, StoreError>>;
    /// The object opened for reading in place, and its size, where the
    /// backend keeps objects as local files (`file://`); None for the
    /// others. Nothing is bounded: [`Store::open_local`] checks the size.
    fn open_local<'a>(
        &'a self,
        _key: &'a str,
    ) -> Option<BoxFuture<'a, Result<(std::fs::File, u64), StoreError>>> {
        None
    }
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
    /// What unwraps the repository key, if the repository has one.
    key_source: Option<crate::crypto::KeySource>,
    /// The repository's keys, once read (docs/REPOSITORY_FORMAT.md, "Encryption").
    keys: encrypted::KeyState,
}

/// How long `check()` may take before the target counts as unreachable.
const CHECK_TIMEOUT: Duration = Duration::from_secs(15);

impl Store {
    /// Open a configured target (`[target.NAME]`: its URL and credentials
    /// file) for shipping and reading. Never reads `prune_credentials_file`.
    /// The repository key, if the repository has one, is unwrapped with the
    /// target's `key_file` or `passphrase_file` (else `CDP_KEY_FILE` /
    /// `CDP_PASSPHRASE_FILE`).
    pub fn for_target(t: &cdp_core::config::Target) -> Result<Store, StoreError> {
        let s = Store::open(&t.url, t.credentials_file.as_deref())?;
        Ok(match target_key_source(t) {
            Some(k) => s.with_key_source(Some(k)),
            None => s,
        })
    }

    /// Open a configured target for retention and prune: with its
    /// `prune_credentials_file`, which must be readable by its owner only
    /// (root or this user; refused otherwise, saying how to fix it), else
    /// with `credentials_file` (see [`shared_credential_warning`]).
    pub fn for_prune(t: &cdp_core::config::Target) -> Result<Store, StoreError> {
        match &t.prune_credentials_file {
            Some(p) => {
                credentials::check_private(p).map_err(|message| StoreError::Config {
                    url: t.url.clone(),
                    message,
                })?;
                let s = Store::open(&t.url, Some(p))?;
                Ok(match target_key_source(t) {
                    Some(k) => s.with_key_source(Some(k)),
                    None => s,
                })
            }
            None => Store::for_target(t),
        }
    }

    /// Open a target URL: `file:///abs/path` or
    /// `s3://bucket/prefix?endpoint=http://127.0.0.1:9000&region=us-east-1`.
    ///
    /// S3 credentials come from `credentials_file` if given (an AWS-style INI
    /// file; the profile is `$AWS_PROFILE` or `default`), else from
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`;
    /// never from the URL. Unknown query keys are an error. Opening does no
    /// I/O on S3 (see [`Store::check`]); a `file://` root must be an existing
    /// directory. The key of an encrypted repository comes from
    /// `CDP_KEY_FILE` or `CDP_PASSPHRASE_FILE` (see [`Store::with_key_source`]).
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
                Arc::new(file::FileBackend::open(url, &parsed)?)
            }
            "s3" => Arc::new(s3::S3Backend::open(url, &parsed, credentials_file)?),
            other => {
                return Err(config(format!(
                    "unsupported scheme {other:?}: use file:///path or s3://bucket/prefix?endpoint=…&region=…"
                )))
            }
        };
        Ok(Store {
            url: url.into(),
            backend,
            key_source: encrypted::env_key_source(),
            keys: encrypted::KeyState::default(),
        })
    }

    /// The target URL, as given to `open`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Create the object `key` holding `data`, atomically. Never replaces:
    /// an object already there with the same bytes is success (a re-upload
    /// after a crash), one with other bytes is [`StoreError::Exists`] and is
    /// left as it was. Everything shipping writes goes through here.
    pub async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        self.valid_key(key)?;
        let data = self.seal(key, data).await?;
        self.backend.put(key, data, PutMode::Create).await
    }

    /// Store `data` under `key`, atomically, replacing what is there. Only
    /// for retention (with the prune credential): shipping never replaces.
    pub async fn replace(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        self.valid_key(key)?;
        let data = self.seal(key, data).await?;
        self.backend.put(key, data, PutMode::Replace).await
    }

    /// The whole object. Never more than the bound for its kind of object
    /// ([`crate::format::object_cap`]): a larger one is
    /// [`StoreError::TooLarge`], and is not read.
    pub async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        self.valid_key(key)?;
        self.get_open(key, crate::format::object_cap(key)).await
    }

    /// The object `key` opened for reading in place, and its size, where it
    /// is a local file holding the object's plain bytes (a `file://` target;
    /// for a sealed object of an encrypted repository, never); else None:
    /// use [`Store::get`]. Opened as `get` opens it (beneath the root, never
    /// through a symbolic link, a regular file) and bounded as `get` bounds
    /// it: more than its kind's cap is [`StoreError::TooLarge`]. The caller
    /// reads at most the size and checks what it read (restore reads a
    /// chunk straight into the buffer it hashes and writes from).
    pub async fn open_local(&self, key: &str) -> Result<Option<(std::fs::File, u64)>, StoreError> {
        self.valid_key(key)?;
        if !crate::crypto::is_clear_key(key) && self.is_encrypted().await? {
            return Ok(None);
        }
        let Some(open) = self.backend.open_local(key) else {
            return Ok(None);
        };
        let (file, size) = open.await?;
        let max = crate::format::object_cap(key);
        if size > max {
            return Err(StoreError::TooLarge {
                url: self.url.to_string(),
                key: key.to_string(),
                size,
                max,
            });
        }
        Ok(Some((file, size)))
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
        let max = crate::format::object_cap(key);
        if range.end - range.start > max {
            return Err(StoreError::TooLarge {
                url: self.url.to_string(),
                key: key.to_string(),
                size: range.end - range.start,
                max,
            });
        }
        self.get_range_open(key, range, max).await
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
        self.plain_sizes(&mut out).await?;
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
                    s3::HINT
                } else {
                    file::HINT
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

/// The key source a target names (`key_file` first), else the
/// environment's.
fn target_key_source(t: &cdp_core::config::Target) -> Option<crate::crypto::KeySource> {
    use crate::crypto::KeySource;
    t.key_file
        .clone()
        .map(KeySource::KeyFile)
        .or_else(|| t.passphrase_file.clone().map(KeySource::PassphraseFile))
}

/// The one-line warning for a target whose retention and prune use the
/// shipping credential (an S3 target without `prune_credentials_file`),
/// or None. docs/CREDENTIALS.md says why it matters.
pub fn shared_credential_warning(name: &str, t: &cdp_core::config::Target) -> Option<String> {
    (t.prune_credentials_file.is_none() && t.url.starts_with("s3:")).then(|| {
        format!(
            "warning: target {name}: shipping and pruning share a credential (no prune_credentials_file): \
             a compromised VM holding it can delete backups; see docs/CREDENTIALS.md"
        )
    })
}

/// Validate a key, or (with `prefix`) a list prefix: the empty string, or
/// a key whose last component may be empty or partial.
pub(crate) fn check_key(key: &str, prefix: bool) -> Result<(), &'static str> {
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

/// An I/O error kind that means the storage cannot be reached (a network
/// connection failed, a file system server went away): retrying may help.
pub(crate) fn io_kind_unreachable(k: std::io::ErrorKind) -> bool {
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
}
