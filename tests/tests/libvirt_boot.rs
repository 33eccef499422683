//! Instant boot of a point through a real libvirtd (docs/LIBVIRT.md,
//! "Booting a point"): a protected VM runs the tiny guest in `cdp.wait`
//! mode, is destroyed and shipped; `cdpctl boot VM --at <first marker>
//! --name NEW --start` returns within seconds with NEW running on qcow2
//! overlays backed by NBD exports of that point. The guest of NEW writes;
//! its writes land in the overlays only (the repository's files and the
//! original disk byte-identical), the overlay over its backing reads as the
//! point plus NEW's own writes, and `cdpctl boot NEW --stop` leaves no VM,
//! no export process and no file of the boot.
//!
//! Owns host-wide things (libvirtd, /etc/cdp/cdp.toml): nextest runs every
//! libvirt* binary alone (.config/nextest.toml, group `libvirt`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use cdp_tests::guest::{follow_markers, wait_until};
use cdp_tests::libvirt::*;
use cdp_tests::require_tool;

/// Every regular file under `root` with its bytes (directories left out:
/// an export's lease leaves its empty directory behind), and the leases
/// apart (a running export holds one).
fn files(root: &Path) -> (BTreeMap<PathBuf, Vec<u8>>, usize) {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                todo.push(e.path());
            } else if t.is_file() {
                out.insert(e.path(), std::fs::read(e.path()).unwrap());
            }
        }
    }
    let before = out.len();
    out.retain(|p, _| !p.to_string_lossy().contains("/leases/"));
    let leases = before - out.len();
    (out, leases)
}

/// `qemu-img convert` of `src` (an image or an NBD URI) to raw bytes.
fn read_image(src: &str, fmt: &str, out: &Path) -> Vec<u8> {
    sh(Command::new(require_tool("qemu-img"))
        .args(["convert", "-U", "-f", fmt, "-O", "raw", src])
        .arg(out));
    let b = std::fs::read(out).unwrap();
    std::fs::remove_file(out).unwrap();
    b
}

