//! SIGKILL cdpd again and again under a writing client (the short CI version of
//! `benches/kill.sh`): after every kill, the recovered cdpd serves every
//! acknowledged-and-flushed write (and every acknowledged one), and the whole journal
//! replayed onto the initial image equals the image. Both run the same program,
//! `kill-cycles` (tests/src/bin/kill-cycles.rs), so the bench and the test cannot drift.

use std::process::Command;

use cdp_tests::{bin_dir, run};
use serde_json::Value;

/// Runs `kill-cycles` with `env`; returns its exit success and its JSON summary.
fn kill_cycles(env: &[(&str, &str)]) -> (bool, Value, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kill-cycles"));
    cmd.env("CDP_BIN_DIR", bin_dir());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = run(&mut cmd);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let summary: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!("kill-cycles printed no JSON summary ({e}):\n{stdout}\n--- stderr ---\n{stderr}")
    });
    (out.status.success(), summary, stderr)
}

#[test]
fn ten_sigkills_under_writes_lose_nothing_flushed_and_replay_equals_the_image() {
    let (ok, s, stderr) = kill_cycles(&[("CYCLES", "10"), ("ROTATE", "4")]);
    eprintln!("{s}");
    assert!(
        ok && s["failures"] == 0,
        "kill cycles failed: {s}\n{stderr}"
    );
    assert_eq!(s["cycles"], 10, "{s}");
    assert_eq!(s["not_killed_by_sigkill"], 0, "{s}");
    assert_eq!(s["guest_io_errors"], 0, "{s}");
    // The run did what it claims: writes and FLUSHes were acknowledged before each kill,
    // and the journal was rotated (three epochs: cycles 1-4, 5-8, 9-10).
    assert!(s["writes_acknowledged"].as_u64().unwrap() >= 10 * 50, "{s}");
    assert!(s["flushes_acknowledged"].as_u64().unwrap() >= 10, "{s}");
    assert_eq!(s["epochs"], 3, "{s}");
    assert!(s["recovery_ms_mean"].as_f64().unwrap() > 0.0, "{s}");
}

/// The checker can fail: a flushed block put back to its original bytes behind cdpd's
/// back (after the recovery, before the check) is reported as a lost flushed write and
/// as a replay mismatch, and the run exits non-zero.
#[test]
fn the_checker_reports_a_lost_flushed_write() {
    let (ok, s, stderr) = kill_cycles(&[
        ("CYCLES", "2"),
        ("CORRUPT_AT", "1"),
        // Enough acknowledgements before the first kill that FLUSHes have completed.
        ("KILL_MIN", "400"),
    ]);
    assert!(
        !ok,
        "kill-cycles exited 0 with a corrupted block: {s}\n{stderr}"
    );
    assert!(s["failures"].as_u64().unwrap() >= 1, "{s}");
    assert!(
        s["lost_flushed_writes"].as_u64().unwrap() >= 1,
        "{s}\n{stderr}"
    );
    assert!(
        s["replay_mismatches"].as_u64().unwrap() >= 1,
        "{s}\n{stderr}"
    );
    assert!(stderr.contains("lost flushed write"), "{stderr}");
}
