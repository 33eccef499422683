//! Restores from the repository alone are byte-identical to copies of the
//! image taken at the same points (by seq, by time, by mark), and the two
//! disks of a VM restore to the same cut.

use std::path::{Path, PathBuf};
use std::process::Command;

use cdp_tests::fixture::{cdpctl, config, phase, qemu_io};
use cdp_tests::{bin, qemu_img_compare, run, run_ok, Daemon};

const MIB: u64 = 1 << 20;

fn ship(d: &Daemon, cfg: &Path) {
    run_ok(
        Command::new(bin("cdp-shipper"))
            .args(["run", "--once", "--vm-uuid", &d.vm_uuid])
            .arg("--state-dir")
            .arg(&d.state_dir)
            .arg("--run-dir")
            .arg(&d.run_dir)
            .arg("--config")
            .arg(cfg),
    );
}

struct Snapshot {
    copy: PathBuf,
    seq: u64,
    time: String,
    mark: String,
}

fn snapshot(d: &Daemon, cfg: &Path, disk: &str, i: u64) -> Snapshot {
    let mark = format!("phase-{i}");
    cdpctl(d, cfg, &["mark", &d.vm_uuid, &mark]);
    let seq = d.status_json()["last_seq"].as_u64().unwrap();
    let copy = d.work_dir().join(format!("{disk}-ref-{i}.img"));
    std::fs::copy(d.image(disk), &copy).unwrap();
    let time = humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string();
    Snapshot {
        copy,
        seq,
        time,
        mark,
    }
}

