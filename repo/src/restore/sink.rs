//! Where restored bytes go: a fresh sparse file (raw, or the raw file
//! behind a qcow2 conversion) or the disk in place.

use std::fs::File;
use std::os::unix::fs::FileExt;

/// Where restored bytes go. Every byte of the disk is given exactly once.
pub trait Sink: Send + Sync {
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()>;
    fn zero(&self, offset: u64, len: u64) -> std::io::Result<()>;
}

/// A new sparse file: zeros are holes, nothing to write.
pub struct FreshFile(pub File);

impl Sink for FreshFile {
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.0.write_all_at(data, offset)?;
        if data.len() >= 1 << 18 {
            // Start writing large pieces back now, so the disk works while
            // the rest is fetched and the final sync has little left to do.
            // nix has no sync_file_range. The result is ignored: this is a
            // hint, and the final fsync reports any write error.
            use std::os::fd::AsRawFd;
            // SAFETY: the fd is owned by `self.0` and open for the whole
            // call; sync_file_range takes no pointers, only integers.
            unsafe {
                libc::sync_file_range(
                    self.0.as_raw_fd(),
                    offset as libc::off64_t,
                    data.len() as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                )
            };
        }
        Ok(())
    }
    fn zero(&self, _offset: u64, _len: u64) -> std::io::Result<()> {
        Ok(())
    }
}

/// An existing disk: only ranges that differ are written.
pub struct InPlace {
    pub file: File,
    pub changed: std::sync::atomic::AtomicU64,
}

impl Sink for InPlace {
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut cur = vec![0u8; data.len()];
        self.file.read_exact_at(&mut cur, offset)?;
        if cur != data {
            self.file.write_all_at(data, offset)?;
            self.changed
                .fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }
    fn zero(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let mut done = 0;
        let mut cur = vec![0u8; (len as usize).min(1 << 20)];
        while done < len {
            let n = (len - done).min(cur.len() as u64) as usize;
            self.file.read_exact_at(&mut cur[..n], offset + done)?;
            if cur[..n].iter().any(|&b| b != 0) {
                cdp_core::journal::zero_range(&self.file, offset + done, n as u64, false)?;
                self.changed
                    .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            }
            done += n as u64;
        }
        Ok(())
    }
}
