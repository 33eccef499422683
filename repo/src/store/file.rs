//! The `file://` backend: a local or NFS directory. An object appears
//! atomically: it is written into `<root>/.cdp-staging/`, fsynced, then
//! linked into place with `linkat` (or `renameat2(RENAME_NOREPLACE)`), which
//! never replaces an object (and the directory fsynced). Only
//! [`super::Store::replace`] renames over an object. Directories it creates
//! take the root's permission bits plus the sticky bit.
//!
//! The repository is written by two users (the VM's shipper as QEMU's user,
//! cdp-agent and cdpctl as root), so nothing below the root is trusted to be
//! what its name says: every directory and object is opened relative to a
//! directory fd with `O_NOFOLLOW` (`openat`, `renameat`, `unlinkat`,
//! `mkdirat`), a symbolic link anywhere below the root is refused (never
//! followed), and ownership is handed over with `fchown` on an open fd
//! (docs/DESIGN.md, "Repository"; issue 11, items 2 and 3).

use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::unistd::UnlinkatFlags;

use super::{io_kind_unreachable, Backend, ObjectMeta, PutMode, StoreError};

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

    fn err(&self, op: &'static str, key: &str, e: io::Error) -> StoreError {
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

fn classify_io(url: &str, op: &'static str, key: &str, e: io::Error) -> StoreError {
    let (url, key) = (url.to_string(), key.to_string());
    let errno = e.raw_os_error().unwrap_or(0);
    if e.kind() == io::ErrorKind::NotFound {
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
        Err(e) if e.kind() == io::ErrorKind::NotFound => Some(config(format!(
            "directory {} does not exist: create it (or mount the share) first",
            root.display()
        ))),
        Err(e) => Some(classify_io(url, "open", "root", e)),
    }
}

fn nix_io(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// `openat(dir, name, flags | O_CLOEXEC)`, as an owned fd.
fn open_at(dir: &OwnedFd, name: &str, flags: OFlag, mode: Mode) -> io::Result<OwnedFd> {
    let fd = nix::fcntl::openat(Some(dir.as_raw_fd()), name, flags | OFlag::O_CLOEXEC, mode)
        .map_err(nix_io)?;
    // SAFETY: openat just returned this fd: it is open and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The error for a name below the root that is a symbolic link (or not
/// what it must be): refused, never followed, left alone.
fn refused(root: &Path, rel: &str, what: &str) -> io::Error {
    io::Error::other(format!(
        "{} is {what}: refusing to follow or use it (a symbolic link in a repository \
         could redirect root's writes and deletions); remove it",
        root.join(rel).display()
    ))
}

/// Open the directory `rel` (`/`-separated, validated components) below the
/// root fd, one component at a time with `O_NOFOLLOW`. With `create`, the
/// missing ones are made (handed to the repository's owner, parents fsynced).
fn open_dir_beneath(
    root_path: &Path,
    root: &OwnedFd,
    rel: &str,
    create: Option<&Owner>,
) -> io::Result<OwnedFd> {
    let mut cur = root.try_clone()?;
    let mut walked = String::new();
    for comp in rel.split('/').filter(|c| !c.is_empty()) {
        if !walked.is_empty() {
            walked.push('/');
        }
        walked.push_str(comp);
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW;
        let next = match open_at(&cur, comp, flags, Mode::empty()) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && create.is_some() => {
                // Created here, or by a racing writer (then left as it is).
                let created = match nix::sys::stat::mkdirat(
                    Some(cur.as_raw_fd()),
                    comp,
                    Mode::from_bits_truncate(0o700),
                ) {
                    Ok(()) => true,
                    Err(Errno::EEXIST) => false,
                    Err(e) => return Err(nix_io(e)),
                };
                let fd = open_at(&cur, comp, flags, Mode::empty())
                    .map_err(|e| dir_error(root_path, &walked, &cur, comp, e))?;
                if let (true, Some(owner)) = (created, create) {
                    owner.set_mode(&fd)?;
                    owner.give(&fd)?;
                }
                nix::unistd::fsync(cur.as_raw_fd()).map_err(nix_io)?;
                fd
            }
            r => r.map_err(|e| dir_error(root_path, &walked, &cur, comp, e))?,
        };
        cur = next;
    }
    Ok(cur)
}

/// A component that could not be opened as a directory: a symbolic link is
/// refused (Linux says ELOOP or, with O_DIRECTORY, ENOTDIR); a file stays
/// ENOTDIR (a key used as a directory: nothing under it).
fn dir_error(root: &Path, rel: &str, parent: &OwnedFd, comp: &str, e: io::Error) -> io::Error {
    let symlink = match e.raw_os_error() {
        Some(libc::ELOOP) => true,
        Some(libc::ENOTDIR) => {
            nix::sys::stat::fstatat(Some(parent.as_raw_fd()), comp, AtFlags::AT_SYMLINK_NOFOLLOW)
                .is_ok_and(|st| is_kind(&st, SFlag::S_IFLNK))
        }
        _ => false,
    };
    if symlink {
        refused(root, rel, "a symbolic link")
    } else {
        e
    }
}

/// Split a key into its directory and last component.
fn split_key(key: &str) -> (&str, &str) {
    key.rsplit_once('/').unwrap_or(("", key))
}

/// The owner of the repository's root directory. A repository directory is
/// written by two users: the VM's shipper runs as QEMU's user, cdp-agent and
/// cdpctl as root. A directory root creates is handed to the owner of the
/// root, so the QEMU user can always add objects beside root's.
struct Owner {
    uid: u32,
    gid: u32,
    /// The root's permission bits (with set-group-ID), which every
    /// directory created below it takes, plus the sticky bit.
    mode: u32,
}

impl Owner {
    fn of(root: &OwnedFd) -> io::Result<Owner> {
        let st = nix::sys::stat::fstat(root.as_raw_fd()).map_err(nix_io)?;
        Ok(Owner {
            uid: st.st_uid,
            gid: st.st_gid,
            mode: st.st_mode & 0o2777,
        })
    }

    /// Give a directory just created (by fd) the root's permission bits
    /// and the sticky bit: in a directory several users may write, only an
    /// object's owner (or the directory's) may then delete or rename it
    /// (docs/CREDENTIALS.md, "file:// targets").
    fn set_mode(&self, fd: &OwnedFd) -> io::Result<()> {
        let mode = Mode::from_bits_truncate(self.mode) | Mode::S_ISVTX;
        nix::sys::stat::fchmod(fd.as_raw_fd(), mode).map_err(nix_io)
    }

    /// Hand a directory root just created to the owner, by fd (no path to
    /// swap for a symlink in between).
    fn give(&self, fd: &OwnedFd) -> io::Result<()> {
        if !nix::unistd::geteuid().is_root() || (self.uid == 0 && self.gid == 0) {
            return Ok(());
        }
        nix::unistd::fchown(
            fd.as_raw_fd(),
            Some(nix::unistd::Uid::from_raw(self.uid)),
            Some(nix::unistd::Gid::from_raw(self.gid)),
        )
        .map_err(nix_io)
    }

    /// Whether a directory owned by `uid` may be used: root's, the
    /// repository owner's, or this process's own.
    fn trusts(&self, uid: u32) -> bool {
        uid == 0 || uid == self.uid || uid == nix::unistd::geteuid().as_raw()
    }
}

fn open_root(root: &Path) -> io::Result<OwnedFd> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(root)?;
    Ok(OwnedFd::from(f))
}

use std::os::unix::fs::OpenOptionsExt;

/// The staging directory, opened without following a symlink and checked:
/// a directory owned by root, the repository's owner or this user.
fn open_staging(root_path: &Path, root: &OwnedFd, owner: &Owner) -> io::Result<OwnedFd> {
    let fd = open_dir_beneath(root_path, root, STAGING_DIR, Some(owner))?;
    let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(nix_io)?;
    if !is_kind(&st, SFlag::S_IFDIR) {
        return Err(refused(root_path, STAGING_DIR, "not a directory"));
    }
    if !owner.trusts(st.st_uid) {
        return Err(refused(
            root_path,
            STAGING_DIR,
            &format!(
                "owned by uid {}, not by the repository's owner (uid {}), root or this user",
                st.st_uid, owner.uid
            ),
        ));
    }
    Ok(fd)
}

fn is_kind(st: &FileStat, kind: SFlag) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == kind
}

