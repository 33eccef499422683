//! Buffers reused from one segment to the next while the shipper is busy:
//! the segment read from the journal, each frame's compressed output and
//! the joined object. A fresh 64 MiB buffer per segment cost a page fault
//! and a page zeroing per 4 KiB touched (~7 % of shipping's time,
//! BENCHMARKS.md, "Shipper: throughput and RPO"). An idle shipper gives
//! them back ([`release`]): fifty idle VMs keep no buffers.
//!
//! An object's bytes start on a [`ALIGN`] boundary, so the `file://`
//! backend can write them with `O_DIRECT` (no page-cache copy).

use std::sync::Mutex;

/// The alignment of an object's first byte (the page size, a multiple of
/// every block size `O_DIRECT` asks for).
pub const ALIGN: usize = 4096;

/// Free buffers of one kind, at most `max` of them.
pub struct Pool {
    free: Mutex<Vec<Vec<u8>>>,
    max: usize,
}

impl Pool {
    pub const fn new(max: usize) -> Pool {
        Pool {
            free: Mutex::new(Vec::new()),
            max,
        }
    }

    /// An empty buffer with room for at least `cap` bytes: a free one
    /// (the largest) or a new one.
    pub fn take(&self, cap: usize) -> Vec<u8> {
        let mut free = self.free.lock().unwrap();
        let best = (0..free.len()).max_by_key(|&i| free[i].capacity());
        let mut v = best.map(|i| free.swap_remove(i)).unwrap_or_default();
        drop(free);
        v.clear();
        v.reserve(cap);
        v
    }

    /// Keep `v` for the next [`Pool::take`] (dropped when `max` are kept).
    pub fn give(&self, v: Vec<u8>) {
        let mut free = self.free.lock().unwrap();
        if free.len() < self.max && v.capacity() > 0 {
            free.push(v);
        }
    }

    /// Drop every free buffer.
    pub fn clear(&self) {
        self.free.lock().unwrap().clear();
    }

    /// How many buffers are free (tests).
    pub fn len(&self) -> usize {
        self.free.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Segments read from the journal (one being encoded per disk, one read
/// ahead).
pub static RAW: Pool = Pool::new(2);
/// Compressed frames (one per compressing worker, a few waiting to be
/// joined).
pub static FRAMES: Pool = Pool::new(8);
/// Joined objects (one being uploaded, one being encoded, one kept for a
/// lagging target).
pub static OBJECTS: Pool = Pool::new(3);

/// Give every free buffer back to the allocator (an idle shipper).
pub fn release() {
    RAW.clear();
    FRAMES.clear();
    OBJECTS.clear();
}

/// A segment object being joined: bytes from an [`ALIGN`]ed start in a
/// pooled buffer, which goes back to [`OBJECTS`] when the last
/// [`bytes::Bytes`] made of it ([`Object::freeze`]) is dropped.
pub struct Object {
    buf: Vec<u8>,
    start: usize,
}

impl Object {
    /// An empty object with room for `cap` bytes without moving.
    pub fn with_capacity(cap: usize) -> Object {
        let mut buf = OBJECTS.take(cap + ALIGN);
        let start = buf.as_ptr().align_offset(ALIGN).min(ALIGN);
        buf.resize(start, 0);
        Object { buf, start }
    }

    pub fn extend_from_slice(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }

    pub fn len(&self) -> usize {
        self.buf.len() - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The object as shared bytes, the buffer pooled again once they are
    /// all dropped.
    pub fn freeze(self) -> bytes::Bytes {
        bytes::Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for Object {
    fn as_ref(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

impl Drop for Object {
    fn drop(&mut self) {
        OBJECTS.give(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A buffer given back is the one taken next (no new allocation, so
    /// no page faults), at most `max` are kept, and `clear` drops them.
    #[test]
    fn a_pool_hands_back_what_it_was_given() {
        let p = Pool::new(2);
        let a = p.take(1 << 20);
        let ptr = a.as_ptr();
        p.give(a);
        let b = p.take(1000);
        assert_eq!(b.as_ptr(), ptr, "the free buffer was not reused");
        assert!(b.is_empty() && b.capacity() >= 1 << 20);
        p.give(b);
        p.give(vec![0; 10]);
        p.give(vec![0; 10]);
        assert_eq!(p.len(), 2);
        p.clear();
        assert!(p.is_empty());
    }

    /// An object starts on a page boundary, holds what was appended, and
    /// its buffer is pooled again when the last `Bytes` of it goes.
    #[test]
    fn an_object_is_aligned_and_pooled_again_when_dropped() {
        // Tests run in parallel: another test's objects share OBJECTS, so
        // look for this object's own allocation among the free ones.
        let mut o = Object::with_capacity(3 << 20);
        o.extend_from_slice(b"abc");
        o.extend_from_slice(&[7; 5000]);
        let b = o.freeze();
        assert_eq!(b.as_ptr() as usize % ALIGN, 0, "object not aligned");
        assert_eq!(b.len(), 5003);
        assert_eq!(&b[..3], b"abc");
        let base = b.as_ptr() as usize;
        let c = b.clone();
        drop(b);
        let pooled = |base: usize| {
            let free = OBJECTS.free.lock().unwrap();
            free.iter().any(|v| {
                let p = v.as_ptr() as usize;
                (p..=p + ALIGN).contains(&base)
            })
        };
        assert!(!pooled(base), "pooled while a Bytes still holds it");
        drop(c);
        assert!(pooled(base), "not pooled after the last Bytes went");
    }
}
