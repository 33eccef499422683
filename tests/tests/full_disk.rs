//! A full journal disk: the guest's writes still succeed (cdpd runs
//! degraded: they reach the image, their ranges the dirty map), nothing is
//! half journaled, cdpd keeps serving, and once there is room again it
//! journals those ranges again and carries on (docs/RELIABILITY.md, "A full
//! journal"; more in tests/tests/degraded.rs).

use std::process::Command;
use std::time::{Duration, Instant};

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
fn a_full_journal_never_fails_the_guest_and_recovers() {
    let mut d = Daemon::builder().disk_random("vda", 32 << 20, 5).prepare();
    let fs = Tmpfs::mount(&d.state_dir, "3M");
    d.start();
    let ok = qemu_io(&d, "write -P 0x11 0 512k");
    assert!(ok.contains("wrote 524288/524288"), "{ok}");
    // Larger than the room left: taken all the same (degraded).
    let full = qemu_io(&d, "write -P 0x22 4M 4M");
    assert!(
        full.contains("wrote 4194304/4194304") && !full.contains("No space left"),
        "a full journal failed the guest's write: {full}"
    );
    d.assert_alive("with a full journal");
    let st = d.status_json();
    let disk = &st["disks"][0];
    assert_eq!(disk["journal_mode"], "degraded", "{st}");
    assert_eq!(disk["errors"].as_u64(), Some(0), "{st}");
    assert!(disk["dirty_bytes"].as_u64().unwrap() >= 4 << 20, "{st}");
    // The write reached the image.
    let back = qemu_io(&d, "read -P 0x22 4M 4M");
    assert!(back.contains("read 4194304/4194304"), "{back}");
    assert!(!back.contains("Pattern verification failed"), "{back}");
    // Room again: cdpd journals the dirty ranges by itself, and the journal
    // replayed equals the image.
    fs.resize("128M");
    let t0 = Instant::now();
    loop {
        let st = d.status_json();
        let disk = &st["disks"][0];
        if disk["journal_mode"] == "normal" && disk["resyncs_done"].as_u64() == Some(1) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "{st}\n{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let again = qemu_io(&d, "write -P 0x33 4M 4M");
    assert!(again.contains("wrote 4194304/4194304"), "{again}");
    d.term();
    d.check_replay_invariant("vda");
}
