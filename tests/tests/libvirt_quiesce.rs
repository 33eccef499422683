//! Quiesced marks with a real libvirtd and a real qemu-guest-agent (issue
//! 14, "Quiesced marks"; docs/LIBVIRT.md, "Quiesced marks"): the tiny guest
//! in `cdp.qga` mode (ext4 on its disk, qemu-ga on the virtio-serial channel
//! org.qemu.guest_agent.0, files written in a loop) is protected and
//! started. `cdpctl mark --quiesce` freezes, marks and thaws (the agent says
//! "thawed" after it); a refused mark thaws too; `cdpctl points` tells the
//! quiesced mark from an ordinary one (text and JSON); the disk restored at
//! the quiesced mark is a clean ext4 (no journal to replay), the one at the
//! ordinary mark needs its journal replayed. A guest without the agent: the
//! quiesced mark is refused with the reason and no mark is made, unless
//! `--quiesce-or-crash`, which makes a crash-consistent one and says so.
//!
//! Needs root and libvirtd (`scripts/install-deps`); runs alone
//! (.config/nextest.toml, group `libvirt`).

use std::path::Path;
use std::process::Command;

use cdp_tests::guest::{follow_markers, wait_until};
use cdp_tests::libvirt::*;
use cdp_tests::{require_tool, run, run_ok};

const CHANNEL: &str = "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>\n  </devices>";

