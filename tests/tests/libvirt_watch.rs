//! The definition watch with a real libvirtd (issue 14, "Whole-VM
//! restore"; docs/AGENT.md, "Definition watch"): a protected VM runs the
//! tiny guest, cdp-agent runs; the definition is changed while the VM runs
//! (`virsh attach-device --config` of a second disk), and within a few
//! scans the repository holds a new definition version with it;
//! `cdpctl restore-config --at` a time before the change gives the old
//! definition and after it the new. Then `virsh metadata --remove` takes the
//! CDP keys away: the agent says so, unprotects nothing (the VM keeps being
//! captured), and stores that definition too.
//!
//! Needs root and libvirtd (`scripts/install-deps`); runs alone
//! (.config/nextest.toml, group `libvirt`).

use std::path::{Path, PathBuf};

use cdp_core::time::{fmt_ns, now_ns};
use cdp_tests::guest::{follow_markers, wait_until};
use cdp_tests::libvirt::*;

/// The definition versions the repository holds, oldest first: (time, XML).
fn versions(repo: &Path, uuid: &str) -> Vec<(u64, String)> {
    let dir = repo.join("cdp/v1/vms").join(uuid).join("config");
    let mut v: Vec<(u64, String)> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let ts = name.strip_suffix(".xml")?.parse().ok()?;
            Some((ts, std::fs::read_to_string(e.path()).ok()?))
        })
        .collect();
    v.sort();
    v
}

/// `cdpctl restore-config VM --at AT` from the repository alone.
fn restore_config(d: &Path, uuid: &str, at: &str, out: &str) -> String {
    let out: PathBuf = d.join(out);
    sh(host_cdpctl()
        .args(["restore-config", uuid, "--at", at, "--output"])
        .arg(&out)
        .args(["--repo", &format!("file://{}/repo", d.display())]));
    std::fs::read_to_string(&out).unwrap()
}

#[test]
fn a_definition_changed_while_the_vm_runs_is_stored_and_restored_by_time() {
    let dir = shared_tempdir();
    let d = dir.path();
    let repo = d.join("repo");
    let mut lv = Libvirt::start(d, &config_for(d, free_port()));
    let name = "cdp-t-defwatch";
    let uuid = "7d6c5b4a-3f2e-4d1c-8b0a-9f8e7d6c5b4a";
    let _ = virsh_try(&["destroy", name]);
    let _ = virsh_try(&["undefine", name]);
    define(d, &domain_xml(name, uuid, d, "cdp.wait"));
    sh(host_cdpctl().args(["protect", name, "--disk", "vda"]));
    let log = d.join("agent.log");
    lv.start_agent(&log);
    virsh(&["start", name]);
    let mut markers = Vec::new();
    follow_markers(&d.join("serial.log"), "CDP-MARKER 1", 120, &mut markers);

    // Settled: the repository's newest version is libvirt's persistent
    // definition (the watch replaces the start-time copy with it).
    let persistent = || virsh(&["dumpxml", "--inactive", "--security-info", name]);
    let mut before_xml = persistent();
    wait_until("the persistent definition in the repository", 60, || {
        before_xml = persistent();
        versions(&repo, uuid).last().map(|v| &v.1) == Some(&before_xml)
    });
    assert!(!before_xml.contains("disk2.raw"));
    let n_before = versions(&repo, uuid).len();
    let before = fmt_ns(now_ns());

    // The change, while the VM runs, to its persistent definition only.
    let disk2 = d.join("disk2.raw");
    std::fs::File::create(&disk2)
        .unwrap()
        .set_len(MIB as u64)
        .unwrap();
    let dev = d.join("disk2.xml");
    std::fs::write(
        &dev,
        format!(
            "<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='vdb' bus='virtio'/></disk>\n",
            disk2.display()
        ),
    )
    .unwrap();
    virsh(&["attach-device", name, dev.to_str().unwrap(), "--config"]);
    let changed_xml = persistent();
    assert!(changed_xml.contains("disk2.raw"), "{changed_xml}");
    wait_until("the changed definition in the repository", 60, || {
        versions(&repo, uuid)
            .last()
            .is_some_and(|v| v.1 == changed_xml)
    });
    let after = fmt_ns(now_ns());
    assert_eq!(
        versions(&repo, uuid).len(),
        n_before + 1,
        "one new version for one change"
    );
    assert_eq!(virsh(&["domstate", name]).trim(), "running");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(&format!(
            "VM {name} ({uuid}): its definition changed in libvirt"
        )),
        "{text}"
    );

    // Restore by time: before the change the old definition, after it the new.
    assert_eq!(restore_config(d, uuid, &before, "before.xml"), before_xml);
    assert_eq!(restore_config(d, uuid, &after, "after.xml"), changed_xml);

    // `virsh edit` (here `virsh metadata --remove`) takes the CDP keys away:
    // the agent says so; nothing is unprotected (cdpd keeps capturing), and
    // the definition libvirt will boot next is stored like any other.
    virsh(&[
        "metadata",
        name,
        "urn:cdpd:protection:1",
        "--remove",
        "--config",
    ]);
    let bare = persistent();
    assert!(!bare.contains("urn:cdpd:protection:1"), "{bare}");
    wait_until(
        "the agent's warning and the bare definition stored",
        60,
        || {
            let text = std::fs::read_to_string(&log).unwrap();
            text.contains("has no CDP keys any more")
                && versions(&repo, uuid).last().is_some_and(|v| v.1 == bare)
        },
    );
    let sock = d.join("run").join(uuid).join("control.sock");
    assert!(sock.exists(), "cdpd stopped: {}", sock.display());
    let live = virsh(&["dumpxml", name]);
    assert!(live.contains("urn:cdpd:protection:1"), "{live}");
    let mut more = Vec::new();
    follow_markers(&d.join("serial.log"), "CDP-MARKER 3", 120, &mut more);

    virsh(&["destroy", name]);
    virsh(&["undefine", name]);
    lv.stop_agent();
    drop(lv);
}