/// Remove what interrupted puts left in the staging directory. Only files
/// (and symlinks, which are removed, never followed) older than
/// [`STAGING_MAX_AGE`]: another process may be writing right now. Every
/// call is relative to the staging directory's fd.
fn remove_stale_staging(staging: &OwnedFd) {
    let Ok(mut dir) = nix::dir::Dir::openat(
        Some(staging.as_raw_fd()),
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) else {
        return;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let names: Vec<std::ffi::CString> = dir
        .iter()
        .flatten()
        .map(|e| e.file_name().to_owned())
        .filter(|n| n.as_bytes() != b"." && n.as_bytes() != b"..")
        .collect();
    for name in names {
        let Ok(st) = nix::sys::stat::fstatat(
            Some(staging.as_raw_fd()),
            name.as_c_str(),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ) else {
            continue;
        };
        let removable = is_kind(&st, SFlag::S_IFREG) || is_kind(&st, SFlag::S_IFLNK);
        let old = now.saturating_sub(st.st_mtime) > STAGING_MAX_AGE.as_secs() as i64;
        if removable && old {
            let _ = nix::unistd::unlinkat(
                Some(staging.as_raw_fd()),
                name.as_c_str(),
                UnlinkatFlags::NoRemoveDir,
            );
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

fn new_file_flags() -> OFlag {
    OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW
}

/// What a put did.
enum Put {
    Done,
    /// Create only: an object with other bytes is there (kept as it was).
    Differs,
}

/// Put `data` at `key`: written and fsynced in the staging directory, then
/// linked into place. Create only: `linkat` never replaces (an object there
/// is compared, equal bytes are success). Replace: `renameat`.
fn file_put(root_path: &Path, key: &str, data: &[u8], mode: PutMode) -> io::Result<Put> {
    let root = open_root(root_path)?;
    let owner = Owner::of(&root)?;
    let staging = open_staging(root_path, &root, &owner)?;
    let tmp = staging_name();
    let result = (|| {
        let fd = open_at(
            &staging,
            &tmp,
            new_file_flags(),
            Mode::from_bits_truncate(0o666),
        )?;
        let mut f = std::fs::File::from(fd);
        write_object(&mut f, data)?;
        // fdatasync: the bytes and the size that finds them (a new file);
        // its times need not survive a crash before it is linked.
        f.sync_data()?;
        drop(f);
        let (dir, leaf) = split_key(key);
        let parent = open_dir_beneath(root_path, &root, dir, Some(&owner))?;
        let put =
            match mode {
                PutMode::Create => create_at(&staging, &tmp, &parent, leaf, data).map_err(|e| {
                    match e.raw_os_error() {
                        Some(libc::ELOOP) => refused(root_path, key, "a symbolic link"),
                        _ => e,
                    }
                })?,
                PutMode::Replace => {
                    // renameat replaces a symlink at the destination; it never follows it.
                    nix::fcntl::renameat(
                        Some(staging.as_raw_fd()),
                        tmp.as_str(),
                        Some(parent.as_raw_fd()),
                        leaf,
                    )
                    .map_err(nix_io)?;
                    Put::Done
                }
            };
        nix::unistd::fsync(parent.as_raw_fd()).map_err(nix_io)?;
        Ok(put)
    })();
    // The staging name is gone after a rename; after a link (or a failure)
    // it is removed here.
    let _ = nix::unistd::unlinkat(
        Some(staging.as_raw_fd()),
        tmp.as_str(),
        UnlinkatFlags::NoRemoveDir,
    );
    result
}

/// The smallest object [`write_object`] writes with `O_DIRECT`.
const DIRECT_MIN: usize = 1 << 20;
/// The alignment `O_DIRECT` needs of the buffer, offset and length (the
/// page size: a multiple of the device's logical block size).
const DIRECT_ALIGN: usize = 4096;

/// Write `data` into `f`, a new empty file. A large object whose bytes
/// start on a page boundary (the shipper's segment objects) has its whole
/// pages written with `O_DIRECT`: no copy into the page cache and no
/// writeback after it (the put syncs it anyway; that copy was 16 % of
/// shipping's time, BENCHMARKS.md, "Shipper: throughput and RPO"); the
/// tail goes through the page cache. Anything else, and a file system
/// without `O_DIRECT` (tmpfs, or one that refuses the write), is written
/// through the page cache. Whether `O_DIRECT` was used.
fn write_object(f: &mut std::fs::File, data: &[u8]) -> io::Result<bool> {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    let whole = data.len() / DIRECT_ALIGN * DIRECT_ALIGN;
    let direct = data.len() >= DIRECT_MIN
        && (data.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
        && set_direct(f, true).is_ok();
    if !direct {
        f.write_all(data)?;
        return Ok(false);
    }
    let r = f.write_all_at(&data[..whole], 0);
    set_direct(f, false)?;
    match r {
        Ok(()) => {
            f.write_all_at(&data[whole..], whole as u64)?;
            Ok(true)
        }
        // Refused (a file system that takes the flag but not the write):
        // everything again through the page cache.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            f.write_all_at(data, 0)?;
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Turn `O_DIRECT` on or off on `f` (Linux takes it in `F_SETFL`; a file
/// system without direct I/O says EINVAL).
fn set_direct(f: &std::fs::File, on: bool) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg};
    let now = fcntl(f.as_raw_fd(), FcntlArg::F_GETFL).map_err(nix_io)?;
    let mut flags = OFlag::from_bits_truncate(now);
    flags.set(OFlag::O_DIRECT, on);
    fcntl(f.as_raw_fd(), FcntlArg::F_SETFL(flags)).map_err(nix_io)?;
    Ok(())
}

/// Link the staging file `tmp` as `leaf` in `parent`, never replacing:
/// `linkat` (which NFS has too), or `renameat2(RENAME_NOREPLACE)` where
/// the file system has no hard links. An entry already there is compared
/// with `data`: equal bytes are [`Put::Done`], anything else (other bytes,
/// a directory, a symlink) [`Put::Differs`].
fn create_at(
    staging: &OwnedFd,
    tmp: &str,
    parent: &OwnedFd,
    leaf: &str,
    data: &[u8],
) -> io::Result<Put> {
    let linked = nix::unistd::linkat(
        Some(staging.as_raw_fd()),
        tmp,
        Some(parent.as_raw_fd()),
        leaf,
        AtFlags::empty(),
    );
    let r = match linked {
        Err(Errno::EPERM | Errno::EOPNOTSUPP | Errno::EMLINK) => nix::fcntl::renameat2(
            Some(staging.as_raw_fd()),
            tmp,
            Some(parent.as_raw_fd()),
            leaf,
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        ),
        r => r,
    };
    match r {
        Ok(()) => Ok(Put::Done),
        Err(Errno::EEXIST) => same_object(parent, leaf, data),
        Err(e) => Err(nix_io(e)),
    }
}

/// Whether the object `leaf` in `parent` holds exactly `data` (opened
/// without following a symlink; at most `data.len() + 1` bytes read).
fn same_object(parent: &OwnedFd, leaf: &str, data: &[u8]) -> io::Result<Put> {
    use std::io::Read;
    let fd = match open_at(
        parent,
        leaf,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        // A symlink (or a name that cannot be opened) is not our object.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENXIO)) => {
            return Ok(Put::Differs)
        }
        Err(e) => return Err(e),
    };
    let mut f = std::fs::File::from(fd);
    let meta = f.metadata()?;
    if !meta.is_file() || meta.len() != data.len() as u64 {
        return Ok(Put::Differs);
    }
    let mut there = Vec::with_capacity(data.len());
    (&mut f)
        .take(data.len() as u64 + 1)
        .read_to_end(&mut there)?;
    Ok(if there == data {
        Put::Done
    } else {
        Put::Differs
    })
}

/// What a GET found: the bytes, or why they are not given.
enum Got {
    Data(Bytes),
    /// A range outside the object (the detail).
    Range(String),
    /// The object is larger than the caller's bound (its size).
    TooLarge(u64),
}

/// Open object `key` for reading: beneath the root, never through a
/// symbolic link, a regular file only. The file and its size.
fn file_open(root_path: &Path, key: &str) -> io::Result<(std::fs::File, u64)> {
    let root = open_root(root_path)?;
    let (dir, leaf) = split_key(key);
    let parent = open_dir_beneath(root_path, &root, dir, None)?;
    let fd = open_at(
        &parent,
        leaf,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW,
        Mode::empty(),
    )
    .map_err(|e| match e.raw_os_error() {
        Some(libc::ELOOP) => refused(root_path, key, "a symbolic link"),
        _ => e,
    })?;
    let f = std::fs::File::from(fd);
    let meta = f.metadata()?;
    if meta.is_dir() {
        return Err(io::Error::from(io::ErrorKind::NotFound));
    }
    if !meta.is_file() {
        return Err(refused(root_path, key, "not a regular file"));
    }
    Ok((f, meta.len()))
}

fn file_get(root_path: &Path, key: &str, range: Option<Range<u64>>, max: u64) -> io::Result<Got> {
    use std::io::{Read, Seek, SeekFrom};
    let (mut f, size) = file_open(root_path, key)?;
    let range = range.unwrap_or(0..size);
    if range.end > size {
        return Ok(Got::Range(format!(
            "range outside the object: {}..{} of a {size}-byte object",
            range.start, range.end
        )));
    }
    let want = range.end - range.start;
    if want > max {
        return Ok(Got::TooLarge(if want == size { size } else { want }));
    }
    let len = usize::try_from(want)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "range too large"))?;
    f.seek(SeekFrom::Start(range.start))?;
    // Read into the spare capacity: `read_to_end` does not zero it first
    // (a memset of every byte fetched was ~10 % of a restore's CPU).
    let mut buf = Vec::with_capacity(len);
    f.take(want).read_to_end(&mut buf)?;
    if buf.len() != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("object ended after {} of {len} bytes", buf.len()),
        ));
    }
    Ok(Got::Data(Bytes::from(buf)))
}