/// The guest agent's answer to `cmd` through libvirt, or None.
fn agent(name: &str, cmd: &str) -> Option<String> {
    let o = virsh_try(&["qemu-agent-command", name, cmd]);
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn freeze_status(name: &str) -> String {
    agent(name, r#"{"execute":"guest-fsfreeze-status"}"#).expect("the guest agent answers")
}

/// `cdpctl [--json] ARGS` as the host's operator; (success, stdout, stderr).
fn cdpctl(args: &[&str]) -> (bool, String, String) {
    let o = run(host_cdpctl().args(args));
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// The domain of the tiny guest (its disk created empty), with the guest
/// agent's channel when `channel`.
fn domain(d: &Path, name: &str, uuid: &str, cmdline: &str, channel: bool) -> String {
    let _ = virsh_try(&["destroy", name]);
    let _ = virsh_try(&["undefine", name]);
    let xml = domain_xml(name, uuid, d, cmdline);
    if channel {
        xml.replacen("</devices>", CHANNEL, 1)
    } else {
        xml
    }
}

/// Define, protect and start the guest; wait for `CDP-MARKER 3`.
fn boot(d: &Path, name: &str, xml: &str) {
    define(d, xml);
    sh(host_cdpctl().args(["protect", name, "--disk", "vda"]));
    virsh(&["start", name]);
    let mut markers = Vec::new();
    follow_markers(&d.join("serial.log"), "CDP-MARKER 3", 180, &mut markers);
}

/// Every disk's marks of `points --json` from the repository: (label, quiesced).
fn marks_in_points(d: &Path, uuid: &str) -> Vec<(String, bool)> {
    let url = format!("file://{}/repo", d.display());
    let out = sh(host_cdpctl().args(["--json", "points", uuid, "--repo", &url]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut m: Vec<(String, bool)> = v["disks"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|disk| disk["marks"].as_array().unwrap().clone())
        .map(|x| {
            (
                x["label"].as_str().unwrap().to_string(),
                x["quiesced"].as_bool().expect("marks say quiesced or not"),
            )
        })
        .collect();
    m.sort();
    m
}

/// `dumpe2fs -h` and `e2fsck -fn` of a restored image: (needs journal
/// recovery, e2fsck's exit code).
fn fs_state(img: &Path) -> (bool, i32) {
    let h = sh(Command::new("dumpe2fs").arg("-h").arg(img));
    let features = h
        .lines()
        .find(|l| l.starts_with("Filesystem features:"))
        .unwrap_or_else(|| panic!("no features in dumpe2fs -h: {h}"))
        .to_string();
    let fsck = run(Command::new("e2fsck").arg("-fn").arg(img));
    (
        features.contains("needs_recovery"),
        fsck.status.code().unwrap_or(-1),
    )
}

#[test]
fn quiesced_mark_freezes_marks_thaws_and_restores_a_clean_file_system() {
    require_tool("mkfs.ext4");
    require_tool("e2fsck");
    let dir = shared_tempdir();
    let d = dir.path();
    let port = free_port();
    let mut lv = Libvirt::start(d, &config_for(d, port));
    let name = "cdp-t-quiesce";
    let uuid = "4e1f0c2b-7a3d-4b5e-9c6f-1a2b3c4d5e6f";
    // The guest's file system, made before the first boot (protect takes it
    // in the offline baseline).
    let xml = domain(d, name, uuid, "cdp.qga", true);
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(d.join("disk.raw")),
    );
    lv.start_agent(&d.join("agent.log"));
    boot(d, name, &xml);
    wait_until("the guest agent to answer guest-ping", 90, || {
        agent(name, r#"{"execute":"guest-ping"}"#).is_some()
    });

    let (ok, out, err) = cdpctl(&["mark", uuid, "plain"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("crash-consistent"), "{out}");
    let (ok, out, err) = cdpctl(&["mark", uuid, "frozen", "--quiesce"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("), quiesced"), "{out}");
    assert!(
        freeze_status(name).contains("thawed"),
        "{}",
        freeze_status(name)
    );
    // The guest goes on writing after the thaw.
    let seen = std::fs::read_to_string(d.join("serial.log")).unwrap();
    let n = seen.matches("CDP-MARKER").count();
    wait_until("markers after the thaw", 60, || {
        std::fs::read_to_string(d.join("serial.log"))
            .unwrap()
            .matches("CDP-MARKER")
            .count()
            > n + 2
    });

    // A mark cdpd refuses (the label exists) after the freeze: thawed, no mark.
    let (ok, out, err) = cdpctl(&["mark", uuid, "frozen", "--quiesce"]);
    assert!(!ok, "a duplicate label was accepted: {out}");
    assert!(err.contains("mark refused"), "{err}");
    assert!(err.contains("thawed again; no quiesced mark"), "{err}");
    assert!(
        freeze_status(name).contains("thawed"),
        "{}",
        freeze_status(name)
    );

    virsh(&["destroy", name]);
    wait_until("an empty backlog after destroy", 90, || {
        let text = metrics(port).unwrap_or_default();
        metric_sum(&text, "cdp_backlog_segments", uuid) == Some(0.0)
            && metric_sum(&text, "cdp_vm_running", uuid) == Some(0.0)
    });
    lv.stop_agent();

    // points: the quiesced mark and the ordinary one, JSON and text.
    assert_eq!(
        marks_in_points(d, uuid),
        vec![("frozen".to_string(), true), ("plain".to_string(), false)]
    );
    let url = format!("file://{}/repo", d.display());
    let text = sh(host_cdpctl().args(["points", uuid, "--repo", &url]));
    let line = |label: &str| {
        text.lines()
            .find(|l| l.contains("mark ") && l.contains(&format!("  {label}  (")))
            .unwrap_or_else(|| panic!("no mark {label} in points:\n{text}"))
            .to_string()
    };
    assert!(line("frozen").ends_with("(quiesced)"), "{text}");
    assert!(line("plain").ends_with("(crash-consistent)"), "{text}");

    // Restored from the repository: at the quiesced mark a clean ext4 (the
    // freeze flushed its journal); at the ordinary mark, taken while it was
    // mounted, one that needs its journal replayed.
    std::fs::remove_dir_all(d.join("state")).unwrap();
    for label in ["frozen", "plain"] {
        sh(host_cdpctl()
            .args(["restore", uuid, "--disk", "vda", "--at"])
            .arg(format!("mark:{label}"))
            .arg("--output")
            .arg(d.join(format!("{label}.raw")))
            .args(["--repo", &url, "--state-dir"])
            .arg(d.join("empty-state")));
    }
    assert_eq!(fs_state(&d.join("frozen.raw")), (false, 0));
    assert!(
        fs_state(&d.join("plain.raw")).0,
        "the ordinary mark's file system was clean"
    );

    virsh(&["undefine", name]);
    drop(lv);
}

#[test]
fn quiesce_without_a_guest_agent_is_refused_and_makes_no_mark() {
    let dir = shared_tempdir();
    let d = dir.path();
    let lv = Libvirt::start(d, &config_for(d, free_port()));
    let name = "cdp-t-noagent";
    let uuid = "5f2a1d3c-8b4e-4c6f-8d7a-2b3c4d5e6f7a";
    let xml = domain(d, name, uuid, "cdp.wait", false);
    boot(d, name, &xml);

    let (ok, out, err) = cdpctl(&["mark", uuid, "q1", "--quiesce", "--freeze-timeout", "15"]);
    assert!(!ok, "quiesced without an agent: {out}");
    assert!(err.contains("cannot quiesce"), "{err}");
    assert!(err.contains("qemu-guest-agent"), "{err}");
    // No mark: the label is still free.
    let (ok, out, err) = cdpctl(&["mark", uuid, "q1", "--quiesce-or-crash"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("crash-consistent"), "{out}");
    assert!(err.contains("made a crash-consistent mark"), "{err}");
    let (ok, _, err) = cdpctl(&["mark", uuid, "q1"]);
    assert!(!ok && err.contains("mark refused"), "{err}");

    virsh(&["destroy", name]);
    virsh(&["undefine", name]);
    drop(lv);
}
