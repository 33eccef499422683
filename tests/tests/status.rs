//! `cdpctl status` (the control socket) and the run directory: counters per disk,
//! socket permissions, and the catalog.

use std::os::unix::fs::PermissionsExt;

use cdp_tests::nbd::*;
use cdp_tests::*;
use serde_json::Value;

fn disk_status<'a>(status: &'a Value, disk: &str) -> &'a Value {
    status["disks"]
        .as_array()
        .unwrap_or_else(|| panic!("status has no disks array: {status:#}"))
        .iter()
        .find(|d| d["disk"] == disk)
        .unwrap_or_else(|| panic!("status has no disk {disk}: {status:#}"))
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("status field {key} missing or not a number: {v:#}"))
}

#[test]
fn status_counts_requests_per_disk() {
    let mut d = Daemon::builder()
        .vm_name("status-vm")
        .disk("vda", 16 << 20)
        .disk("vdb", 8 << 20)
        .start();
    let s0 = d.status_json();
    assert_eq!(s0["vm_uuid"], d.vm_uuid.as_str(), "{s0:#}");
    assert_eq!(s0["vm_name"], "status-vm", "{s0:#}");
    assert_eq!(s0["pid"], d.pid(), "{s0:#}");
    let a0 = disk_status(&s0, "vda").clone();
    assert_eq!(a0["path"], d.image("vda").to_str().unwrap(), "{s0:#}");
    assert_eq!(u(&a0, "size"), 16 << 20);
    assert_eq!(u(disk_status(&s0, "vdb"), "size"), 8 << 20);
    for key in [
        "bytes_written",
        "write_requests",
        "bytes_read",
        "read_requests",
        "last_seq",
        "in_flight",
        "journal_bytes",
        "connections",
    ] {
        u(&a0, key);
    }
    assert!(a0.get("open_segment").is_some(), "no open_segment: {a0:#}");

    // 10 writes of 4 KiB and 3 reads of 8 KiB on vda; nothing on vdb.
    let (mut c, _) = Client::open(&d.socket("vda"), "vda").unwrap();
    for i in 0..10u64 {
        assert_eq!(c.write(i * 4096, &[i as u8; 4096], 0).unwrap(), 0);
    }
    for i in 0..3u64 {
        c.read(i * 8192, 8192).unwrap().unwrap();
    }
    let s1 = d.status_json();
    let a1 = disk_status(&s1, "vda");
    let b1 = disk_status(&s1, "vdb");
    assert_eq!(
        u(a1, "bytes_written") - u(&a0, "bytes_written"),
        40960,
        "{s1:#}"
    );
    assert_eq!(
        u(a1, "write_requests") - u(&a0, "write_requests"),
        10,
        "{s1:#}"
    );
    assert_eq!(u(a1, "bytes_read") - u(&a0, "bytes_read"), 24576, "{s1:#}");
    assert_eq!(
        u(a1, "read_requests") - u(&a0, "read_requests"),
        3,
        "{s1:#}"
    );
    assert!(u(a1, "last_seq") >= u(&a0, "last_seq") + 10, "{s1:#}");
    assert!(
        u(a1, "journal_bytes") >= u(&a0, "journal_bytes") + 40960,
        "journal_bytes should grow by at least the payload: {s1:#}"
    );
    assert_eq!(
        u(a1, "in_flight"),
        0,
        "idle, yet requests in flight: {s1:#}"
    );
    assert_eq!(
        u(a1, "connections"),
        1,
        "one client is connected to vda: {s1:#}"
    );
    assert_eq!(u(b1, "write_requests"), 0, "{s1:#}");
    assert_eq!(u(b1, "connections"), 0, "{s1:#}");
    c.disconnect();

    // The journal agrees with the status: the last WRITE on vda has seq <= last_seq.
    d.term();
    let records = d.journal_records();
    let writes: Vec<&Value> = records
        .iter()
        .filter(|r| r["disk"] == "vda" && r["kind"] == "WRITE")
        .collect();
    assert_eq!(writes.len(), 10, "{writes:#?}");
    let max_write_seq = writes
        .iter()
        .filter_map(|r| r["seq"].as_u64())
        .max()
        .unwrap();
    assert!(max_write_seq <= u(a1, "last_seq"));
}

