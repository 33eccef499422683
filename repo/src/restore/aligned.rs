//! Restore's buffers: page-aligned memory kept in a small pool, so that
//! restoring a disk does not allocate (and zero) a fresh megabyte per chunk
//! or per run of journal records.

use std::sync::Mutex;

/// The buffers' alignment: the page size, at least 4 KiB.
pub fn align() -> usize {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| {
        nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .map_or(4096, |p| (p as usize).max(4096))
    })
}

/// Buffers given back, for the next [`AlignedBuf::take`] (at most
/// [`POOL_MAX`], each of [`POOL_LEN`] bytes).
static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
const POOL_MAX: usize = 64;
/// The size of pooled buffers: a baseline chunk.
pub const POOL_LEN: usize = crate::format::CHUNK_SIZE as usize;

/// `len` bytes of memory aligned to [`align()`]; its contents are whatever
/// the last user left (callers overwrite all of it). Goes back to the pool
/// when dropped.
pub struct AlignedBuf {
    mem: Vec<u8>,
    off: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn take(len: usize) -> AlignedBuf {
        let a = align();
        let mem = if len <= POOL_LEN {
            POOL.lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop()
                .unwrap_or_else(|| vec![0u8; POOL_LEN + a])
        } else {
            vec![0u8; len + a]
        };
        // The heap block never moves (the Vec is never grown), so the
        // offset stays right for the buffer's life.
        let off = mem.as_ptr().align_offset(a);
        debug_assert!(off + len <= mem.len());
        AlignedBuf { mem, off, len }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.mem[self.off..self.off + self.len]
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.mem[self.off..self.off + self.len]
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.mem.len() == POOL_LEN + align() {
            let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
            if pool.len() < POOL_MAX {
                pool.push(std::mem::take(&mut self.mem));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_reused() {
        for len in [0, 1, 4096, 5000, POOL_LEN, POOL_LEN + 1] {
            let mut b = AlignedBuf::take(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % align(), 0);
            b.fill(7);
        }
        // Taken again from the pool: still aligned.
        let b = AlignedBuf::take(100);
        assert_eq!(b.as_ptr() as usize % align(), 0);
    }
}
