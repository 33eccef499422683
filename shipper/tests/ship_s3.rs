//! The shipper against a real S3 server on loopback (moto) and a file://
//! target at once: outages, a killed shipper, bad credentials.

#[path = "../../repo/tests/common/mod.rs"]
mod common;

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cdp_repo::read;
use cdp_repo::store::Store;
use cdp_tests::fixture::qemu_io;
use cdp_tests::{bin, require_tool, run, Daemon};
use common::S3Server;

/// A TCP proxy in front of the S3 server that can be cut, as a network
/// outage would (connections refused, open ones reset). The server behind it
/// is real; moto loses its objects on restart, so it is never restarted here.
struct Proxy {
    port: u16,
    upstream: u16,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    fn start(upstream: u16) -> Proxy {
        let port = common::free_port();
        let mut p = Proxy {
            port,
            upstream,
            up: Arc::new(AtomicBool::new(false)),
            conns: Arc::new(Mutex::new(Vec::new())),
            thread: None,
        };
        p.set_up();
        p
    }

    fn set_up(&mut self) {
        let l = TcpListener::bind(("127.0.0.1", self.port)).unwrap();
        self.up.store(true, Ordering::SeqCst);
        let (up, conns, upstream) = (self.up.clone(), self.conns.clone(), self.upstream);
        self.thread = Some(std::thread::spawn(move || {
            for c in l.incoming() {
                if !up.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(c) = c else { continue };
                let Ok(s) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let mut g = conns.lock().unwrap();
                g.push(c.try_clone().unwrap());
                g.push(s.try_clone().unwrap());
                for (mut a, mut b) in [(c.try_clone().unwrap(), s.try_clone().unwrap()), (s, c)] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut a, &mut b);
                        let _ = b.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        }));
    }