/// List the objects below the directory `dir` (a key prefix's directory
/// part). Symlinks are neither listed nor followed.
fn file_list(root_path: &Path, dir: &str, out: &mut Vec<ObjectMeta>) -> io::Result<()> {
    let root = open_root(root_path)?;
    let fd = match open_dir_beneath(root_path, &root, dir, None) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        // A "directory" prefix that names a file lists nothing.
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => return Ok(()),
        Err(e) => return Err(e),
    };
    list_fd(&fd, dir, out)
}

fn list_fd(fd: &OwnedFd, dir: &str, out: &mut Vec<ObjectMeta>) -> io::Result<()> {
    let mut d = nix::dir::Dir::openat(
        Some(fd.as_raw_fd()),
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(nix_io)?;
    let mut names = Vec::new();
    for entry in d.iter() {
        let entry = entry.map_err(nix_io)?;
        let Ok(name) = entry.file_name().to_str() else {
            continue;
        };
        // Hidden names are never keys: the staging directory, editor files
        // (and "." and "..").
        if !name.starts_with('.') {
            names.push(name.to_string());
        }
    }
    for name in names {
        let st = match nix::sys::stat::fstatat(
            Some(fd.as_raw_fd()),
            name.as_str(),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(st) => st,
            // Deleted while listing.
            Err(Errno::ENOENT) => continue,
            Err(e) => return Err(nix_io(e)),
        };
        let key = if dir.is_empty() {
            name.clone()
        } else {
            format!("{dir}/{name}")
        };
        if is_kind(&st, SFlag::S_IFDIR) {
            let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW;
            match open_at(fd, &name, flags, Mode::empty()) {
                Ok(sub) => list_fd(&sub, &key, out)?,
                // Deleted or swapped for a symlink while listing: skipped.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ENOENT | libc::ELOOP | libc::ENOTDIR)
                    ) => {}
                Err(e) => return Err(e),
            }
        } else if is_kind(&st, SFlag::S_IFREG) {
            out.push(ObjectMeta {
                key,
                size: st.st_size as u64,
            });
        }
    }
    Ok(())
}

