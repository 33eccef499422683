#![no_main]
//! `vm.json`, leases and the FORMAT marker: decoding arbitrary bytes never
//! panics.
use cdp_repo::format::{self as rf, Lease, VmJson};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = VmJson::decode("vm.json", data);
    let _ = Lease::decode("l.json", data);
    let _ = rf::check_format_marker(data);
});
