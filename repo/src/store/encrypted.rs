//! The encryption layer of [`Store`] (docs/REPOSITORY_FORMAT.md,
//! "Encryption"): a repository holding `cdp/v1/keys/repo-key.json` has every
//! other object (but `FORMAT`) sealed by [`crate::crypto`]. The store finds
//! out once, on its first read or write, by reading the key object; it then
//! seals what it puts and opens what it gets, so every reader and writer
//! gets it. A repository with a key and a store without one (or the
//! reverse) is refused, naming the option.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::{PutMode, Store, StoreError};
use crate::crypto::{self, CryptoError, KeyObject, KeySource, Keys, KEY_OBJECT};
use crate::format::ChunkNamer;

/// Repository keys already unwrapped by this process, by
/// BLAKE3(key object, secret): argon2 runs once per process and key.
static UNWRAPPED: Mutex<Vec<([u8; 32], Keys)>> = Mutex::new(Vec::new());

/// What a store knows of its repository's key, once loaded.
pub(super) type KeyState = Arc<tokio::sync::OnceCell<Option<Keys>>>;

const HOW: &str = "set key_file or passphrase_file in the target's [target.NAME] section (or cdpctl --key-file / --passphrase-file, or CDP_KEY_FILE / CDP_PASSPHRASE_FILE for a repository given by URL)";

/// The key source from `CDP_KEY_FILE` or `CDP_PASSPHRASE_FILE`, if set.
pub(super) fn env_key_source() -> Option<KeySource> {
    let get = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    get("CDP_KEY_FILE")
        .map(|p| KeySource::KeyFile(p.into()))
        .or_else(|| get("CDP_PASSPHRASE_FILE").map(|p| KeySource::PassphraseFile(p.into())))
}

impl Store {
    fn crypto_config(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Config {
            url: self.url.to_string(),
            message: e.to_string(),
        }
    }

    /// Use `source` to unwrap the repository key (None: the repository
    /// must have none).
    pub fn with_key_source(mut self, source: Option<KeySource>) -> Store {
        self.key_source = source;
        self.keys = KeyState::default();
        self
    }

    /// This target with its objects as stored: nothing sealed or opened,
    /// whatever the repository holds (for tests and tools that handle the
    /// sealed bytes themselves, such as a copy between repositories).
    pub fn raw(&self) -> Store {
        let keys = KeyState::default();
        keys.set(None).expect("a new cell is empty");
        Store {
            url: self.url.clone(),
            backend: self.backend.clone(),
            key_source: None,
            keys,
        }
    }

    /// The repository's keys: None for a clear repository. Read once per
    /// store (a failure is not kept: the next call tries again).
    pub(super) async fn keys(&self) -> Result<Option<&Keys>, StoreError> {
        let state = self
            .keys
            .get_or_try_init(|| async {
                let obj = match self
                    .backend
                    .get(KEY_OBJECT, None, crypto::SECRET_FILE_MAX)
                    .await
                {
                    Ok(b) => b,
                    Err(StoreError::NotFound { .. }) => {
                        return match &self.key_source {
                            None => Ok(None),
                            Some(_) => Err(self.crypto_config(format!(
                                "a key is configured for this target but the repository has no key ({KEY_OBJECT}): \
                                 it is not encrypted, or its key object was removed; refusing to read or write it in clear \
                                 (make an encrypted repository with `cdpctl repo init URL --encrypt`, or remove key_file/passphrase_file)"
                            ))),
                        };
                    }
                    Err(e) => return Err(e),
                };
                let Some(source) = self.key_source.clone() else {
                    return Err(self.crypto_config(format!(
                        "the repository is encrypted ({KEY_OBJECT}) and no key was given: {HOW}"
                    )));
                };
                let keys = tokio::task::spawn_blocking(move || unwrap(&obj, &source))
                    .await
                    .map_err(|e| self.crypto_config(format!("unwrapping the key: {e}")))?
                    .map_err(|e| self.crypto_config(e))?;
                Ok(Some(keys))
            })
            .await?;
        Ok(state.as_ref())
    }

    /// How chunks are named in this repository: the BLAKE3 of the plain
    /// chunk, or, in an encrypted repository, its keyed BLAKE3.
    pub async fn chunk_namer(&self) -> Result<ChunkNamer, StoreError> {
        Ok(match self.keys().await? {
            None => ChunkNamer::Plain,
            Some(k) => ChunkNamer::Keyed(k.chunk_key()),
        })
    }

    /// Whether the repository is encrypted (loads its key as
    /// [`Store::chunk_namer`] does).
    pub async fn is_encrypted(&self) -> Result<bool, StoreError> {
        Ok(self.keys().await?.is_some())
    }

