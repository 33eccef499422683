//! Journal recovery and integrity: a torn tail after a crash is cut off and the journal
//! recovers; a corrupt sealed segment is reported, never skipped; the age limit seals
//! segments while cdpd runs (it bounds the RPO).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use cdp_tests::nbd::*;
use cdp_tests::*;

const BLOCK: u64 = 4096;

fn block(i: u64) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK as usize];
    fill_pseudo_random(0xb10c_0000 + i, &mut v);
    v
}

/// The segment files of one disk, in name (= replay) order.
fn segments(d: &Daemon, disk: &str) -> Vec<PathBuf> {
    let dir = d
        .state_dir
        .join("vms")
        .join(&d.vm_uuid)
        .join(disk)
        .join("journal");
    let mut v: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    v.sort();
    v
}

fn write_blocks(d: &Daemon, range: std::ops::Range<u64>) {
    let (mut c, _) = Client::open(&d.socket("vda"), "vda").unwrap();
    for i in range {
        assert_eq!(c.write(i * BLOCK, &block(i), 0).unwrap(), 0);
    }
    c.disconnect();
}

#[test]
fn torn_tail_after_crash_is_cut_and_journal_recovers() {
    let mut d = Daemon::builder().disk_random("vda", 8 << 20, 51).start();
    write_blocks(&d, 0..100);
    d.kill9();

    // A crash in the middle of an append: a record header that promises a 4 KiB payload,
    // followed by only part of it. (The CRC cannot match.)
    let open = segments(&d, "vda").pop().expect("no segment");
    let mut torn = Vec::new();
    torn.extend_from_slice(&0x5250_4443u32.to_le_bytes()); // "CDPR"
    torn.push(1); // WRITE
    torn.push(0);
    torn.extend_from_slice(&0u16.to_le_bytes());
    torn.extend_from_slice(&1_000_000u64.to_le_bytes()); // seq
    torn.extend_from_slice(&0u64.to_le_bytes()); // ts
    torn.extend_from_slice(&(200 * BLOCK).to_le_bytes()); // offset
    torn.extend_from_slice(&BLOCK.to_le_bytes()); // length
    torn.extend_from_slice(&(BLOCK as u32).to_le_bytes()); // payload length
    torn.extend_from_slice(&0xdead_beefu32.to_le_bytes()); // crc
    torn.extend_from_slice(&[0xee; 1000]); // a quarter of the payload
    OpenOptions::new()
        .append(true)
        .open(&open)
        .unwrap()
        .write_all(&torn)
        .unwrap();

    d.start();
    d.assert_alive("after recovering a torn tail");
    // The recovered disk has every completed write, and takes new ones.
    {
        let (mut c, _) = Client::open(&d.socket("vda"), "vda").unwrap();
        for i in 0..100 {
            assert!(
                c.read(i * BLOCK, BLOCK as u32).unwrap().unwrap() == block(i),
                "block {i} lost in recovery"
            );
        }
        assert_eq!(c.write(200 * BLOCK, &block(200), 0).unwrap(), 0);
        c.disconnect();
    }
    d.term();

    let records = d.journal_records();
    assert!(
        !records.iter().any(|r| r["seq"] == 1_000_000),
        "the torn record was kept"
    );
    let ends: Vec<_> = records_of_kind(&records, "SESSION_START")
        .iter()
        .map(|r| r["info"]["previous_end"].clone())
        .collect();
    assert_eq!(
        ends.last().and_then(|v| v.as_str()),
        Some("crash"),
        "{ends:?}"
    );
    d.check_replay_invariant("vda");
    // cdpd reports how much it cut (an optional field of SESSION_START's info).
    let last_start = records_of_kind(&records, "SESSION_START")
        .into_iter()
        .max_by_key(|r| r["seq"].as_u64())
        .unwrap();
    if let Some(cut) = last_start["info"]["torn_bytes"].as_u64() {
        assert_eq!(cut, torn.len() as u64, "torn_bytes: {last_start}");
    }
}

#[test]
fn corrupt_sealed_segment_is_reported_not_skipped() {
    let mut d = Daemon::builder().disk_random("vda", 8 << 20, 52).start();
    write_blocks(&d, 0..64);
    d.term();
    let segs = segments(&d, "vda");
    let seg = &segs[0];
    // Flip one byte in the middle of the payload of a WRITE record (well past the
    // 64-byte header and the SESSION_START record, well before the seal).
    let f = OpenOptions::new().read(true).write(true).open(seg).unwrap();
    let len = f.metadata().unwrap().len();
    assert!(
        len > 64 * BLOCK,
        "segment {} is only {len} bytes",
        seg.display()
    );
    let at = 32 * BLOCK;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
    drop(f);

    let copy = d.work_dir().join("copy.img");
    copy_sparse(&d.disk("vda").initial, &copy);
    let out = d.cdpctl([
        "journal",
        "replay",
        "--vm-uuid",
        &d.vm_uuid,
        "--disk",
        "vda",
        "--onto",
        copy.to_str().unwrap(),
        "--state-dir",
        d.state_dir.to_str().unwrap(),
    ]);
    assert!(
        !out.status.success(),
        "journal replay succeeded over a corrupt sealed segment:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        !out.stderr.is_empty(),
        "journal replay failed without saying why"
    );
}

#[test]
fn segment_age_seals_while_running() {
    let mut d = Daemon::builder()
        .disk("vda", 4 << 20)
        .args(["--segment-age", "200ms"])
        .start();
    write_blocks(&d, 0..4);
    let status = d.status_json();
    let last_seq = status["disks"][0]["last_seq"].as_u64().unwrap();

    // The catalog shows a sealed segment covering that write, with cdpd
    // running (nothing but the age seals it; the bound is for a hung cdpd).
    let db = d.catalog_path();
    let what = format!("a segment sealed by --segment-age 200ms covering seq {last_seq}");
    cdp_tests::guest::wait_until(&what, 60, || {
        let conn =
            rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .unwrap();
        let sealed: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM segments WHERE disk = 'vda' AND sealed != 0 AND last_seq >= ?1",
                [last_seq as i64],
                |r| r.get(0),
            )
            .unwrap();
        sealed > 0
    });
    d.assert_alive("after an age seal");
    // Writing goes on in a new segment.
    write_blocks(&d, 4..8);
    d.term();
    assert!(segments(&d, "vda").len() >= 2);
    d.check_replay_invariant("vda");
}
