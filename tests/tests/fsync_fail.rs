//! A failed sync (issue 12: "a failed fsync poisons the journal until that
//! resync"; docs/RELIABILITY.md, "A failed sync"). The real cdpd runs under
//! an LD_PRELOAD shim whose `fdatasync`/`fsync` fail once with EIO on the
//! files whose path holds `CDP_FAIL_SYNC_PATH`, when the trigger file exists
//! (the failure is reported once, as Linux reports a writeback error once:
//! the dangerous case, where a later sync succeeds over dropped data).
//! A real NBD client writes and FLUSHes: the FLUSH that saw the failure gets
//! EIO; the later FLUSHes succeed only with what the failed sync may have
//! dropped tracked in the dirty map; cdpd resyncs it (RESYNCED), and the
//! journal replayed equals the image at the end.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use cdp_tests::nbd::Client;
use cdp_tests::{records_of_kind, run_ok, which, Daemon};

const MIB: u64 = 1 << 20;
const EXTENT: u64 = 4 * MIB;

const SHIM: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Fail once, with EIO, a sync of a file whose path holds
   $CDP_FAIL_SYNC_PATH, when $CDP_FAIL_SYNC_TRIGGER exists (consumed). */
static int should_fail(int fd) {
    const char *match = getenv("CDP_FAIL_SYNC_PATH");
    const char *trigger = getenv("CDP_FAIL_SYNC_TRIGGER");
    char link[64], path[4096];
    ssize_t n;
    if (!match || !trigger || access(trigger, F_OK) != 0)
        return 0;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    n = readlink(link, path, sizeof path - 1);
    if (n < 0)
        return 0;
    path[n] = 0;
    if (!strstr(path, match))
        return 0;
    return unlink(trigger) == 0;
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (should_fail(fd)) {
        errno = EIO;
        return -1;
    }
    if (!real)
        real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    return real(fd);
}

int fsync(int fd) {
    static int (*real)(int);
    if (should_fail(fd)) {
        errno = EIO;
        return -1;
    }
    if (!real)
        real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    return real(fd);
}
"#;

/// The shim, built with the system's C compiler.
fn build_shim(d: &Daemon) -> PathBuf {
    let cc = which("cc").expect("a C compiler (cc) to build the fsync shim");
    let src = d.work_dir().join("failsync.c");
    let so = d.work_dir().join("failsync.so");
    std::fs::write(&src, SHIM).unwrap();
    run_ok(
        Command::new(cc)
            .args(["-shared", "-fPIC", "-o"])
            .arg(&so)
            .arg(&src)
            .arg("-ldl"),
    );
    so
}

fn disk_status(d: &Daemon) -> Value {
    d.status_json()["disks"][0].clone()
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("status has no {k}: {v}"))
}

/// cdpd under the shim, failing syncs of files whose path holds `what`,
/// making a checkpoint (syncing the image) every `checkpoint`.
fn start_failing(what: &str, checkpoint: &str) -> (Daemon, PathBuf) {
    // No age sealing: a seal's sync in the background must not take the
    // one failure meant for the FLUSH's sync (1 s by default, easily hit
    // between the trigger and the FLUSH on a loaded machine).
    let mut d = Daemon::builder()
        .disk_random("vda", 64 * MIB, 61)
        .args(["--segment-age", "1h", "--checkpoint-interval", checkpoint])
        .prepare();
    let so = build_shim(&d);
    let trigger = d.work_dir().join("fail-next-sync");
    // Inherited by cdpd (started now) only: removed again at once.
    std::env::set_var("LD_PRELOAD", &so);
    std::env::set_var("CDP_FAIL_SYNC_PATH", what);
    std::env::set_var("CDP_FAIL_SYNC_TRIGGER", &trigger);
    d.start();
    for k in ["LD_PRELOAD", "CDP_FAIL_SYNC_PATH", "CDP_FAIL_SYNC_TRIGGER"] {
        std::env::remove_var(k);
    }
    (d, trigger)
}

