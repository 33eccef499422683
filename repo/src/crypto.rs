//! Repository encryption (docs/REPOSITORY_FORMAT.md, "Encryption"): the
//! repository key, its wrapped form (the key object), and the sealing of
//! objects. Pure: no I/O but reading a key or passphrase file.
//!
//! The repository key (32 random bytes) is sealed with XChaCha20-Poly1305
//! under a key-encryption key derived from a passphrase (argon2id) or a key
//! file (BLAKE3 `derive_key`). From the repository key, BLAKE3 `derive_key`
//! gives three subkeys: the objects' AEAD key, the key that derives each
//! object's nonce, and the key of chunk names (BLAKE3 keyed mode).
//!
//! A sealed object is a 32-byte header (magic `CDPENC01`, a 16-byte nonce
//! prefix, the plain length u64 LE) and the plain bytes in blocks of
//! [`BLOCK`] bytes (at least one block, which may be empty), each sealed
//! with XChaCha20-Poly1305: nonce = prefix || block number u64 LE,
//! associated data = header || the object's key. So every block is bound to
//! its header, its place and its object's name: a bit flipped anywhere, a
//! block moved, a truncated object or an object copied under another name
//! fails to open. The prefix is a keyed hash of the name and the plain
//! bytes, so sealing is deterministic: the same object uploaded again is the
//! same bytes (create-only puts compare bytes), and two different objects
//! never share a nonce.

use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The key object: the repository key, wrapped. Stored in clear (it holds
/// no secret but the sealed key), created once, never encrypted itself.
pub const KEY_OBJECT: &str = "cdp/v1/keys/repo-key.json";

/// Plain bytes per sealed block.
pub const BLOCK: u64 = 64 * 1024;
/// The header of a sealed object.
pub const HEADER: u64 = 32;
/// The AEAD tag of each block.
pub const TAG: u64 = 16;
const MAGIC: &[u8; 8] = b"CDPENC01";

/// The largest key object, key file or passphrase file read.
pub const SECRET_FILE_MAX: u64 = 64 * 1024;

/// argon2id parameters a new key object gets (64 MiB, 3 passes).
pub const ARGON2_M_KIB: u32 = 64 * 1024;
pub const ARGON2_T: u32 = 3;
pub const ARGON2_P: u32 = 1;
/// The most a key object may ask of argon2 (it is untrusted input).
const ARGON2_MAX_M_KIB: u32 = 1024 * 1024;
const ARGON2_MAX_T: u32 = 32;
const ARGON2_MAX_P: u32 = 16;

/// Whether `key` is stored in clear in an encrypted repository: the format
/// marker, the key object, and anything outside `cdp/v1/` (not a repository
/// object).
pub fn is_clear_key(key: &str) -> bool {
    key == KEY_OBJECT || key == "cdp/v1/FORMAT" || !key.starts_with("cdp/v1/")
}

/// What went wrong with keys or sealed bytes.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CryptoError {
    /// A key or passphrase file that cannot be used (unreadable, wrong
    /// mode or owner, too short); the message says how to fix it.
    #[error("{0}")]
    SecretFile(String),
    /// The key object does not decode or asks for what is refused.
    #[error("the repository key object {KEY_OBJECT} is not valid: {0}")]
    KeyObject(String),
    /// The key object opened with another kind of secret than configured.
    #[error(
        "the repository key is wrapped with a {wrapped}, and a {given} was given: use {option}"
    )]
    WrongKind {
        wrapped: &'static str,
        given: &'static str,
        option: &'static str,
    },
    /// The secret does not unwrap the repository key.
    #[error(
        "the {given} does not unwrap the repository key (a wrong {given}, or a changed key object)"
    )]
    WrongKey { given: &'static str },
    /// A sealed object that does not open.
    #[error("{0}")]
    Open(String),
}

/// Where the secret that unwraps the repository key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A file of at least 32 bytes (random), read whole.
    KeyFile(PathBuf),
    /// A file whose content (less one trailing newline) is the passphrase.
    PassphraseFile(PathBuf),
}

