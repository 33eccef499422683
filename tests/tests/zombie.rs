//! A dead shipper leaves no zombie under QEMU (issue 15): a real QEMU
//! started through cdp-qemu with a policy that ships to a file:// target;
//! its shipper is SIGKILLed. QEMU never waits for a child, so a shipper
//! forked by cdp-qemu before the exec stayed a zombie (`Z` in
//! /proc/<pid>/stat) for the VM's whole life. The shipper is the
//! supervisor's child: it is reaped at once, started again within seconds
//! (the VM's log says so), and the restarted shipper ships what is written
//! after the kill.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use cdp_core::control::Client;
use cdp_core::layout::RunDir;
use cdp_tests::fixture::{write_protected_domain_xml, KillOnDrop, Qmp};
use cdp_tests::guest::wait_until;
use cdp_tests::{bin, require_tool};

const UUID: &str = "5e1c2d3f-7a8b-4c9d-8e0f-1a2b3c4d5e6f";

/// The process state letter of `pid` (`None`: no such process).
fn state(pid: i32) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .map(str::to_string)
}

/// The parent of `pid`.
fn ppid(pid: i32) -> Option<i32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
}

fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .unwrap_or_default()
}

/// Every live process whose command line is this VM's shipper.
fn shippers() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            let c = cmdline(*p);
            c.contains("cdp-shipper") && c.contains(UUID)
        })
        .filter(|p| state(*p).is_some_and(|s| s != "Z"))
        .collect()
}

/// QEMU's descendants (children, grandchildren) in state Z.
fn zombies_under(root: i32) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        let kids =
            std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")).unwrap_or_default();
        for k in kids
            .split_whitespace()
            .filter_map(|k| k.parse::<i32>().ok())
        {
            if state(k).as_deref() == Some("Z") {
                out.push((k, cmdline(k)));
            }
            todo.push(k);
        }
    }
    out
}

fn setup(d: &Path) -> (PathBuf, PathBuf) {
    let disk = d.join("vda.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let cfg = d.join("cdp.toml");
    std::fs::write(
        &cfg,
        format!(
            "[paths]\nstate_dir = \"{0}/state\"\nrun_dir = \"{0}/run\"\n\
             [target.primary]\nurl = \"file://{0}/repo\"\n\
             [policy.default]\ntargets = [\"primary\"]\nsegment_age = \"200ms\"\n\
             journal_min_free = \"0%\"\n",
            d.display()
        ),
    )
    .unwrap();
    std::fs::create_dir(d.join("repo")).unwrap();
    write_protected_domain_xml(&d.join("domain.xml"), "zombie", UUID, &disk);
    (disk, cfg)
}

fn start_qemu(d: &Path, disk: &Path, cfg: &Path) -> KillOnDrop {
    KillOnDrop(
        Command::new(bin("cdp-qemu"))
            .arg("--vm-config")
            .arg(d.join("domain.xml"))
            .arg("--qemu")
            .arg(require_tool("qemu-system-x86_64"))
            .arg("--config")
            .arg(cfg)
            .args(["--", "-name", "guest=zombie", "-S", "-nodefaults"])
            .args([
                "-machine", "q35", "-m", "64", "-accel", "tcg", "-display", "none",
            ])
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                d.join("qmp.sock").display()
            ))
            .arg("-blockdev")
            .arg(format!(
                r#"{{"driver":"file","filename":"{}","node-name":"d0-storage"}}"#,
                disk.display()
            ))
            .args([
                "-blockdev",
                r#"{"node-name":"d0","read-only":false,"driver":"raw","file":"d0-storage"}"#,
            ])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(d.join("qemu-io.log")).unwrap())
            .stderr(std::fs::File::create(d.join("qemu.log")).unwrap())
            .env(cdp_core::config::CONFIG_ENV, cfg)
            .spawn()
            .unwrap(),
    )
}

/// `cdpctl status UUID --json`: disk vda and its target `primary`.
fn primary(cfg: &Path) -> (serde_json::Value, serde_json::Value) {
    let out = Command::new(bin("cdpctl"))
        .args(["status", UUID, "--json", "--config"])
        .arg(cfg)
        .output()
        .unwrap();
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let t = st["disks"][0]["targets"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["target"] == "primary"))
        .cloned()
        .unwrap_or_default();
    (st["disks"][0].clone(), t)
}

#[test]
fn a_killed_shipper_is_reaped_and_started_again_under_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (disk, cfg) = setup(d);
    let log = || std::fs::read_to_string(d.join("qemu.log")).unwrap_or_default();
    let qemu = start_qemu(d, &disk, &cfg);
    let qemu_pid = qemu.0.id() as i32;
    let control = Client::new(RunDir::new(d.join("run")).vm(UUID).control_socket())
        .with_timeout(Duration::from_secs(2));
    wait_until("cdpd to serve", 60, || control.status().is_ok());
    wait_until("the shipper to run", 60, || shippers().len() == 1);
    let first = shippers()[0];
    let mut qmp = Qmp::connect(&d.join("qmp.sock"));
    qmp.qemu_io("write -P 0x11 0 64k");
    qmp.qemu_io("flush");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // Reaped: the pid is gone, not a zombie (polled; a zombie never goes).
    wait_until("the killed shipper to be reaped", 60, || {
        state(first).is_none()
    });
    assert_eq!(zombies_under(qemu_pid), vec![], "{}", log());

    // Started again by its parent within seconds, and it ships.
    wait_until("a new shipper", 60, || {
        shippers().iter().any(|p| *p != first)
    });
    let second = shippers()[0];
    assert_ne!(second, first);
    let parent = ppid(second).unwrap();
    assert!(
        cmdline(parent).contains("--supervise"),
        "the shipper's parent is the supervisor, not {parent}: {}",
        cmdline(parent)
    );
    assert!(log().contains("starting it again"), "{}", log());
    qmp.qemu_io("write -P 0x22 64k 64k");
    qmp.qemu_io("flush");
    // The write after the kill is sealed and shipped by the new shipper.
    wait_until("primary up with nothing behind", 60, || {
        let (disk, t) = primary(&cfg);
        disk["open_segment_records"] == 0
            && disk["segments_waiting_seal"] == 0
            && t["state"] == "up"
            && t["backlog_segments"] == 0
    });
    assert!(d.join("repo/cdp/v1/FORMAT").exists());
    assert_eq!(zombies_under(qemu_pid), vec![], "{}", log());
    assert!(
        state(qemu_pid).is_some_and(|s| s != "Z"),
        "QEMU died: {}",
        log()
    );
}
