//! The tiny test guest (scripts/build-guest) and waiting on what it prints.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The workspace root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Build (or reuse) the tiny guest: (vmlinuz, initramfs.gz).
pub fn build() -> (PathBuf, PathBuf) {
    let out = repo_root().join("target/guest");
    crate::run_ok(
        Command::new("bash")
            .arg(repo_root().join("scripts/build-guest"))
            .arg(&out),
    );
    (out.join("vmlinuz"), out.join("initramfs.gz"))
}

/// Poll `f` every 50 ms until it holds; fail the test after `secs`.
pub fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The guest's markers in a serial log file, stamped with the host time at
/// which each was first seen, until a line starting with `until` appears.
/// `seen` carries markers across calls.
pub fn follow_markers(log: &Path, until: &str, secs: u64, seen: &mut Vec<(u64, String)>) -> String {
    let mut text = String::new();
    wait_until(&format!("{until:?} in {}", log.display()), secs, || {
        text = std::fs::read_to_string(log)
            .unwrap_or_default()
            .replace('\r', "");
        for l in text.lines() {
            assert!(!l.contains("CDP-ERROR"), "guest: {l}");
            if let Some(rest) = l.strip_prefix("CDP-MARKER ") {
                let k: u64 = rest.split_whitespace().next().unwrap().parse().unwrap();
                if !seen.iter().any(|(s, _)| *s == k) {
                    seen.push((
                        k,
                        humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string(),
                    ));
                }
            }
        }
        text.lines().any(|l| l.starts_with(until))
    });
    text
}