fn file_delete(root_path: &Path, key: &str) -> io::Result<()> {
    let root = open_root(root_path)?;
    let (dir, leaf) = split_key(key);
    let parent = open_dir_beneath(root_path, &root, dir, None)?;
    // unlinkat removes a symlink itself, never what it points to.
    nix::unistd::unlinkat(Some(parent.as_raw_fd()), leaf, UnlinkatFlags::NoRemoveDir)
        .map_err(nix_io)
}

/// The `check` of a file target: the root is a directory, the staging
/// directory is a real directory of a trusted owner (never a symlink),
/// writable; then stale staging files are removed.
fn file_check(url: &str, root_path: &Path) -> Result<(), StoreError> {
    let config = |message: String| StoreError::Config {
        url: url.to_string(),
        message,
    };
    if let Some(e) = missing_root(url, root_path) {
        return Err(e);
    }
    let not_writable = |e: io::Error| {
        config(format!(
            "directory {} is not writable: {e}",
            root_path.display()
        ))
    };
    let root = open_root(root_path).map_err(|e| classify_io(url, "check", "root", e))?;
    let owner = Owner::of(&root).map_err(|e| classify_io(url, "check", "root", e))?;
    let staging = match open_staging(root_path, &root, &owner) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error().is_none() => return Err(config(e.to_string())),
        Err(e) => return Err(not_writable(e)),
    };
    // Writable? A probe file in the staging directory.
    let probe = format!("check-{}", staging_name());
    let r = open_at(
        &staging,
        &probe,
        new_file_flags(),
        Mode::from_bits_truncate(0o600),
    );
    let _ = nix::unistd::unlinkat(
        Some(staging.as_raw_fd()),
        probe.as_str(),
        UnlinkatFlags::NoRemoveDir,
    );
    r.map_err(not_writable)?;
    remove_stale_staging(&staging);
    Ok(())
}

