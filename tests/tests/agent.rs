//! cdp-agent with real processes: cdpd, qemu-io, cdp-shipper, file://
//! targets, cdpctl restore from the repository alone.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use cdp_tests::fixture::{cdpctl, phase, qemu_io};
use cdp_tests::{assert_files_equal, bin, run, wait_child, Daemon};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------- helpers

/// Poll `f` until it holds (every 20 ms, at most `timeout`).
fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A config: target `primary` at `repo` for policy `default`, plus `[agent]` lines.
fn config(d: &Daemon, repo: &Path, agent: &str) -> PathBuf {
    let p = d.work_dir().join("cdp.toml");
    std::fs::write(
        &p,
        format!(
            "[target.primary]\nurl = \"file://{}\"\n[policy.default]\ntargets = [\"primary\"]\n[agent]\n{agent}\n",
            repo.display()
        ),
    )
    .unwrap();
    p
}

fn repo_dir(d: &Daemon) -> PathBuf {
    let r = d.work_dir().join("repo");
    std::fs::create_dir_all(&r).unwrap();
    r
}

fn agent_cmd(d: &Daemon, cfg: &Path) -> Command {
    let mut c = Command::new(bin("cdp-agent"));
    c.arg("run")
        .arg("--config")
        .arg(cfg)
        .arg("--state-dir")
        .arg(&d.state_dir)
        .arg("--run-dir")
        .arg(&d.run_dir);
    c
}

/// `cdp-agent run --once`: its output.
fn agent_once(d: &Daemon, cfg: &Path) -> Output {
    run(agent_cmd(d, cfg).arg("--once"))
}

/// `cdp-agent run --once` that must succeed: its report.
fn agent_once_ok(d: &Daemon, cfg: &Path) -> Value {
    let out = agent_once(d, cfg);
    assert!(
        out.status.success(),
        "cdp-agent --once failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("cdp-agent --once prints its report as JSON")
}

/// A `cdp-agent run` service process, killed when dropped.
struct Agent {
    child: Option<Child>,
    log: PathBuf,
}

impl Agent {
    fn start(d: &Daemon, cfg: &Path, env: &[(&str, &str)]) -> Agent {
        let log = d.work_dir().join("agent.log");
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut c = agent_cmd(d, cfg);
        // Its stderr is a file here, never the journal's (even when the
        // tests run under systemd): it stamps its lines.
        c.env_remove("JOURNAL_STREAM")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f);
        Agent {
            child: Some(c.spawn().expect("start cdp-agent")),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = self.child.as_ref().unwrap().id() as i32;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
    }

    fn term(&mut self) -> ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let st = wait_child(self.child.take().unwrap(), Duration::from_secs(30));
        st.unwrap_or_else(|| panic!("cdp-agent ignored SIGTERM\n{}", self.log()))
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("--- cdp-agent log ---\n{}", self.log());
        }
    }
}

/// GET /metrics: the body, after checking the status and the content type.
fn scrape(port: u16) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}\n{body}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    Some(body.to_string())
}

