//! The S3-compatible backend, through object_store's `AmazonS3`
//! (`s3://bucket/prefix?endpoint=…&region=…`). One attempt per call:
//! object_store's own retries are off, retry lives in [`super::retry`].

use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder, S3ConditionalPut};
use object_store::path::Path as OsPath;
use object_store::{ClientOptions, ObjectStore, RetryConfig};

use super::credentials;
use super::{check_key, io_kind_unreachable, Backend, ObjectMeta, PutMode, StoreError};

/// Connection set-up timeout of the S3 client.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Whole-request timeout of the S3 client (a large PUT over a slow link must fit).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// What to look at when an S3 target cannot be reached.
pub(super) const HINT: &str = "is the S3 endpoint up and its address right?";
/// Query keys an `s3://` URL may carry.
const QUERY_KEYS: &[&str] = &["endpoint", "region", "conditional_put"];
/// `conditional_put=check-first`: for a server that ignores `If-None-Match`
/// (Garage): read each key before a create-only put (docs/CREDENTIALS.md,
/// "Servers without conditional writes").
const CHECK_FIRST: &str = "check-first";
/// The object the conditional-write probe writes, under the URL's prefix: a
/// hidden name, never a repository object (listings skip hidden names).
const PROBE_KEY: &str = ".cdp-probe/conditional-put";