    fn cut(&mut self) {
        self.up.store(false, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    fn url(&self, bucket: &str, prefix: &str) -> String {
        format!(
            "s3://{bucket}/{prefix}?endpoint=http://127.0.0.1:{}&region=us-east-1",
            self.port
        )
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.cut();
        }
    }
}

fn write_config(dir: &Path, file_root: &Path, s3_url: &str, creds: &Path) -> PathBuf {
    let p = dir.join("cdp.toml");
    std::fs::write(
        &p,
        format!(
            "[target.local]\nurl = \"file://{}\"\n\
             [target.offsite]\nurl = \"{s3_url}\"\ncredentials_file = \"{}\"\n\
             [policy.default]\ntargets = [\"local\", \"offsite\"]\n",
            file_root.display(),
            creds.display()
        ),
    )
    .unwrap();
    p
}

fn shipper(d: &Daemon, cfg: &Path, once: bool) -> Command {
    let mut c = Command::new(bin("cdp-shipper"));
    c.args(["run", "--vm-uuid", &d.vm_uuid, "--poll", "50ms"])
        .arg("--state-dir")
        .arg(&d.state_dir)
        .arg("--run-dir")
        .arg(&d.run_dir)
        .arg("--config")
        .arg(cfg)
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY");
    if once {
        c.arg("--once");
    }
    c
}

/// A shipper killed when dropped, so a failing test leaves none behind.
struct Shipper(Child);

impl Drop for Shipper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_shipper(d: &Daemon, cfg: &Path) -> Shipper {
    let log = std::fs::File::create(d.work_dir().join("shipper.log")).unwrap();
    Shipper(
        shipper(d, cfg, false)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

fn writes(n: usize, seed: u64) -> Vec<String> {
    (0..n)
        .flat_map(|i| {
            let off = ((seed * 7919 + i as u64 * 104_729) % 60) * 64 * 1024;
            [
                format!("write -P {} {off} 64k", (i + 1) % 250),
                "flush".to_string(),
            ]
        })
        .collect()
}

/// Poll a condition on the daemon's status (no event to wait for here).
fn wait_for(d: &Daemon, what: &str, timeout: Duration, f: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        let st = d.status_json();
        if f(&st["disks"][0]) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {st}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn target<'a>(disk: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    disk["targets"]
        .as_array()?
        .iter()
        .find(|t| t["target"] == name)
}

fn seqs(store: &Store, vm: &str) -> Vec<u64> {
    let chain = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(read::load_chain(store, vm, "vda"))
        .unwrap();
    assert!(chain.problems().is_empty(), "{:?}", chain.problems());
    assert!(chain.orphans.is_empty(), "{:?}", chain.orphans);
    assert_eq!(chain.segments.first().map(|s| s.meta.record_base), Some(0));
    chain
        .segments
        .iter()
        .flat_map(|s| s.entries.iter().map(|e| e.seq))
        .collect()
}

struct Setup {
    d: Daemon,
    _s3: S3Server,
    proxy: Proxy,
    cfg: PathBuf,
    file_store: Store,
    s3_store: Store,
}

fn setup() -> Setup {
    let s3 = S3Server::start(&["cdp"]);
    let proxy = Proxy::start(s3.port);
    let d = Daemon::builder()
        .disk_random("vda", 4 << 20, 11)
        .args(["--segment-age", "50ms"])
        .start();
    let root = d.work_dir().join("repo");
    std::fs::create_dir_all(&root).unwrap();
    let creds = s3.credentials_file("test", "secret");
    let url = proxy.url("cdp", "fleet");
    let cfg = write_config(&d.work_dir(), &root, &url, &creds);
    let file_store = Store::open(&format!("file://{}", root.display()), None).unwrap();
    let s3_store = Store::open(&s3.url("cdp", "fleet"), Some(&creds)).unwrap();
    Setup {
        d,
        _s3: s3,
        proxy,
        cfg,
        file_store,
        s3_store,
    }
}

#[test]
fn s3_outage_grows_backlog_while_file_target_keeps_up_and_loses_nothing() {
    let Setup {
        mut d,
        _s3,
        mut proxy,
        cfg,
        file_store,
        s3_store,
    } = setup();
    let mut sh = spawn_shipper(&d, &cfg);
    qemu_io(&d, "vda", &writes(10, 1));
    wait_for(
        &d,
        "both targets caught up",
        Duration::from_secs(30),
        |disk| {
            ["local", "offsite"].iter().all(|t| {
                target(disk, t).is_some_and(|t| t["backlog_segments"] == 0 && t["state"] == "up")
            })
        },
    );

    proxy.cut();
    qemu_io(&d, "vda", &writes(10, 2));
    wait_for(
        &d,
        "offsite failing with a backlog",
        Duration::from_secs(30),
        |disk| {
            let (l, o) = (
                target(disk, "local").unwrap(),
                target(disk, "offsite").unwrap(),
            );
            o["state"] == "failing"
                && o["backlog_segments"].as_u64().unwrap() > 0
                && l["backlog_segments"] == 0
        },
    );
    let st = d.status_json();
    let off = target(&st["disks"][0], "offsite").unwrap().clone();
    assert!(
        off["last_error"].as_str().unwrap().contains("reach"),
        "{off}"
    );
    assert!(off["lag_ms"].as_u64().unwrap() > 0, "{off}");
    // What offsite lacks is kept on the host.
    assert!(
        st["disks"][0]["journal_segments"].as_u64().unwrap()
            >= off["backlog_segments"].as_u64().unwrap(),
        "{st}"
    );

    proxy.set_up();
    wait_for(
        &d,
        "offsite caught up again",
        Duration::from_secs(60),
        |disk| {
            target(disk, "offsite")
                .is_some_and(|t| t["backlog_segments"] == 0 && t["state"] == "up")
        },
    );
    d.term();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sh.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(sh.0.wait().unwrap().success(), "shipper exit after SIGTERM");

    let a = seqs(&file_store, &d.vm_uuid);
    let b = seqs(&s3_store, &d.vm_uuid);
    assert_eq!(a, b, "both targets hold the same records");
    assert!(a.windows(2).all(|w| w[0] < w[1]));
    let recs = a.len();
    assert!(recs > 40, "{recs} records");
    // Everything was trimmed locally once both had it.
    let journal = cdp_core::layout::StateDir::new(&d.state_dir).journal(&d.vm_uuid, "vda");
    let left = std::fs::read_dir(journal).unwrap().count();
    assert_eq!(left, 0);
}

#[test]
fn killed_shipper_resumes_without_loss_or_duplicates() {
    let Setup {
        mut d,
        _s3,
        proxy: _proxy,
        cfg,
        file_store,
        s3_store,
    } = setup();
    let fio = require_tool("fio");
    let mut load = Command::new(fio)
        .args([
            "--name=w",
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bs=64k",
            "--iodepth=4",
            "--size=4m",
            "--time_based",
            "--runtime=3",
        ])
        .arg(format!("--uri={}", d.uri("vda")))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..3 {
        let mut sh = spawn_shipper(&d, &cfg);
        // Let it get into uploads, then kill it hard.
        wait_for(&d, "some shipping", Duration::from_secs(30), |disk| {
            target(disk, "offsite").is_some()
        });
        std::thread::sleep(Duration::from_millis(300));
        sh.0.kill().unwrap();
        sh.0.wait().unwrap();
    }
    assert!(load.wait().unwrap().success());
    d.term();
    let out = run(&mut shipper(&d, &cfg, true));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a = seqs(&file_store, &d.vm_uuid);
    let b = seqs(&s3_store, &d.vm_uuid);
    assert_eq!(a, b);
    let ends = d.journal_records();
    assert!(
        ends.is_empty(),
        "all local segments shipped and trimmed: {ends:?}"
    );
    assert!(a.len() > 10);
}

#[test]
fn bad_credentials_and_dead_server_fail_clearly_at_start() {
    let s3 = S3Server::start(&["cdp"]);
    let mut d = Daemon::with_disk(1 << 20);
    d.term();
    let root = d.work_dir().join("repo");
    std::fs::create_dir_all(&root).unwrap();
    let (id, _secret) = s3.enable_auth();
    let bad = s3.credentials_file(&id, "not-the-secret");
    let cfg = write_config(&d.work_dir(), &root, &s3.url("cdp", "x"), &bad);
    let out = run(&mut shipper(&d, &cfg, true));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("offsite") && err.contains("AWS_SECRET_ACCESS_KEY"),
        "{err}"
    );

    let dead = format!(
        "s3://cdp/x?endpoint=http://127.0.0.1:{}&region=us-east-1",
        common::free_port()
    );
    // A fresh file target, to see that this run served it.
    let root = d.work_dir().join("repo2");
    std::fs::create_dir_all(&root).unwrap();
    let cfg = write_config(&d.work_dir(), &root, &dead, &bad);
    let out = run(&mut shipper(&d, &cfg, true));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("offsite") && err.contains("reach"), "{err}");
    // The dead target does not stop the other one: `local` was opened and
    // served in that same pass (tests/ship_target_down.rs follows a dead
    // target through to its backlog).
    assert!(root.join(cdp_repo::format::FORMAT_KEY).is_file(), "{err}");
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["failed_targets"], 1, "{st}");
}
