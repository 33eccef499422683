//! A repository the VM's user cannot write (issue 15): the per-VM shipper,
//! running as that user, keeps running, its target is "failing" in `cdpctl
//! status` within seconds with the permission error and what to do; once the
//! directory is the user's, the target ships and is "up" again.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cdp_tests::fixture::{cdpctl_out, config, qemu_io, spawn_shipper_as, KillOnDrop as Shipper};
use cdp_tests::Daemon;

/// The VM's QEMU user on Debian (libvirt-qemu).
const QEMU_UID: u32 = 64055;

fn spawn_shipper(d: &Daemon, cfg: &Path, xml: &Path) -> Shipper {
    spawn_shipper_as(d, cfg, xml, QEMU_UID, &d.root.join("shipper.log"))
}

fn shipper_log(d: &Daemon) -> String {
    std::fs::read_to_string(d.root.join("shipper.log")).unwrap_or_default()
}

/// `cdpctl status --json` for the VM: its disk vda's target `primary`.
fn primary(d: &Daemon, cfg: &Path) -> serde_json::Value {
    let out = cdpctl_out(d, cfg, &["status", &d.vm_uuid, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    st["disks"][0]["targets"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["target"] == "primary"))
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

fn wait_for(
    d: &Daemon,
    cfg: &Path,
    sh: &mut Shipper,
    what: &str,
    secs: u64,
    f: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        assert!(
            sh.0.try_wait().unwrap().is_none(),
            "the shipper exited while waiting for {what}; its log:\n{}",
            shipper_log(d)
        );
        let t = primary(d, cfg);
        if f(&t) {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "timed out ({secs}s) waiting for {what}: {t}\nshipper log:\n{}",
            shipper_log(d)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_unwritable_repository_is_a_failing_target_and_ships_once_writable() {
    use std::os::unix::fs::PermissionsExt;
    let d = Daemon::builder()
        .disk_random("vda", 4 << 20, 3)
        .args(["--segment-age", "50ms"])
        .as_user(QEMU_UID, QEMU_UID)
        .start();
    // Root's directory, 0755: QEMU's user can read it, not write it.
    let repo = d.root.join("repo");
    std::fs::create_dir(&repo).unwrap();
    std::fs::set_permissions(&repo, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = config(&d, &repo);
    let xml = d.root.join("domain.xml");
    std::fs::write(&xml, "<domain><name>test-vm</name></domain>\n").unwrap();
    let mut sh = spawn_shipper(&d, &cfg, &xml);
    qemu_io(&d, "vda", &["write -P 7 0 64k".into(), "flush".into()]);

    let started = Instant::now();
    let t = wait_for(&d, &cfg, &mut sh, "primary failing", 60, |t| {
        t["state"] == "failing"
    });
    let err = t["last_error"].as_str().unwrap_or_default().to_string();
    assert!(
        err.contains("Permission denied") || err.contains("not writable"),
        "{t}"
    );
    assert!(
        err.contains("not writable by") && err.contains("chown") && err.contains("cdpctl protect"),
        "the error says what to do: {err}"
    );
    eprintln!("failing after {:?}: {err}", started.elapsed());
    // It stays failing (not "up") while the shipper keeps running and retrying.
    std::thread::sleep(Duration::from_secs(2));
    let t = wait_for(&d, &cfg, &mut sh, "still failing", 1, |t| {
        t["state"] == "failing"
    });
    assert_eq!(t["state"], "failing");
    let text = cdpctl_out(&d, &cfg, &["status", &d.vm_uuid]);
    let text = String::from_utf8_lossy(&text.stdout).to_string();
    assert!(
        text.contains("failing") && text.contains("not writable by"),
        "{text}"
    );

    // The operator gives the directory to QEMU's user: it ships.
    std::os::unix::fs::chown(&repo, Some(QEMU_UID), Some(QEMU_UID)).unwrap();
    wait_for(
        &d,
        &cfg,
        &mut sh,
        "primary up with nothing behind",
        60,
        |t| t["state"] == "up" && t["backlog_segments"] == 0,
    );
    assert!(
        repo.join("cdp/v1/FORMAT").exists(),
        "the repository was created once writable"
    );
    let segs = std::fs::read_dir(repo.join("cdp/v1"))
        .unwrap()
        .flatten()
        .count();
    assert!(segs > 1, "something shipped");
}

/// The repository directory is QEMU's user's (the target checks fine), but
/// its `cdp/` tree was made by root (a root `cdpctl baseline` before, say):
/// the VM's objects cannot be created. The first pass had nothing sealed to
/// ship, so the put of the VM definition was the first to fail: it ended the
/// shipper before, with the target still "up". Now it is a failing target,
/// the shipper keeps running, and the target ships once the tree is the
/// user's.
#[test]
fn a_repository_tree_made_by_root_is_a_failing_target_not_a_dead_shipper() {
    use std::os::unix::fs::PermissionsExt;
    let d = Daemon::builder()
        .disk_random("vda", 4 << 20, 4)
        .args(["--segment-age", "50ms"])
        .as_user(QEMU_UID, QEMU_UID)
        .start();
    let repo = d.root.join("repo");
    let v1 = repo.join("cdp/v1");
    std::fs::create_dir_all(&v1).unwrap();
    std::fs::write(
        repo.join(cdp_repo::format::FORMAT_KEY),
        cdp_repo::format::format_marker(),
    )
    .unwrap();
    for p in [repo.join("cdp"), v1.clone()] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::os::unix::fs::chown(&repo, Some(QEMU_UID), Some(QEMU_UID)).unwrap();
    let cfg = config(&d, &repo);
    let xml = d.root.join("domain.xml");
    std::fs::write(&xml, "<domain><name>test-vm</name></domain>\n").unwrap();
    let mut sh = spawn_shipper(&d, &cfg, &xml);

    let t = wait_for(&d, &cfg, &mut sh, "primary failing", 60, |t| {
        t["state"] == "failing"
    });
    eprintln!("failing: {t}");
    // Still running a while later, still failing.
    std::thread::sleep(Duration::from_secs(2));
    wait_for(&d, &cfg, &mut sh, "still failing", 1, |t| {
        t["state"] == "failing"
    });

    let out = Command::new("chown")
        .args(["-R", &format!("{QEMU_UID}:{QEMU_UID}")])
        .arg(&repo)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    qemu_io(&d, "vda", &["write -P 9 0 64k".into(), "flush".into()]);
    wait_for(
        &d,
        &cfg,
        &mut sh,
        "primary up with nothing behind",
        60,
        |t| t["state"] == "up" && t["backlog_segments"] == 0,
    );
    assert!(
        v1.join("vms").join(&d.vm_uuid).is_dir(),
        "the VM's objects were created once writable"
    );
}
