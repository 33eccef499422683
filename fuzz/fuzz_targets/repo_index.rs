#![no_main]
//! Repository segment indexes (`.idx`): decoding arbitrary bytes never
//! panics, and an index it accepts is consistent enough for readers to index
//! with (frames of FRAME_RAW bytes inside the object, payloads inside the raw
//! segment).
use cdp_repo::format::{self as rf, SegmentIndex};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Half the inputs get the magic and a valid checksum, so the parser
    // behind the CRC is reached.
    let mut fixed;
    let bytes = if data.first().is_some_and(|b| b & 1 == 1) {
        fixed = rf::IDX_MAGIC.to_vec();
        fixed.extend_from_slice(&data[1..]);
        let crc = crc32fast::hash(&fixed);
        fixed.extend_from_slice(&crc.to_le_bytes());
        &fixed[..]
    } else {
        data
    };
    if let Ok(i) = SegmentIndex::decode("k.idx", bytes) {
        let m = &i.meta;
        assert!(m.raw_size <= rf::MAX_SEGMENT_RAW);
        assert_eq!(i.frames.len() as u64, m.raw_size.div_ceil(rf::FRAME_RAW as u64));
        for (k, f) in i.frames.iter().enumerate() {
            assert_eq!(f.raw_offset, k as u64 * rf::FRAME_RAW as u64);
            assert!(f.object_offset < m.object_size);
        }
        for e in &i.entries {
            assert!(e.payload_pos <= m.raw_size);
        }
        assert_eq!(SegmentIndex::decode("k.idx", &i.encode()).unwrap(), i);
    }
});
