//! A whole VM restored as a NEW libvirt VM (issue 14, "Whole-VM restore";
//! docs/LIBVIRT.md, "Whole-VM restore"), through a real libvirtd: the
//! protected VM runs and ships, then `cdpctl restore --all-disks --to DIR
//! --define NAME` defines a clone with a new name, UUID and MAC that boots
//! from the restored disk (its bytes those of the marker, the original
//! untouched); `--remap-pool` restores a volume disk into a new volume of
//! another pool; and a hostile definition in the repository (a disk on
//! /etc/shadow, another emulator) is refused with nothing written or defined.
//!
//! Runs alone (every binary named libvirt*: .config/nextest.toml); needs root
//! and what `scripts/install-deps` installs.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use cdp_tests::guest::{follow_markers, wait_until};
use cdp_tests::libvirt::*;
use cdp_tests::run;

const NAME: &str = "cdp-t-define-src";
const UUID: &str = "6a5b4c3d-2e1f-4a0b-9c8d-7e6f5a4b3c2d";
const CLONE: &str = "cdp-t-define-clone";
const POOL_CLONE: &str = "cdp-t-define-pool";
const HOSTILE: &str = "cdp-t-define-hostile";
const DST_POOL: &str = "cdp-t-define-dst";
const MAC: &str = "52:54:00:aa:bb:cc";

