//! Files in a tree another user can write, reached only through directory
//! file descriptors (issue 11, "Trust boundaries"): a process running as
//! root never resolves a path inside such a tree, never follows a symbolic
//! link there, and never chowns or chmods by path.
//!
//! - [`DirFd::open`] opens a directory whose path the caller trusts up to
//!   its parent; the last component is never followed.
//! - [`DirFd::open_at`], [`DirFd::mkdir_at`], [`DirFd::create_file`],
//!   [`DirFd::rename_at`], [`DirFd::remove_at`] take one name (no `/`, not
//!   `.` or `..`) inside an opened directory, with `O_NOFOLLOW`.
//! - [`DirFd::chown`], [`DirFd::chmod`] act on the opened directory itself;
//!   [`DirFd::own_entry`] chowns one entry after opening it without following
//!   links and checking, on the open file, what it is.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::unistd::{Gid, Uid};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum FsatError {
    #[error("{path} is a symbolic link: refused (links are never followed here)")]
    Symlink { path: PathBuf },
    #[error("{path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("{path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("{path} has {links} hard links: refused (it may be another file's second name)")]
    HardLinked { path: PathBuf, links: u64 },
    #[error("{name:?} is not a single file name")]
    BadName { name: OsString },
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

impl FsatError {
    /// Missing (`ENOENT`): callers that tolerate an absent entry branch on it.
    pub fn is_not_found(&self) -> bool {
        matches!(self, FsatError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

/// What an entry is, from `fstatat(AT_SYMLINK_NOFOLLOW)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    /// A socket, FIFO or device.
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: OsString,
    pub kind: Kind,
    pub owner: (u32, u32),
    pub links: u64,
}

fn kind_of(st: &FileStat) -> Kind {
    match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFDIR => Kind::Dir,
        SFlag::S_IFREG => Kind::File,
        SFlag::S_IFLNK => Kind::Symlink,
        _ => Kind::Other,
    }
}

/// One component: not empty, no `/`, not `.` or `..`.
fn check_name(name: &OsStr) -> Result<&OsStr, FsatError> {
    let b = name.as_bytes();
    if b.is_empty() || b.contains(&b'/') || b == b"." || b == b".." || b.contains(&0) {
        return Err(FsatError::BadName { name: name.into() });
    }
    Ok(name)
}

/// Own a descriptor `openat` just returned.
fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was returned by a successful open(2)/openat(2) call in
    // this module and has no other owner: it is wrapped exactly once.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// An open directory and the path it was reached by (for messages only).
#[derive(Debug)]
pub struct DirFd {
    fd: OwnedFd,
    path: PathBuf,
}

impl DirFd {
    fn err(&self, name: Option<&OsStr>, op: &'static str) -> impl Fn(Errno) -> FsatError + '_ {
        let path = match name {
            Some(n) => self.path.join(n),
            None => self.path.clone(),
        };
        move |e| FsatError::Io {
            path: path.clone(),
            op,
            source: e.into(),
        }
    }

    fn from_fd(fd: OwnedFd, path: PathBuf) -> Result<DirFd, FsatError> {
        let d = DirFd { fd, path };
        if kind_of(&d.stat()?) != Kind::Dir {
            return Err(FsatError::NotADirectory { path: d.path });
        }
        Ok(d)
    }

    /// An already opened directory (e.g. an operator's path, links
    /// followed); checked to be a directory.
    pub fn from_file(f: File, path: PathBuf) -> Result<DirFd, FsatError> {
        DirFd::from_fd(OwnedFd::from(f), path)
    }

    /// Open the directory `path`, not following its last component.
    pub fn open(path: &Path) -> Result<DirFd, FsatError> {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        match nix::fcntl::open(path, flags, Mode::empty()) {
            Ok(fd) => DirFd::from_fd(owned(fd), path.to_path_buf()),
            Err(e) => Err(classify(None, path, e)),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `fstat` of the directory itself.
    pub fn stat(&self) -> Result<FileStat, FsatError> {
        nix::sys::stat::fstat(self.fd.as_raw_fd()).map_err(self.err(None, "fstat"))
    }

    pub fn owner(&self) -> Result<(u32, u32), FsatError> {
        let st = self.stat()?;
        Ok((st.st_uid, st.st_gid))
    }

    /// `fchown` of the opened directory (a no-op when it already has `owner`).
    pub fn chown(&self, owner: (u32, u32)) -> Result<(), FsatError> {
        if self.owner()? == owner {
            return Ok(());
        }
        nix::unistd::fchown(
            self.fd.as_raw_fd(),
            Some(Uid::from_raw(owner.0)),
            Some(Gid::from_raw(owner.1)),
        )
        .map_err(self.err(None, "fchown"))
    }

    /// `fchmod` of the opened directory.
    pub fn chmod(&self, mode: u32) -> Result<(), FsatError> {
        nix::sys::stat::fchmod(self.fd.as_raw_fd(), Mode::from_bits_truncate(mode))
            .map_err(self.err(None, "fchmod"))
    }

    /// The subdirectory `name`, never following a link.
    pub fn open_at(&self, name: impl AsRef<OsStr>) -> Result<DirFd, FsatError> {
        let name = check_name(name.as_ref())?;
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        match nix::fcntl::openat(Some(self.fd.as_raw_fd()), name, flags, Mode::empty()) {
            Ok(fd) => DirFd::from_fd(owned(fd), self.path.join(name)),
            Err(e) => Err(classify(Some(self), &self.path.join(name), e)),
        }
    }

    /// `mkdirat`: true when it was created, false when `name` already exists
    /// (whatever it is: [`DirFd::open_at`] says).
    pub fn mkdir_at(&self, name: impl AsRef<OsStr>, mode: u32) -> Result<bool, FsatError> {
        let name = check_name(name.as_ref())?;
        match nix::sys::stat::mkdirat(
            Some(self.fd.as_raw_fd()),
            name,
            Mode::from_bits_truncate(mode),
        ) {
            Ok(()) => Ok(true),
            Err(Errno::EEXIST) => Ok(false),
            Err(e) => Err(self.err(Some(name), "mkdirat")(e)),
        }
    }

    /// `fstatat(AT_SYMLINK_NOFOLLOW)`; `None` when there is no such entry.
    pub fn entry(&self, name: impl AsRef<OsStr>) -> Result<Option<Entry>, FsatError> {
        let name = check_name(name.as_ref())?;
        match nix::sys::stat::fstatat(
            Some(self.fd.as_raw_fd()),
            name,
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(st) => Ok(Some(Entry {
                name: name.into(),
                kind: kind_of(&st),
                owner: (st.st_uid, st.st_gid),
                links: st.st_nlink,
            })),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(self.err(Some(name), "fstatat")(e)),
        }
    }

    /// Every entry but `.` and `..`, sorted by name.
    pub fn entries(&self) -> Result<Vec<Entry>, FsatError> {
        // The listing of the open directory itself: /proc/self/fd/N is that
        // directory whatever happened to its path since it was opened.
        let fd_path = PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()));
        let io = |source| FsatError::Io {
            path: self.path.clone(),
            op: "readdir",
            source,
        };
        let mut names = Vec::new();
        for e in std::fs::read_dir(&fd_path).map_err(io)? {
            names.push(e.map_err(io)?.file_name());
        }
        names.sort();
        let mut out = Vec::new();
        for n in names {
            // Gone since the listing: nothing to do with it.
            if let Some(e) = self.entry(&n)? {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// Give the entry `name` to `owner`, never following a link: a regular
    /// file is opened (`O_NOFOLLOW`) and checked on the open file (one link
    /// only) before `fchown`; a socket or FIFO is `fchownat`ed with
    /// `AT_SYMLINK_NOFOLLOW`. A directory is refused (open it with
    /// [`DirFd::open_at`]), and so is a symbolic link.
    pub fn own_entry(&self, name: impl AsRef<OsStr>, owner: (u32, u32)) -> Result<(), FsatError> {
        let name = check_name(name.as_ref())?;
        let path = self.path.join(name);
        let Some(e) = self.entry(name)? else {
            return Ok(());
        };
        let ids = (Some(Uid::from_raw(owner.0)), Some(Gid::from_raw(owner.1)));
        match e.kind {
            Kind::Symlink => Err(FsatError::Symlink { path }),
            Kind::Dir => Err(FsatError::NotAFile { path }),
            Kind::Other => nix::unistd::fchownat(
                Some(self.fd.as_raw_fd()),
                name,
                ids.0,
                ids.1,
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(self.err(Some(name), "fchownat")),
            Kind::File => {
                let flags = OFlag::O_RDONLY
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_NONBLOCK
                    | OFlag::O_NOCTTY
                    | OFlag::O_CLOEXEC;
                let fd = nix::fcntl::openat(Some(self.fd.as_raw_fd()), name, flags, Mode::empty())
                    .map_err(|e| classify(Some(self), &path, e))?;
                let f = File::from(owned(fd));
                let st =
                    nix::sys::stat::fstat(f.as_raw_fd()).map_err(self.err(Some(name), "fstat"))?;
                if kind_of(&st) != Kind::File {
                    return Err(FsatError::NotAFile { path });
                }
                if st.st_nlink > 1 {
                    return Err(FsatError::HardLinked {
                        path,
                        links: st.st_nlink,
                    });
                }
                if (st.st_uid, st.st_gid) == owner {
                    return Ok(());
                }
                nix::unistd::fchown(f.as_raw_fd(), ids.0, ids.1)
                    .map_err(self.err(Some(name), "fchown"))
            }
        }
    }

    /// Open the regular file at `rel` below this directory for reading,
    /// following no link on the way (`openat2` with `RESOLVE_BENEATH |
    /// RESOLVE_NO_SYMLINKS`), and refusing what is not a regular file with
    /// one name (a hard link may be another file's second name).
    pub fn open_beneath(&self, rel: &Path) -> Result<File, FsatError> {
        use nix::fcntl::{OpenHow, ResolveFlag};
        // O_NONBLOCK: a FIFO planted where a file is expected must not hang
        // the opener (it is refused below as not a file); no effect on
        // reading a regular file.
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
        let path = self.path.join(rel);
        let fd = nix::fcntl::openat2(self.fd.as_raw_fd(), rel, how).map_err(|e| {
            if e == Errno::ELOOP || e == Errno::EXDEV {
                FsatError::Symlink { path: path.clone() }
            } else {
                FsatError::Io {
                    path: path.clone(),
                    op: "open",
                    source: e.into(),
                }
            }
        })?;
        let f = File::from(owned(fd));
        let st = nix::sys::stat::fstat(f.as_raw_fd()).map_err(|e| FsatError::Io {
            path: path.clone(),
            op: "fstat",
            source: e.into(),
        })?;
        if kind_of(&st) != Kind::File {
            return Err(FsatError::NotAFile { path });
        }
        if st.st_nlink != 1 {
            return Err(FsatError::HardLinked {
                path,
                links: st.st_nlink as u64,
            });
        }
        Ok(f)
    }

    /// Open the regular file `name` for reading, not following a link.
    pub fn open_file(&self, name: impl AsRef<OsStr>) -> Result<File, FsatError> {
        let name = check_name(name.as_ref())?;
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
        let fd = nix::fcntl::openat(Some(self.fd.as_raw_fd()), name, flags, Mode::empty())
            .map_err(|e| classify(Some(self), &self.path.join(name), e))?;
        let f = File::from(owned(fd));
        let st = nix::sys::stat::fstat(f.as_raw_fd()).map_err(self.err(Some(name), "fstat"))?;
        if kind_of(&st) != Kind::File {
            return Err(FsatError::NotAFile {
                path: self.path.join(name),
            });
        }
        Ok(f)
    }

    /// Create the regular file `name` (`O_CREAT|O_EXCL|O_NOFOLLOW`, write
    /// only): fails if anything, a link included, has that name.
    pub fn create_file(&self, name: impl AsRef<OsStr>, mode: u32) -> Result<File, FsatError> {
        let name = check_name(name.as_ref())?;
        let flags =
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        nix::fcntl::openat(
            Some(self.fd.as_raw_fd()),
            name,
            flags,
            Mode::from_bits_truncate(mode),
        )
        .map(|fd| File::from(owned(fd)))
        .map_err(self.err(Some(name), "create"))
    }

    /// `renameat` within this directory (replaces `to` itself, never what a
    /// link named `to` points at).
    pub fn rename_at(
        &self,
        from: impl AsRef<OsStr>,
        to: impl AsRef<OsStr>,
    ) -> Result<(), FsatError> {
        let (from, to) = (check_name(from.as_ref())?, check_name(to.as_ref())?);
        let fd = Some(self.fd.as_raw_fd());
        nix::fcntl::renameat(fd, from, fd, to).map_err(self.err(Some(to), "rename"))
    }

    /// `unlinkat` of a non-directory (a link is removed, not followed):
    /// false when there was nothing.
    pub fn remove_at(&self, name: impl AsRef<OsStr>) -> Result<bool, FsatError> {
        let name = check_name(name.as_ref())?;
        match nix::unistd::unlinkat(
            Some(self.fd.as_raw_fd()),
            name,
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        ) {
            Ok(()) => Ok(true),
            Err(Errno::ENOENT) => Ok(false),
            Err(e) => Err(self.err(Some(name), "unlink")(e)),
        }
    }
}

/// An open that failed: say "symbolic link" or "not a directory" when that
/// is why (`O_NOFOLLOW` gives `ELOOP`, `O_DIRECTORY` `ENOTDIR`).
fn classify(dir: Option<&DirFd>, path: &Path, e: Errno) -> FsatError {
    if e == Errno::ELOOP || e == Errno::ENOTDIR {
        let st = match (dir, path.file_name()) {
            (Some(d), Some(n)) => d.entry(n).ok().flatten().map(|e| e.kind),
            _ => std::fs::symlink_metadata(path).ok().map(|m| {
                if m.file_type().is_symlink() {
                    Kind::Symlink
                } else {
                    Kind::Other
                }
            }),
        };
        return match st {
            Some(Kind::Symlink) => FsatError::Symlink { path: path.into() },
            _ => FsatError::NotADirectory { path: path.into() },
        };
    }
    FsatError::Io {
        path: path.into(),
        op: "open",
        source: e.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn links_are_never_followed() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        std::fs::create_dir(d.path().join("t")).unwrap();
        std::os::unix::fs::symlink(&victim, d.path().join("t/file")).unwrap();
        std::os::unix::fs::symlink(d.path(), d.path().join("t/dir")).unwrap();
        let t = DirFd::open(&d.path().join("t")).unwrap();
        assert!(matches!(t.open_at("dir"), Err(FsatError::Symlink { .. })));
        assert!(matches!(t.open_at("file"), Err(FsatError::Symlink { .. })));
        assert!(matches!(
            t.own_entry("file", (0, 0)),
            Err(FsatError::Symlink { .. })
        ));
        assert!(t.create_file("file", 0o600).is_err());
        assert!(matches!(
            DirFd::open(&d.path().join("t/dir")),
            Err(FsatError::Symlink { .. })
        ));
        // rename over a link replaces the link.
        t.create_file("new", 0o600)
            .unwrap()
            .write_all(b"x")
            .unwrap();
        t.rename_at("new", "file").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert!(t.remove_at("dir").unwrap());
        assert!(!t.remove_at("dir").unwrap());
        assert!(d.path().is_dir());
        let names: Vec<_> = t.entries().unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["file"]);
        for bad in ["", ".", "..", "a/b"] {
            assert!(matches!(t.open_at(bad), Err(FsatError::BadName { .. })));
        }
    }

    #[test]
    fn hard_links_are_not_chowned() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), b"").unwrap();
        std::fs::hard_link(d.path().join("a"), d.path().join("b")).unwrap();
        let t = DirFd::open(d.path()).unwrap();
        let me = t.owner().unwrap();
        assert!(matches!(
            t.own_entry("b", me),
            Err(FsatError::HardLinked { links: 2, .. })
        ));
        assert!(t.mkdir_at("sub", 0o700).unwrap());
        assert!(!t.mkdir_at("sub", 0o700).unwrap());
        t.open_at("sub").unwrap().chown(me).unwrap();
    }
}
