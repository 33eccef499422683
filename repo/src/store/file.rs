//! The `file://` backend: a local or NFS directory. An object appears
//! atomically: it is written into `<root>/.cdp-staging/`, fsynced, then
//! renamed into place (and the directory fsynced).

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;

use super::{io_kind_unreachable, Backend, ObjectMeta, StoreError};

/// What to look at when a `file://` target cannot be reached.
pub(super) const HINT: &str = "is the file system mounted and, for NFS, its server up?";
/// The staging directory, under the root.
pub(super) const STAGING_DIR: &str = ".cdp-staging";
/// Staging files older than this are leftovers of interrupted puts.
const STAGING_MAX_AGE: Duration = Duration::from_secs(3600);

#[derive(Debug)]
pub(super) struct FileBackend {
    url: String,
    root: PathBuf,
}

impl FileBackend {
    pub(super) fn open(url: &str, parsed: &url::Url) -> Result<FileBackend, StoreError> {
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
            hint: HINT,
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
    if !nix::unistd::geteuid().is_root() {
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
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    Some((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
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
    use crate::store::Store;

    /// Root writing into a repository QEMU's user owns (cdp-agent beside the
    /// VM's shipper) hands every directory it creates to that user.
    #[tokio::test]
    async fn directories_root_creates_go_to_the_repository_owner() {
        use std::os::unix::fs::MetadataExt;
        assert!(
            nix::unistd::geteuid().is_root(),
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
}