#[test]
fn restores_by_seq_time_and_mark_equal_reference_copies_with_the_host_gone() {
    let mut d = Daemon::builder()
        .disk_random("vda", 8 * MIB, 21)
        .args(["--segment-age", "30ms"])
        .start();
    let repo = d.work_dir().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let cfg = config(&d, &repo);
    // An online baseline first, then phases of writes with a reference copy each.
    cdpctl(&d, &cfg, &["baseline", &d.vm_uuid]);
    let mut snaps = Vec::new();
    for i in 0..4 {
        qemu_io(&d, "vda", &phase(i));
        snaps.push(snapshot(&d, &cfg, "vda", i));
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    d.term();
    ship(&d, &cfg);
    // The host's state is gone: only the repository is left.
    std::fs::remove_dir_all(&d.state_dir).unwrap();
    std::fs::create_dir_all(&d.state_dir).unwrap();
    let url = format!("file://{}", repo.display());
    for (i, s) in snaps.iter().enumerate() {
        for (how, at) in [
            ("seq", format!("seq:{}", s.seq)),
            ("time", s.time.clone()),
            ("mark", format!("mark:{}", s.mark)),
        ] {
            let out = d.work_dir().join(format!("restored-{i}-{how}.img"));
            cdpctl(
                &d,
                &cfg,
                &[
                    "restore",
                    &d.vm_uuid,
                    "--disk",
                    "vda",
                    "--at",
                    &at,
                    "--output",
                    out.to_str().unwrap(),
                    "--repo",
                    &url,
                ],
            );
            qemu_img_compare(out.as_os_str(), s.copy.as_os_str());
        }
    }
    // qcow2 output.
    let q = d.work_dir().join("restored.qcow2");
    cdpctl(
        &d,
        &cfg,
        &[
            "restore",
            &d.vm_uuid,
            "--disk",
            "vda",
            "--at",
            &format!("mark:{}", snaps[1].mark),
            "--output",
            q.to_str().unwrap(),
            "--format",
            "qcow2",
            "--repo",
            &url,
        ],
    );
    let info = run_ok(Command::new("qemu-img").arg("info").arg(&q));
    assert!(String::from_utf8_lossy(&info.stdout).contains("qcow2"));
    let cmp = run(Command::new("qemu-img")
        .args(["compare", "-U", "-f", "qcow2", "-F", "raw"])
        .arg(&q)
        .arg(&snaps[1].copy));
    assert!(cmp.status.success(), "{cmp:?}");
    // A point before the baseline, or a mark that does not exist, is refused.
    let out = run(Command::new(bin("cdpctl")).args([
        "restore",
        &d.vm_uuid,
        "--disk",
        "vda",
        "--at",
        "mark:nope",
        "--output",
        "/tmp/never",
        "--repo",
        &url,
    ]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no mark \"nope\""));
    assert!(!Path::new("/tmp/never").exists());
    // A time before the first record: refused, naming the nearest restorable
    // point (after it: the earliest one).
    let out = run(Command::new(bin("cdpctl")).args([
        "restore",
        &d.vm_uuid,
        "--disk",
        "vda",
        "--at",
        "2001-01-01T00:00:00Z",
        "--output",
        "/tmp/never",
        "--repo",
        &url,
    ]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("nearest restorable: seq:") && err.trim_end().ends_with(") after"),
        "{err}"
    );
    assert!(!Path::new("/tmp/never").exists());
}

#[test]
fn unshipped_local_records_are_used_and_two_disks_restore_to_one_cut() {
    let mut d = Daemon::builder()
        .disk_random("vda", 8 * MIB, 1)
        .disk_random("vdb", 8 * MIB, 2)
        .args(["--segment-age", "30ms"])
        .start();
    let repo = d.work_dir().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let cfg = config(&d, &repo);
    cdpctl(&d, &cfg, &["baseline", &d.vm_uuid]);
    qemu_io(&d, "vda", &phase(1));
    qemu_io(&d, "vdb", &phase(2));
    ship(&d, &cfg);
    // One cut across both disks.
    cdpctl(&d, &cfg, &["mark", &d.vm_uuid, "cut"]);
    let a = d.work_dir().join("vda-cut.img");
    let b = d.work_dir().join("vdb-cut.img");
    std::fs::copy(d.image("vda"), &a).unwrap();
    std::fs::copy(d.image("vdb"), &b).unwrap();
    qemu_io(&d, "vda", &phase(3));
    qemu_io(&d, "vdb", &phase(4));
    d.term();
    // Not shipped: the newest records are only on this host.
    for (disk, reference) in [("vda", &a), ("vdb", &b)] {
        let out = d.work_dir().join(format!("{disk}-restored.img"));
        cdpctl(
            &d,
            &cfg,
            &[
                "restore",
                &d.vm_uuid,
                "--disk",
                disk,
                "--at",
                "mark:cut",
                "--output",
                out.to_str().unwrap(),
            ],
        );
        qemu_img_compare(out.as_os_str(), reference.as_os_str());
        let latest = d.work_dir().join(format!("{disk}-latest.img"));
        cdpctl(
            &d,
            &cfg,
            &[
                "restore",
                &d.vm_uuid,
                "--disk",
                disk,
                "--at",
                "latest",
                "--output",
                latest.to_str().unwrap(),
            ],
        );
        qemu_img_compare(latest.as_os_str(), d.image(disk).as_os_str());
    }
    let pts: serde_json::Value =
        serde_json::from_str(&cdpctl(&d, &cfg, &["points", &d.vm_uuid, "--json"])).unwrap();
    let disks = pts["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2);
    for x in disks {
        assert_eq!(x["marks"][0]["label"], "cut", "{x}");
        assert!(!x["restorable"].as_array().unwrap().is_empty(), "{x}");
        assert!(!x["flushes"].as_array().unwrap().is_empty(), "{x}");
    }
    assert_eq!(disks[0]["marks"][0]["seq"], disks[1]["marks"][0]["seq"]);
}

#[test]
fn in_place_restore_rewrites_only_what_differs_and_refuses_a_running_vm() {
    let mut d = Daemon::builder()
        .disk_random("vda", 8 * MIB, 5)
        .args(["--segment-age", "30ms"])
        .start();
    let repo = d.work_dir().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let cfg = config(&d, &repo);
    cdpctl(&d, &cfg, &["baseline", &d.vm_uuid]);
    qemu_io(&d, "vda", &phase(1));
    let s = snapshot(&d, &cfg, "vda", 1);
    qemu_io(&d, "vda", &phase(2));
    let mut c = Command::new(bin("cdpctl"));
    c.args([
        "restore",
        &d.vm_uuid,
        "--disk",
        "vda",
        "--at",
        &format!("mark:{}", s.mark),
        "--in-place",
        "--yes",
        "--target",
    ])
    .arg(d.image("vda"))
    .arg("--state-dir")
    .arg(&d.state_dir)
    .arg("--run-dir")
    .arg(&d.run_dir)
    .arg("--config")
    .arg(&cfg);
    let out = run(&mut c);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("running"),
        "{out:?}"
    );
    d.term();
    ship(&d, &cfg);
    // Without a terminal and without --yes: refused, naming --yes, nothing written.
    let before = std::fs::read(d.image("vda")).unwrap();
    let at = format!("mark:{}", s.mark);
    let image = d.image("vda");
    let args = [
        "restore",
        &d.vm_uuid,
        "--disk",
        "vda",
        "--at",
        &at,
        "--in-place",
        "--target",
        image.to_str().unwrap(),
    ];
    let out = cdp_tests::fixture::cdpctl_out(&d, &cfg, &args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("--yes") && err.contains(d.image("vda").to_str().unwrap()),
        "{err}"
    );
    assert!(
        std::fs::read(d.image("vda")).unwrap() == before,
        "written without --yes"
    );
    let mut args = args.to_vec();
    args.push("--yes");
    cdpctl(&d, &cfg, &args);
    qemu_img_compare(d.image("vda").as_os_str(), s.copy.as_os_str());
    // Until a capture session journals that gap, an offline baseline would
    // label the restored disk with a seq it no longer matches: refused.
    let out = cdp_tests::fixture::cdpctl_out(&d, &cfg, &["baseline", &d.vm_uuid]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not captured") && err.contains("in place"),
        "a baseline of a disk changed outside capture: {err}"
    );
    // The next capture session records that the disk left the journal's line.
    d.start();
    d.term();
    let gaps: Vec<_> = d
        .journal_records()
        .into_iter()
        .filter(|r| r["kind"] == "GAP")
        // (A new VM's first session starts with a "new history" GAP.)
        .filter(|r| !r.to_string().contains("new history"))
        .collect();
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    assert!(gaps[0]["info"]["reason"]
        .as_str()
        .unwrap()
        .contains("in place"));
    // Journaled now: the offline baseline is exact again.
    cdpctl(&d, &cfg, &["baseline", &d.vm_uuid]);
}

/// A time after the disk's newest record while capture still runs is
/// refused (later writes may not be shipped, or journaled, yet), saying to
/// restore `latest` or wait; `latest` restores the newest record. Once the
/// VM stopped cleanly (SESSION_END shipped), that time restores the image.
#[test]
fn a_time_after_the_newest_record_needs_a_clean_stop() {
    let mut d = Daemon::builder()
        .disk_random("vda", 8 * MIB, 23)
        .args(["--segment-age", "30ms"])
        .start();
    let repo = d.work_dir().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let cfg = config(&d, &repo);
    cdpctl(&d, &cfg, &["baseline", &d.vm_uuid]);
    qemu_io(&d, "vda", &phase(0));
    // Every record sealed (30 ms age, later on a loaded machine) before the
    // pass: "latest" in the repository is then the image.
    cdp_tests::guest::wait_until("every record sealed", 60, || {
        let s = d.status_json()["disks"][0].clone();
        s["open_segment_records"] == 0 && s["segments_waiting_seal"] == 0
    });
    ship(&d, &cfg);
    let copy = d.work_dir().join("ref.img");
    std::fs::copy(d.image("vda"), &copy).unwrap();
    let url = format!("file://{}", repo.display());
    let (vm, state) = (d.vm_uuid.clone(), d.state_dir.clone());
    let restore = |at: &str, out: &Path| {
        let _ = std::fs::remove_file(out);
        run(Command::new(bin("cdpctl"))
            .args(["restore", &vm, "--disk", "vda", "--at", at])
            .arg("--output")
            .arg(out)
            .args(["--repo", &url, "--no-local"])
            .arg("--state-dir")
            .arg(&state)
            .arg("--config")
            .arg(&cfg))
    };
    let out = d.work_dir().join("r.img");
    let now = humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string();
    let o = restore(&now, &out);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains("after the newest record of vda")
            && err.contains("capture was still running")
            && err.contains("restore `latest`"),
        "{err}"
    );
    assert!(!out.exists());
    let o = restore("latest", &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    qemu_img_compare(out.as_os_str(), copy.as_os_str());

    d.term();
    ship(&d, &cfg);
    let o = restore(&now, &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    qemu_img_compare(out.as_os_str(), copy.as_os_str());
}
