//! A full journal disk: writes fail with ENOSPC, nothing is lost or half
//! journaled, cdpd keeps serving, and once there is room again it carries on.

use std::path::PathBuf;
use std::process::Command;

use cdp_tests::{require_tool, run, run_ok, Daemon};

/// A small tmpfs mounted over a directory; lazily unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts it, or fails the test saying why it cannot (never a skip: a
    /// full disk is only testable on a small filesystem of its own).
    fn mount(at: &std::path::Path, size: &str) -> Tmpfs {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test mounts a small tmpfs to fill the journal's disk: it needs root \
             (run the suite as root, as scripts/test does in CI)"
        );
        let out = run(Command::new(require_tool("mount"))
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "cdp-test",
            ])
            .arg(at));
        assert!(
            out.status.success(),
            "cannot mount a {size} tmpfs at {} (needs root and the right to mount in \
             this mount namespace; in a container, CAP_SYS_ADMIN): {}",
            at.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_path_buf())
    }

    fn resize(&self, size: &str) {
        run_ok(
            Command::new("mount")
                .args(["-o", &format!("remount,size={size}")])
                .arg(&self.0),
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn qemu_io(d: &Daemon, cmd: &str) -> String {
    let out = run(Command::new(require_tool("qemu-io"))
        .args(["-f", "raw", "-t", "writeback", "-c", cmd])
        .arg(d.uri("vda")));
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn full_journal_fails_writes_cleanly_and_recovers() {
    let mut d = Daemon::builder().disk_random("vda", 32 << 20, 5).prepare();
    let fs = Tmpfs::mount(&d.state_dir, "3M");
    d.start();
    let ok = qemu_io(&d, "write -P 0x11 0 512k");
    assert!(ok.contains("wrote 524288/524288"), "{ok}");
    // Larger than the room left: refused as a whole.
    let full = qemu_io(&d, "write -P 0x22 4M 4M");
    assert!(
        full.contains("No space left on device"),
        "expected ENOSPC, got: {full}"
    );
    d.assert_alive("after ENOSPC");
    let st = d.status_json();
    assert!(st["disks"][0]["errors"].as_u64().unwrap() > 0, "{st}");
    // The refused write did not reach the image.
    let back = qemu_io(&d, "read -P 0x22 4M 4k");
    assert!(back.contains("Pattern verification failed"), "{back}");
    // Room again: the same write goes through, and the journal is whole.
    fs.resize("128M");
    let again = qemu_io(&d, "write -P 0x22 4M 4M");
    assert!(again.contains("wrote 4194304/4194304"), "{again}");
    let back = qemu_io(&d, "read -P 0x22 4M 4M");
    assert!(back.contains("read 4194304/4194304"), "{back}");
    d.term();
    d.check_replay_invariant("vda");
}
