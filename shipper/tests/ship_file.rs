//! The shipper against file:// targets, with a real cdpd and real qemu-io.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cdp_core::layout::StateDir;
use cdp_core::time::now_ns;
use cdp_repo::read;
use cdp_repo::store::Store;
use cdp_tests::fixture::{qemu_io, shipper_once_cmd};
use cdp_tests::{bin, run, Daemon};

const MIB: u64 = 1 << 20;

fn config(dir: &Path, targets: &[(&str, &Path, Option<&str>)]) -> PathBuf {
    let mut s = String::new();
    for (name, root, delay) in targets {
        s.push_str(&format!(
            "[target.{name}]\nurl = \"file://{}\"\n",
            root.display()
        ));
        if let Some(d) = delay {
            s.push_str(&format!("delay = \"{d}\"\n"));
        }
    }
    let names: Vec<String> = targets.iter().map(|t| format!("{:?}", t.0)).collect();
    s.push_str(&format!(
        "[policy.default]\ntargets = [{}]\n",
        names.join(", ")
    ));
    let p = dir.join("cdp.toml");
    std::fs::write(&p, s).unwrap();
    p
}

fn shipper_once(d: &Daemon, cfg: &Path) -> Output {
    run(&mut shipper_once_cmd(d, cfg))
}