#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parse the Prometheus text format 0.0.4 strictly: every sample line is
/// `name{label="value",…} value`, and its family was typed before it.
fn parse_prom(text: &str) -> Vec<Sample> {
    let mut typed = BTreeMap::new();
    let mut out = Vec::new();
    let is_name = |s: &str| {
        !s.is_empty()
            && s.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            })
    };
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(is_name(name), "bad metric name in {line:?}");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line:?}"
            );
            typed.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => panic!("no value in {line:?}"),
        };
        assert!(is_name(name), "bad metric name in {line:?}");
        assert!(
            typed.contains_key(name),
            "{name} has no TYPE line before it"
        );
        let mut labels = BTreeMap::new();
        let mut rest = rest;
        if let Some(r) = rest.strip_prefix('{') {
            let mut chars = r.char_indices().peekable();
            let end;
            loop {
                // label name
                let start = chars.peek().expect("unterminated labels").0;
                if r[start..].starts_with('}') {
                    end = start + 1;
                    break;
                }
                let eq = r[start..].find('=').expect("label without =") + start;
                let lname = &r[start..eq];
                assert!(is_name(lname), "bad label name {lname:?} in {line:?}");
                assert_eq!(&r[eq + 1..eq + 2], "\"", "label value not quoted: {line:?}");
                while chars.peek().unwrap().0 <= eq + 1 {
                    chars.next();
                }
                let mut v = String::new();
                loop {
                    let (_, c) = chars.next().expect("unterminated label value");
                    match c {
                        '\\' => match chars.next().unwrap().1 {
                            'n' => v.push('\n'),
                            c => v.push(c),
                        },
                        '"' => break,
                        c => v.push(c),
                    }
                }
                labels.insert(lname.to_string(), v);
                match chars.next().expect("unterminated labels") {
                    (_, ',') => {}
                    (i, '}') => {
                        end = i + 1;
                        break;
                    }
                    (_, c) => panic!("unexpected {c:?} in {line:?}"),
                }
            }
            rest = &r[end..];
        }
        let mut parts = rest.split_whitespace();
        let v = parts
            .next()
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        let value: f64 = match v {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value {v:?} in {line:?}")),
        };
        if let Some(ts) = parts.next() {
            ts.parse::<i64>()
                .unwrap_or_else(|_| panic!("bad timestamp in {line:?}"));
        }
        assert!(parts.next().is_none(), "trailing text in {line:?}");
        out.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    out
}

