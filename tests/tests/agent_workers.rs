//! Sized workers (issue 14; docs/DESIGN.md, "Plans"), with the real cdpd,
//! qemu-io and cdp-agent: the agent adopts several lagging VMs of one host
//! at once, and its `cdp_uploads_in_flight` metric rises with the backlog
//! (many segments: several uploads at once; two segments: one) and falls
//! back to 0 once everything is shipped.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cdp_tests::fixture::{cdpctl, phase, qemu_io};
use cdp_tests::{bin, Daemon};

const MIB: u64 = 1 << 20;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn scrape(port: u16) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}\n{body}");
    Some(body.to_string())
}

/// `cdp_uploads_in_flight` by VM uuid (target "primary").
fn in_flight(body: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for l in body.lines() {
        let Some(rest) = l.strip_prefix("cdp_uploads_in_flight{") else {
            continue;
        };
        let (labels, value) = rest.split_once("} ").unwrap();
        if !labels.contains("target=\"primary\"") {
            continue;
        }
        let uuid = labels
            .split(',')
            .find_map(|kv| kv.strip_prefix("vm_uuid=\""))
            .unwrap()
            .trim_end_matches('"')
            .to_string();
        out.insert(uuid, value.trim().parse::<f64>().unwrap() as u64);
    }
    out
}

fn backlog_segments(body: &str, uuid: &str) -> u64 {
    body.lines()
        .filter(|l| {
            l.starts_with("cdp_backlog_segments{")
                && l.contains(&format!("vm_uuid=\"{uuid}\""))
                && l.contains("target=\"primary\"")
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64)
        .sum()
}

struct Agent(Child, PathBuf);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- cdp-agent log ---\n{}",
                std::fs::read_to_string(&self.1).unwrap_or_default()
            );
        }
    }
}

fn write_config(path: &Path, repo: &Path, rate: &str, port: u16) {
    std::fs::write(
        path,
        format!(
            "[target.primary]\nurl = \"file://{}\"\n{rate}\
             [policy.default]\ntargets = [\"primary\"]\n\
             [agent]\nmetrics_listen = \"127.0.0.1:{port}\"\nscan_interval = \"1h\"\n",
            repo.display()
        ),
    )
    .unwrap();
}

/// A stopped VM of the host whose journal holds `cmds` (qemu-io) in 16 KiB
/// segments, none shipped, after a baseline.
fn lagging_vm(name: &str, seed: u64, cmds: &[String], host: &Path, cfg: &Path) -> Daemon {
    let (state, run_dir) = (host.join("state"), host.join("run"));
    let mut d = Daemon::builder()
        .vm_name(name)
        .disk_random("vda", 8 * MIB, seed)
        .args(["--segment-size", "16KiB", "--segment-age", "1h"])
        .host_dirs(&state, &run_dir)
        .start();
    cdpctl(&d, cfg, &["baseline", &d.vm_uuid]);
    qemu_io(&d, "vda", cmds);
    d.term();
    d
}

#[test]
fn in_flight_uploads_rise_with_the_backlog_over_several_vms_and_fall_back() {
    let host = tempfile::tempdir().unwrap();
    std::fs::set_permissions(host.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let repo = host.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let port = free_port();
    let cfg = host.path().join("cdp.toml");
    // Baselines unthrottled; the agent ships at 256 KiB/s, slowly enough to
    // see its uploads in flight (at 512 KiB/s a loaded CI run once took only
    // 9 scrapes before everything was shipped).
    write_config(&cfg, &repo, "", port);
    let phases = |seed: u64| (seed..seed + 30).flat_map(phase).collect::<Vec<_>>();
    let a = lagging_vm("vm-a", 51, &phases(51), host.path(), &cfg);
    let b = lagging_vm("vm-b", 52, &phases(52), host.path(), &cfg);
    // One 4 KiB write: one segment.
    let one = ["write -P 7 0 4k".to_string(), "flush".to_string()];
    let small = lagging_vm("vm-small", 53, &one, host.path(), &cfg);
    write_config(&cfg, &repo, "rate = \"256KiB\"\n", port);

    let log = host.path().join("agent.log");
    let f = std::fs::File::create(&log).unwrap();
    let agent = Agent(
        Command::new(bin("cdp-agent"))
            .arg("run")
            .arg("--config")
            .arg(&cfg)
            .arg("--state-dir")
            .arg(host.path().join("state"))
            .arg("--run-dir")
            .arg(host.path().join("run"))
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap(),
        log,
    );
    let uuids = [&a.vm_uuid, &b.vm_uuid, &small.vm_uuid];
    let mut peak: BTreeMap<String, u64> = BTreeMap::new();
    let (mut together, mut samples) = (0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(180);
    let last = loop {
        assert!(Instant::now() < deadline, "not shipped in 180 s: {peak:?}");
        let Some(body) = scrape(port) else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        samples += 1;
        let now = in_flight(&body);
        for (u, n) in &now {
            let p = peak.entry(u.clone()).or_default();
            *p = (*p).max(*n);
        }
        if now.get(&a.vm_uuid).copied().unwrap_or(0) > 0
            && now.get(&b.vm_uuid).copied().unwrap_or(0) > 0
        {
            together += 1;
        }
        let left: u64 = uuids.iter().map(|u| backlog_segments(&body, u)).sum();
        if left == 0 && peak.len() == 3 && now.values().all(|&n| n == 0) {
            break body;
        }
        std::thread::sleep(Duration::from_millis(30));
    };
    drop(agent);
    // Many segments behind: several uploads at once per VM, the two big VMs
    // shipped side by side; two segments behind: one at a time.
    assert!(samples >= 10, "{samples} scrapes");
    for u in [&a.vm_uuid, &b.vm_uuid] {
        assert!(peak[u.as_str()] >= 4, "{u}: peak {peak:?}");
    }
    assert!(peak[small.vm_uuid.as_str()] <= 1, "{peak:?}");
    assert!(
        together >= 1,
        "the two lagging VMs never shipped at once: {peak:?}"
    );
    // And back to 0 with nothing left.
    for u in uuids {
        assert_eq!(in_flight(&last).get(u.as_str()), Some(&0), "{last}");
    }
}