fn shipper_ok(d: &Daemon, cfg: &Path) -> serde_json::Value {
    let out = shipper_once(d, cfg);
    assert!(
        out.status.success(),
        "cdp-shipper failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("shipper prints its pass as JSON")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

/// Data records (seq) of the local journal of a disk, in order.
fn local_seqs(d: &Daemon, disk: &str) -> Vec<u64> {
    d.journal_records()
        .iter()
        .filter(|r| r["disk"] == disk)
        .map(|r| r["seq"].as_u64().unwrap())
        .collect()
}

fn repo_seqs(root: &Path, vm: &str, disk: &str) -> (Vec<u64>, Vec<read::ChainProblem>, u64) {
    let store = Store::open(&format!("file://{}", root.display()), None).unwrap();
    let chain = rt().block_on(read::load_chain(&store, vm, disk)).unwrap();
    assert!(chain.orphans.is_empty(), "orphans: {:?}", chain.orphans);
    let first_base = chain.segments.first().map_or(0, |s| s.meta.record_base);
    let seqs = chain
        .segments
        .iter()
        .flat_map(|s| s.entries.iter().map(|e| e.seq))
        .collect();
    (seqs, chain.problems(), first_base)
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

#[test]
fn ships_every_record_once_in_order_trims_and_baselines() {
    let mut d = Daemon::builder()
        .disk_random("vda", 4 * MIB, 3)
        .args(["--segment-age", "20ms"])
        .start();
    let repo = d.work_dir().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let cfg = config(&d.work_dir(), &[("primary", &repo, None)]);
    qemu_io(&d, "vda", &writes(30, 1));
    // Ship while cdpd runs (an online baseline), then more writes, then stop.
    let first = shipper_ok(&d, &cfg);
    assert!(first["shipped"].as_u64().unwrap() > 0, "{first}");
    assert_eq!(first["baselines"], 1, "{first}");
    qemu_io(&d, "vda", &writes(20, 2));
    d.term();
    let all_local = local_seqs(&d, "vda");
    shipper_ok(&d, &cfg);

    let (seqs, problems, base) = repo_seqs(&repo, &d.vm_uuid, "vda");
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(base, 0);
    // Everything the first ship trimmed plus what was local at the end: every record once, in order.
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "not in order: {seqs:?}"
    );
    let tail: Vec<u64> = seqs
        .iter()
        .copied()
        .filter(|s| *s >= all_local[0])
        .collect();
    assert_eq!(tail, all_local);

    // Local segments were trimmed once the (only) target had them.
    let jdir = StateDir::new(&d.state_dir).journal(&d.vm_uuid, "vda");
    let left = std::fs::read_dir(&jdir).unwrap().count();
    assert_eq!(left, 0, "segments left in {}", jdir.display());

    // cdpd restarts on a trimmed journal, and the chain continues.
    d.start();
    qemu_io(&d, "vda", &writes(5, 3));
    d.term();
    shipper_ok(&d, &cfg);
    let (seqs2, problems, _) = repo_seqs(&repo, &d.vm_uuid, "vda");
    assert!(problems.is_empty(), "{problems:?}");
    assert!(seqs2.len() > seqs.len());
    assert!(seqs2.windows(2).all(|w| w[0] < w[1]));

    let store = Store::open(&format!("file://{}", repo.display()), None).unwrap();
    let bl = rt()
        .block_on(read::load_baselines(&store, &d.vm_uuid, "vda"))
        .unwrap();
    assert_eq!(bl.len(), 1);
    assert_eq!(bl[0].1.size, 4 * MIB);
    assert!(
        bl[0].1.chunks.iter().all(|c| c.is_some()),
        "random disk: every chunk has data"
    );
}

/// (first_seq, last_ts_ns) of every segment a repository holds for a disk.
fn repo_segments(root: &Path, vm: &str, disk: &str) -> Vec<(u64, u64)> {
    let store = Store::open(&format!("file://{}", root.display()), None).unwrap();
    let chain = rt().block_on(read::load_chain(&store, vm, disk)).unwrap();
    chain
        .segments
        .iter()
        .map(|s| (s.meta.first_seq, s.meta.last_ts_ns))
        .collect()
}

/// Files in the local journal directory of a disk.
fn journal_files(d: &Daemon, disk: &str) -> usize {
    std::fs::read_dir(StateDir::new(&d.state_dir).journal(&d.vm_uuid, disk))
        .unwrap()
        .count()
}

/// The delay is checked against the records' own timestamps, pass by pass:
/// whatever a pass that ended at `t` left on the delayed target has its
/// newest record at or before `t - delay`, and whatever was due when the
/// pass began is there. No step depends on how fast the machine is.
#[test]
fn delayed_target_lags_and_blocks_trimming() {
    let mut d = Daemon::builder()
        .disk("vda", 4 * MIB)
        .args(["--segment-age", "20ms"])
        .start();
    let (a, b) = (d.work_dir().join("a"), d.work_dir().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    qemu_io(&d, "vda", &writes(10, 4));
    d.term();
    let local = local_seqs(&d, "vda");
    let files = journal_files(&d, "vda");
    assert!(files > 0);

    // A delay no run can outlast: b gets nothing, and nothing is trimmed
    // while b lacks it, though a has it all.
    let cfg = config(&d.work_dir(), &[("a", &a, None), ("b", &b, Some("1h"))]);
    let pass = shipper_ok(&d, &cfg);
    let segments = repo_segments(&a, &d.vm_uuid, "vda");
    assert_eq!(repo_seqs(&a, &d.vm_uuid, "vda").0, local);
    assert_eq!(
        pass["waiting"].as_u64(),
        Some(segments.len() as u64),
        "{pass}"
    );
    assert!(repo_segments(&b, &d.vm_uuid, "vda").is_empty());
    assert_eq!(pass["trimmed"].as_u64(), Some(0), "{pass}");
    assert_eq!(journal_files(&d, "vda"), files, "trimmed before b had them");

    // A short delay: pass until b has caught up, checking every pass.
    let delay_ns = 2_000_000_000;
    let cfg = config(&d.work_dir(), &[("a", &a, None), ("b", &b, Some("2s"))]);
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let began = now_ns();
        let pass = shipper_ok(&d, &cfg);
        let ended = now_ns();
        let on_b = repo_segments(&b, &d.vm_uuid, "vda");
        for s in &on_b {
            assert!(
                s.1 + delay_ns <= ended,
                "segment {} reached the delayed target {} ms before its delay was over",
                s.0,
                (s.1 + delay_ns - ended) / 1_000_000
            );
        }
        for s in segments.iter().filter(|s| s.1 + delay_ns <= began) {
            assert!(on_b.contains(s), "segment {} was due and not shipped", s.0);
        }
        if pass["waiting"].as_u64() == Some(0) {
            break;
        }
        assert!(
            std::time::Instant::now() < give_up,
            "b never caught up: {pass}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(repo_seqs(&b, &d.vm_uuid, "vda").0, local);
    // Both have everything now: the local segments go.
    shipper_ok(&d, &cfg);
    assert_eq!(journal_files(&d, "vda"), 0);
}

#[test]
fn bad_inputs_fail_clearly() {
    let mut d = Daemon::with_disk(MIB);
    d.term();
    let w = d.work_dir();
    let repo = w.join("repo");
    std::fs::create_dir_all(&repo).unwrap();

    let bad = w.join("bad.toml");
    std::fs::write(
        &bad,
        format!(
            "[target.p]\nurl = \"file://{}\"\nsped = 1\n",
            repo.display()
        ),
    )
    .unwrap();
    let out = shipper_once(&d, &bad);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown field") && err.contains("sped"),
        "{err}"
    );

    let gone = config(&w, &[("p", Path::new("/nonexistent/cdp-repo"), None)]);
    let out = shipper_once(&d, &gone);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/cdp-repo"), "{err}");

    let cfg = config(&w, &[("p", &repo, None)]);
    std::fs::create_dir_all(repo.join("cdp/v1")).unwrap();
    std::fs::write(
        repo.join("cdp/v1/FORMAT"),
        br#"{"format":"cdp","version":2}"#,
    )
    .unwrap();
    let out = shipper_once(&d, &cfg);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("version"), "{err}");
    // Nothing was written next to the foreign repository.
    assert!(!repo.join("cdp/v1/vms").exists());
}

#[test]
fn rebaseline_uploads_only_changed_chunks() {
    let mut d = Daemon::builder().disk_random("vda", 128 * MIB, 9).start();
    let repo = d.work_dir().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let cfg = config(&d.work_dir(), &[("primary", &repo, None)]);
    let base = |d: &Daemon| -> serde_json::Value {
        let out = d.cdpctl_ok([
            "baseline".as_ref(),
            d.vm_uuid.as_ref(),
            "--state-dir".as_ref(),
            d.state_dir.as_os_str(),
            "--run-dir".as_ref(),
            d.run_dir.as_os_str(),
            "--config".as_ref(),
            cfg.as_os_str(),
            "--json".as_ref(),
        ]);
        serde_json::from_str::<serde_json::Value>(&out).unwrap()[0]["baseline"].clone()
    };
    let b1 = base(&d);
    assert_eq!(b1["chunks_total"], 128);
    assert_eq!(b1["chunks_uploaded"], 128);
    let b2 = base(&d);
    assert_eq!(b2["chunks_uploaded"], 0, "unchanged disk: {b2}");
    // Change 1% of the disk (1.28 MiB, from a chunk boundary).
    qemu_io(&d, "vda", &["write -P 0x5c 10M 1310720".to_string()]);
    let b3 = base(&d);
    let up = b3["chunks_uploaded"].as_u64().unwrap();
    assert!(
        (1..=2).contains(&up),
        "1% changed, {up} of 128 chunks uploaded: {b3}"
    );
    assert!(b3["s1"].as_u64().unwrap() > b2["s1"].as_u64().unwrap());
    d.term();
}

#[test]
fn vm_definition_is_stored_when_it_changes() {
    let mut d = Daemon::with_disk(MIB);
    d.term();
    let repo = d.work_dir().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let cfg = config(&d.work_dir(), &[("primary", &repo, None)]);
    let xml = d.work_dir().join("domain.xml");
    let ship = |d: &Daemon| {
        let out = run(Command::new(bin("cdp-shipper"))
            .args(["run", "--once", "--vm-uuid", &d.vm_uuid])
            .arg("--state-dir")
            .arg(&d.state_dir)
            .arg("--run-dir")
            .arg(&d.run_dir)
            .arg("--config")
            .arg(&cfg)
            .arg("--vm-config")
            .arg(&xml));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let configs = || -> Vec<String> {
        let dir = repo.join("cdp/v1/vms").join(&d.vm_uuid).join("config");
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
            .collect();
        v.sort();
        v
    };
    std::fs::write(&xml, "<domain><name>a</name></domain>").unwrap();
    ship(&d);
    ship(&d);
    assert_eq!(configs().len(), 1, "unchanged definition stored once");
    std::fs::write(&xml, "<domain><name>b</name></domain>").unwrap();
    ship(&d);
    assert_eq!(
        configs(),
        vec![
            "<domain><name>a</name></domain>".to_string(),
            "<domain><name>b</name></domain>".to_string()
        ]
    );
    let vm_json: serde_json::Value = serde_json::from_slice(
        &std::fs::read(repo.join("cdp/v1/vms").join(&d.vm_uuid).join("vm.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(vm_json["disks"][0]["name"], "vda");
    assert_eq!(vm_json["disks"][0]["size"], MIB);
    // Renamed: vm.json is never rewritten; the change is a new version,
    // which readers take as current.
    let first = std::fs::read(repo.join("cdp/v1/vms").join(&d.vm_uuid).join("vm.json")).unwrap();
    cdp_core::catalog::Catalog::open(&d.state_dir, &d.vm_uuid)
        .unwrap()
        .upsert_vm(&d.vm_uuid, "renamed")
        .unwrap();
    ship(&d);
    ship(&d);
    let vm_dir = repo.join("cdp/v1/vms").join(&d.vm_uuid);
    assert_eq!(std::fs::read(vm_dir.join("vm.json")).unwrap(), first);
    let versions: Vec<_> = std::fs::read_dir(vm_dir.join("vm.json.d"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(versions.len(), 1, "one change, one version: {versions:?}");
    let current: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&versions[0]).unwrap()).unwrap();
    assert_eq!(current["name"], "renamed");
}

/// The process loop (`cdp_shipper::service::run`) in process: it waits while
/// another process holds the VM's lock and leaves when told to stop; then,
/// following a cdpd that has exited, it ships everything and releases the lock.
#[test]
fn service_waits_for_the_lock_then_follows_cdpd_to_the_end() {
    use cdp_shipper::service::{self, Mode, Outcome};
    let mut d = Daemon::builder()
        .disk_random("vda", 4 * MIB, 4)
        .args(["--segment-age", "20ms"])
        .start();
    let repo = d.work_dir().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let cfg = config(&d.work_dir(), &[("primary", &repo, None)]);
    qemu_io(&d, "vda", &writes(10, 4));
    d.term();
    let config = cdp_core::config::Config::load(Some(&cfg)).unwrap();
    let opts = || cdp_shipper::Options {
        vm_uuid: d.vm_uuid.clone(),
        state_dir: d.state_dir.clone(),
        run_dir: d.run_dir.clone(),
        policy: "default".into(),
        max_parallel: 4,
        vm_config: None,
        poll: std::time::Duration::from_millis(20),
        auto_baseline: true,
        images: Default::default(),
    };
    let rt = rt();

    // Someone else ships this VM: the service waits, and a stop ends the wait.
    let held = cdp_shipper::lock::try_lock(&d.state_dir, &d.vm_uuid)
        .unwrap()
        .expect("lock free");
    let s = rt
        .block_on(cdp_shipper::Shipper::new(opts(), &config))
        .unwrap();
    let (tx, stop) = tokio::sync::watch::channel(false);
    let waiting = rt.spawn(service::run(s, Mode::default(), stop));
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(!waiting.is_finished(), "ran without the lock");
    tx.send(true).unwrap();
    let out = rt.block_on(waiting).unwrap().unwrap();
    assert_eq!(out, Outcome::NotOurs);
    assert!(repo_seqs(&repo, &d.vm_uuid, "vda").0.is_empty());
    drop(held);

    // Following a cdpd that has exited: one drain, every record shipped, lock released.
    let local = local_seqs(&d, "vda");
    assert!(!local.is_empty());
    let mut gone = Command::new("true").spawn().unwrap();
    let pid = gone.id() as i32;
    gone.wait().unwrap();
    let s = rt
        .block_on(cdp_shipper::Shipper::new(opts(), &config))
        .unwrap();
    let (_tx, stop) = tokio::sync::watch::channel(false);
    let mode = Mode {
        follow_pid: Some(pid),
        ..Mode::default()
    };
    let out = rt.block_on(service::run(s, mode, stop)).unwrap();
    let Outcome::Drained(st) = out else {
        panic!("expected a drain, got {out:?}")
    };
    assert_eq!(st.waiting, 0, "{st:?}");
    let (seqs, problems, _) = repo_seqs(&repo, &d.vm_uuid, "vda");
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(seqs, local, "every local record once, in order");
    assert!(cdp_shipper::lock::try_lock(&d.state_dir, &d.vm_uuid)
        .unwrap()
        .is_some());
}