impl KeySource {
    fn what(&self) -> &'static str {
        match self {
            KeySource::KeyFile(_) => "key file",
            KeySource::PassphraseFile(_) => "passphrase",
        }
    }

    /// Read the secret, refusing a file others may read (see
    /// [`read_secret_file`]).
    pub fn read(&self) -> Result<Vec<u8>, CryptoError> {
        match self {
            KeySource::KeyFile(p) => {
                let b = read_secret_file(p, "key file").map_err(CryptoError::SecretFile)?;
                if b.len() < 32 {
                    return Err(CryptoError::SecretFile(format!(
                        "the key file {} holds {} bytes: a key file holds at least 32 random bytes (head -c 32 /dev/urandom > {})",
                        p.display(),
                        b.len(),
                        p.display()
                    )));
                }
                Ok(b)
            }
            KeySource::PassphraseFile(p) => {
                let mut b =
                    read_secret_file(p, "passphrase file").map_err(CryptoError::SecretFile)?;
                if b.last() == Some(&b'\n') {
                    b.pop();
                    if b.last() == Some(&b'\r') {
                        b.pop();
                    }
                }
                if b.len() < 8 {
                    return Err(CryptoError::SecretFile(format!(
                        "the passphrase in {} is shorter than 8 bytes",
                        p.display()
                    )));
                }
                Ok(b)
            }
        }
    }
}

/// Read a key or passphrase file: a regular file (not a symbolic link),
/// owned by root or by this process's user, that others cannot read or
/// write; group read is accepted only on a root-owned file (`chown
/// root:libvirt-qemu; chmod 640`, for a shipper running as QEMU's user).
/// Refused otherwise, with the `chmod` to run in the message.
pub fn read_secret_file(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| format!("cannot read the {what} {}: {e}", path.display()))?;
    let m = f
        .metadata()
        .map_err(|e| format!("cannot read the {what} {}: {e}", path.display()))?;
    if !m.file_type().is_file() {
        return Err(format!(
            "the {what} {} is not a regular file",
            path.display()
        ));
    }
    let me = nix::unistd::geteuid().as_raw();
    if m.uid() != 0 && m.uid() != me {
        return Err(format!(
            "the {what} {} is owned by uid {}, not by root or by this user (uid {me}): fix it with: chown root {}",
            path.display(),
            m.uid(),
            path.display()
        ));
    }
    let mode = m.mode() & 0o7777;
    let allowed = if m.uid() == 0 { 0o640 } else { 0o600 } | 0o7000;
    if mode & !allowed & 0o077 != 0 {
        let fix = if m.uid() == 0 {
            "chmod 640"
        } else {
            "chmod 600"
        };
        return Err(format!(
            "the {what} {} is mode {mode:04o}: others may read or change it, and it unlocks the repository; fix it with: {fix} {}",
            path.display(),
            path.display()
        ));
    }
    let mut out = Vec::new();
    f.take(SECRET_FILE_MAX + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("cannot read the {what} {}: {e}", path.display()))?;
    if out.len() as u64 > SECRET_FILE_MAX {
        return Err(format!(
            "the {what} {} is larger than {SECRET_FILE_MAX} bytes",
            path.display()
        ));
    }
    Ok(out)
}

/// How the key-encryption key is derived.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Kdf {
    /// argon2id (version 0x13) of the passphrase with `salt`.
    Argon2id {
        m_cost_kib: u32,
        t_cost: u32,
        p_cost: u32,
        salt: String,
    },
    /// BLAKE3 `derive_key("cdp v1 key-file kek", salt || key file)`.
    KeyFile { salt: String },
}