#[test]
fn run_directory_layout_and_socket_modes() {
    let d = Daemon::builder()
        .disk("vda", 1 << 20)
        .disk("vdb", 1 << 20)
        .start();
    let vm_dir = d.run_dir.join(&d.vm_uuid);
    for name in ["vda.sock", "vdb.sock", "control.sock"] {
        let p = vm_dir.join(name);
        let meta = std::fs::metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        use std::os::unix::fs::FileTypeExt;
        assert!(
            meta.file_type().is_socket(),
            "{} is not a socket",
            p.display()
        );
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o600,
            "{} has mode {:o}, want 0600",
            p.display(),
            meta.permissions().mode() & 0o777
        );
    }
    assert!(
        d.catalog_path().exists(),
        "no catalog.sqlite in the VM's state directory"
    );
    let journal_dir = d
        .state_dir
        .join("vms")
        .join(&d.vm_uuid)
        .join("vda")
        .join("journal");
    assert!(
        journal_dir.is_dir(),
        "no journal directory {}",
        journal_dir.display()
    );
}

#[test]
fn replay_upto_a_sequence_number() {
    let mut d = Daemon::builder().disk_random("vda", 4 << 20, 41).start();
    let (mut c, _) = Client::open(&d.socket("vda"), "vda").unwrap();
    assert_eq!(c.write(0, &[0xa1; 4096], 0).unwrap(), 0);
    assert_eq!(c.flush().unwrap(), 0);
    assert_eq!(c.write(0, &[0xb2; 4096], 0).unwrap(), 0);
    assert_eq!(c.write(8192, &[0xc3; 4096], 0).unwrap(), 0);
    c.disconnect();
    d.term();
    let records = d.journal_records();
    let flush_seq = records_of_kind(&records, "FLUSH")[0]["seq"]
        .as_u64()
        .unwrap();
    let point = d.work_dir().join("point.img");
    copy_sparse(&d.disk("vda").initial, &point);
    d.replay("vda", &point, Some(&format!("seq:{flush_seq}")));
    assert_eq!(
        read_at(&point, 0, 4096),
        vec![0xa1; 4096],
        "first write missing at the point"
    );
    assert_eq!(
        read_at(&point, 8192, 4096),
        read_at(&d.disk("vda").initial, 8192, 4096),
        "a write after the point was replayed"
    );
    d.check_replay_invariant("vda");
}