    /// Make this (empty) repository an encrypted one: create its key,
    /// wrapped for `source`, as the key object. Refused when the repository
    /// already holds a key or any object but the format marker.
    pub async fn init_encryption(&self, source: &KeySource) -> Result<(), StoreError> {
        let existing = self.backend.list("cdp/v1/").await?;
        if let Some(o) = existing.iter().find(|o| {
            o.key.starts_with("cdp/v1/") && !o.key.ends_with("/FORMAT") && o.key != "cdp/v1/FORMAT"
        }) {
            return Err(self.crypto_config(format!(
                "the repository already holds objects ({}{}): encryption is chosen when a repository is created; \
                 use an empty repository",
                o.key,
                if o.key == KEY_OBJECT { ": it is already encrypted" } else { "" }
            )));
        }
        let secret = source.read().map_err(|e| self.crypto_config(e))?;
        let s = source.clone();
        let (obj, _) = tokio::task::spawn_blocking(move || KeyObject::create(&s, &secret))
            .await
            .map_err(|e| self.crypto_config(format!("making the key: {e}")))?
            .map_err(|e| self.crypto_config(e))?;
        let body = serde_json::to_vec_pretty(&obj).expect("a key object serializes");
        self.backend
            .put(KEY_OBJECT, Bytes::from(body), PutMode::Create)
            .await
    }

    /// Seal `data` for `key` if the repository is encrypted.
    pub(super) async fn seal(&self, key: &str, data: Bytes) -> Result<Bytes, StoreError> {
        if crypto::is_clear_key(key) {
            return Ok(data);
        }
        Ok(match self.keys().await? {
            None => data,
            Some(k) => Bytes::from(k.seal(key, &data)),
        })
    }

    fn sealed_err(&self, key: &str, e: CryptoError) -> StoreError {
        StoreError::Sealed {
            url: self.url.to_string(),
            key: key.to_string(),
            detail: e.to_string(),
        }
    }

    /// GET the whole object, opening it if the repository is encrypted.
    pub(super) async fn get_open(&self, key: &str, max: u64) -> Result<Bytes, StoreError> {
        if crypto::is_clear_key(key) {
            return self.backend.get(key, None, max).await;
        }
        let Some(k) = self.keys().await? else {
            return self.backend.get(key, None, max).await;
        };
        let sealed = self.backend.get(key, None, crypto::sealed_len(max)).await?;
        k.open(key, &sealed)
            .map(Bytes::from)
            .map_err(|e| self.sealed_err(key, e))
    }

    /// GET plain bytes `range` of the object (inside it), opening only the
    /// blocks that hold them if the repository is encrypted.
    pub(super) async fn get_range_open(
        &self,
        key: &str,
        range: Range<u64>,
        max: u64,
    ) -> Result<Bytes, StoreError> {
        if crypto::is_clear_key(key) {
            return self.backend.get(key, Some(range), max).await;
        }
        let Some(k) = self.keys().await? else {
            return self.backend.get(key, Some(range), max).await;
        };
        let cap = crypto::sealed_len(max);
        let head = self.backend.get(key, Some(0..crypto::HEADER), cap).await?;
        let (header, plain) =
            crypto::parse_header(key, &head).map_err(|e| self.sealed_err(key, e))?;
        if range.end > plain {
            return Err(StoreError::Other {
                url: self.url.to_string(),
                op: "get range",
                key: key.to_string(),
                detail: format!("range {range:?} outside the object ({plain} bytes)"),
                source: None,
            });
        }
        let (sealed, first) = crypto::sealed_range(&range, plain);
        let body = self.backend.get(key, Some(sealed), cap).await?;
        let out = k
            .open_blocks(key, &header, plain, first, &body)
            .map_err(|e| self.sealed_err(key, e))?;
        let skip = (range.start - first * crypto::BLOCK) as usize;
        let len = (range.end - range.start) as usize;
        match out.get(skip..skip + len) {
            Some(b) => Ok(Bytes::copy_from_slice(b)),
            None => Err(self.sealed_err(
                key,
                CryptoError::Open(format!(
                    "encrypted object {key}: blocks shorter than its header says"
                )),
            )),
        }
    }

    /// Listed sizes as plain sizes, if the repository is encrypted.
    pub(super) async fn plain_sizes(
        &self,
        list: &mut [super::ObjectMeta],
    ) -> Result<(), StoreError> {
        if list.iter().all(|o| crypto::is_clear_key(&o.key)) || self.keys().await?.is_none() {
            return Ok(());
        }
        for o in list.iter_mut().filter(|o| !crypto::is_clear_key(&o.key)) {
            // A size no sealed object has: keep it (reading it fails).
            if let Some(p) = crypto::plain_len(o.size) {
                o.size = p;
            }
        }
        Ok(())
    }
}

fn unwrap(obj: &[u8], source: &KeySource) -> Result<Keys, CryptoError> {
    let secret = source.read()?;
    let mut h = blake3::Hasher::new();
    h.update(&(obj.len() as u64).to_le_bytes());
    h.update(obj);
    h.update(&secret);
    let id: [u8; 32] = h.finalize().into();
    if let Some((_, k)) = UNWRAPPED.lock().unwrap().iter().find(|(i, _)| *i == id) {
        return Ok(k.clone());
    }
    let keys = KeyObject::decode(obj)?.unwrap_keys(source, &secret)?;
    UNWRAPPED.lock().unwrap().push((id, keys.clone()));
    Ok(keys)
}
