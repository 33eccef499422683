//! A power loss (issue 12, "Bounded resync after a crash";
//! docs/RELIABILITY.md, "A power loss"): cdpd keeps an activity log per disk
//! (the 4 MiB extents that may hold writes not yet durable, durable before
//! the image is written). The start after a power loss resyncs only those
//! extents (a GAP {"resync": true}, RESYNC records, RESYNCED) instead of
//! taking a new baseline.
//!
//! The power loss is faked: cdpd is SIGKILLed, the open segment's last
//! records are cut off (what the journal lost) and other bytes are written
//! straight into the image inside those extents (what reached the image but
//! not the journal), and the next start is given another boot id.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use cdp_core::journal::LoadedSegment;
use cdp_tests::fixture::{
    cdpctl, config_without_space_floor, qemu_io_ok, restore_from_repo, shipper_once_cmd,
    write_boot_id,
};
use cdp_tests::{records_of_kind, run_ok, Daemon};

const MIB: u64 = 1 << 20;
const EXTENT: u64 = 4 * MIB;

fn disk_status(d: &Daemon) -> Value {
    d.status_json()["disks"][0].clone()
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("status has no {k}: {v}"))
}

/// The newest segment of vda's journal (the one open when cdpd was killed).
fn newest_segment(d: &Daemon) -> PathBuf {
    let dir = cdp_core::layout::StateDir::new(&d.state_dir).journal(&d.vm_uuid, "vda");
    let mut segs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segs.sort();
    segs.pop().expect("a segment")
}

/// Cut the open segment just before its first record at or after
/// `from_seq`: the records the journal "lost". Returns how many WRITEs
/// were cut.
fn cut_tail(seg: &Path, from_seq: u64) -> usize {
    let loaded = LoadedSegment::load(seg).unwrap();
    let recs = &loaded.scan.records;
    let i = recs
        .iter()
        .position(|r| r.header.seq >= from_seq)
        .unwrap_or_else(|| panic!("no record from seq {from_seq} in {}", seg.display()));
    let f = std::fs::OpenOptions::new().write(true).open(seg).unwrap();
    f.set_len(recs[i].pos).unwrap();
    recs[i..]
        .iter()
        .filter(|r| r.header.kind == cdp_core::journal::Kind::Write)
        .count()
}

fn write_image(path: &Path, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
    f.sync_all().unwrap();
}

/// cdpd on a random disk, started on boot "boot-id-1" with `extra` flags,
/// its baseline shipped to a file:// repository. Returns the daemon, the
/// repository, the shipper's config and the boot id file of the start after
/// the power loss.
fn start_on_boot_1(size: u64, seed: u64, extra: &[&str]) -> (Daemon, PathBuf, PathBuf, PathBuf) {
    let mut d = Daemon::builder().disk_random("vda", size, seed).prepare();
    let repo = d.work_dir().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let cfg = config_without_space_floor(&d, &repo);
    let boot1 = write_boot_id(&d, "boot-id-1");
    let boot2 = write_boot_id(&d, "boot-id-2");
    d.extra = vec!["--boot-id-file".into(), boot1.into()];
    d.extra.extend(extra.iter().map(|a| a.into()));
    d.start();
    run_ok(&mut shipper_once_cmd(&d, &cfg));
    (d, repo, cfg, boot2)
}