/// The value of the sample `name` whose labels include `labels`.
fn metric(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

fn scrape_parsed(port: u16) -> Vec<Sample> {
    parse_prom(&scrape(port).expect("metrics answer"))
}

fn catalog(d: &Daemon) -> rusqlite::Connection {
    rusqlite::Connection::open(d.catalog_path()).unwrap()
}

fn shipments(d: &Daemon) -> i64 {
    catalog(d)
        .query_row(
            "SELECT count(*) FROM shipments WHERE vm_uuid = ?1",
            [&d.vm_uuid],
            |r| r.get(0),
        )
        .unwrap()
}

/// (first_seq, last_seq) of every sealed segment of `disk` in the catalog.
fn catalog_segments(d: &Daemon, disk: &str) -> Vec<(u64, u64)> {
    let c = catalog(d);
    let mut st = c
        .prepare("SELECT first_seq, last_seq FROM segments WHERE vm_uuid = ?1 AND disk = ?2 AND sealed = 1 ORDER BY first_seq")
        .unwrap();
    st.query_map([&d.vm_uuid, disk], |r| {
        Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// (first_seq, last_seq) of every segment object of `disk` in a file:// repository.
fn repo_segments(repo: &Path, vm: &str, disk: &str) -> Vec<(u64, u64)> {
    let dir = repo.join(format!("cdp/v1/vms/{vm}/{disk}/journal"));
    let mut v: Vec<(u64, u64)> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let (a, b) = n.strip_suffix(".seg.zst")?.split_once('-')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .collect();
    v.sort();
    v
}

fn last_session_end(d: &Daemon) -> Option<String> {
    catalog(d)
        .query_row(
            "SELECT end_kind FROM sessions WHERE vm_uuid = ?1 ORDER BY id DESC LIMIT 1",
            [&d.vm_uuid],
            |r| r.get(0),
        )
        .unwrap()
}

/// Restore `disk` at `latest` from the repository alone, with the host's
/// state gone, and compare it with the image byte for byte.
fn restore_equals_image(d: &Daemon, cfg: &Path, repo: &Path, disk: &str) {
    let saved = d.root.join("state-saved");
    std::fs::rename(&d.state_dir, &saved).unwrap();
    std::fs::create_dir_all(&d.state_dir).unwrap();
    let out = d
        .work_dir()
        .join(format!("restored-{disk}-{}.img", std::process::id()));
    let _ = std::fs::remove_file(&out);
    let url = format!("file://{}", repo.display());
    cdpctl(
        d,
        cfg,
        &[
            "restore",
            &d.vm_uuid,
            "--disk",
            disk,
            "--at",
            "latest",
            "--output",
            out.to_str().unwrap(),
            "--repo",
            &url,
        ],
    );
    assert_files_equal(&out, &d.image(disk));
    std::fs::remove_file(&out).unwrap();
    std::fs::remove_dir_all(&d.state_dir).unwrap();
    std::fs::rename(&saved, &d.state_dir).unwrap();
}

fn adopted<'a>(report: &'a Value, vm: &str) -> Option<&'a Value> {
    report["adopted"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["vm_uuid"] == vm)
}

/// Hold `<state>/vms/<uuid>/shipper.lock` as a shipper (or the agent) would.
fn hold_lock(d: &Daemon) -> File {
    let p = d
        .state_dir
        .join("vms")
        .join(&d.vm_uuid)
        .join("shipper.lock");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&p)
        .unwrap();
    // SAFETY: flock takes a descriptor `f` owns and two flags; no memory is shared.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(r, 0, "lock {} is held", p.display());
    f
}

// ------------------------------------------------------------------ tests

#[test]
fn adopts_a_stopped_vm_and_a_killed_one_and_restores_byte_exact() {
    // Stopped cleanly, no shipper ever ran.
    let mut d = Daemon::builder()
        .disk_random("vda", 8 * MIB, 31)
        .args(["--segment-age", "20ms"])
        .start();
    let repo = repo_dir(&d);
    let cfg = config(&d, &repo, "metrics_listen = \"\"");
    cdpctl(&d, &cfg, &["baseline", &d.vm_uuid]);
    for i in 0..3 {
        qemu_io(&d, "vda", &phase(i));
    }
    d.term();
    let local = catalog_segments(&d, "vda");
    assert!(!local.is_empty());
    let report = agent_once_ok(&d, &cfg);
    let a = adopted(&report, &d.vm_uuid).unwrap_or_else(|| panic!("not adopted: {report}"));
    assert!(a["recovered"].is_null(), "{a}");
    assert!(a["shipped_segments"].as_u64().unwrap() > 0, "{a}");
    // Every sealed segment once, in order.
    assert_eq!(repo_segments(&repo, &d.vm_uuid, "vda"), local);
    restore_equals_image(&d, &cfg, &repo, "vda");
    // Nothing left: a second scan does nothing.
    let again = agent_once_ok(&d, &cfg);
    assert!(adopted(&again, &d.vm_uuid).is_none(), "{again}");

    // Killed with an unsealed segment (segments never age out).
    let mut k = Daemon::builder()
        .disk_random("vda", 8 * MIB, 32)
        .args(["--segment-age", "1h"])
        .start();
    let repo = repo_dir(&k);
    let cfg = config(&k, &repo, "metrics_listen = \"\"");
    cdpctl(&k, &cfg, &["baseline", &k.vm_uuid]);
    for i in 0..3 {
        qemu_io(&k, "vda", &phase(i));
    }
    k.kill9();
    assert!(
        catalog_segments(&k, "vda").is_empty(),
        "nothing was sealed before the kill"
    );
    assert_eq!(last_session_end(&k), None);
    let report = agent_once_ok(&k, &cfg);
    let a = adopted(&report, &k.vm_uuid).unwrap_or_else(|| panic!("not adopted: {report}"));
    assert_eq!(a["recovered"]["previous_end"], "crash", "{a}");
    assert!(
        a["recovered"]["sealed_segments"].as_u64().unwrap() >= 1,
        "{a}"
    );
    assert_eq!(last_session_end(&k).as_deref(), Some("crash"));
    let sealed = catalog_segments(&k, "vda");
    assert_eq!(repo_segments(&repo, &k.vm_uuid, "vda"), sealed);
    restore_equals_image(&k, &cfg, &repo, "vda");
    // Recovery synced the image with the journal redone (a checkpoint at
    // its last seq): every shipped segment is trimmed.
    let local: i64 = catalog(&k)
        .query_row(
            "SELECT count(*) FROM segments WHERE vm_uuid = ?1 AND local = 1",
            [&k.vm_uuid],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(local, 0, "shipped segments kept after the agent's recovery");

    // cdpd starts again on the adopted journal and the chain goes on.
    k.start();
    qemu_io(&k, "vda", &phase(7));
    k.term();
    let recs = k.journal_records();
    let start = recs
        .iter()
        .rev()
        .find(|r| r["kind"] == "SESSION_START")
        .unwrap();
    assert!(
        start.to_string().contains("crash"),
        "the next session sees the crash the agent recorded: {start}"
    );
    let report = agent_once_ok(&k, &cfg);
    assert!(adopted(&report, &k.vm_uuid).is_some(), "{report}");
    let all = repo_segments(&repo, &k.vm_uuid, "vda");
    assert!(all.windows(2).all(|w| w[0].1 < w[1].0), "overlap: {all:?}");
    restore_equals_image(&k, &cfg, &repo, "vda");
}

#[test]
fn killed_mid_shipping_then_restarted_ships_every_record_exactly_once() {
    let mut d = Daemon::builder()
        .disk_random("vda", 8 * MIB, 41)
        .args(["--segment-size", "16KiB", "--segment-age", "1h"])
        .start();
    let repo = repo_dir(&d);
    let port = free_port();
    let cfg = config(
        &d,
        &repo,
        &format!("metrics_listen = \"127.0.0.1:{port}\"\nscan_interval = \"1h\""),
    );
    cdpctl(&d, &cfg, &["baseline", &d.vm_uuid]);
    // Many small segments: 8 phases of 15 requests, one segment each or more.
    let mut cmds = Vec::new();
    for i in 0..40 {
        cmds.extend(phase(i));
    }
    qemu_io(&d, "vda", &cmds);
    d.term();
    let local = catalog_segments(&d, "vda");
    assert!(local.len() > 100, "only {} segments", local.len());

    let mut agent = Agent::start(&d, &cfg, &[]);
    wait_until("the agent's first shipments", WAIT, || shipments(&d) > 0);
    agent.kill9();
    let at_kill = shipments(&d);
    assert!(
        (at_kill as usize) < local.len(),
        "the agent finished before it was killed ({at_kill} of {}); make the backlog bigger",
        local.len()
    );
    // Restarted, it ships the rest.
    let mut agent = Agent::start(&d, &cfg, &[]);
    wait_until("everything shipped", WAIT, || {
        shipments(&d) as usize == local.len()
    });
    assert_eq!(agent.term().code(), Some(0), "{}", agent.log());
    // Run by hand (stderr not the journal's), each line says when.
    let log = agent.log();
    let stamped = |l: &str| {
        l.len() > 25
            && l.as_bytes()[4] == b'-'
            && l[..25].ends_with("Z ")
            && l.contains(" cdp-agent: ")
    };
    assert!(
        log.lines().any(|l| l.contains("cdp-agent: stopped"))
            && log
                .lines()
                .filter(|l| l.contains("cdp-agent: "))
                .all(stamped),
        "agent lines without a UTC time:\n{log}"
    );
    // Every record exactly once, in order: each sealed segment is one
    // object, and the objects' ranges follow each other.
    let objs = repo_segments(&repo, &d.vm_uuid, "vda");
    assert_eq!(objs, local);
    assert!(objs.windows(2).all(|w| w[0].1 < w[1].0));
    restore_equals_image(&d, &cfg, &repo, "vda");
}

#[test]
fn never_ships_a_vm_whose_shipper_holds_the_lock() {
    let mut d = Daemon::builder()
        .disk_random("vda", 8 * MIB, 51)
        .args(["--segment-age", "20ms"])
        .start();
    let repo = repo_dir(&d);
    let cfg = config(&d, &repo, "metrics_listen = \"\"");
    qemu_io(&d, "vda", &phase(1));

    // A real shipper runs: it holds the lock, the agent keeps off.
    let shipper = Command::new(bin("cdp-shipper"))
        .args(["run", "--vm-uuid", &d.vm_uuid, "--poll", "50ms"])
        .arg("--state-dir")
        .arg(&d.state_dir)
        .arg("--run-dir")
        .arg(&d.run_dir)
        .arg("--config")
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the shipper's first shipment", WAIT, || shipments(&d) > 0);
    let report = agent_once_ok(&d, &cfg);
    assert_eq!(report["busy"][0], d.vm_uuid.as_str(), "{report}");
    assert!(adopted(&report, &d.vm_uuid).is_none(), "{report}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shipper.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(wait_child(shipper, Duration::from_secs(30)).is_some());

    // The lock held by someone else (as the agent holds it during a pass):
    // the agent skips the VM, and a shipper waits for it.
    qemu_io(&d, "vda", &phase(2));
    d.term();
    let before = repo_segments(&repo, &d.vm_uuid, "vda");
    let lock = hold_lock(&d);
    let report = agent_once_ok(&d, &cfg);
    assert_eq!(report["busy"][0], d.vm_uuid.as_str(), "{report}");
    assert_eq!(repo_segments(&repo, &d.vm_uuid, "vda"), before);

    let log = d.work_dir().join("shipper.log");
    let mut waiting = Command::new(bin("cdp-shipper"))
        .args(["run", "--once", "--vm-uuid", &d.vm_uuid, "--poll", "50ms"])
        .arg("--state-dir")
        .arg(&d.state_dir)
        .arg("--run-dir")
        .arg(&d.run_dir)
        .arg("--config")
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_until("the shipper to say it waits", WAIT, || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("waiting")
    });
    assert!(
        waiting.try_wait().unwrap().is_none(),
        "the shipper did not wait"
    );
    assert_eq!(repo_segments(&repo, &d.vm_uuid, "vda"), before);
    drop(lock);
    let st = wait_child(waiting, WAIT).expect("the shipper went on once the lock was free");
    assert!(st.success(), "{}", std::fs::read_to_string(&log).unwrap());
    assert_eq!(
        repo_segments(&repo, &d.vm_uuid, "vda"),
        catalog_segments(&d, "vda")
    );
    restore_equals_image(&d, &cfg, &repo, "vda");
}

#[test]
fn systemd_ready_watchdog_stopping() {
    let mut d = Daemon::with_disk(MIB);
    d.term();
    let repo = repo_dir(&d);
    let port = free_port();
    let cfg = config(&d, &repo, &format!("metrics_listen = \"127.0.0.1:{port}\""));
    let nsock = d.work_dir().join("notify.sock");
    let rx = UnixDatagram::bind(&nsock).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut agent = Agent::start(
        &d,
        &cfg,
        &[
            ("NOTIFY_SOCKET", nsock.to_str().unwrap()),
            ("WATCHDOG_USEC", "300000"),
        ],
    );
    let recv = || {
        let mut buf = [0u8; 4096];
        let n = rx
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no notification: {e}"));
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let first = recv();
    assert!(first.lines().any(|l| l == "READY=1"), "{first:?}");
    // Ready means the metrics answer and the notify socket is there.
    assert!(scrape(port).is_some());
    assert!(d.run_dir.join("agent.sock").exists());
    let mut watchdogs = 0;
    let mut statuses = 0;
    while watchdogs < 3 {
        let m = recv();
        watchdogs += m.lines().filter(|l| *l == "WATCHDOG=1").count();
        statuses += m.lines().filter(|l| l.starts_with("STATUS=")).count();
    }
    assert!(statuses >= 1 || first.contains("STATUS="));
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    wait_until("STOPPING=1", WAIT, || {
        recv().lines().any(|l| l == "STOPPING=1")
    });
    let st = wait_child(agent.child.take().unwrap(), Duration::from_secs(30)).unwrap();
    assert!(st.success(), "{st}\n{}", agent.log());
    assert!(!d.run_dir.join("agent.sock").exists());
}

#[test]
fn metrics_and_notification_wake_the_agent() {
    let mut d = Daemon::builder()
        .vm_name("web")
        .disk_random("vda", 8 * MIB, 61)
        .args(["--segment-age", "20ms"])
        .start();
    let repo = repo_dir(&d);
    let port = free_port();
    // Scans are an hour apart: only the notification can wake it.
    let cfg = config(
        &d,
        &repo,
        &format!("metrics_listen = \"127.0.0.1:{port}\"\nscan_interval = \"1h\""),
    );
    qemu_io(&d, "vda", &phase(1));
    // cdpd seals the first segment segment_age after its first write, which
    // on a busy machine can be after the agent's first scan: only a sealed
    // segment is shipped, and the next scan is an hour away. Start the agent
    // once the catalog has the sealed row.
    wait_until("cdpd to seal a segment of phase 1", WAIT, || {
        !catalog_segments(&d, "vda").is_empty()
    });
    let mut agent = Agent::start(&d, &cfg, &[]);
    // Its first scan adopts the running VM (no shipper runs for it).
    wait_until("metrics", WAIT, || scrape(port).is_some());
    wait_until("the first scan's shipments", WAIT, || shipments(&d) > 0);
    let m = scrape_parsed(port);
    let uuid = d.vm_uuid.clone();
    let vm = [("vm", "web"), ("vm_uuid", uuid.as_str())];
    assert_eq!(metric(&m, "cdp_vm_running", &vm), Some(1.0));
    let rpo = metric(&m, "cdp_rpo_seconds", &[vm[0], vm[1], ("disk", "vda")])
        .expect("cdp_rpo_seconds for the running VM");
    assert!((0.0..3600.0).contains(&rpo), "{rpo}");
    for k in ["catalog", "target", "recovery"] {
        assert_eq!(metric(&m, "cdp_errors_total", &[("kind", k)]), Some(0.0));
    }

    // Stopped with a backlog nobody ships.
    qemu_io(&d, "vda", &phase(2));
    d.term();
    let disk_target = [vm[0], vm[1], ("disk", "vda"), ("target", "primary")];
    wait_until("a backlog in the metrics", WAIT, || {
        let m = scrape_parsed(port);
        metric(&m, "cdp_vm_running", &vm) == Some(0.0)
            && metric(&m, "cdp_backlog_segments", &disk_target).unwrap_or(0.0) > 0.0
    });
    let m = scrape_parsed(port);
    assert!(metric(&m, "cdp_backlog_bytes", &disk_target).unwrap() > 0.0);
    assert!(metric(&m, "cdp_rpo_seconds", &[vm[0], vm[1], ("disk", "vda")]).unwrap() > 0.0);
    let adoptions = metric(&m, "cdp_agent_adoptions_total", &[]).unwrap();

    // The hook's notification wakes it long before the next scan.
    cdp_core::notify::notify_agent(&d.run_dir, &d.vm_uuid).unwrap();
    wait_until(
        "the backlog to go to 0 and the adoption counted",
        WAIT,
        || {
            let m = scrape_parsed(port);
            metric(&m, "cdp_backlog_segments", &disk_target) == Some(0.0)
                && metric(&m, "cdp_agent_adoptions_total", &[]).unwrap() > adoptions
        },
    );
    let m = scrape_parsed(port);
    assert_eq!(metric(&m, "cdp_backlog_bytes", &disk_target), Some(0.0));
    assert_eq!(
        metric(&m, "cdp_rpo_seconds", &[vm[0], vm[1], ("disk", "vda")]),
        Some(0.0)
    );
    assert!(metric(&m, "cdp_agent_adoptions_total", &[]).unwrap() > adoptions);
    assert_eq!(
        metric(&m, "cdp_target_up", &[("target", "primary")]),
        Some(1.0)
    );
    assert!(
        metric(
            &m,
            "cdp_shipped_bytes_total",
            &[vm[0], vm[1], ("target", "primary")]
        )
        .unwrap()
            > 0.0
    );
    assert!(agent.running());
    assert_eq!(agent.term().code(), Some(0));
    restore_equals_image(&d, &cfg, &repo, "vda");
}

/// One VM's broken catalog is that VM's failure, named with its path; the
/// service goes on for the others.
#[test]
fn bad_catalog_fails_clearly() {
    let mut d = Daemon::with_disk(MIB);
    d.term();
    let repo = repo_dir(&d);
    let cfg = config(&d, &repo, "metrics_listen = \"\"");
    let cat = d.catalog_path();
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", cat.display()));
    }
    std::fs::write(&cat, vec![0x5a; 8192]).unwrap();
    let out = agent_once(&d, &cfg);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(cat.to_str().unwrap()), "{err}");
    // As a service: it says so, and keeps running for the other VMs.
    let mut agent = Agent::start(&d, &cfg, &[]);
    let path = cat.to_str().unwrap().to_string();
    wait_until(
        "the service names the broken catalog",
        Duration::from_secs(60),
        || agent.log().contains(&path),
    );
    assert!(agent.running(), "{}", agent.log());
    assert_eq!(agent.term().code(), Some(0));
    // Unreadable: a directory where the file should be.
    std::fs::remove_file(&cat).unwrap();
    std::fs::create_dir(&cat).unwrap();
    let out = agent_once(&d, &cfg);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(cat.to_str().unwrap()));
}

