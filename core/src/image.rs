//! Opening a protected disk image: raw file or block device, locked.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ImageError {
    #[error("cannot open disk image {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk image {path} is neither a regular file nor a block device")]
    NotADisk { path: PathBuf },
    #[error("disk image {path} is in use by another process (QEMU, qemu-nbd or another cdpd): stop it first")]
    Locked { path: PathBuf },
    #[error("disk image {path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

pub struct Image {
    pub file: File,
    pub size: u64,
    pub block_device: bool,
}

/// Open an image read-write and take an exclusive OFD lock on it, as QEMU
/// does on its images, so that nothing else writes it behind our back.
pub fn open(path: &Path) -> Result<Image, ImageError> {
    let file = File::options()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| ImageError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    from_file(file, path)
}

/// An image already opened read-write (by root, for a child working as
/// the VM's user: `root_images`), checked and locked as [`open`] does.
pub fn from_file(file: File, path: &Path) -> Result<Image, ImageError> {
    let io_err = |op, source| ImageError::Io {
        path: path.to_path_buf(),
        op,
        source,
    };
    let md = file.metadata().map_err(|e| io_err("stat", e))?;
    let ft = md.file_type();
    let block_device = ft.is_block_device();
    if !ft.is_file() && !block_device {
        return Err(ImageError::NotADisk {
            path: path.to_path_buf(),
        });
    }
    lock(&file).map_err(|e| match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => ImageError::Locked {
            path: path.to_path_buf(),
        },
        _ => io_err("lock", e),
    })?;
    let size = if block_device {
        // A block device's size is where its end is (its metadata says 0).
        (&file)
            .seek(SeekFrom::End(0))
            .map_err(|e| io_err("size", e))?
    } else {
        md.len()
    };
    Ok(Image {
        file,
        size,
        block_device,
    })
}

/// Where a write to the image can allocate nothing, so cannot fail for
/// want of space (cdpd then answers a WRITE once it is journaled, before
/// its image write: docs/DESIGN.md, "Write path", step 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overwrite {
    /// Everywhere: a block device open for writing.
    Always,
    /// Over allocated blocks: a regular file open for writing on ext2/3/4,
    /// which overwrites in place ([`allocated_runs`] says where).
    WhereAllocated,
    /// Nowhere known: read-only, or a file system that may copy on write
    /// (btrfs, XFS with reflinks, ...), or an error.
    Never,
}

impl Image {
    /// How writes to the image allocate ([`Overwrite`]). An `fcntl` and an
    /// `fstatfs`.
    pub fn overwrites(&self) -> Overwrite {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let writable = fcntl(self.file.as_raw_fd(), FcntlArg::F_GETFL)
            .is_ok_and(|f| OFlag::from_bits_truncate(f) & OFlag::O_ACCMODE != OFlag::O_RDONLY);
        let ext4 = || {
            nix::sys::statfs::fstatfs(&self.file)
                .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::EXT4_SUPER_MAGIC)
        };
        match (writable, self.block_device) {
            (false, _) => Overwrite::Never,
            (true, true) => Overwrite::Always,
            (true, false) if ext4() => Overwrite::WhereAllocated,
            _ => Overwrite::Never,
        }
    }
}

/// `struct fiemap` (linux/fiemap.h): the request's header.
#[repr(C)]
struct Fiemap {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
}

/// `struct fiemap_extent`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

/// Extents asked for per `FS_IOC_FIEMAP` call.
const FIEMAP_BATCH: usize = 256;

#[repr(C)]
struct FiemapRequest {
    head: Fiemap,
    extents: [FiemapExtent; FIEMAP_BATCH],
}

/// `_IOWR('f', 11, struct fiemap)`.
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
const FIEMAP_EXTENT_SHARED: u32 = 0x2000;

