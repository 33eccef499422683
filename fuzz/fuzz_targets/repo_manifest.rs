#![no_main]
//! Retention manifests: decoding arbitrary bytes never panics, and what
//! decodes answers `disk()` without a panic.
use cdp_repo::format::RetentionManifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = RetentionManifest::decode("k.json", data) {
        for d in &m.disks {
            assert!(m.disk(&d.disk).is_some());
        }
    }
});
