//! Buffers for `O_DIRECT` output: memory aligned to [`align()`], kept in a
//! small pool so that restoring a disk does not allocate (and zero) a fresh
//! megabyte per chunk; and the split of a write into the aligned middle a
//! direct write can take and the unaligned head and tail that go through
//! the page cache.

use std::sync::Mutex;

/// The alignment of direct writes (file offset, length and memory): the
/// page size, at least 4 KiB. A page is then written either whole by a
/// direct write or only through the page cache, never both, so the two
/// never race on one page.
pub fn align() -> usize {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| {
        nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .map_or(4096, |p| (p as usize).max(4096))
    })
}

/// How a write of `len` bytes at `offset` splits: `head` bytes up to the
/// first aligned offset, `mid` aligned bytes (a multiple of `align`, at an
/// aligned offset), `tail` bytes after. `head + mid + tail == len`; when
/// no aligned block fits, everything is in `head`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split {
    pub head: usize,
    pub mid: usize,
    pub tail: usize,
}

impl Split {
    pub fn of(offset: u64, len: usize, align: usize) -> Split {
        let a = align as u64;
        let start = offset.div_ceil(a) * a;
        let end = (offset + len as u64) / a * a;
        if end <= start {
            return Split {
                head: len,
                mid: 0,
                tail: 0,
            };
        }
        let head = (start - offset) as usize;
        let mid = (end - start) as usize;
        Split {
            head,
            mid,
            tail: len - head - mid,
        }
    }
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
    use proptest::prelude::*;

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

    #[test]
    fn splits() {
        let s = |o, l| Split::of(o, l, 4096);
        let sp = |head, mid, tail| Split { head, mid, tail };
        assert_eq!(s(0, 4096), sp(0, 4096, 0));
        assert_eq!(s(0, 4095), sp(4095, 0, 0));
        assert_eq!(s(512, 4096), sp(4096, 0, 0));
        assert_eq!(s(512, 8192), sp(3584, 4096, 512));
        assert_eq!(s(4096, 1 << 20), sp(0, 1 << 20, 0));
        assert_eq!(s(100, 0), sp(0, 0, 0));
    }

    proptest! {
        #[test]
        fn split_covers_and_aligns(offset in 0u64..1 << 40, len in 0usize..3 << 20,
                                   shift in 9u32..17) {
            let a = 1usize << shift;
            let s = Split::of(offset, len, a);
            prop_assert_eq!(s.head + s.mid + s.tail, len);
            if s.mid > 0 {
                let mid_at = offset + s.head as u64;
                prop_assert_eq!(mid_at % a as u64, 0);
                prop_assert_eq!(s.mid % a, 0);
                prop_assert!(s.head < a && s.tail < a);
                prop_assert_eq!(mid_at + s.mid as u64 + s.tail as u64, offset + len as u64);
            } else {
                // No aligned block fits inside.
                prop_assert_eq!(s.tail, 0);
                let first = offset.div_ceil(a as u64) * a as u64;
                prop_assert!(first + a as u64 > offset + len as u64);
            }
        }
    }
}
