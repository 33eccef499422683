//! A shipper that cannot write is a failing target within seconds (issue
//! 15), end to end: the real cdpd and the real shipper run as QEMU's user
//! (libvirt-qemu), the repository is root's (mode 0755), the real cdp-agent
//! serves its metrics. Within seconds of the first write the target is
//! "failing" in `cdpctl status` (JSON and text, with what to do) and 0 in
//! the agent's metrics, and it stays failing (every sample, not one look
//! after a sleep); once the directory is the user's it is "up" (1) again,
//! nothing is behind, and a restore from the repository alone equals the
//! image: nothing written while it was failing was lost.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cdp_tests::fixture::{
    assert_repo_restores_image, cdpctl_out, qemu_io, spawn_shipper_as, KillOnDrop as Killed,
};
use cdp_tests::{bin, Daemon};

const QEMU_UID: u32 = 64055;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn_shipper(d: &Daemon, cfg: &Path) -> Killed {
    let xml = d.work_dir().join("domain.xml");
    std::fs::write(&xml, "<domain><name>test-vm</name></domain>\n").unwrap();
    spawn_shipper_as(d, cfg, &xml, QEMU_UID, &d.work_dir().join("shipper.log"))
}

fn spawn_agent(d: &Daemon, cfg: &Path) -> Killed {
    let log = std::fs::File::create(d.work_dir().join("agent.log")).unwrap();
    Killed(
        Command::new(bin("cdp-agent"))
            .arg("run")
            .arg("--config")
            .arg(cfg)
            .arg("--state-dir")
            .arg(&d.state_dir)
            .arg("--run-dir")
            .arg(&d.run_dir)
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

/// `cdp_vm_target_up` of this VM's target `primary`, from GET /metrics.
fn metric_up(port: u16, uuid: &str) -> Option<f64> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.lines()
        .filter(|l| l.starts_with("cdp_vm_target_up{"))
        .filter(|l| l.contains(&format!("vm_uuid=\"{uuid}\"")) && l.contains("target=\"primary\""))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// (disk vda, its target `primary`) from `cdpctl status --json`.
fn status(d: &Daemon, cfg: &Path) -> (serde_json::Value, serde_json::Value) {
    let out = cdpctl_out(d, cfg, &["status", &d.vm_uuid, "--json"]);
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let t = st["disks"][0]["targets"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["target"] == "primary"))
        .cloned()
        .unwrap_or_default();
    (st["disks"][0].clone(), t)
}

fn logs(d: &Daemon) -> String {
    let r = |n: &str| std::fs::read_to_string(d.work_dir().join(n)).unwrap_or_default();
    format!(
        "shipper log:\n{}\nagent log:\n{}",
        r("shipper.log"),
        r("agent.log")
    )
}

/// Poll `f` every 50 ms until it holds; fail after `secs` with the logs.
fn poll(d: &Daemon, sh: &mut Killed, what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            sh.0.try_wait().unwrap().is_none(),
            "the shipper exited waiting for {what}\n{}",
            logs(d)
        );
        assert!(
            Instant::now() < deadline,
            "timed out ({secs} s) waiting for {what}\n{}",
            logs(d)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_unwritable_repository_is_failing_within_seconds_and_up_once_writable() {
    use std::os::unix::fs::PermissionsExt;
    let d = Daemon::builder()
        .disk_random("vda", 4 << 20, 5)
        .args(["--segment-age", "50ms"])
        .as_user(QEMU_UID, QEMU_UID)
        .start();
    let repo = d.root.join("repo");
    std::fs::create_dir(&repo).unwrap();
    std::fs::set_permissions(&repo, std::fs::Permissions::from_mode(0o755)).unwrap();
    let port = free_port();
    let cfg = d.work_dir().join("cdp.toml");
    std::fs::write(
        &cfg,
        format!(
            "[target.primary]\nurl = \"file://{}\"\n[policy.default]\ntargets = [\"primary\"]\n\
             journal_min_free = \"0%\"\n[agent]\nmetrics_listen = \"127.0.0.1:{port}\"\n",
            repo.display()
        ),
    )
    .unwrap();
    let mut sh = spawn_shipper(&d, &cfg);
    let _agent = spawn_agent(&d, &cfg);
    qemu_io(&d, "vda", &["write -P 7 0 64k".into(), "flush".into()]);
    let t0 = Instant::now();

    // Failing, in status and in the metrics, within seconds.
    poll(&d, &mut sh, "status: failing", 30, || {
        status(&d, &cfg).1["state"] == "failing"
    });
    let in_status = t0.elapsed();
    poll(&d, &mut sh, "metrics: cdp_vm_target_up 0", 30, || {
        metric_up(port, &d.vm_uuid) == Some(0.0)
    });
    let in_metrics = t0.elapsed();
    eprintln!("failing in status after {in_status:?}, in the metrics after {in_metrics:?}");
    assert!(
        in_metrics < Duration::from_secs(30),
        "{in_metrics:?}\n{}",
        logs(&d)
    );
    let (_, t) = status(&d, &cfg);
    let err = t["last_error"].as_str().unwrap_or_default();
    assert!(
        err.contains("not writable by") && err.contains("chown"),
        "{t}"
    );
    let text = cdpctl_out(&d, &cfg, &["status", &d.vm_uuid]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("failing") && text.contains("not writable by"),
        "{text}"
    );

    // A write while failing; every sample for 3 s (and at least 3 samples,
    // however slow each is on a loaded host) says failing (the shipper
    // keeps retrying; never "up" meanwhile).
    qemu_io(&d, "vda", &["write -P 8 1M 64k".into(), "flush".into()]);
    let until = Instant::now() + Duration::from_secs(3);
    let mut samples = 0;
    while Instant::now() < until || samples < 3 {
        assert!(sh.0.try_wait().unwrap().is_none(), "{}", logs(&d));
        let (_, t) = status(&d, &cfg);
        assert_eq!(t["state"], "failing", "{t}\n{}", logs(&d));
        assert_eq!(metric_up(port, &d.vm_uuid), Some(0.0));
        samples += 1;
    }
    assert!(samples >= 3, "{samples} samples");

    // The operator gives the directory to QEMU's user: up, nothing behind.
    std::os::unix::fs::chown(&repo, Some(QEMU_UID), Some(QEMU_UID)).unwrap();
    poll(&d, &mut sh, "up with nothing behind", 120, || {
        let (disk, t) = status(&d, &cfg);
        t["state"] == "up"
            && t["backlog_segments"] == 0
            && disk["open_segment_records"] == 0
            && disk["segments_waiting_seal"] == 0
    });
    // The baseline goes up in its own step after the target's backoff (it may
    // come after the segments): a restore needs it.
    let baselines = repo.join(format!("cdp/v1/vms/{}/vda/baselines", d.vm_uuid));
    poll(&d, &mut sh, "a baseline in the repository", 120, || {
        std::fs::read_dir(&baselines).is_ok_and(|mut e| e.next().is_some())
    });
    poll(&d, &mut sh, "metrics: cdp_vm_target_up 1", 30, || {
        metric_up(port, &d.vm_uuid) == Some(1.0)
    });
    // Nothing lost: the repository alone restores the image.
    assert_repo_restores_image(&d, &cfg, &repo, "vda");
}
