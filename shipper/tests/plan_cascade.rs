//! Plans (issue 14; docs/DESIGN.md, "Plans"), with the real cdpd and
//! cdp-shipper: under `cascade = true` a secondary never holds a segment
//! the primary does not hold, the secondaries are served by free space
//! (two file:// targets on tmpfs mounts of different sizes; an S3 target
//! by its `capacity`), and a primary that is down holds the secondaries
//! back only `cascade_wait`, after which they receive anyway and the
//! primary's status says so.

#[path = "../../repo/tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cdp_core::catalog::Catalog;
use cdp_tests::fixture::qemu_io;
use cdp_tests::{bin, Daemon};
use common::S3Server;

/// A tmpfs of `size` mounted on `dir`, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test mounts tmpfs file systems: run it as root"
        );
        std::fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs on {}", dir.display());
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

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

fn file_target(name: &str, root: &Path) -> String {
    format!("[target.{name}]\nurl = \"file://{}\"\n", root.display())
}

fn write_config(d: &Daemon, targets: &str, policy: &[&str], extra: &str) -> PathBuf {
    let p = d.work_dir().join("cdp.toml");
    let names: Vec<String> = policy.iter().map(|n| format!("{n:?}")).collect();
    std::fs::write(
        &p,
        format!(
            "{targets}[policy.default]\ntargets = [{}]\ncascade = true\n{extra}",
            names.join(", ")
        ),
    )
    .unwrap();
    p
}

/// The segment objects (`….seg.zst`) of a file:// repository, by key.
fn segments_in(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            } else if p.to_string_lossy().ends_with(".seg.zst") {
                out.insert(p.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    out
}

fn target<'a>(disk: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    disk["targets"]
        .as_array()?
        .iter()
        .find(|t| t["target"] == name)
}

/// Poll the VM's status until every record written is sealed and every
/// named target has no backlog.
fn wait_shipped(d: &Daemon, names: &[&str], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        // Right after the writes their segment may still be open (it is
        // sealed by age), and the backlog counts sealed segments only: so
        // what was sealed is read first, and the status must show no record
        // beyond it (and then no backlog).
        let sealed_to = Catalog::open(&d.state_dir, &d.vm_uuid)
            .and_then(|c| c.segments(&d.vm_uuid))
            .map(|segs| {
                segs.iter()
                    .filter(|s| s.sealed)
                    .map(|s| s.last_seq)
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0);
        let st = d.status_json();
        let disk = &st["disks"][0];
        if disk["last_seq"].as_u64().is_some_and(|l| l <= sealed_to)
            && names
                .iter()
                .all(|n| target(disk, n).is_some_and(|t| t["backlog_segments"] == 0))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {names:?} to hold every segment: {st}\nshipper log:\n{}",
            shipper_log(d)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Per segment (disk, first_seq): target → when it was recorded shipped.
fn shipment_times(d: &Daemon) -> BTreeMap<(String, u64), BTreeMap<String, u64>> {
    let cat = Catalog::open(&d.state_dir, &d.vm_uuid).unwrap();
    let mut out: BTreeMap<(String, u64), BTreeMap<String, u64>> = BTreeMap::new();
    for (disk, seq, t, ns) in cat.shipments(&d.vm_uuid).unwrap() {
        out.entry((disk, seq)).or_default().insert(t, ns);
    }
    out
}

/// Every segment went to `order[0]`, then `order[1]`, … (recorded times).
fn assert_shipped_in_order(d: &Daemon, order: &[&str], at_least: usize) {
    let times = shipment_times(d);
    assert!(times.len() >= at_least, "{times:?}");
    for (seg, by) in &times {
        let t: Vec<u64> = order
            .iter()
            .map(|n| {
                *by.get(*n)
                    .unwrap_or_else(|| panic!("{seg:?} never went to {n}: {by:?}"))
            })
            .collect();
        assert!(
            t.windows(2).all(|w| w[0] <= w[1]),
            "segment {seg:?} was not shipped in the order {order:?}: {by:?}"
        );
    }
}

#[test]
fn cascade_keeps_secondaries_behind_the_primary_in_free_space_order() {
    let mut d = Daemon::builder()
        .disk_random("vda", 4 << 20, 21)
        .args(["--segment-age", "50ms"])
        .start();
    let w = d.work_dir();
    let primary = w.join("primary");
    std::fs::create_dir_all(&primary).unwrap();
    let (small_dir, big_dir) = (w.join("small"), w.join("big"));
    let _small = Tmpfs::mount(&small_dir, "24m");
    let _big = Tmpfs::mount(&big_dir, "96m");
    let targets = file_target("primary", &primary)
        + &file_target("small", &small_dir)
        + &file_target("big", &big_dir);
    // The policy names the small one first: the plan serves the bigger first.
    let cfg = write_config(&d, &targets, &["primary", "small", "big"], "");
    let _sh = spawn_shipper(&d, &cfg);

    // Sample the three repositories while segments are written and shipped:
    // the secondaries first, then the primary (whatever a secondary held
    // then, the primary must hold by now).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (stop, primary, small, big) = (
            stop.clone(),
            primary.clone(),
            small_dir.clone(),
            big_dir.clone(),
        );
        std::thread::spawn(move || {
            let (mut samples, mut nonempty) = (0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let (s, b) = (segments_in(&small), segments_in(&big));
                let p = segments_in(&primary);
                for (name, held) in [("small", &s), ("big", &b)] {
                    let ahead: Vec<_> = held.difference(&p).collect();
                    assert!(
                        ahead.is_empty(),
                        "{name} holds {ahead:?}, the primary does not"
                    );
                }
                samples += 1;
                nonempty += u64::from(!s.is_empty() || !b.is_empty());
                std::thread::sleep(Duration::from_millis(5));
            }
            (samples, nonempty)
        })
    };
    for round in 0..6 {
        qemu_io(&d, "vda", &writes(8, round));
        std::thread::sleep(Duration::from_millis(300));
    }
    wait_shipped(&d, &["primary", "small", "big"], Duration::from_secs(90));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (samples, nonempty) = sampler.join().expect("the sampler found a secondary ahead");
    assert!(samples >= 100, "only {samples} samples");
    assert!(
        nonempty >= 10,
        "secondaries held segments in {nonempty} samples only"
    );
    // Every segment: primary, then the target with the most free space.
    assert_shipped_in_order(&d, &["primary", "big", "small"], 6);
    d.assert_alive("after shipping");
}