/// Degraded mode seen by an operator (docs/RELIABILITY.md, "A full
/// journal"): `journal_max` reached, the plain-text status says since when
/// and how much is not journaled yet; a local restore at a point taken
/// while degraded (a MARK journaled meanwhile, or a time since) is refused,
/// while the point before the window restores byte-exact.
#[test]
fn status_shows_a_degraded_disk_and_restore_refuses_its_window() {
    use cdp_tests::fixture::{cdpctl, cdpctl_out, config, shipper_once_cmd};
    const MIB: u64 = 1 << 20;
    let mut d = Daemon::builder().disk_random("vda", 32 * MIB, 21).prepare();
    let repo = d.work_dir().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let cfg = config(&d, &repo);
    let text = std::fs::read_to_string(&cfg).unwrap()
        + "journal_max = \"4MiB\"\njournal_min_free = \"0\"\nsegment_size = \"1MiB\"\n";
    std::fs::write(&cfg, text).unwrap();
    d.extra
        .extend(["--config".into(), cfg.clone().into_os_string()]);
    d.start();
    let writes = |from: u64, to: u64, p: u8| {
        let mut cmds: Vec<String> = (from..to)
            .map(|i| format!("write -P {p} {} 1M", i * MIB))
            .collect();
        cmds.push("flush".into());
        cdp_tests::fixture::qemu_io(&d, "vda", &cmds);
    };
    writes(0, 2, 0x11);
    run_ok(&mut shipper_once_cmd(&d, &cfg));
    let plain = cdpctl(&d, &cfg, &["status", &d.vm_uuid]);
    assert!(plain.contains("journal normal"), "{plain}");
    cdpctl(&d, &cfg, &["mark", &d.vm_uuid, "before"]);
    let before = d.work_dir().join("before.img");
    std::fs::copy(d.image("vda"), &before).unwrap();

    // Far past journal_max, nobody shipping: degraded.
    writes(4, 24, 0x22);
    let t0 = std::time::Instant::now();
    let s = loop {
        let s = d.status_json();
        if disk_status(&s, "vda")["journal_mode"] == "degraded" {
            break s;
        }
        assert!(t0.elapsed().as_secs() < 60, "not degraded: {s:#}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let v = disk_status(&s, "vda");
    let plain = cdpctl(&d, &cfg, &["status", &d.vm_uuid]);
    let since = cdp_core::time::fmt_ns(u(v, "degraded_since_ns"));
    assert!(
        plain.contains(&format!("journal degraded since {since}, "))
            && plain.contains("not journaled yet"),
        "{plain}\n{s:#}"
    );
    assert!(u(v, "dirty_bytes") >= 12 * MIB, "{s:#}");

    // A MARK journaled while degraded does not name a journaled state, nor
    // does a time since the journal filled.
    cdpctl(&d, &cfg, &["mark", &d.vm_uuid, "during"]);
    let url = format!("file://{}", repo.display());
    let restore = |at: &str, out: &std::path::Path| {
        let _ = std::fs::remove_file(out);
        cdpctl_out(
            &d,
            &cfg,
            &[
                "restore",
                &d.vm_uuid,
                "--disk",
                "vda",
                "--at",
                at,
                "--output",
                out.to_str().unwrap(),
                "--repo",
                &url,
            ],
        )
    };
    let out = d.work_dir().join("r.img");
    let just_after = cdp_core::time::fmt_ns(u(v, "degraded_since_ns") + 1);
    for at in ["mark:during", just_after.as_str()] {
        let o = restore(at, &out);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("full since") && err.contains("degraded"),
            "restore at {at} inside the degraded window: {err}"
        );
        assert!(!out.exists(), "a refused restore left {}", out.display());
    }
    let o = restore("mark:before", &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_files_equal(&out, &before);
    d.term();
}

/// A WRITE is answered once journaled, before its image write, where the
/// image takes writes in place (on ext4, over blocks allocated), and after
/// its image write into a hole (docs/DESIGN.md, "Write path", step 5): on
/// a written or preallocated image at once, on a sparse one once written.
/// Either way what was written reads back on a new connection.
#[test]
fn writes_are_answered_once_journaled_only_where_the_image_takes_them_in_place() {
    let mut d = Daemon::builder()
        .disk_random("vda", 8 << 20, 7)
        .disk("vdb", 8 << 20)
        .disk("vdc", 8 << 20)
        .prepare();
    // vdc preallocated, as `qemu-img create -o preallocation=falloc` does:
    // unwritten extents, which a write fills without allocating.
    let vdc = std::fs::OpenOptions::new()
        .write(true)
        .open(d.image("vdc"))
        .unwrap();
    nix::fcntl::fallocate(
        std::os::fd::AsRawFd::as_raw_fd(&vdc),
        nix::fcntl::FallocateFlags::empty(),
        0,
        8 << 20,
    )
    .unwrap();
    drop(vdc);
    d.start();
    assert_eq!(
        nix::sys::statfs::statfs(&d.image("vda"))
            .unwrap()
            .filesystem_type(),
        nix::sys::statfs::EXT4_SUPER_MAGIC,
        "this test needs its images on ext4 (CDP_TEST_TMPDIR)"
    );
    // Whole 64 KiB granules, so that a write into a hole maps them.
    let writes: Vec<String> = (0..8u64)
        .map(|i| format!("write -P {} {} 64k", i + 1, i * 256 * 1024))
        .chain(["write -P 9 4M 1M".to_string()])
        .collect();
    let reads: Vec<String> = writes.iter().map(|w| w.replace("write", "read")).collect();
    let early = |disk: &str| {
        let st = d.status_json();
        let s = disk_status(&st, disk);
        assert_eq!(s["writes_in_place"], true, "{s:#}");
        assert_eq!(s["image_failed"], false, "{s:#}");
        u(s, "early_acks")
    };
    for disk in ["vda", "vdb", "vdc"] {
        cdp_tests::fixture::qemu_io(&d, disk, &writes);
        cdp_tests::fixture::qemu_io(&d, disk, &reads);
    }
    assert_eq!(early("vda"), 9, "a written image");
    assert_eq!(early("vdc"), 9, "a preallocated image");
    assert_eq!(early("vdb"), 0, "holes");
    cdp_tests::fixture::qemu_io(&d, "vdb", &writes);
    cdp_tests::fixture::qemu_io(&d, "vdb", &reads);
    assert_eq!(early("vdb"), 9, "the same ranges, written now");
    // 4 KiB writes fill a granule of the sparse image, none of them whole:
    // a rescan on the sealer's pass finds it (the first one at once).
    let fill: Vec<String> = (0..16u64)
        .map(|i| format!("write -P 3 {} 4k", (6 << 20) + i * 4096))
        .collect();
    cdp_tests::fixture::qemu_io(&d, "vdb", &fill);
    cdp_tests::guest::wait_until("the filled granule to be found", 20, || {
        cdp_tests::fixture::qemu_io(&d, "vdb", &["write -P 4 6M 4k".to_string()]);
        early("vdb") > 9
    });
    cdp_tests::fixture::qemu_io(&d, "vdb", &["read -P 4 6M 4k".to_string()]);
}
