//! A full journal disk: writes fail with ENOSPC, nothing is lost or half
//! journaled, cdpd keeps serving, and once there is room again it carries on.

use std::process::Command;

use cdp_tests::fixture::Tmpfs;
use cdp_tests::{require_tool, run, Daemon};

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