/// The key object (`cdp/v1/keys/repo-key.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KeyObject {
    /// "cdp-repo-key".
    pub format: String,
    /// 1.
    pub version: u32,
    pub kdf: Kdf,
    /// "xchacha20poly1305".
    pub aead: String,
    /// The 24-byte nonce of the sealed key, hex.
    pub nonce: String,
    /// The repository key sealed under the key-encryption key (associated
    /// data: the key object's name), hex.
    pub sealed_key: String,
}

/// The repository's keys, derived from its key.
#[derive(Clone)]
pub struct Keys {
    aead: XChaCha20Poly1305,
    nonce_key: [u8; 32],
    chunk_key: [u8; 32],
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).expect("the system's random number generator failed");
    b
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex<const N: usize>(s: &str, what: &str) -> Result<[u8; N], CryptoError> {
    let bad = || CryptoError::KeyObject(format!("{what} is not {N} bytes of hex"));
    if s.len() != 2 * N {
        return Err(bad());
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16).map_err(|_| bad())?;
    }
    Ok(out)
}

fn kek(kdf: &Kdf, secret: &[u8]) -> Result<[u8; 32], CryptoError> {
    match kdf {
        Kdf::Argon2id {
            m_cost_kib,
            t_cost,
            p_cost,
            salt,
        } => {
            let salt: [u8; 16] = unhex(salt, "the salt")?;
            if *m_cost_kib > ARGON2_MAX_M_KIB || *t_cost > ARGON2_MAX_T || *p_cost > ARGON2_MAX_P {
                return Err(CryptoError::KeyObject(format!(
                    "argon2 parameters m={m_cost_kib} KiB t={t_cost} p={p_cost} exceed the accepted {ARGON2_MAX_M_KIB} KiB, {ARGON2_MAX_T}, {ARGON2_MAX_P}"
                )));
            }
            let params = argon2::Params::new(*m_cost_kib, *t_cost, *p_cost, Some(32))
                .map_err(|e| CryptoError::KeyObject(format!("argon2 parameters: {e}")))?;
            let a =
                argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
            let mut out = [0u8; 32];
            a.hash_password_into(secret, &salt, &mut out)
                .map_err(|e| CryptoError::KeyObject(format!("argon2: {e}")))?;
            Ok(out)
        }
        Kdf::KeyFile { salt } => {
            let salt: [u8; 16] = unhex(salt, "the salt")?;
            let mut material = salt.to_vec();
            material.extend_from_slice(secret);
            Ok(blake3::derive_key("cdp v1 key-file kek", &material))
        }
    }
}