/// Wait for the start after the power loss to finish its resync; its
/// disk status then.
fn resynced(d: &Daemon) -> Value {
    let t0 = Instant::now();
    loop {
        let s = disk_status(d);
        if s["journal_mode"] == "normal" && u(&s, "resyncs_done") >= 1 {
            return s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no resync after the power loss: {s}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn catalog_gaps(d: &Daemon) -> Vec<String> {
    let conn = rusqlite::Connection::open_with_flags(
        d.catalog_path(),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut stmt = conn.prepare("SELECT reason FROM gaps").unwrap();
    let rows = stmt.query_map([], |r| r.get::<_, String>(0)).unwrap();
    rows.map(|r| r.unwrap()).collect()
}

/// Mark "after", keep a copy of the image as it is then, stop cdpd
/// cleanly; the copy's path.
fn mark_after_and_stop(d: &mut Daemon, cfg: &Path, img: &Path) -> PathBuf {
    cdpctl(d, cfg, &["mark", &d.vm_uuid, "after"]);
    let after = d.work_dir().join("after.img");
    std::fs::copy(img, &after).unwrap();
    d.term();
    after
}

/// Ship, then restore "mark:after" from the repository: it must equal
/// `after`. The restored file's path.
fn restores_at_after(d: &Daemon, cfg: &Path, repo: &Path, after: &Path) -> PathBuf {
    run_ok(&mut shipper_once_cmd(d, cfg));
    let out = d.work_dir().join("restored.img");
    let r = restore_from_repo(d, cfg, repo, "vda", "mark:after", &out);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    cdp_tests::assert_files_equal(&out, after);
    out
}

#[test]
fn a_power_loss_resyncs_only_the_activity_log_extents() {
    let size = 256 * MIB;
    // No age sealing before the power loss: the unflushed writes stay in
    // the segment the test cuts (a seal between them, 1 s by default, is
    // likely on a loaded machine).
    // The baseline is shipped before the power loss.
    let (mut d, repo, cfg, boot2) = start_on_boot_1(size, 51, &["--segment-age", "1h"]);
    let gaps_before = catalog_gaps(&d);

    // Extents 2, 5 and 9 written and flushed; then two more writes in
    // extents 5 and 9, not flushed: their records are what the journal
    // loses.
    let extents = [2u64, 5, 9];
    let mut cmds: Vec<String> = extents
        .iter()
        .map(|e| format!("write -P 0x{:x} {} 64k", 0x40 + e, e * EXTENT + MIB))
        .collect();
    cmds.push("flush".into());
    qemu_io_ok(&d, "vda", &cmds);
    let flushed_seq = d.status_json()["last_seq"].as_u64().unwrap();
    qemu_io_ok(
        &d,
        "vda",
        &[
            format!("write -P 0x77 {} 64k", 5 * EXTENT + 2 * MIB),
            format!("write -P 0x78 {} 64k", 9 * EXTENT + 3 * MIB),
        ],
    );
    d.kill9();

    // The power loss: the journal lost the last two records; the image
    // got other bytes there (what reached the disk of the image).
    let cut = cut_tail(&newest_segment(&d), flushed_seq + 1);
    assert_eq!(
        cut, 2,
        "the two unflushed writes are cut (and qemu-io's FLUSH at exit)"
    );
    let img = d.image("vda");
    write_image(&img, 5 * EXTENT + 2 * MIB, &[0x99; 65536]);
    write_image(&img, 9 * EXTENT + 3 * MIB + 4096, &[0x9a; 4096]);

    d.extra = vec!["--boot-id-file".into(), boot2.into()];
    d.start();
    let s = resynced(&d);
    let read = u(&s, "resync_bytes_read");
    assert_eq!(
        read,
        extents.len() as u64 * EXTENT,
        "only the activity log's extents are read: {s}"
    );
    assert!(read * 10 < size);
    assert_eq!(
        catalog_gaps(&d),
        gaps_before,
        "no catalog gap: no new baseline needed"
    );

    // Written after the resync: a point that must restore.
    qemu_io_ok(
        &d,
        "vda",
        &[format!("write -P 0x55 {} 4k", 100 * MIB), "flush".into()],
    );
    let after = mark_after_and_stop(&mut d, &cfg, &img);

    let recs = d.journal_records();
    let starts = records_of_kind(&recs, "SESSION_START");
    assert_eq!(
        starts.last().unwrap()["info"]["previous_end"],
        "power-loss",
        "{starts:?}"
    );
    let gaps: Vec<&Value> = records_of_kind(&recs, "GAP")
        .into_iter()
        .filter(|g| g["seq"].as_u64().unwrap() > flushed_seq)
        .collect();
    assert_eq!(gaps.len(), 1, "{gaps:#?}");
    let gap = gaps[0];
    assert_eq!(gap["info"]["resync"], true, "{gap}");
    assert!(
        gap["info"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("power loss")),
        "{gap}"
    );
    let gap_seq = gap["seq"].as_u64().unwrap();
    let resynced = records_of_kind(&recs, "RESYNCED");
    assert_eq!(resynced.len(), 1, "{resynced:#?}");
    assert_eq!(resynced[0]["info"]["gap_seq"].as_u64(), Some(gap_seq));
    d.check_replay_invariant("vda");

    // From the repository: after the RESYNCED, the image; inside the
    // window, refused.
    let out = restores_at_after(&d, &cfg, &repo, &after);
    let r = restore_from_repo(&d, &cfg, &repo, "vda", &format!("seq:{gap_seq}"), &out);
    assert!(
        !r.status.success(),
        "a point inside the window restored: {}",
        String::from_utf8_lossy(&r.stdout)
    );
}

fn catalog_segments(d: &Daemon) -> u64 {
    let conn = rusqlite::Connection::open_with_flags(
        d.catalog_path(),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    conn.query_row("SELECT count(*) FROM segments WHERE sealed = 1", [], |r| {
        r.get::<_, i64>(0)
    })
    .unwrap() as u64
}

/// A segment is created on the data path without a sync (issue 13): its
/// header reaches the disk with the first FLUSH or its seal. A power loss
/// before either can leave it under its name with a header of zeros; the
/// next start (another boot) removes it, says so, and the activity log's
/// resync journals what the image holds there: the replay equals the image
/// again, and what was written after the resync restores.
#[test]
fn a_segment_created_after_the_last_flush_and_lost_is_removed_and_resynced() {
    // Segments switch at 1 MiB; no age sealing.
    let (mut d, repo, cfg, boot2) = start_on_boot_1(
        64 * MIB,
        52,
        &["--segment-age", "1h", "--segment-size", "1MiB"],
    );
    qemu_io_ok(
        &d,
        "vda",
        &[format!("write -P 0x42 {} 64k", 2 * EXTENT), "flush".into()],
    );
    // A write past the segment size: that segment is switched out and
    // sealed; the next write goes to a segment created after the FLUSH.
    let sealed = catalog_segments(&d);
    qemu_io_ok(&d, "vda", &[format!("write -P 0x45 {} 1m", 5 * EXTENT)]);
    let t0 = Instant::now();
    while catalog_segments(&d) <= sealed {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no seal\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    qemu_io_ok(&d, "vda", &[format!("write -P 0x49 {} 64k", 9 * EXTENT)]);
    let lost = newest_segment(&d);
    let loaded = LoadedSegment::load(&lost).unwrap();
    assert!(
        loaded
            .scan
            .records
            .iter()
            .any(|r| r.header.offset == 9 * EXTENT),
        "the last write is in the newest segment"
    );
    d.kill9();

    // The power loss: the new segment's header never reached the disk; the
    // image got other bytes in extent 9.
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&lost)
        .unwrap()
        .write_all_at(&[0u8; cdp_core::journal::format::SEGMENT_HEADER_LEN], 0)
        .unwrap();
    let img = d.image("vda");
    write_image(&img, 9 * EXTENT + 4096, &[0x9a; 4096]);

    d.extra = vec!["--boot-id-file".into(), boot2.into()];
    d.start();
    resynced(&d);
    assert!(
        d.log().contains("its header never reached the disk"),
        "the removal is said: {}",
        d.log()
    );
    qemu_io_ok(
        &d,
        "vda",
        &[format!("write -P 0x55 {} 4k", 20 * MIB), "flush".into()],
    );
    let after = mark_after_and_stop(&mut d, &cfg, &img);

    let recs = d.journal_records();
    let starts = records_of_kind(&recs, "SESSION_START");
    assert_eq!(starts.last().unwrap()["info"]["previous_end"], "power-loss");
    assert_eq!(records_of_kind(&recs, "RESYNCED").len(), 1);
    d.check_replay_invariant("vda");
    restores_at_after(&d, &cfg, &repo, &after);
}

/// The highest last seq among vda's sealed segments in the catalog, and
/// whether the segment that holds `seq` is still local (not trimmed).
fn sealed_upto(d: &Daemon, seq: u64) -> (u64, bool) {
    let conn = rusqlite::Connection::open_with_flags(
        d.catalog_path(),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let last = conn
        .query_row(
            "SELECT coalesce(max(last_seq), 0) FROM segments WHERE disk = 'vda' AND sealed = 1",
            [],
            |r| r.get::<_, i64>(0),
        )
        .unwrap() as u64;
    let local = conn
        .query_row(
            "SELECT coalesce(max(local), 0) FROM segments
             WHERE disk = 'vda' AND first_seq <= ?1 AND last_seq >= ?1",
            [seq as i64],
            |r| r.get::<_, i64>(0),
        )
        .unwrap();
    (last, local == 1)
}

/// A FLUSH makes the journal durable, not the image (issue 13: the image is
/// made durable by a checkpoint, every 30 s). A flushed write whose segment
/// is sealed and shipped is not trimmed before a checkpoint covers it, and
/// after a power loss that lost it from the image, recovery redoes it from
/// that sealed segment: the guest keeps what it flushed, and the replay
/// equals the image.
#[test]
fn a_flushed_write_the_image_lost_is_redone_from_its_sealed_segment() {
    let (mut d, repo, cfg, boot2) = start_on_boot_1(64 * MIB, 53, &["--segment-age", "50ms"]);
    let at = 6 * EXTENT + 8192;
    qemu_io_ok(
        &d,
        "vda",
        &[format!("write -P 0x61 {at} 64k"), "flush".into()],
    );
    let flushed = d.status_json()["last_seq"].as_u64().unwrap();
    let t0 = Instant::now();
    while sealed_upto(&d, flushed).0 < flushed {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "not sealed\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Shipped, but kept: no checkpoint covers it yet.
    run_ok(&mut shipper_once_cmd(&d, &cfg));
    assert!(
        sealed_upto(&d, flushed).1,
        "a segment past the checkpoint was trimmed"
    );
    d.kill9();

    // The power loss: the image's pages never reached the disk.
    let img = d.image("vda");
    write_image(&img, at, &[0x13; 65536]);

    d.extra = vec!["--boot-id-file".into(), boot2.into()];
    d.start();
    resynced(&d);
    let mut got = vec![0u8; 65536];
    use std::os::unix::fs::FileExt;
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut got, at)
        .unwrap();
    assert!(got.iter().all(|&b| b == 0x61), "the flushed write is lost");
    let after = mark_after_and_stop(&mut d, &cfg, &img);
    let recs = d.journal_records();
    let starts = records_of_kind(&recs, "SESSION_START");
    let start = &starts.last().unwrap()["info"];
    assert_eq!(start["previous_end"], "power-loss");
    assert!(start["redone_records"].as_u64() >= Some(1), "{start}");
    // The history agrees (the first segments are trimmed: the repository
    // is where it is whole).
    restores_at_after(&d, &cfg, &repo, &after);
}