#[test]
fn dead_target_is_reported_and_shipped_to_once_back() {
    let mut d = Daemon::builder()
        .disk_random("vda", 8 * MIB, 71)
        .args(["--segment-age", "20ms"])
        .start();
    let repo = repo_dir(&d);
    let port = free_port();
    let cfg = config(
        &d,
        &repo,
        &format!("metrics_listen = \"127.0.0.1:{port}\"\nscan_interval = \"200ms\""),
    );
    qemu_io(&d, "vda", &phase(1));
    qemu_io(&d, "vda", &phase(2));
    d.term();
    // The target's directory is gone (an unmounted NFS share).
    let away = d.work_dir().join("repo-away");
    std::fs::rename(&repo, &away).unwrap();
    let mut agent = Agent::start(&d, &cfg, &[]);
    wait_until("the failing target in the metrics", WAIT, || {
        scrape(port).is_some_and(|t| {
            let m = parse_prom(&t);
            metric(&m, "cdp_errors_total", &[("kind", "target")]).unwrap_or(0.0) >= 1.0
                && metric(&m, "cdp_target_up", &[("target", "primary")]) == Some(0.0)
        })
    });
    assert!(agent.running(), "{}", agent.log());
    assert_eq!(shipments(&d), 0);
    // Back: shipped at the next scans.
    std::fs::rename(&away, &repo).unwrap();
    let target = [("disk", "vda"), ("target", "primary")];
    wait_until("the backlog shipped", WAIT, || {
        let m = scrape_parsed(port);
        metric(&m, "cdp_backlog_segments", &target) == Some(0.0)
            && metric(&m, "cdp_target_up", &[("target", "primary")]) == Some(1.0)
            // Counted once its passes (segments, then a baseline) are done.
            && metric(&m, "cdp_agent_adoptions_total", &[]) >= Some(1.0)
    });
    assert!(agent.running());
    assert_eq!(agent.term().code(), Some(0));
    assert_eq!(
        repo_segments(&repo, &d.vm_uuid, "vda"),
        catalog_segments(&d, "vda")
    );
    restore_equals_image(&d, &cfg, &repo, "vda");
}