/// Call `f(start, end)` for each run of allocated blocks in the first
/// `size` bytes of `file`, in order, adjacent extents merged
/// (`FS_IOC_FIEMAP`: written, unwritten (preallocated) and delayed
/// allocation extents: a write into any of them allocates nothing; shared
/// extents, which a write would copy, are left out). At most `max_extents`
/// extents; false when there were more (the rest is left out) or on an
/// error (what was called stays true).
pub fn allocated_runs(
    file: &File,
    size: u64,
    max_extents: usize,
    mut f: impl FnMut(u64, u64),
) -> bool {
    let mut req = FiemapRequest {
        head: Fiemap {
            start: 0,
            length: 0,
            flags: 0,
            mapped_extents: 0,
            extent_count: 0,
            reserved: 0,
        },
        extents: [FiemapExtent::default(); FIEMAP_BATCH],
    };
    let mut run: Option<(u64, u64)> = None;
    let emit = |r: (u64, u64), f: &mut dyn FnMut(u64, u64)| {
        if r.0 < r.1 {
            f(r.0, r.1);
        }
    };
    let mut pos = 0u64;
    let mut seen = 0usize;
    let done = loop {
        if pos >= size {
            break true;
        }
        if seen >= max_extents {
            break false;
        }
        req.head = Fiemap {
            start: pos,
            length: size - pos,
            flags: 0,
            mapped_extents: 0,
            extent_count: FIEMAP_BATCH.min(max_extents - seen) as u32,
            reserved: 0,
        };
        // SAFETY: FS_IOC_FIEMAP reads the header and writes at most
        // `extent_count` extents right after it, all within `req`, which
        // lives across the call; `file` keeps the descriptor open.
        let rc = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                FS_IOC_FIEMAP,
                &mut req as *mut FiemapRequest,
            )
        };
        if rc != 0 {
            break false;
        }
        let n = (req.head.mapped_extents as usize).min(FIEMAP_BATCH);
        if n == 0 {
            break true;
        }
        let mut last = false;
        for e in &req.extents[..n] {
            seen += 1;
            let (a, b) = (e.logical, e.logical.saturating_add(e.length).min(size));
            pos = pos.max(b);
            last |= e.flags & FIEMAP_EXTENT_LAST != 0;
            if e.flags & FIEMAP_EXTENT_SHARED != 0 {
                if let Some(r) = run.take() {
                    emit(r, &mut f);
                }
                continue;
            }
            run = match run {
                Some((ra, rb)) if a <= rb => Some((ra, rb.max(b))),
                Some(r) => {
                    emit(r, &mut f);
                    Some((a, b))
                }
                None => Some((a, b)),
            };
        }
        if last {
            break true;
        }
    };
    if let Some(r) = run {
        emit(r, &mut f);
    }
    done
}

/// The most a `<uuid>.images` file may hold.
const MAX_IMAGES_FILE: u64 = 64 * 1024;

#[derive(Debug, Error)]
pub enum RootImagesError {
    #[error(transparent)]
    Fs(#[from] crate::fsat::FsatError),
    #[error(
        "{path}: {why}: refused (only root may write it; the libvirt hook writes it at each start)"
    )]
    Untrusted { path: PathBuf, why: String },
    #[error("{path}: {why}")]
    Bad { path: PathBuf, why: String },
}