#[test]
fn a_primary_down_holds_the_secondaries_back_only_cascade_wait() {
    // The primary is S3, down (nothing listens) from the start.
    let mut s3 = S3Server::start(&["cdp"]);
    s3.stop();
    let mut d = Daemon::builder()
        .disk_random("vda", 4 << 20, 22)
        .args(["--segment-age", "50ms"])
        .start();
    let second = d.work_dir().join("second");
    std::fs::create_dir_all(&second).unwrap();
    let creds = s3.credentials_file("test", "secret");
    let targets = format!(
        "[target.primary]\nurl = \"{}\"\ncredentials_file = \"{}\"\n{}",
        s3.url("cdp", "fleet"),
        creds.display(),
        file_target("second", &second)
    );
    let cfg = write_config(
        &d,
        &targets,
        &["primary", "second"],
        "cascade_wait = \"3s\"\n",
    );
    let _sh = spawn_shipper(&d, &cfg);
    qemu_io(&d, "vda", &writes(10, 1));
    wait_shipped(&d, &["second"], Duration::from_secs(60));
    // Each segment waited cascade_wait for the primary first.
    let cat = Catalog::open(&d.state_dir, &d.vm_uuid).unwrap();
    let segs: BTreeMap<(String, u64), u64> = cat
        .segments(&d.vm_uuid)
        .unwrap()
        .into_iter()
        .map(|s| ((s.disk, s.first_seq), s.last_ts_ns))
        .collect();
    let times = shipment_times(&d);
    assert!(!times.is_empty());
    for (seg, by) in &times {
        assert!(!by.contains_key("primary"), "{seg:?}: {by:?}");
        let waited = by["second"] - segs[seg];
        assert!(
            waited >= 3_000_000_000,
            "{seg:?} went to the secondary {waited} ns after its last record"
        );
    }
    // The status says so on the primary's line.
    let st = d.status_json();
    let p = target(&st["disks"][0], "primary").unwrap().clone();
    assert_eq!(p["state"], "failing", "{p}");
    let err = p["last_error"].as_str().unwrap_or("");
    assert!(err.contains("without the primary"), "{p}");
    assert!(err.contains("reach"), "why the primary lacks them: {p}");
    // The primary comes back: it gets the whole backlog.
    s3.restart();
    qemu_io(&d, "vda", &writes(4, 2));
    wait_shipped(&d, &["primary", "second"], Duration::from_secs(120));
    d.assert_alive("after shipping");
}

/// An S3 secondary is ordered by its `capacity` minus what it holds: before
/// a 24 MiB tmpfs with 1 GiB, after it with 1 MiB (and so last, as without
/// a capacity).
#[test]
fn an_s3_secondary_is_ordered_by_its_capacity() {
    let s3 = S3Server::start(&["cdp"]);
    let creds = s3.credentials_file("test", "secret");
    for (case, capacity, order) in [
        ("large", "1GiB", ["primary", "offsite", "small"]),
        ("tiny", "1MiB", ["primary", "small", "offsite"]),
    ] {
        let mut d = Daemon::builder()
            .disk_random("vda", 4 << 20, 23)
            .args(["--segment-age", "50ms"])
            .start();
        let w = d.work_dir();
        let primary = w.join("primary");
        std::fs::create_dir_all(&primary).unwrap();
        let small_dir = w.join("small");
        let _small = Tmpfs::mount(&small_dir, "24m");
        let targets = format!(
            "{}[target.offsite]\nurl = \"{}\"\ncredentials_file = \"{}\"\ncapacity = \"{capacity}\"\n{}",
            file_target("primary", &primary),
            s3.url("cdp", case),
            creds.display(),
            file_target("small", &small_dir)
        );
        let cfg = write_config(&d, &targets, &["primary", "small", "offsite"], "");
        let _sh = spawn_shipper(&d, &cfg);
        for round in 0..3 {
            qemu_io(&d, "vda", &writes(6, round));
            std::thread::sleep(Duration::from_millis(200));
        }
        wait_shipped(
            &d,
            &["primary", "small", "offsite"],
            Duration::from_secs(90),
        );
        assert_shipped_in_order(&d, &order, 3);
        d.assert_alive(case);
    }
}
