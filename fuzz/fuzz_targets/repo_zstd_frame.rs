#![no_main]
//! zstd frames from the repository (chunks, segment frames): decompressing
//! arbitrary bytes never panics and never yields more than the bound, what
//! the frame declares or expands to.
use cdp_repo::format as rf;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(out) = rf::decompress_bounded("k", data, 1 << 16) {
        assert!(out.len() <= 1 << 16);
    }
    if let Ok(out) = rf::decompress_segment("k", data, 1) {
        assert!(out.len() <= rf::FRAME_RAW);
    }
    let _ = rf::decompress_chunk(&"ab".repeat(32), data, 4096);
});