impl KeyObject {
    /// A new repository key, wrapped for `source` with the secret `secret`
    /// (what `source.read()` gave). Returns the key object and the keys.
    pub fn create(source: &KeySource, secret: &[u8]) -> Result<(KeyObject, Keys), CryptoError> {
        let repo_key: [u8; 32] = random();
        let salt = hex(&random::<16>());
        let kdf = match source {
            KeySource::KeyFile(_) => Kdf::KeyFile { salt },
            KeySource::PassphraseFile(_) => Kdf::Argon2id {
                m_cost_kib: ARGON2_M_KIB,
                t_cost: ARGON2_T,
                p_cost: ARGON2_P,
                salt,
            },
        };
        let kek = kek(&kdf, secret)?;
        let nonce: [u8; 24] = random();
        let sealed = XChaCha20Poly1305::new(&kek.into())
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &repo_key,
                    aad: KEY_OBJECT.as_bytes(),
                },
            )
            .map_err(|_| CryptoError::KeyObject("sealing the key failed".into()))?;
        let obj = KeyObject {
            format: "cdp-repo-key".into(),
            version: 1,
            kdf,
            aead: "xchacha20poly1305".into(),
            nonce: hex(&nonce),
            sealed_key: hex(&sealed),
        };
        Ok((obj, Keys::from_repo_key(&repo_key)))
    }

    /// Decode a key object's bytes.
    pub fn decode(bytes: &[u8]) -> Result<KeyObject, CryptoError> {
        let o: KeyObject =
            serde_json::from_slice(bytes).map_err(|e| CryptoError::KeyObject(e.to_string()))?;
        if o.format != "cdp-repo-key" || o.version != 1 || o.aead != "xchacha20poly1305" {
            return Err(CryptoError::KeyObject(format!(
                "format {:?} version {} aead {:?}: this cdpd reads cdp-repo-key 1 with xchacha20poly1305",
                o.format, o.version, o.aead
            )));
        }
        Ok(o)
    }

    /// Unwrap the repository key with the secret from `source`.
    pub fn unwrap_keys(&self, source: &KeySource, secret: &[u8]) -> Result<Keys, CryptoError> {
        let wrapped = match self.kdf {
            Kdf::Argon2id { .. } => "passphrase",
            Kdf::KeyFile { .. } => "key file",
        };
        if wrapped != source.what() {
            return Err(CryptoError::WrongKind {
                wrapped,
                given: source.what(),
                option: if wrapped == "passphrase" {
                    "passphrase_file (--passphrase-file)"
                } else {
                    "key_file (--key-file)"
                },
            });
        }
        let kek = kek(&self.kdf, secret)?;
        let nonce: [u8; 24] = unhex(&self.nonce, "the nonce")?;
        let sealed: [u8; 48] = unhex(&self.sealed_key, "the sealed key")?;
        let key = XChaCha20Poly1305::new(&kek.into())
            .decrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &sealed,
                    aad: KEY_OBJECT.as_bytes(),
                },
            )
            .map_err(|_| CryptoError::WrongKey {
                given: source.what(),
            })?;
        let key: [u8; 32] = key.try_into().map_err(|_| CryptoError::WrongKey {
            given: source.what(),
        })?;
        Ok(Keys::from_repo_key(&key))
    }
}

/// Blocks of a sealed object of `plain` bytes (at least one).
fn blocks(plain: u64) -> u64 {
    plain.div_ceil(BLOCK).max(1)
}

/// The size of a sealed object of `plain` bytes.
pub fn sealed_len(plain: u64) -> u64 {
    HEADER + plain + TAG * blocks(plain)
}

/// The plain size of a sealed object of `sealed` bytes, if that is the
/// size of a sealed object.
pub fn plain_len(sealed: u64) -> Option<u64> {
    let body = sealed.checked_sub(HEADER)?;
    let full = body / (BLOCK + TAG);
    let rem = body % (BLOCK + TAG);
    let plain = match (full, rem) {
        (0, r) if r >= TAG => r - TAG,
        (f, 0) if f > 0 => f * BLOCK,
        (f, r) if r > TAG => f * BLOCK + r - TAG,
        _ => return None,
    };
    (sealed_len(plain) == sealed).then_some(plain)
}

impl Keys {
    fn from_repo_key(k: &[u8; 32]) -> Keys {
        let aead_key = blake3::derive_key("cdp v1 object encryption", k);
        Keys {
            aead: XChaCha20Poly1305::new(&aead_key.into()),
            nonce_key: blake3::derive_key("cdp v1 object nonce", k),
            chunk_key: blake3::derive_key("cdp v1 chunk name", k),
        }
    }

    /// The key of chunk names (BLAKE3 keyed mode).
    pub fn chunk_key(&self) -> [u8; 32] {
        self.chunk_key
    }

    fn nonce(prefix: &[u8; 16], block: u64) -> XNonce {
        let mut n = [0u8; 24];
        n[..16].copy_from_slice(prefix);
        n[16..].copy_from_slice(&block.to_le_bytes());
        n.into()
    }

