//! Opening a protected disk image: raw file or block device, locked.

use std::fs::File;
use std::io;
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
        let r = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
        if r < 0 {
            return Err(io_err("size", io::Error::last_os_error()));
        }
        r as u64
    } else {
        md.len()
    };
    Ok(Image {
        file,
        size,
        block_device,
    })
}

fn lock(file: &File) -> io::Result<()> {
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0;
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
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
}