#[test]
fn boot_a_point_as_a_new_vm_writes_to_overlays_only_and_stop_cleans_up() {
    let dir = shared_tempdir();
    let d = dir.path();
    let port = free_port();
    let mut lv = Libvirt::start(d, &config_for(d, port));
    let (name, uuid, new) = (
        "cdp-t-bootsrc",
        "0b1c2d3e-4f5a-4b6c-8d7e-9f0a1b2c3d4e",
        "cdp-t-booted",
    );
    for n in [name, new] {
        let _ = virsh_try(&["destroy", n]);
        let _ = virsh_try(&["undefine", n]);
    }
    define(d, &domain_xml(name, uuid, d, "cdp.wait"));
    sh(host_cdpctl().args(["protect", name, "--disk", "vda"]));
    let original_def = virsh(&["dumpxml", "--inactive", "--security-info", name]);
    lv.start_agent(&d.join("agent.log"));
    virsh(&["start", name]);
    let mut markers = Vec::new();
    follow_markers(&d.join("serial.log"), "CDP-MARKER 4", 120, &mut markers);
    virsh(&["destroy", name]);
    wait_until("an empty backlog after destroy", 90, || {
        let text = metrics(port).unwrap_or_default();
        metric_sum(&text, "cdp_backlog_segments", uuid) == Some(0.0)
            && metric_sum(&text, "cdp_vm_running", uuid) == Some(0.0)
    });
    // Nothing else writes the repository from here on.
    lv.stop_agent();
    let (repo_before, leases) = files(&d.join("repo"));
    assert_eq!(leases, 0);
    let disk_before = std::fs::read(d.join("disk.raw")).unwrap();

    // Boot the first marker's point as a new VM.
    let first = markers
        .iter()
        .find(|m| m.0 == 1)
        .expect("marker 1")
        .1
        .clone();
    let bootdir = d.join("boot");
    let t = Instant::now();
    let out = sh(host_cdpctl()
        .args([
            "boot", uuid, "--at", &first, "--name", new, "--start", "--dir",
        ])
        .arg(&bootdir));
    let took = t.elapsed();
    eprintln!("cdpctl boot returned in {took:?}:\n{out}");
    assert!(took.as_secs() < 30, "boot took {took:?}");
    assert!(out.contains("defined and started"), "{out}");
    assert!(out.contains("blockpull"), "no way to keep it said: {out}");
    assert_eq!(virsh(&["domstate", new]).trim(), "running");
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bootdir.join("boot.json")).unwrap()).unwrap();
    let disk = &record["disks"][0];
    let pid = disk["pid"].as_i64().unwrap() as i32;
    let socket = disk["socket"].as_str().unwrap().to_string();
    let overlay = disk["overlay"].as_str().unwrap().to_string();
    assert!(!cdp_core::proc::is_gone(pid), "the export is not running");
    // The new VM is not protected, has its own UUID, and runs on the overlay.
    let live = virsh(&["dumpxml", new]);
    assert!(!live.contains(uuid) && !live.contains("urn:cdpd"), "{live}");
    assert!(live.contains(&overlay), "{live}");
    assert!(!live.contains("disk.raw"), "{live}");
    // The socket's directory: QEMU's user's alone.
    let sockdir = Path::new(&socket).parent().unwrap();
    let m = std::fs::metadata(sockdir).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!((m.uid(), m.permissions().mode() & 0o777), (64055, 0o700));

    // The export serves the point: exactly what the guest had at marker 1.
    let uri = format!("nbd+unix:///vda?socket={socket}");
    assert!(
        read_image(&uri, "raw", &d.join("export.raw")) == expected_wait(1),
        "the export differs from marker 1's point"
    );
    // The booted guest writes its own markers into the overlay.
    let mut booted = Vec::new();
    follow_markers(
        &bootdir.join("serial0.log"),
        "CDP-MARKER 2",
        120,
        &mut booted,
    );
    virsh(&["destroy", new]);
    let m = booted.iter().map(|b| b.0).max().unwrap();
    let got = read_image(&overlay, "qcow2", &d.join("overlay.raw"));
    // The point (region 1 only) plus the booted guest's writes 1..=m; the
    // region of write m+1 may be partly written when it was destroyed.
    let want = expected_wait(m);
    let partial = ((m + 1) % 8) as usize * MIB;
    for (i, (g, w)) in got.chunks(MIB).zip(want.chunks(MIB)).enumerate() {
        if i * MIB != partial {
            assert!(
                g == w,
                "MiB {i} of the booted VM's disk (guest at marker {m})"
            );
        }
    }
    // Its writes are in the overlay only (the running export holds a lease).
    let (repo_now, leases) = files(&d.join("repo"));
    assert!(repo_now == repo_before, "the repository changed");
    assert_eq!(leases, 1, "one lease, the export's");
    assert!(
        std::fs::read(d.join("disk.raw")).unwrap() == disk_before,
        "the original VM's disk changed"
    );
    assert_eq!(
        virsh(&["dumpxml", "--inactive", "--security-info", name]),
        original_def
    );

    // --stop: no VM, no export, no file of the boot.
    let out = sh(host_cdpctl().args(["boot", new, "--stop"]));
    assert!(out.contains("1 export(s) stopped"), "{out}");
    assert!(
        !virsh_try(&["domstate", new]).status.success(),
        "{new} is still defined"
    );
    assert!(cdp_core::proc::is_gone(pid), "the export still runs");
    assert!(!bootdir.exists(), "{} is left", bootdir.display());
    assert!(
        files(&d.join("repo")) == (repo_before, 0),
        "the repository changed, or the export's lease is left"
    );

    sh(host_cdpctl().args(["unprotect", name]));
    virsh(&["undefine", name]);
    drop(lv);
}
