//! Targets fail independently (issue 12): an S3 target dead when the
//! shipper starts does not stop the file:// target; it is retried in the
//! background and gets its whole backlog when it answers again; a restore
//! with the primary target gone reads from the next one and says so.

#[path = "../../repo/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cdp_repo::read;
use cdp_repo::store::Store;
use cdp_tests::fixture::qemu_io;
use cdp_tests::{assert_files_equal, bin, run, Daemon};
use common::S3Server;

/// Policy `default`: `local` (file://, primary) then `offsite` (S3).
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
        Command::new(bin("cdp-shipper"))
            .args(["run", "--vm-uuid", &d.vm_uuid, "--poll", "50ms"])
            .arg("--state-dir")
            .arg(&d.state_dir)
            .arg("--run-dir")
            .arg(&d.run_dir)
            .arg("--config")
            .arg(cfg)
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

fn shipper_log(d: &Daemon) -> String {
    std::fs::read_to_string(d.work_dir().join("shipper.log")).unwrap_or_default()
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

fn target<'a>(disk: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    disk["targets"]
        .as_array()?
        .iter()
        .find(|t| t["target"] == name)
}

/// Poll the VM's status until `f` holds for its disk.
fn wait_for(d: &Daemon, what: &str, timeout: Duration, f: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        let st = d.status_json();
        if f(&st["disks"][0]) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {st}\nshipper log:\n{}",
            shipper_log(d)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every record seq of disk vda in `store`, checking the chain is whole.
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

fn cdpctl(d: &Daemon, cfg: &Path, args: &[&str]) -> std::process::Output {
    run(Command::new(bin("cdpctl"))
        .args(args)
        .arg("--state-dir")
        .arg(&d.state_dir)
        .arg("--run-dir")
        .arg(&d.run_dir)
        .arg("--config")
        .arg(cfg)
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY"))
}

#[test]
fn dead_s3_target_at_start_does_not_stop_the_file_target_and_gets_its_backlog_when_back() {
    // moto on a port, then stopped: nothing listens there when the shipper
    // starts (connection refused, as for a host that is down).
    let mut s3 = S3Server::start(&["cdp"]);
    s3.stop();
    let mut d = Daemon::builder()
        .disk_random("vda", 4 << 20, 12)
        .args(["--segment-age", "50ms"])
        .start();
    let root = d.work_dir().join("repo");
    std::fs::create_dir_all(&root).unwrap();
    let creds = s3.credentials_file("test", "secret");
    let cfg = write_config(&d.work_dir(), &root, &s3.url("cdp", "fleet"), &creds);
    let file_store = Store::open(&format!("file://{}", root.display()), None).unwrap();
    let s3_store = Store::open(&s3.url("cdp", "fleet"), Some(&creds)).unwrap();

    let mut sh = spawn_shipper(&d, &cfg);
    qemu_io(&d, "vda", &writes(10, 1));
    wait_for(
        &d,
        "local caught up while offsite fails",
        Duration::from_secs(60),
        |disk| {
            let (Some(l), Some(o)) = (target(disk, "local"), target(disk, "offsite")) else {
                return false;
            };
            l["state"] == "up"
                && l["backlog_segments"] == 0
                && o["state"] == "failing"
                && o["backlog_segments"].as_u64().unwrap_or(0) > 0
        },
    );
    assert!(
        sh.0.try_wait().unwrap().is_none(),
        "the shipper runs on: {}",
        shipper_log(&d)
    );
    let st = d.status_json();
    let off = target(&st["disks"][0], "offsite").unwrap().clone();
    assert!(
        off["last_error"].as_str().unwrap_or("").contains("reach"),
        "{off}"
    );
    // The file target has every record written so far, and a baseline
    // (the status's backlog counts sealed segments only: the last records
    // may still be in the open one, sealed within 50 ms, or later on a
    // loaded machine).
    cdp_tests::guest::wait_until("the file target holds every record written", 60, || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(read::load_chain(&file_store, &d.vm_uuid, "vda"))
            .is_ok_and(|c| c.segments.iter().map(|s| s.entries.len()).sum::<usize>() >= 20)
    });
    let before = seqs(&file_store, &d.vm_uuid);
    assert!(before.len() >= 20, "{before:?}");

    // The S3 server comes back on the same port: offsite gets what it lacks.
    s3.restart();
    qemu_io(&d, "vda", &writes(10, 2));
    wait_for(
        &d,
        "both targets caught up",
        // The offsite target's failure backoff (10s at most) and its
        // baseline backoff (doubling while it was down) both run out first.
        Duration::from_secs(120),
        |disk| {
            ["local", "offsite"].iter().all(|t| {
                target(disk, t).is_some_and(|t| t["backlog_segments"] == 0 && t["state"] == "up")
            })
        },
    );
    d.term();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sh.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(sh.0.wait().unwrap().success(), "{}", shipper_log(&d));
    // What cdpd sealed at its stop (the last writes may have been in its
    // open segment until then) goes to both.
    cdp_tests::run_ok(&mut cdp_tests::fixture::shipper_once_cmd(&d, &cfg));

    let a = seqs(&file_store, &d.vm_uuid);
    let b = seqs(&s3_store, &d.vm_uuid);
    assert_eq!(a, b, "both targets hold the same records");
    assert!(a.len() >= 40, "{} records", a.len());
    assert!(b.starts_with(&before), "offsite got the backlog too");

    // The primary (local) is gone: restore reads from offsite, says so,
    // and the image is byte-exact.
    std::fs::rename(&root, d.work_dir().join("repo-gone")).unwrap();
    let out_img = d.work_dir().join("restored.img");
    let out = cdpctl(
        &d,
        &cfg,
        &[
            "--json",
            "restore",
            &d.vm_uuid,
            "--disk",
            "vda",
            "--at",
            "latest",
            "--no-local",
            "--output",
            out_img.to_str().unwrap(),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("reading from target offsite"), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["target"], "offsite", "{v}");
    assert_files_equal(&out_img, &d.image("vda"));
}
