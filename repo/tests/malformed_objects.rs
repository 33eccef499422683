//! Every parser of repository objects takes any bytes without a panic:
//! random bytes, and valid objects with bytes changed (for the index, with
//! its checksum recomputed, so the mutation reaches the checks behind it).
//! What a parser accepts is consistent enough for readers to index with
//! (issue 11, item 9). The fuzz targets in fuzz/ run the same parsers longer.

use cdp_core::journal::format::{IndexEntry, Kind};
use cdp_repo::format as rf;
use proptest::prelude::*;

fn valid_index() -> Vec<u8> {
    static INDEX: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    INDEX.get_or_init(make_index).clone()
}

fn make_index() -> Vec<u8> {
    let raw: Vec<u8> = (0..3 * rf::FRAME_RAW / 2).map(|i| (i / 7) as u8).collect();
    let (obj, frames) = rf::compress_segment(&raw).unwrap();
    rf::SegmentIndex {
        meta: rf::IndexMeta {
            vm_uuid: "u".into(),
            disk: "vda".into(),
            first_seq: 1,
            last_seq: 2,
            record_base: 0,
            records: 2,
            first_ts_ns: 1,
            last_ts_ns: 2,
            raw_size: raw.len() as u64,
            object_size: obj.len() as u64,
            object_blake3: blake3::hash(&obj).to_hex().to_string(),
            prev: None,
        },
        frames,
        entries: (1..=2)
            .map(|i| IndexEntry {
                seq: i,
                ts_ns: i,
                offset: 4096 * i,
                length: 4096,
                payload_pos: 112 + 8192 * i,
                kind: Kind::Write,
                flags: 0,
            })
            .collect(),
    }
    .encode()
}

fn valid_baseline() -> Vec<u8> {
    serde_json::to_vec(&rf::Baseline {
        vm_uuid: "u".into(),
        disk: "vda".into(),
        size: 3 * rf::CHUNK_SIZE - 5,
        chunk_size: rf::CHUNK_SIZE,
        s0: 1,
        s1: 2,
        started_ns: 1,
        finished_ns: 2,
        chunks: vec![Some("ab".repeat(32)), None, Some("0f".repeat(32))],
    })
    .unwrap()
}

const MANIFEST: &str = r#"{"vm_uuid":"u","written_ns":5,"now_ns":5,"any_point_ns":1,
"thin":[[1,2]],"window":{"seq":3,"ts_ns":4},"points":[{"seq":1,"ts_ns":1,"marks":["m"]}],
"disks":[{"disk":"vda","journal_from_seq":1,"from_ts_ns":1,"record_base":0}]}"#;
const VM_JSON: &str =
    r#"{"uuid":"u","name":"n","disks":[{"name":"vda","size":1048576,"source_path":"/x"}]}"#;
const LEASE: &str =
    r#"{"holder":"cdpctl restore","host":"h","pid":1,"created_ns":1,"expires_ns":2}"#;

/// Every parser, on `b`; none may panic. What is accepted is checked.
fn parse_all(b: &[u8]) {
    if let Ok(i) = rf::SegmentIndex::decode("k.idx", b) {
        // Readers index frames and entries with these.
        assert!(i.meta.raw_size <= rf::MAX_SEGMENT_RAW);
        for e in &i.entries {
            assert!(e.payload_pos <= i.meta.raw_size);
        }
    }
    if let Ok(bl) = rf::Baseline::decode("k.json", b) {
        assert!(bl.chunk_size > 0 && bl.chunk_size <= rf::CHUNK_SIZE);
        assert_eq!(bl.chunks.len() as u64, bl.size.div_ceil(bl.chunk_size));
        for h in bl.chunks.iter().flatten() {
            assert!(rf::is_chunk_hash(h));
            let _ = rf::chunk_key(h);
        }
    }
    let _ = rf::RetentionManifest::decode("k.json", b);
    let _ = rf::VmJson::decode("vm.json", b);
    let _ = rf::Lease::decode("l.json", b);
    let _ = rf::check_format_marker(b);
    if let Ok(out) = rf::decompress_bounded("k", b, 4096) {
        assert!(out.len() <= 4096);
    }
    let _ = rf::decompress_segment("k", b, 1);
    let _ = rf::decompress_chunk(&"ab".repeat(32), b, 1 << 20);
    // A chunk key from any string does not panic either.
    let _ = rf::chunk_key(&String::from_utf8_lossy(b));
}

/// `b` with the bytes at `edits` replaced, and (for an index) its checksum
/// recomputed.
fn mutate(mut b: Vec<u8>, edits: &[(usize, u8)], fix_crc: bool) -> Vec<u8> {
    for &(at, v) in edits {
        let n = b.len();
        if n > 0 {
            b[at % n] = v;
        }
    }
    if fix_crc && b.len() >= 4 {
        let n = b.len() - 4;
        let crc = crc32fast::hash(&b[..n]);
        b[n..].copy_from_slice(&crc.to_le_bytes());
    }
    b
}

#[test]
fn the_valid_objects_parse() {
    rf::SegmentIndex::decode("k.idx", &valid_index()).unwrap();
    rf::Baseline::decode("k.json", &valid_baseline()).unwrap();
    rf::RetentionManifest::decode("k.json", MANIFEST.as_bytes()).unwrap();
    rf::VmJson::decode("vm.json", VM_JSON.as_bytes()).unwrap();
    rf::Lease::decode("l.json", LEASE.as_bytes()).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..2048)) {
        parse_all(&b);
        let mut magic = rf::IDX_MAGIC.to_vec();
        magic.extend_from_slice(&b);
        parse_all(&mutate(magic, &[], true));
    }

    #[test]
    fn mutated_indexes_never_panic(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        cut in any::<usize>(),
    ) {
        let v = valid_index();
        parse_all(&mutate(v.clone(), &edits, true));
        parse_all(&mutate(v.clone(), &edits, false));
        let n = cut % v.len();
        parse_all(&v[..n]);
        parse_all(&mutate(v[..n].to_vec(), &[], true));
    }

    #[test]
    fn mutated_json_objects_never_panic(
        which in 0usize..4,
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        cut in any::<usize>(),
    ) {
        let v = match which {
            0 => valid_baseline(),
            1 => MANIFEST.as_bytes().to_vec(),
            2 => VM_JSON.as_bytes().to_vec(),
            _ => LEASE.as_bytes().to_vec(),
        };
        parse_all(&mutate(v.clone(), &edits, false));
        parse_all(&v[..cut % v.len()]);
    }

    #[test]
    fn mutated_zstd_frames_never_panic(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        len in 0usize..20_000,
    ) {
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let c = rf::compress_chunk(&data).unwrap();
        parse_all(&mutate(c, &edits, false));
    }
}
