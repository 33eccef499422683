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
