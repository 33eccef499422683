//! `cdpctl boot VM --at POINT --name NEW --no-define --dir DIR` without
//! libvirt: every disk of the point served by a detached export, a qcow2
//! overlay per disk on it reads as the point (from the repository alone),
//! writes to an overlay leave the repository's files unchanged, the written
//! definition names the overlays, and `cdpctl boot NEW --stop --dir DIR`
//! stops the exports and removes every file of the boot. The libvirt journey
//! is tests/tests/libvirt_boot.rs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use cdp_tests::fixture::{cdpctl, config, phase, qemu_io};
use cdp_tests::{bin, require_tool, run_ok, Daemon};
use serde_json::Value;

const MIB: u64 = 1 << 20;

const DOMAIN: &str = r#"<domain type='kvm'>
  <name>two-disks</name>
  <uuid>9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d</uuid>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/var/lib/libvirt/images/two-a.img'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <source dev='/dev/vg0/two-b'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <interface type='network'><mac address='52:54:00:01:02:03'/><source network='default'/></interface>
  </devices>
</domain>
"#;

fn ship(d: &Daemon, cfg: &Path, vm_config: &Path) {
    let mut c = Command::new(bin("cdp-shipper"));
    c.args(["run", "--once", "--vm-uuid", &d.vm_uuid])
        .arg("--state-dir")
        .arg(&d.state_dir)
        .arg("--run-dir")
        .arg(&d.run_dir)
        .arg("--config")
        .arg(cfg)
        .arg("--vm-config")
        .arg(vm_config);
    run_ok(&mut c);
}

/// Every regular file under `root` but the leases (an export holds one).
fn files(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                todo.push(e.path());
            } else if !e.path().to_string_lossy().contains("/leases/") {
                out.insert(e.path(), std::fs::read(e.path()).unwrap());
            }
        }
    }
    out
}

fn qcow2_bytes(overlay: &str, out: &Path) -> Vec<u8> {
    run_ok(
        Command::new(require_tool("qemu-img"))
            .args(["convert", "-f", "qcow2", "-O", "raw", overlay])
            .arg(out),
    );
    let b = std::fs::read(out).unwrap();
    std::fs::remove_file(out).unwrap();
    b
}

