//! The journal directory is the source of truth (issue 12, item 4): a sealed
//! segment whose catalog row is missing (its insert failed when it was
//! sealed: the catalog locked or full) is never left out of the repository.
//! cdpd's start (and the agent's adoption, which runs the same session
//! recovery) records every sealed segment on disk the catalog lacks.

use cdp_tests::fixture::{config, phase, qemu_io, shipper_once_cmd};
use cdp_tests::{run_ok, Daemon};

const MIB: u64 = 1 << 20;

fn catalog_firsts(d: &Daemon) -> Vec<i64> {
    let c = rusqlite::Connection::open(d.catalog_path()).unwrap();
    let mut st = c
        .prepare("SELECT first_seq FROM segments WHERE disk = 'vda' ORDER BY first_seq")
        .unwrap();
    let v = st
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<Vec<i64>, _>>()
        .unwrap();
    v
}

#[test]
fn a_sealed_segment_missing_from_the_catalog_is_recorded_and_shipped() {
    let mut d = Daemon::builder()
        .disk_random("vda", 8 * MIB, 61)
        .args(["--segment-age", "20ms"])
        .start();
    let repo = d.work_dir().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let cfg = config(&d, &repo);
    // A baseline before the writes: the restore below needs every segment.
    cdp_tests::fixture::cdpctl(&d, &cfg, &["baseline", &d.vm_uuid]);
    for i in 0..3 {
        qemu_io(&d, "vda", &phase(i));
    }
    d.term();
    let before = catalog_firsts(&d);
    assert!(before.len() >= 2, "{before:?}");
    // The row of a sealed segment in the middle is gone, as if its insert
    // had failed while cdpd ran.
    let lost = before[1];
    let c = rusqlite::Connection::open(d.catalog_path()).unwrap();
    c.execute("DELETE FROM segments WHERE first_seq = ?1", [lost])
        .unwrap();
    drop(c);
    assert!(!catalog_firsts(&d).contains(&lost));

    // The next start records it again, from the file.
    d.start();
    d.term();
    let after = catalog_firsts(&d);
    assert!(after.contains(&lost), "{after:?}");

    // And it is shipped: the repository alone gives the image back.
    run_ok(&mut shipper_once_cmd(&d, &cfg));
    let journal = repo.join("cdp/v1/vms").join(&d.vm_uuid).join("vda/journal");
    let shipped = std::fs::read_dir(&journal)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .any(|n| n.starts_with(&format!("{lost:020}-")) && n.ends_with(".seg.zst"));
    assert!(shipped, "segment {lost} is not in {}", journal.display());
    cdp_tests::fixture::assert_repo_restores_image(&d, &cfg, &repo, "vda");
}

/// While cdpd runs: a catalog locked past its busy timeout when a segment is
/// sealed (another process holding a write lock) loses nothing; cdpd records
/// the segment once the lock is gone, without a restart, and says so.
#[test]
fn a_failed_insert_is_retried_while_cdpd_runs() {
    let mut d = Daemon::builder()
        .disk_random("vda", 8 * MIB, 62)
        .args(["--segment-age", "20ms"])
        .start();
    let repo = d.work_dir().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let cfg = config(&d, &repo);
    cdp_tests::fixture::cdpctl(&d, &cfg, &["baseline", &d.vm_uuid]);
    let before = catalog_firsts(&d);
    let mut lock = rusqlite::Connection::open(d.catalog_path()).unwrap();
    let tx = lock
        .transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)
        .unwrap();
    qemu_io(&d, "vda", &phase(1));
    // cdpd's insert waits out its busy timeout, fails, and says it will retry.
    cdp_tests::guest::wait_until("cdpd reports the failed insert", 60, || {
        d.log().contains("(will retry)")
    });
    tx.rollback().unwrap();
    drop(lock);
    cdp_tests::guest::wait_until("cdpd records the segment again", 60, || {
        d.log()
            .contains("every sealed segment is recorded in the catalog again")
    });
    let after = catalog_firsts(&d);
    assert!(after.len() > before.len(), "{before:?} → {after:?}");
    d.term();
    run_ok(&mut shipper_once_cmd(&d, &cfg));
    cdp_tests::fixture::assert_repo_restores_image(&d, &cfg, &repo, "vda");
}