fn ns(rfc3339: &str) -> u64 {
    humantime::parse_rfc3339(rfc3339)
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// A definition in the repository in force from `ts_ns` (as the shipper stores them).
fn store_definition(d: &Path, ts_ns: u64, xml: &str) -> PathBuf {
    let p = d
        .join("repo/cdp/v1/vms")
        .join(UUID)
        .join(format!("config/{ts_ns:020}.xml"));
    std::fs::write(&p, xml).unwrap();
    p
}

fn cleanup_libvirt() {
    for n in [NAME, CLONE, POOL_CLONE, HOSTILE] {
        let _ = virsh_try(&["destroy", n]);
        let _ = virsh_try(&["undefine", n]);
    }
    let _ = virsh_try(&["pool-destroy", DST_POOL]);
    let _ = virsh_try(&["pool-undefine", DST_POOL]);
}

/// `cdpctl restore UUID --at T --all-disks --to DIR --define NAME [extra]`.
fn restore_define(
    d: &Path,
    at: &str,
    dir: &Path,
    name: &str,
    extra: &[&str],
) -> std::process::Output {
    let out = run(host_cdpctl()
        .args(["restore", UUID, "--at", at, "--all-disks", "--to"])
        .arg(dir)
        .args(["--define", name])
        .args(extra)
        .args(["--repo", &format!("file://{}/repo", d.display())]));
    eprintln!(
        "restore --define {name}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn dumpxml(name: &str) -> String {
    virsh(&["dumpxml", "--inactive", name])
}

#[test]
fn restored_vm_defined_as_a_new_vm_boots_from_its_restored_disk() {
    let dir = shared_tempdir();
    let d = dir.path();
    let port = free_port();
    let mut lv = Libvirt::start(d, &config_for(d, port));
    cleanup_libvirt();
    let xml = domain_xml(NAME, UUID, d, "cdp.wait").replacen(
        "<serial ",
        &format!("<interface type='user'><mac address='{MAC}'/><model type='virtio'/></interface>\n    <serial "),
        1,
    );
    define(d, &xml);
    let out = sh(host_cdpctl().args(["protect", NAME, "--disk", "vda"]));
    assert!(out.contains("next start"), "{out}");

    // The journey: run, write markers, destroy, ship everything.
    lv.start_agent(&d.join("agent.log"));
    virsh(&["start", NAME]);
    let mut markers = Vec::new();
    follow_markers(&d.join("serial.log"), "CDP-MARKER 5", 180, &mut markers);
    virsh(&["destroy", NAME]);
    wait_until("an empty backlog after destroy", 90, || {
        let text = metrics(port).unwrap_or_default();
        metric_sum(&text, "cdp_backlog_segments", UUID) == Some(0.0)
            && metric_sum(&text, "cdp_vm_running", UUID) == Some(0.0)
    });
    lv.stop_agent();
    let at = |k: u64| markers.iter().find(|m| m.0 == k).unwrap().1.clone();
    let original_disk = std::fs::read(d.join("disk.raw")).unwrap();
    let original_xml = virsh(&["dumpxml", "--inactive", "--security-info", NAME]);

    // 1. The clone at marker 2: a new VM, not protected, its disk the marker's bytes.
    let to = d.join("clone");
    let r = restore_define(d, &at(2), &to, CLONE, &[]);
    assert!(r.status.success());
    let said = String::from_utf8_lossy(&r.stdout);
    assert!(
        said.contains("NOT protected")
            && said.contains(&format!("cdpctl protect {CLONE} --disk vda")),
        "{said}"
    );
    assert!(
        std::fs::read(to.join("vda.raw")).unwrap() == expected_wait(2),
        "the restored disk differs from marker 2"
    );
    let cx = dumpxml(CLONE);
    let clone_uuid = virsh(&["domuuid", CLONE]).trim().to_string();
    assert_ne!(clone_uuid, UUID);
    assert_eq!(clone_uuid.len(), 36, "{clone_uuid}");
    assert!(
        !cx.contains(MAC) && cx.contains("<mac address='52:54:00:"),
        "{cx}"
    );
    assert!(
        cx.contains(&format!(
            "<source file='{}'/>",
            to.join("vda.raw").display()
        )),
        "{cx}"
    );
    assert!(!cx.contains("urn:cdpd") && !cx.contains("cdp-qemu"), "{cx}");
    assert!(
        !cx.contains(&d.join("disk.raw").display().to_string()),
        "{cx}"
    );
    // It boots from the restored disk: its console in DIR, its writes in DIR/vda.raw.
    virsh(&["start", CLONE]);
    let serial = to.join("serial0.log");
    let mut seen = Vec::new();
    follow_markers(&serial, "CDP-MARKER 3", 180, &mut seen);
    virsh(&["destroy", CLONE]);
    let mut seen = Vec::new();
    follow_markers(&serial, "CDP-MARKER 3", 5, &mut seen);
    let j = seen.iter().map(|m| m.0).max().unwrap();
    let disk = std::fs::read(to.join("vda.raw")).unwrap();
    assert!(
        disk == expected_wait(j) || disk == expected_wait(j + 1),
        "the clone's disk is not the restored one plus its {j} writes"
    );
    // The original is untouched: its disk, its definition, its console.
    assert!(std::fs::read(d.join("disk.raw")).unwrap() == original_disk);
    assert_eq!(
        original_xml,
        virsh(&["dumpxml", "--inactive", "--security-info", NAME])
    );
    let log = std::fs::read_to_string(d.join("serial.log")).unwrap();
    assert_eq!(
        log.matches("CDP-BOOT").count(),
        1,
        "the clone wrote to the original's console"
    );
    // NAME exists now: a second --define of it is refused before anything is written.
    let again = d.join("again");
    let r = restore_define(d, &at(2), &again, CLONE, &[]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("already has a VM named"));
    assert!(!again.join("vda.raw").exists());

    // 2. --remap-pool: the definition at marker 4 has vda as a volume of pool
    // cdp-t-src; it is restored into a new volume of a dir pool.
    let t3 = ns(&at(3));
    let vol_xml = original_xml.replacen(
        &format!("<disk type='file' device='disk'>\n      <driver name='qemu' type='raw'/>\n      <source file='{}'/>", d.join("disk.raw").display()),
        "<disk type='volume' device='disk'>\n      <driver name='qemu' type='raw'/>\n      <source pool='cdp-t-src' volume='web-disk'/>",
        1,
    );
    assert_ne!(vol_xml, original_xml, "{original_xml}");
    store_definition(d, t3 + 200_000_000, &vol_xml);
    let pool_dir = d.join("dst-pool");
    std::fs::create_dir_all(&pool_dir).unwrap();
    virsh(&[
        "pool-define-as",
        DST_POOL,
        "dir",
        "--target",
        pool_dir.to_str().unwrap(),
    ]);
    virsh(&["pool-start", DST_POOL]);
    let to2 = d.join("clone-pool");
    let r = restore_define(
        d,
        &at(4),
        &to2,
        POOL_CLONE,
        &["--remap-pool", &format!("cdp-t-src={DST_POOL}")],
    );
    assert!(r.status.success());
    let vol = pool_dir.join("web-disk");
    assert!(
        std::fs::read(&vol).unwrap() == expected_wait(4),
        "the pool's volume differs from marker 4"
    );
    assert!(
        !to2.join("vda.raw").exists(),
        "the image stayed in DIR besides the volume"
    );
    let px = dumpxml(POOL_CLONE);
    assert!(
        px.contains(&format!("<source pool='{DST_POOL}' volume='web-disk'/>")),
        "{px}"
    );
    let dx = std::fs::read_to_string(to2.join("domain.xml")).unwrap();
    assert!(dx.contains(&format!("pool='{DST_POOL}'")), "{dx}");
    // Restore never overwrites: the volume is there now.
    let r = restore_define(
        d,
        &at(4),
        &d.join("clone-pool2"),
        "cdp-t-define-pool2",
        &["--remap-pool", &format!("cdp-t-src={DST_POOL}")],
    );
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("already has a volume"));

    // 3. Hostile definitions in the repository (as a VM's user could upload
    // them): refused, nothing written in DIR, nothing defined, /etc/shadow as it was.
    let t4 = ns(&at(4));
    let shadow = std::fs::metadata("/etc/shadow").unwrap();
    let shadow_bytes = std::fs::read("/etc/shadow").unwrap();
    let extra_disk = original_xml.replacen(
        "<devices>",
        "<devices>\n    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/etc/shadow'/><target dev='vdz' bus='virtio'/></disk>",
        1,
    );
    let other_emulator = original_xml.replacen(
        "<emulator>/usr/local/bin/cdp-qemu</emulator>",
        "<emulator>/bin/sh</emulator>",
        1,
    );
    assert_ne!(other_emulator, original_xml);
    for (xml, why) in [(extra_disk, "vdz"), (other_emulator, "/bin/sh")] {
        let key = store_definition(d, t4 + 200_000_000, &xml);
        let to3 = d.join("hostile");
        let r = restore_define(d, &at(5), &to3, HOSTILE, &[]);
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(
            !r.status.success(),
            "a hostile definition ({why}) was defined"
        );
        assert!(err.contains(why), "{why}: {err}");
        let left: Vec<_> = std::fs::read_dir(&to3)
            .map(|r| r.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "a refused restore wrote {left:?}");
        assert!(!virsh_try(&["domuuid", HOSTILE]).status.success());
        std::fs::remove_file(key).unwrap();
    }
    let now = std::fs::metadata("/etc/shadow").unwrap();
    assert_eq!(
        (now.mode(), now.uid(), now.gid()),
        (shadow.mode(), shadow.uid(), shadow.gid())
    );
    assert!(std::fs::read("/etc/shadow").unwrap() == shadow_bytes);

    cleanup_libvirt();
    drop(lv);
}