#[test]
fn boot_serves_every_disk_of_a_point_through_overlays_and_stop_cleans_up() {
    let mut d = Daemon::builder()
        .disk_random("vda", 8 * MIB, 21)
        .disk_random("vdb", 8 * MIB, 22)
        .args(["--segment-age", "30ms"])
        .start();
    let repo = d.work_dir().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let cfg = config(&d, &repo);
    let xml = d.work_dir().join("domain-in.xml");
    std::fs::write(&xml, DOMAIN).unwrap();
    cdpctl(&d, &cfg, &["baseline", &d.vm_uuid]);
    ship(&d, &cfg, &xml);
    std::thread::sleep(std::time::Duration::from_millis(60));
    qemu_io(&d, "vda", &phase(0));
    qemu_io(&d, "vdb", &phase(1));
    cdpctl(&d, &cfg, &["mark", &d.vm_uuid, "both"]);
    let refs: Vec<(&str, Vec<u8>)> = ["vda", "vdb"]
        .into_iter()
        .map(|k| (k, std::fs::read(d.image(k)).unwrap()))
        .collect();
    qemu_io(&d, "vda", &phase(2));
    qemu_io(&d, "vdb", &phase(3));
    d.term();
    ship(&d, &cfg, &xml);
    std::fs::remove_dir_all(&d.state_dir).unwrap();
    std::fs::create_dir_all(&d.state_dir).unwrap();
    let repo_before = files(&repo);

    let dir = d.work_dir().join("boot");
    let url = format!("file://{}", repo.display());
    let t = std::time::Instant::now();
    let out = cdpctl(
        &d,
        &cfg,
        &[
            "--json",
            "boot",
            &d.vm_uuid,
            "--at",
            "mark:both",
            "--name",
            "t-boot",
            "--no-define",
            "--dir",
            dir.to_str().unwrap(),
            "--repo",
            &url,
        ],
    );
    eprintln!("cdpctl boot --no-define: {:?}", t.elapsed());
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["defined"], false, "{report:#}");
    let disks = report["booted"]["disks"].as_array().unwrap().clone();
    assert_eq!(disks.len(), 2, "{report:#}");
    let mut pids = Vec::new();
    for (disk, (k, want)) in disks.iter().zip(&refs) {
        assert_eq!(disk["disk"], *k);
        let overlay = disk["overlay"].as_str().unwrap();
        pids.push(disk["pid"].as_i64().unwrap() as i32);
        // The point itself, read through the overlay and its export.
        let got = qcow2_bytes(overlay, &d.work_dir().join("read.raw"));
        assert!(&got == want, "{k}: the overlay does not read as the point");
        // Writes land in the overlay only.
        run_ok(Command::new(require_tool("qemu-io")).args([
            "-f",
            "qcow2",
            overlay,
            "-c",
            "write -P 0x77 0 1M",
        ]));
        let got = qcow2_bytes(overlay, &d.work_dir().join("read.raw"));
        assert!(got[..MIB as usize].iter().all(|b| *b == 0x77), "{k}");
        assert!(got[MIB as usize..] == want[MIB as usize..], "{k}");
    }
    assert!(files(&repo) == repo_before, "the repository changed");
    let def = std::fs::read_to_string(dir.join("t-boot.xml")).unwrap();
    assert!(def.contains("<name>t-boot</name>"), "{def}");
    assert!(
        !def.contains("9a8b7c6d-5e4f") && !def.contains("01:02:03"),
        "{def}"
    );
    for k in ["vda", "vdb"] {
        let o = dir.join(format!("t-boot-{k}.qcow2"));
        assert!(
            def.contains(&format!("<source file=\"{}\"/>", o.display())),
            "{def}"
        );
    }
    assert!(
        !def.contains("two-a.img") && !def.contains("/dev/vg0"),
        "{def}"
    );

    // The host "reboots": every export dies. The overlays read nothing;
    // --resume serves the same point again, the overlays' writes kept.
    for p in &pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*p),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    for p in &pids {
        cdp_tests::guest::wait_until(&format!("export {p} to die"), 10, || {
            cdp_core::proc::is_gone(*p)
        });
    }
    let o0 = dir.join("t-boot-vda.qcow2");
    let dead = Command::new(require_tool("qemu-img"))
        .args(["convert", "-O", "raw", "-f", "qcow2"])
        .arg(&o0)
        .arg(d.work_dir().join("dead.raw"))
        .output()
        .unwrap();
    assert!(!dead.status.success(), "an overlay read without its export");
    let out = cdpctl(
        &d,
        &cfg,
        &[
            "--json",
            "boot",
            "t-boot",
            "--resume",
            "--dir",
            dir.to_str().unwrap(),
        ],
    );
    let resumed: Value = serde_json::from_str(&out).unwrap();
    let pids: Vec<i32> = resumed["resumed"]["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["pid"].as_i64().unwrap() as i32)
        .collect();
    assert_eq!(pids.len(), 2, "{resumed:#}");
    for (k, want) in &refs {
        let got = qcow2_bytes(
            dir.join(format!("t-boot-{k}.qcow2")).to_str().unwrap(),
            &d.work_dir().join("read.raw"),
        );
        assert!(
            got[..MIB as usize].iter().all(|b| *b == 0x77),
            "{k} after --resume"
        );
        assert!(
            got[MIB as usize..] == want[MIB as usize..],
            "{k} after --resume"
        );
    }
    // Resuming what serves already restarts it whole.
    cdpctl(
        &d,
        &cfg,
        &["boot", "t-boot", "--resume", "--dir", dir.to_str().unwrap()],
    );
    let rec: Value =
        serde_json::from_slice(&std::fs::read(dir.join("boot.json")).unwrap()).unwrap();
    let pids: Vec<i32> = rec["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["pid"].as_i64().unwrap() as i32)
        .collect();

    let out = cdpctl(
        &d,
        &cfg,
        &["boot", "t-boot", "--stop", "--dir", dir.to_str().unwrap()],
    );
    assert!(out.contains("2 export(s) stopped"), "{out}");
    for p in pids {
        assert!(cdp_core::proc::is_gone(p), "export {p} still runs");
    }
    assert!(!dir.exists(), "{} is left", dir.display());
    assert!(files(&repo) == repo_before, "the repository changed");
}

/// Attack: QEMU's user owns a directory given as `--dir` and writes a
/// `boot.json` there naming a file of root's as an overlay, log and socket
/// directory. `cdpctl boot NAME --stop` (root) refuses the directory and
/// touches nothing; a record in a root-only directory naming paths outside
/// it is refused too.
#[test]
fn stop_refuses_a_record_another_user_could_have_written() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let d = Daemon::builder().disk_random("vda", MIB, 5).start();
    let cfg = config(&d, &d.work_dir().join("repo"));
    let base = PathBuf::from(format!("/tmp/cdp-boot-attack-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir(&base).unwrap();
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
    let victims = base.join("victims");
    std::fs::create_dir(&victims).unwrap();
    let victim = victims.join("precious");
    std::fs::write(&victim, b"root's data").unwrap();
    let record = |dir: &Path| {
        serde_json::json!({
            "name": "evil", "uuid": "u", "from_vm": "v", "point": "p", "seq": 1,
            "dir": dir, "created_dir": true, "sockets": victims,
            "disks": [{"disk": "vda", "size": 1, "overlay": victim, "socket": victim,
                       "log": victim, "pid": 1}],
        })
        .to_string()
    };
    let stop = |dir: &Path| {
        let out = cdp_tests::fixture::cdpctl_out(
            &d,
            &cfg,
            &[
                "boot",
                "evil",
                "--stop",
                "--dir",
                dir.to_str().unwrap(),
                "--connect",
                "test:///default",
            ],
        );
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let intact = || {
        assert_eq!(std::fs::read(&victim).unwrap(), b"root's data");
        assert_eq!(std::fs::metadata(&victims).unwrap().uid(), 0);
    };

    // QEMU's user's directory, its record written by QEMU's user.
    let theirs = base.join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(64055), Some(64055)).unwrap();
    let script = format!(
        "cat > {}/boot.json <<'X'\n{}\nX\n",
        theirs.display(),
        record(&theirs)
    );
    cdp_tests::fixture::as_user(64055, 64055, &script);
    let (ok, err) = stop(&theirs);
    assert!(
        !ok && err.contains("must be writable by uid 0 alone"),
        "{err}"
    );
    intact();

    // Root's directory, a record naming paths outside it.
    let ours = base.join("ours");
    std::fs::create_dir(&ours).unwrap();
    std::fs::write(ours.join("boot.json"), record(&ours)).unwrap();
    let (ok, err) = stop(&ours);
    assert!(!ok && err.contains("refused"), "{err}");
    intact();
    // A symlink for the record is not followed.
    std::fs::remove_file(ours.join("boot.json")).unwrap();
    std::os::unix::fs::symlink(theirs.join("boot.json"), ours.join("boot.json")).unwrap();
    let (ok, err) = stop(&ours);
    assert!(!ok, "{err}");
    intact();
    std::fs::remove_dir_all(&base).unwrap();
}
