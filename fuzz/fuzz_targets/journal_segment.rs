#![no_main]
//! Journal segments: scanning arbitrary bytes never panics, and every record
//! it accepts lies inside the segment with a matching checksum.
use cdp_core::journal::format::{self, SegmentHeader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Half the inputs get a valid header so the record parser is reached.
    let mut seg;
    let bytes = if data.first().is_some_and(|b| b & 1 == 1) {
        seg = SegmentHeader { vm_uuid: [0; 16], first_seq: 1, record_base: 0, created_ns: 0 }
            .encode()
            .to_vec();
        seg.extend_from_slice(&data[1..]);
        &seg[..]
    } else {
        data
    };
    if let Ok(scan) = format::scan_segment(bytes) {
        for r in &scan.records {
            let p = r.payload(bytes);
            let hb = &bytes[r.pos as usize..r.pos as usize + format::RECORD_HEADER_LEN];
            r.header.verify(hb, p).unwrap();
        }
    }
    let _ = format::read_index(bytes);
});