fn statvfs_free(path: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    Some((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
}

impl Backend for FileBackend {
    fn put<'a>(
        &'a self,
        key: &'a str,
        data: Bytes,
        mode: PutMode,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let (root, url, k) = (self.root.clone(), self.url.clone(), key.to_string());
            self.blocking("put", key, move || match file_put(&root, &k, &data, mode) {
                Ok(Put::Done) => Ok(()),
                Ok(Put::Differs) => Err(StoreError::Exists { url, key: k }),
                Err(e) => Err(match missing_root(&url, &root) {
                    Some(err) => err,
                    None => classify_io(&url, "put", &k, e),
                }),
            })
            .await
        })
    }

    fn get<'a>(
        &'a self,
        key: &'a str,
        range: Option<Range<u64>>,
        max: u64,
    ) -> BoxFuture<'a, Result<Bytes, StoreError>> {
        Box::pin(async move {
            let (root, k) = (self.root.clone(), key.to_string());
            let op = if range.is_some() { "get range" } else { "get" };
            let r = self
                .blocking(op, key, move || Ok(file_get(&root, &k, range, max)))
                .await?
                .map_err(|e| self.err(op, key, e))?;
            match r {
                Got::Data(b) => Ok(b),
                Got::Range(detail) => Err(StoreError::Other {
                    url: self.url.clone(),
                    op,
                    key: key.to_string(),
                    detail,
                    source: None,
                }),
                Got::TooLarge(size) => Err(StoreError::TooLarge {
                    url: self.url.clone(),
                    key: key.to_string(),
                    size,
                    max,
                }),
            }
        })
    }

    fn open_local<'a>(
        &'a self,
        key: &'a str,
    ) -> Option<BoxFuture<'a, Result<(std::fs::File, u64), StoreError>>> {
        Some(Box::pin(async move {
            let (root, k) = (self.root.clone(), key.to_string());
            let r = self
                .blocking("open", key, move || Ok(file_open(&root, &k)))
                .await?;
            r.map_err(|e| self.err("open", key, e))
        }))
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
                io::ErrorKind::NotFound => StoreError::Other {
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
            let (root, k) = (self.root.clone(), key.to_string());
            let r = self
                .blocking("delete", key, move || Ok(file_delete(&root, &k)))
                .await?;
            match r {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(self.err("delete", key, e)),
            }
        })
    }

    fn free_space(&self) -> Option<u64> {
        statvfs_free(&self.root)
    }

    fn check(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let (root, url) = (self.root.clone(), self.url.clone());
            self.blocking("check", "", move || file_check(&url, &root))
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

    /// `open_local` (restore reads chunks in place) opens an object as
    /// `get` does: the object's bytes, never through a symbolic link
    /// (the key or a directory of it), nothing for a missing key, and
    /// None in an encrypted repository (its objects are sealed).
    #[tokio::test]
    async fn objects_are_opened_in_place_as_get_opens_them() {
        use std::io::Read;
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("repo");
        std::fs::create_dir(&root).unwrap();
        let store = Store::open(&format!("file://{}", root.display()), None).unwrap();
        let key = "cdp/v1/chunks/ab/abcd";
        store.put(key, Bytes::from_static(b"chunk")).await.unwrap();
        let (mut f, size) = store.open_local(key).await.unwrap().expect("a file");
        assert_eq!(size, 5);
        let mut got = Vec::new();
        f.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"chunk");
        assert!(store.open_local("cdp/v1/chunks/ab/none").await.is_err());
        // Bounded as get bounds it: past a chunk's cap, not opened.
        let big = "cdp/v1/chunks/ab/big";
        std::fs::File::create(root.join(big))
            .unwrap()
            .set_len(crate::format::object_cap(big) + 1)
            .unwrap();
        assert!(matches!(
            store.open_local(big).await,
            Err(StoreError::TooLarge { .. })
        ));
        let victim = d.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        std::fs::write(victim.join("x"), b"secret").unwrap();
        std::os::unix::fs::symlink(victim.join("x"), root.join("cdp/v1/chunks/ab/link")).unwrap();
        std::os::unix::fs::symlink(&victim, root.join("cdp/v1/chunks/cd")).unwrap();
        for k in ["cdp/v1/chunks/ab/link", "cdp/v1/chunks/cd/x"] {
            assert!(store.open_local(k).await.is_err(), "{k} followed");
        }
        let enc = tempfile::tempdir().unwrap();
        let pass = d.path().join("pass");
        std::fs::write(&pass, b"correct horse battery\n").unwrap();
        std::fs::set_permissions(&pass, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let src = crate::crypto::KeySource::PassphraseFile(pass);
        let store = Store::open(&format!("file://{}", enc.path().display()), None)
            .unwrap()
            .with_key_source(Some(src.clone()));
        store.init_encryption(&src).await.unwrap();
        store.put(key, Bytes::from_static(b"chunk")).await.unwrap();
        assert!(store.open_local(key).await.unwrap().is_none());
        assert_eq!(&store.get(key).await.unwrap()[..], b"chunk");
    }

    /// Bytes of `path` in the page cache (util-linux `fincore`).
    fn cached_bytes(path: &Path) -> u64 {
        let out = std::process::Command::new("fincore")
            .args(["--bytes", "--noheadings", "--raw", "--output", "RES"])
            .arg(path)
            .output()
            .expect("fincore (util-linux) runs");
        assert!(out.status.success(), "fincore: {out:?}");
        String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// A large object whose bytes start on a page boundary (the shipper's
    /// segment objects) is written with O_DIRECT: every byte is there and
    /// none of its whole pages is left in the page cache (only the tail
    /// went through it). The same bytes one byte off a page boundary, or a
    /// small object, go through the page cache. /var/tmp: a disk file
    /// system (tmpfs has no page cache to bypass).
    #[test]
    fn aligned_objects_are_written_around_the_page_cache() {
        let d = tempfile::tempdir_in("/var/tmp").unwrap();
        let len = (4 << 20) + 123;
        let mut v = vec![0u8; len + 2 * DIRECT_ALIGN];
        let off = v.as_ptr().align_offset(DIRECT_ALIGN);
        for (i, b) in v.iter_mut().enumerate() {
            *b = (i * 31 % 251) as u8;
        }
        let cases = [
            ("aligned", &v[off..off + len], true),
            ("unaligned", &v[off + 1..off + 1 + len], false),
            ("small", &v[off..off + 8192], false),
        ];
        for (name, data, direct) in cases {
            let key = format!("cdp/v1/{name}.seg.zst");
            assert!(matches!(
                file_put(d.path(), &key, data, PutMode::Create).unwrap(),
                Put::Done
            ));
            let path = d.path().join(&key);
            // Before reading it back (which caches it).
            let cached = cached_bytes(&path);
            assert!(
                std::fs::read(&path).unwrap() == data,
                "{name}: bytes differ"
            );
            if direct {
                assert!(
                    cached <= DIRECT_ALIGN as u64,
                    "{name}: {cached} bytes cached"
                );
            } else {
                assert!(
                    cached >= (data.len() / DIRECT_ALIGN * DIRECT_ALIGN) as u64,
                    "{name}: {cached} bytes cached"
                );
            }
        }
    }

    /// Without O_DIRECT (tmpfs, or refused) every object is written whole
    /// all the same.
    #[test]
    fn objects_are_whole_where_o_direct_is_not_taken() {
        let d = tempfile::tempdir_in("/dev/shm").unwrap();
        let len = (2 << 20) + 5;
        let mut v = vec![7u8; len + DIRECT_ALIGN];
        let off = v.as_ptr().align_offset(DIRECT_ALIGN);
        v[off + len - 1] = 9;
        let data = &v[off..off + len];
        let mut f = std::fs::File::create(d.path().join("x")).unwrap();
        write_object(&mut f, data).unwrap();
        drop(f);
        assert!(std::fs::read(d.path().join("x")).unwrap() == data);
    }
}
