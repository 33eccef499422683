#![no_main]
//! Request headers: parse, validate; a valid request never reaches outside the export.
use cdp_core::nbd::proto::{self, Verdict};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < proto::REQUEST_LEN + 8 {
        return;
    }
    let size = u64::from_le_bytes(data[..8].try_into().unwrap());
    if let Ok(r) = proto::parse_request(&data[8..8 + proto::REQUEST_LEN]) {
        assert_eq!(proto::parse_request(&proto::encode_request(&r)).unwrap(), r);
        if proto::validate(&r, size, false) == Verdict::Ok && r.kind != proto::CMD_FLUSH {
            assert!(r.offset.checked_add(r.len as u64).unwrap() <= size);
        }
    }
});