#[test]
fn retention_is_applied_per_vm_and_target() {
    let mut d = Daemon::builder()
        .disk_random("vda", 8 * MIB, 81)
        .args(["--segment-age", "20ms"])
        .start();
    let repo = repo_dir(&d);
    let cfg = config(&d, &repo, "metrics_listen = \"\"");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str("[policy.default.retention]\nany_point = \"1s\"\n");
    std::fs::write(&cfg, text).unwrap();
    cdpctl(&d, &cfg, &["baseline", &d.vm_uuid]);
    for i in 0..3 {
        qemu_io(&d, "vda", &phase(i));
    }
    d.term();
    let stopped = Instant::now();
    let report = agent_once_ok(&d, &cfg);
    assert!(adopted(&report, &d.vm_uuid).is_some(), "{report}");
    let r = &report["retention"][0];
    assert_eq!(r["vm_uuid"], d.vm_uuid.as_str(), "{report}");
    assert_eq!(r["target"], "primary", "{report}");
    assert!(r["error"].is_null(), "{report}");
    let shipped = repo_segments(&repo, &d.vm_uuid, "vda");
    // Once every write is older than the any-point window, the history
    // before it is compacted into an exact baseline.
    wait_until("the writes to leave the 1 s window", WAIT, || {
        stopped.elapsed() > Duration::from_millis(1500)
    });
    let report = agent_once_ok(&d, &cfg);
    let r = &report["retention"][0]["report"];
    assert!(
        r["synthetic_baselines"].as_u64().unwrap() + r["segments_deleted"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert!(
        repo_segments(&repo, &d.vm_uuid, "vda").len() < shipped.len(),
        "{report}"
    );
    restore_equals_image(&d, &cfg, &repo, "vda");
}

/// Issue 12, "Targets fail independently": two targets, the S3 one on a closed port.
/// The agent adopts a killed cdpd's journal: the file:// target gets everything (a
/// restore from it alone equals the image), and the adoption is reported DONE with the
/// S3 target down (by name, retried), not as a failed adoption: `--once` exits 0 with
/// the target in `targets_down`, and the service's metrics say which target is down.
#[test]
fn one_target_down_adopts_for_the_others_and_names_the_down_one() {
    let mut d = Daemon::builder()
        .disk_random("vda", 8 * MIB, 91)
        .args(["--segment-age", "1h"])
        .start();
    let repo = repo_dir(&d);
    for i in 0..3 {
        qemu_io(&d, "vda", &phase(i));
    }
    d.kill9();
    assert!(
        catalog_segments(&d, "vda").is_empty(),
        "nothing was sealed before the kill"
    );
    let creds = d.work_dir().join("s3-credentials");
    std::fs::write(
        &creds,
        "[default]\naws_access_key_id = test\naws_secret_access_key = secret\n",
    )
    .unwrap();
    let port = free_port();
    let dead_s3 = format!(
        "s3://cdp/x?endpoint=http://127.0.0.1:{}&region=us-east-1",
        free_port()
    );
    let cfg = d.work_dir().join("cdp-two.toml");
    std::fs::write(
        &cfg,
        format!(
            "[target.primary]\nurl = \"file://{}\"\n\
             [target.offsite]\nurl = \"{dead_s3}\"\ncredentials_file = \"{}\"\n\
             [policy.default]\ntargets = [\"primary\", \"offsite\"]\n\
             [agent]\nmetrics_listen = \"127.0.0.1:{port}\"\nscan_interval = \"300ms\"\n",
            repo.display(),
            creds.display()
        ),
    )
    .unwrap();

    let report = agent_once_ok(&d, &cfg);
    assert_eq!(report["failed"], serde_json::json!([]), "{report}");
    let a = adopted(&report, &d.vm_uuid).unwrap_or_else(|| panic!("not adopted: {report}"));
    assert_eq!(a["recovered"]["previous_end"], "crash", "{a}");
    assert!(a["shipped_segments"].as_u64().unwrap() > 0, "{a}");
    let down = a["targets_down"].as_array().expect("targets_down");
    assert_eq!(down.len(), 1, "{a}");
    assert_eq!(down[0]["target"], "offsite", "{a}");
    assert_eq!(
        down[0]["transient"], true,
        "an unreachable endpoint is retried: {a}"
    );
    assert_eq!(
        report["targets_down"][0]["vm_uuid"],
        d.vm_uuid.as_str(),
        "{report}"
    );
    // Everything went to the file:// target, which restores alone.
    let sealed = catalog_segments(&d, "vda");
    assert!(!sealed.is_empty());
    assert_eq!(repo_segments(&repo, &d.vm_uuid, "vda"), sealed);
    restore_equals_image(&d, &cfg, &repo, "vda");

    // The service retries the down target at every scan and says which one it is.
    let mut agent = Agent::start(&d, &cfg, &[]);
    let vm = [("vm_uuid", d.vm_uuid.as_str()), ("target", "offsite")];
    wait_until("the down target in the metrics", WAIT, || {
        scrape(port).is_some_and(|t| {
            let m = parse_prom(&t);
            metric(&m, "cdp_agent_adoption_target_down", &vm) == Some(1.0)
                && metric(&m, "cdp_target_up", &[("target", "offsite")]) == Some(0.0)
                && metric(&m, "cdp_target_up", &[("target", "primary")]) == Some(1.0)
                && metric(
                    &m,
                    "cdp_backlog_segments",
                    &[("disk", "vda"), ("target", "primary")],
                ) == Some(0.0)
        })
    });
    let m = scrape_parsed(port);
    assert_eq!(
        metric(
            &m,
            "cdp_agent_adoption_target_down",
            &[("target", "primary")]
        ),
        None,
        "only the down target is named"
    );
    assert!(
        metric(
            &m,
            "cdp_backlog_segments",
            &[("disk", "vda"), ("target", "offsite")]
        )
        .unwrap_or(0.0)
            > 0.0,
        "the down target's backlog waits for it"
    );
    assert!(agent.running(), "{}", agent.log());
    let log = agent.log();
    assert!(
        log.contains("target offsite down: will retry"),
        "the log names the down target:\n{log}"
    );
    assert_eq!(agent.term().code(), Some(0), "{}", agent.log());
}
