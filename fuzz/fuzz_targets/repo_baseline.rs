#![no_main]
//! Baseline JSON: decoding arbitrary bytes never panics, and a baseline it
//! accepts covers its size in chunks of at most CHUNK_SIZE, each named by a
//! hash (restore and export index chunks with these values).
use cdp_repo::format::{self as rf, Baseline};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(b) = Baseline::decode("k.json", data) {
        assert!(b.chunk_size > 0 && b.chunk_size <= rf::CHUNK_SIZE);
        assert!(b.size <= rf::MAX_DISK_SIZE);
        assert_eq!(b.chunks.len() as u64, b.size.div_ceil(b.chunk_size));
        for h in b.chunks.iter().flatten() {
            assert!(rf::is_chunk_hash(h));
            assert!(rf::chunk_key(h).starts_with(rf::CHUNKS_PREFIX));
        }
    }
});