/// Write, FLUSH, make the next sync fail, write, FLUSH (EIO when the
/// FLUSH's own sync is the one that fails: `flush_fails`; else the failure
/// is a checkpoint's, which the test waits for), write, FLUSH; then the
/// resync; returns the resync's bytes read.
fn fail_one_sync_then_resync(d: &mut Daemon, trigger: &Path, flush_fails: bool) -> u64 {
    let (mut c, _) = Client::open(&d.socket("vda"), "vda").unwrap();
    assert_eq!(c.write(EXTENT + 4096, &[0x11; 8192], 0).unwrap(), 0);
    assert_eq!(c.flush().unwrap(), 0, "a FLUSH before the failure");

    std::fs::write(trigger, b"").unwrap();
    assert_eq!(c.write(3 * EXTENT, &[0x22; 65536], 0).unwrap(), 0);
    if flush_fails {
        assert_ne!(
            c.flush().unwrap(),
            0,
            "the FLUSH whose sync failed must fail\n{}",
            d.log()
        );
    } else {
        // The journal has what the FLUSH covered: it succeeds.
        assert_eq!(c.flush().unwrap(), 0, "a FLUSH syncs the journal only");
        let t0 = Instant::now();
        while trigger.exists() || u(&disk_status(d), "times_degraded") == 0 {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "no checkpoint failed: {}\n{}",
                disk_status(d),
                d.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert!(!trigger.exists(), "the shim failed a sync");
    let s = disk_status(d);
    // (A fast machine may have resynced already.)
    assert!(
        (s["journal_mode"] != "normal" || u(&s, "resyncs_done") >= 1)
            && u(&s, "times_degraded") >= 1,
        "a failed sync poisons: {s}"
    );
    // Linux reports a writeback error once: this FLUSH's sync succeeds.
    // It may, since what the failed one may have dropped is tracked.
    assert_eq!(c.write(6 * EXTENT, &[0x33; 4096], 0).unwrap(), 0);
    let s = disk_status(d);
    assert!(
        s["journal_mode"] != "normal" || u(&s, "resyncs_done") >= 1,
        "{s}"
    );
    // Tracked: still dirty, being resynced, or resynced already.
    assert!(
        u(&s, "dirty_bytes") > 0 || s["journal_mode"] == "resyncing" || u(&s, "resyncs_done") >= 1,
        "nothing tracked before a FLUSH succeeds: {s}"
    );
    assert_eq!(c.flush().unwrap(), 0, "a FLUSH after the poisoning");

    let t0 = Instant::now();
    let s = loop {
        let s = disk_status(d);
        if s["journal_mode"] == "normal" && u(&s, "resyncs_done") >= 1 {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no resync after the failed sync: {s}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    c.disconnect();
    d.term();
    let recs = d.journal_records();
    assert!(
        records_of_kind(&recs, "GAP")
            .iter()
            .any(|g| g["info"]["resync"] == true),
        "no GAP {{\"resync\": true}}"
    );
    assert_eq!(records_of_kind(&recs, "RESYNCED").len(), 1);
    d.check_replay_invariant("vda");
    u(&s, "resync_bytes_read")
}

/// The image's sync fails, at a checkpoint (every 100 ms here; a FLUSH
/// syncs the journal only): the activity log's extents (1 and 3: a log
/// under its cap keeps every extent) are the honest dirty set.
#[test]
fn a_failed_image_sync_poisons_and_resyncs_the_activity_log_extents() {
    let (mut d, trigger) = start_failing("images/vda.img", "100ms");
    let read = fail_one_sync_then_resync(&mut d, &trigger, false);
    assert!(
        (2 * EXTENT..=2 * EXTENT + MIB).contains(&read),
        "the two extents of the log (and the granule written while degraded): {read}"
    );
}

/// The journal's sync fails: the ranges of the segments not yet sealed are.
#[test]
fn a_failed_journal_sync_poisons_and_resyncs_the_unsealed_ranges() {
    // Checkpoints (which sync the journal too) must not take the failure.
    let (mut d, trigger) = start_failing("/journal/", "1h");
    let read = fail_one_sync_then_resync(&mut d, &trigger, true);
    assert!(read > 0 && read < 2 * EXTENT, "{read}");
}
