#![no_main]
//! Handshake option headers and NBD_OPT_INFO/GO payloads.
use cdp_core::nbd::proto;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() >= 16 {
        let h: [u8; 16] = data[..16].try_into().unwrap();
        if let Ok(o) = proto::parse_option_header(&h) {
            assert!(o.len <= proto::MAX_OPTION_LEN);
        }
    }
    if let Some(r) = proto::parse_info_request(data) {
        assert!(r.name.len() <= proto::MAX_NAME_LEN);
    }
    let _ = proto::parse_client_flags(u32::from_be_bytes([
        *data.first().unwrap_or(&0),
        *data.get(1).unwrap_or(&0),
        *data.get(2).unwrap_or(&0),
        *data.get(3).unwrap_or(&0),
    ]));
});