/// What a create-only PUT found.
enum Created {
    Yes,
    /// The key exists (412, or 409 for a concurrent conditional write).
    Exists(Box<dyn std::error::Error + Send + Sync + 'static>),
}

pub(super) struct S3Backend {
    url: String,
    store: AmazonS3,
    bucket: String,
    /// The URL's prefix without slashes at either end ("" for none).
    prefix: String,
    endpoint: String,
    /// `conditional_put=check-first`: read the key before each create-only put.
    check_first: bool,
    /// Whether the server enforces `If-None-Match: *` (probed once, at the
    /// first create-only put; not with `check_first`).
    enforces_conditional: std::sync::OnceLock<bool>,
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

impl S3Backend {
    pub(super) fn open(
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
        let mut conditional = None;
        for (k, v) in parsed.query_pairs() {
            let slot = match k.as_ref() {
                "endpoint" => &mut endpoint,
                "region" => &mut region,
                "conditional_put" => &mut conditional,
                other => {
                    return Err(config(format!(
                        "unknown query key {other:?} (known: {})",
                        QUERY_KEYS.join(", ")
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
        let check_first = match conditional.as_deref() {
            None | Some("required") => false,
            Some(CHECK_FIRST) => true,
            Some(other) => {
                return Err(config(format!(
                    "conditional_put={other:?}: the values are \"required\" (the default) and \"{CHECK_FIRST}\""
                )))
            }
        };
        let region = region.unwrap_or_else(|| "us-east-1".to_string());
        let creds = match credentials_file {
            Some(p) => credentials::read_file(p).map_err(config)?,
            None => credentials::from_env().map_err(config)?,
        };

        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&bucket)
            .with_region(&region)
            .with_access_key_id(creds.key_id)
            .with_secret_access_key(creds.secret)
            // Payloads are signed (x-amz-content-sha256 is the body's SHA-256,
            // object_store's default): the server checks every PUT body.
            .with_unsigned_payload(false)
            // Create-only PUTs carry `If-None-Match: *` (Store::put).
            .with_conditional_put(S3ConditionalPut::ETagMatch)
            // One attempt per call: retry lives above the backend.
            .with_retry(RetryConfig {
                max_retries: 0,
                retry_timeout: Duration::ZERO,
                ..Default::default()
            })
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(true)
                    .with_connect_timeout(CONNECT_TIMEOUT)
                    .with_timeout(REQUEST_TIMEOUT),
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
            check_first,
            enforces_conditional: std::sync::OnceLock::new(),
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
/// The HTTP status a reqwest error in `e`'s chain carries, if any (server
/// errors keep it there, not in the text).
fn reqwest_status(e: &(dyn std::error::Error + 'static)) -> Option<u16> {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(s) = c.downcast_ref::<reqwest::Error>().and_then(|r| r.status()) {
            return Some(s.as_u16());
        }
        cur = c.source();
    }
    None
}

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
            hint: HINT,
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

impl S3Backend {
    /// The body of a GET, refused as soon as the object's size (or, from a
    /// server that lies about it, the bytes received) passes `max`.
    async fn bounded_body(
        &self,
        key: &str,
        r: object_store::GetResult,
        max: u64,
    ) -> Result<Bytes, StoreError> {
        use futures::StreamExt;
        let too_large = |size: u64| StoreError::TooLarge {
            url: self.url.clone(),
            key: key.to_string(),
            size,
            max,
        };
        let size = r.meta.size as u64;
        if size > max {
            return Err(too_large(size));
        }
        let mut out = bytes::BytesMut::with_capacity(size as usize);
        let mut body = r.into_stream();
        while let Some(part) = body.next().await {
            let part = part.map_err(|e| self.err("get", key, e))?;
            if (out.len() + part.len()) as u64 > max {
                return Err(too_large((out.len() + part.len()) as u64));
            }
            out.extend_from_slice(&part);
        }
        Ok(out.freeze())
    }
}

impl S3Backend {
    /// A create-only PUT (`If-None-Match: *`). The server answers 412 (or
    /// 409 for a concurrent conditional write) when the key exists: then the
    /// object there is read and compared, equal bytes are success.
    ///
    /// A server that ignores the header would replace the object: the first
    /// create-only put of this store probes for that (two conditional PUTs of
    /// [`PROBE_KEY`]; the second must be refused) and, if so, every
    /// create-only put is refused as a configuration error, unless the URL
    /// says `conditional_put=check-first`: then each key is read first (an
    /// existing object is compared as above, never overwritten by this
    /// store; two writers racing on one key are not excluded, which the
    /// server alone could do).
    async fn put_create(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        if self.check_first {
            match self.get(key, None, data.len() as u64).await {
                Ok(there) if there == data => return Ok(()),
                Ok(_) | Err(StoreError::TooLarge { .. }) => return Err(self.exists(key)),
                Err(StoreError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        } else {
            self.require_conditional_writes().await?;
        }
        match self.conditional_put(key, data.clone()).await? {
            Created::Yes => Ok(()),
            Created::Exists(source) => {
                let max = data.len() as u64;
                match self.get(key, None, max).await {
                    Ok(there) if there == data => Ok(()),
                    Ok(_) | Err(StoreError::TooLarge { .. }) => Err(self.exists(key)),
                    // 409 of a conditional write still in flight elsewhere.
                    Err(StoreError::NotFound { .. }) => Err(StoreError::Server {
                        url: self.url.clone(),
                        op: "put",
                        key: key.to_string(),
                        detail: "a concurrent write of the same key is in progress".into(),
                        source,
                    }),
                    Err(e) => Err(e),
                }
            }
        }
    }

    fn exists(&self, key: &str) -> StoreError {
        StoreError::Exists {
            url: self.url.clone(),
            key: key.to_string(),
        }
    }

    /// One PUT with `If-None-Match: *` (`key` relative to the prefix).
    async fn conditional_put(&self, key: &str, data: Bytes) -> Result<Created, StoreError> {
        let opts = object_store::PutOptions::from(object_store::PutMode::Create);
        match self
            .store
            .put_opts(&self.path(key), data.into(), opts)
            .await
        {
            Ok(_) => Ok(Created::Yes),
            Err(object_store::Error::AlreadyExists { source, .. }) => Ok(Created::Exists(source)),
            Err(e) => {
                let text = e.to_string();
                let code = s3_error_code(&text).unwrap_or_else(|| "HTTP 501".into());
                let status = http_status_in(&text).or_else(|| reqwest_status(&e));
                if status == Some(501) || code.starts_with("NotImplemented") {
                    return Err(StoreError::Config {
                        url: self.url.clone(),
                        message: format!(
                            "put {key}: the S3 server does not support conditional writes \
                             (If-None-Match: *), which shipping needs to never replace an object \
                             ({code}); see docs/CREDENTIALS.md"
                        ),
                    });
                }
                Err(self.err("put", key, e))
            }
        }
    }

    /// Whether the server refuses a second `If-None-Match: *` PUT of one key
    /// (probed once per store). A server that accepts it would replace
    /// objects: a permanent configuration error.
    async fn require_conditional_writes(&self) -> Result<(), StoreError> {
        let enforced = match self.enforces_conditional.get() {
            Some(&e) => e,
            None => {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos());
                let nonce = |i: u8| Bytes::from(format!("{} {nanos} {i}\n", std::process::id()));
                // The first creates it (or finds an earlier probe's); the
                // second must be refused either way.
                self.conditional_put(PROBE_KEY, nonce(0)).await?;
                let e = matches!(
                    self.conditional_put(PROBE_KEY, nonce(1)).await?,
                    Created::Exists(_)
                );
                *self.enforces_conditional.get_or_init(|| e)
            }
        };
        if enforced {
            return Ok(());
        }
        Err(StoreError::Config {
            url: self.url.clone(),
            message: format!(
                "the S3 server at {} ignores If-None-Match: * (a second conditional PUT of {PROBE_KEY} \
                 replaced the first): a put there could replace an object, which shipping never \
                 does. Use a server that enforces conditional writes, or add \
                 conditional_put={CHECK_FIRST} to the target URL to read each key before writing \
                 it (two writers racing on one key are then not excluded); see docs/CREDENTIALS.md",
                self.endpoint
            ),
        })
    }
}

impl Backend for S3Backend {
    fn put<'a>(
        &'a self,
        key: &'a str,
        data: Bytes,
        mode: PutMode,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            match mode {
                PutMode::Create => self.put_create(key, data).await,
                PutMode::Replace => self
                    .store
                    .put(&self.path(key), data.into())
                    .await
                    .map(|_| ())
                    .map_err(|e| self.err("put", key, e)),
            }
        })
    }

    fn get<'a>(
        &'a self,
        key: &'a str,
        range: Option<Range<u64>>,
        max: u64,
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
                    self.bounded_body(key, r, max).await
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
            // Hidden names (the conditional-write probe) are not objects,
            // as on a file:// target.
            Ok(metas
                .into_iter()
                .filter_map(|m| {
                    Some(ObjectMeta {
                        key: self.key_of(&m.location)?,
                        size: m.size as u64,
                    })
                })
                .filter(|o| !o.key.split('/').any(|c| c.starts_with('.')))
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
