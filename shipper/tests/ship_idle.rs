//! An idle shipper (issue 13, "Scale"): it commits nothing to the catalog
//! while nothing changes, and still ships a newly sealed segment at once.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cdp_core::catalog::Catalog;
use cdp_shipper::service::{self, Mode, Outcome};
use cdp_tests::fixture::qemu_io;
use cdp_tests::Daemon;

const MIB: u64 = 1 << 20;

fn config(dir: &Path, repo: &Path) -> PathBuf {
    let p = dir.join("cdp.toml");
    std::fs::write(
        &p,
        format!(
            "[target.primary]\nurl = \"file://{}\"\n[policy.default]\ntargets = [\"primary\"]\n",
            repo.display()
        ),
    )
    .unwrap();
    p
}

fn opts(d: &Daemon, poll: Duration) -> cdp_shipper::Options {
    cdp_shipper::Options {
        vm_uuid: d.vm_uuid.clone(),
        state_dir: d.state_dir.clone(),
        run_dir: d.run_dir.clone(),
        policy: "default".into(),
        max_parallel: 4,
        vm_config: None,
        poll,
        auto_baseline: false,
        images: Default::default(),
    }
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

/// Passes that find nothing new write nothing: the target's unchanged "up"
/// is not written again (it was, every pass: a catalog commit every 100 ms
/// per idle VM). Seen from another connection, whose `data_version` moves
/// with every commit of the shipper's.
#[test]
fn idle_passes_commit_nothing_to_the_catalog() {
    let mut d = Daemon::builder()
        .disk_random("vda", 4 * MIB, 5)
        .args(["--segment-age", "20ms"])
        .start();
    let repo = d.work_dir().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let cfg = config(&d.work_dir(), &repo);
    qemu_io(&d, "vda", &writes(5, 1));
    d.term();
    let config = cdp_core::config::Config::load(Some(&cfg)).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut s = rt
        .block_on(cdp_shipper::Shipper::new(
            opts(&d, Duration::from_millis(20)),
            &config,
        ))
        .unwrap();
    let observer = Catalog::open(&d.state_dir, &d.vm_uuid).unwrap();
    let v0 = observer.data_version().unwrap();
    let first = rt.block_on(s.pass()).unwrap();
    assert!(first.shipped > 0, "{first:?}");
    let v1 = observer.data_version().unwrap();
    assert_ne!(v0, v1, "the first pass records its shipments and the state");
    let t = observer.targets(&d.vm_uuid).unwrap();
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].state, "up");
    for _ in 0..5 {
        let st = rt.block_on(s.pass()).unwrap();
        assert_eq!(st.shipped, 0, "{st:?}");
    }
    assert_eq!(
        observer.data_version().unwrap(),
        v1,
        "idle passes committed to the catalog"
    );
    assert_eq!(
        observer.targets(&d.vm_uuid).unwrap()[0].updated_ns,
        t[0].updated_ns
    );
}

/// The service loop idles without writing (a cheap look at the catalog
/// every poll) and ships a segment sealed meanwhile: it is woken by the
/// catalog's change, not by the next whole pass (set an hour away).
#[test]
fn the_idle_service_writes_nothing_and_ships_a_new_segment_at_once() {
    let d = Daemon::builder()
        .disk_random("vda", 4 * MIB, 6)
        .args(["--segment-age", "20ms"])
        .start();
    let repo = d.work_dir().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let cfg = config(&d.work_dir(), &repo);
    let config = cdp_core::config::Config::load(Some(&cfg)).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s = rt
        .block_on(cdp_shipper::Shipper::new(
            opts(&d, Duration::from_millis(20)),
            &config,
        ))
        .unwrap();
    let (tx, stop) = tokio::sync::watch::channel(false);
    // No whole pass for an hour: only the seal can wake it.
    let mode = Mode {
        idle_pass: Some(Duration::from_secs(3600)),
        ..Mode::default()
    };
    let svc = rt.spawn(service::run(s, mode, stop));
    let observer = Catalog::open(&d.state_dir, &d.vm_uuid).unwrap();
    let up = Instant::now();
    while observer.targets(&d.vm_uuid).unwrap().is_empty() {
        assert!(up.elapsed() < Duration::from_secs(10), "no first pass");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Idle for longer than a whole pass's interval: nothing committed.
    std::thread::sleep(Duration::from_millis(200));
    let v = observer.data_version().unwrap();
    std::thread::sleep(service::IDLE_PASS * 2);
    assert_eq!(
        observer.data_version().unwrap(),
        v,
        "an idle shipper committed to the catalog"
    );
    // A write, sealed after 20 ms, is shipped long before the next whole
    // pass would come (an hour after the last), three times in a row: the
    // seal woke the shipper. (No tight timing: a loaded machine only makes
    // each round slower.)
    let sealed = |c: &Catalog| {
        c.segments(&d.vm_uuid)
            .unwrap()
            .iter()
            .filter(|s| s.sealed)
            .count()
    };
    for round in 0..3 {
        let before = sealed(&observer);
        qemu_io(&d, "vda", &writes(1, 2 + round));
        let t0 = Instant::now();
        while sealed(&observer) == before {
            assert!(t0.elapsed() < Duration::from_secs(10), "never sealed");
            std::thread::sleep(Duration::from_millis(2));
        }
        let t1 = Instant::now();
        while !observer
            .unshipped(&d.vm_uuid, "primary")
            .unwrap()
            .is_empty()
        {
            assert!(
                t1.elapsed() < Duration::from_secs(60),
                "round {round}: not shipped: the seal did not wake the shipper"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    tx.send(true).unwrap();
    let out = rt.block_on(svc).unwrap().unwrap();
    assert!(matches!(out, Outcome::Drained(_)), "{out:?}");
}