/// The image path of each protected disk of a VM, as root's hook wrote it
/// from libvirt's definition to `<state>/vms/<uuid>.images` (a JSON object
/// disk → absolute path). `None` when there is none (a VM not started
/// through the hook). The file must be a root-owned regular file that
/// nobody else can write, in the root-owned `<state>/vms`, reached without
/// following a link: these paths are trusted, unlike a catalog's.
pub fn root_images(
    state: &crate::layout::StateDir,
    vm_uuid: &str,
) -> Result<Option<std::collections::BTreeMap<String, PathBuf>>, RootImagesError> {
    use std::io::Read;
    let path = state.vm_images(vm_uuid);
    let vms = match crate::fsat::DirFd::open(&state.vms()) {
        Ok(d) => d,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let untrusted = |why: String| RootImagesError::Untrusted {
        path: path.clone(),
        why,
    };
    let st = vms.stat()?;
    if st.st_uid != 0 || st.st_mode & 0o022 != 0 {
        return Err(untrusted(format!(
            "{} is not root's alone",
            state.vms().display()
        )));
    }
    let name = path.file_name().expect("a file name");
    let mut f = match vms.open_file(name) {
        Ok(f) => f,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let md = f.metadata().map_err(|e| untrusted(e.to_string()))?;
    use std::os::unix::fs::MetadataExt;
    if md.uid() != 0 || md.mode() & 0o022 != 0 || md.len() > MAX_IMAGES_FILE {
        return Err(untrusted(format!(
            "owner uid {}, mode {:o}, {} bytes",
            md.uid(),
            md.mode() & 0o7777,
            md.len()
        )));
    }
    let mut text = String::new();
    f.read_to_string(&mut text)
        .map_err(|e| untrusted(e.to_string()))?;
    let bad = |why: String| RootImagesError::Bad {
        path: path.clone(),
        why,
    };
    let map: std::collections::BTreeMap<String, PathBuf> =
        serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    for (disk, p) in &map {
        crate::names::check_disk(disk).map_err(|e| bad(e.to_string()))?;
        if !p.is_absolute() {
            return Err(bad(format!("disk {disk}: {} is not absolute", p.display())));
        }
    }
    Ok(Some(map))
}

/// An exclusive OFD lock on the whole file (`l_len` 0: to the end, however
/// it grows), refused at once if anyone holds a conflicting one.
fn lock(file: &File) -> io::Result<()> {
    let fl = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        // OFD locks require l_pid = 0.
        l_pid: 0,
    };
    nix::fcntl::fcntl(file.as_raw_fd(), nix::fcntl::FcntlArg::F_OFD_SETLK(&fl))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file on ext4 open for writing overwrites where allocated; read-only
    /// never. Its allocated runs leave out holes (punched, grown, never
    /// written), and take in preallocated (unwritten) and delayed extents.
    #[test]
    fn overwrites_and_allocated_runs() {
        use std::os::unix::fs::FileExt;
        let d = tempfile::tempdir().unwrap();
        let s = nix::sys::statfs::statfs(d.path()).unwrap();
        assert_eq!(
            s.filesystem_type(),
            nix::sys::statfs::EXT4_SUPER_MAGIC,
            "this test needs its temporary directory on ext4"
        );
        let p = d.path().join("img");
        let rw = |p: &Path| File::options().read(true).write(true).open(p).unwrap();
        let new = |name: &str| {
            File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(d.path().join(name))
                .unwrap()
        };
        std::fs::write(&p, vec![7u8; 1 << 20]).unwrap();
        let f = rw(&p);
        let image = |file| Image {
            file,
            size: 1 << 20,
            block_device: false,
        };
        assert_eq!(image(rw(&p)).overwrites(), Overwrite::WhereAllocated);
        let ro = image(File::open(&p).unwrap());
        assert_eq!(ro.overwrites(), Overwrite::Never);
        let runs = |f: &File, size: u64| {
            let mut v = Vec::new();
            assert!(allocated_runs(f, size, 100, |a, b| v.push((a, b))));
            v
        };
        assert_eq!(runs(&f, 1 << 20), [(0, 1 << 20)]);
        nix::fcntl::fallocate(
            f.as_raw_fd(),
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            64 << 10,
            64 << 10,
        )
        .unwrap();
        f.set_len(2 << 20).unwrap();
        assert_eq!(runs(&f, 2 << 20), [(0, 64 << 10), (128 << 10, 1 << 20)]);
        // A run cut at the size asked for; too many extents: false.
        assert_eq!(runs(&f, 96 << 10), [(0, 64 << 10)]);
        assert!(!allocated_runs(&f, 2 << 20, 1, |_, _| {}));
        // The hole written again: in the page cache (delayed allocation),
        // then synced; either way one run with its neighbours.
        f.write_all_at(&[1u8; 64 << 10], 64 << 10).unwrap();
        assert_eq!(runs(&f, 2 << 20), [(0, 1 << 20)]);
        f.sync_all().unwrap();
        assert_eq!(runs(&f, 2 << 20), [(0, 1 << 20)]);
        // Preallocated (unwritten extents): allocated.
        let g = new("falloc");
        nix::fcntl::fallocate(
            g.as_raw_fd(),
            nix::fcntl::FallocateFlags::empty(),
            0,
            1 << 20,
        )
        .unwrap();
        assert_eq!(runs(&g, 1 << 20), [(0, 1 << 20)], "unwritten extents");
        assert_eq!(runs(&g, 0), []);
        // Many small extents (every other 4 KiB written, synced): each a
        // run, in order.
        let h = new("frag");
        for i in 0..600u64 {
            h.write_all_at(&[2u8; 4096], i * 8192).unwrap();
        }
        h.sync_all().unwrap();
        let v = runs_many(&h, 600 * 8192);
        assert_eq!(v.len(), 600, "one run per written block");
        assert!(v
            .iter()
            .enumerate()
            .all(|(i, &(a, b))| a == i as u64 * 8192 && b == a + 4096));
    }

    fn runs_many(f: &File, size: u64) -> Vec<(u64, u64)> {
        let mut v = Vec::new();
        assert!(allocated_runs(f, size, 10_000, |a, b| v.push((a, b))));
        v
    }

    /// `<uuid>.images` is trusted only as root's own regular file, reached
    /// through no link, with disk names and absolute paths.
    #[test]
    fn root_images_are_trusted_only_as_roots_own_file() {
        use std::os::unix::fs::PermissionsExt;
        assert!(nix::unistd::geteuid().is_root(), "this test needs root");
        let d = tempfile::tempdir().unwrap();
        let state = crate::layout::StateDir::new(d.path());
        let u = "0b5c6a3e-1d2f-4a5b-8c9d-0e1f2a3b4c5d";
        assert!(root_images(&state, u).unwrap().is_none());
        std::fs::create_dir_all(state.vms()).unwrap();
        std::fs::set_permissions(state.vms(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let p = state.vm_images(u);
        std::fs::write(&p, r#"{"vda": "/images/a.raw"}"#).unwrap();
        let m = root_images(&state, u).unwrap().unwrap();
        assert_eq!(m["vda"], Path::new("/images/a.raw"));
        // Another user's file, or one others may write: refused.
        std::os::unix::fs::chown(&p, Some(64055), None).unwrap();
        assert!(matches!(
            root_images(&state, u),
            Err(RootImagesError::Untrusted { .. })
        ));
        std::os::unix::fs::chown(&p, Some(0), None).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(matches!(
            root_images(&state, u),
            Err(RootImagesError::Untrusted { .. })
        ));
        // A link: refused, not followed.
        std::fs::remove_file(&p).unwrap();
        let elsewhere = d.path().join("x.json");
        std::fs::write(&elsewhere, r#"{"vda": "/etc/shadow"}"#).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &p).unwrap();
        assert!(root_images(&state, u).is_err());
        // Bad names or relative paths: refused.
        std::fs::remove_file(&p).unwrap();
        for bad in [r#"{"../x": "/a"}"#, r#"{"vda": "rel/a"}"#, "not json"] {
            std::fs::write(&p, bad).unwrap();
            assert!(
                matches!(root_images(&state, u), Err(RootImagesError::Bad { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn second_open_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        File::create(&p).unwrap().set_len(1 << 20).unwrap();
        let a = open(&p).unwrap();
        assert_eq!(a.size, 1 << 20);
        assert!(matches!(open(&p), Err(ImageError::Locked { .. })));
        drop(a);
        open(&p).unwrap();
        assert!(matches!(
            open(dir.path()),
            Err(ImageError::Open { .. }) | Err(ImageError::NotADisk { .. })
        ));
    }

    #[test]
    fn missing_image_names_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("none.img");
        let e = open(&p).err().expect("a missing image must not open");
        assert!(matches!(e, ImageError::Open { .. }), "{e}");
        assert!(e.to_string().contains("none.img"), "{e}");
    }

    #[test]
    fn a_fifo_is_not_a_disk() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fifo");
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // Opened read-write, a FIFO does not block.
        assert!(matches!(open(&p), Err(ImageError::NotADisk { .. })));
    }

    /// The lock is an OFD lock: a second descriptor in the same process
    /// conflicts (a classic POSIX lock would not), which is what keeps two
    /// exports in one process apart as well.
    #[test]
    fn lock_conflicts_within_one_process() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        File::create(&p).unwrap().set_len(4096).unwrap();
        let a = File::options().read(true).write(true).open(&p).unwrap();
        let b = File::options().read(true).write(true).open(&p).unwrap();
        lock(&a).unwrap();
        let e = lock(&b).unwrap_err();
        assert!(
            matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)),
            "{e}"
        );
    }
}