    /// Seal `plain` as the object `name`.
    pub fn seal(&self, name: &str, plain: &[u8]) -> Vec<u8> {
        let mut h = blake3::Hasher::new_keyed(&self.nonce_key);
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(plain);
        let mut prefix = [0u8; 16];
        prefix.copy_from_slice(&h.finalize().as_bytes()[..16]);
        let mut out = Vec::with_capacity(sealed_len(plain.len() as u64) as usize);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&prefix);
        out.extend_from_slice(&(plain.len() as u64).to_le_bytes());
        let mut aad = out.clone();
        aad.extend_from_slice(name.as_bytes());
        let n = blocks(plain.len() as u64);
        for i in 0..n {
            let a = (i * BLOCK) as usize;
            let b = (a + BLOCK as usize).min(plain.len());
            let ct = self
                .aead
                .encrypt(
                    &Keys::nonce(&prefix, i),
                    Payload {
                        msg: &plain[a..b],
                        aad: &aad,
                    },
                )
                .expect("XChaCha20-Poly1305 sealing of a bounded block cannot fail");
            out.extend_from_slice(&ct);
        }
        out
    }

    /// Open the whole sealed object `name`.
    pub fn open(&self, name: &str, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let (header, plain) = parse_header(name, sealed)?;
        if sealed_len(plain) != sealed.len() as u64 {
            return Err(damaged(
                name,
                "its size does not match its header (cut short or extended)",
            ));
        }
        self.open_blocks(name, &header, plain, 0, &sealed[HEADER as usize..])
    }

    /// Open blocks `first..` of object `name` (header bytes `header`, plain
    /// length `plain`), given their sealed bytes `body` (whole blocks).
    pub fn open_blocks(
        &self,
        name: &str,
        header: &[u8; 32],
        plain: u64,
        first: u64,
        body: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let mut prefix = [0u8; 16];
        prefix.copy_from_slice(&header[8..24]);
        let mut aad = header.to_vec();
        aad.extend_from_slice(name.as_bytes());
        let mut out = Vec::with_capacity(body.len());
        let mut at = 0usize;
        let mut i = first;
        while at < body.len() {
            if i >= blocks(plain) {
                return Err(damaged(name, "more blocks than its header says"));
            }
            let len = (plain - (i * BLOCK).min(plain)).min(BLOCK) + TAG;
            let end = at.checked_add(len as usize).filter(|e| *e <= body.len());
            let Some(end) = end else {
                return Err(damaged(name, "a block is cut short"));
            };
            let pt = self
                .aead
                .decrypt(&Keys::nonce(&prefix, i), Payload { msg: &body[at..end], aad: &aad })
                .map_err(|_| {
                    damaged(
                        name,
                        "it fails authentication: its bytes were changed, or it is another object copied under this name, or it was sealed with another key",
                    )
                })?;
            out.extend_from_slice(&pt);
            at = end;
            i += 1;
        }
        Ok(out)
    }
}

fn damaged(name: &str, why: &str) -> CryptoError {
    CryptoError::Open(format!(
        "encrypted object {name}: {why}; the repository is damaged or hostile; {}",
        crate::format::CORRUPT_HINT
    ))
}

/// The header of sealed object `name` and the plain length it declares.
pub fn parse_header(name: &str, sealed: &[u8]) -> Result<([u8; 32], u64), CryptoError> {
    let Some(h) = sealed.get(..HEADER as usize) else {
        return Err(damaged(
            name,
            "shorter than the header of an encrypted object",
        ));
    };
    if &h[..8] != MAGIC {
        return Err(damaged(
            name,
            "not an encrypted object (no CDPENC01 header)",
        ));
    }
    let mut header = [0u8; 32];
    header.copy_from_slice(h);
    let plain = u64::from_le_bytes(header[24..32].try_into().expect("8 bytes"));
    Ok((header, plain))
}

/// Sealed byte range holding plain range `range` of an object of `plain`
/// bytes, and the block number it starts at.
pub fn sealed_range(range: &std::ops::Range<u64>, plain: u64) -> (std::ops::Range<u64>, u64) {
    let first = range.start / BLOCK;
    let last = range.end.saturating_sub(1) / BLOCK;
    let at = |b: u64| HEADER + b * (BLOCK + TAG);
    let end = (at(last + 1)).min(sealed_len(plain));
    (at(first)..end, first)
}
