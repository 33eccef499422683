//! The chain of indexes is the same on every target (docs/REPOSITORY_FORMAT.md,
//! "Chain of indexes"): a target that fails while another receives the
//! segments, across shipper restarts, gets the same index bytes when it
//! comes back, and both repositories verify with the chain recorded from
//! the disk's first segment.

use std::path::Path;
use std::process::Command;

use cdp_repo::store::Store;
use cdp_tests::fixture::{phase, qemu_io};
use cdp_tests::{bin, run, Daemon};

const MIB: u64 = 1 << 20;

fn ship_once(d: &Daemon, cfg: &Path) -> String {
    // A failing target makes the pass exit non-zero: what matters is what
    // each target holds after.
    let out = run(Command::new(bin("cdp-shipper"))
        .args([
            "run",
            "--once",
            "--no-auto-baseline",
            "--vm-uuid",
            &d.vm_uuid,
        ])
        .arg("--state-dir")
        .arg(&d.state_dir)
        .arg("--run-dir")
        .arg(&d.run_dir)
        .arg("--config")
        .arg(cfg));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn wait_sealed(d: &Daemon) {
    cdp_tests::guest::wait_until("every record sealed", 60, || {
        d.status_json()["disks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k["open_segment_records"] == 0 && k["segments_waiting_seal"] == 0)
    });
}

/// Name → bytes of every `.idx` of vda under `root`.
fn indexes(root: &Path, vm: &str) -> Vec<(String, Vec<u8>)> {
    let dir = root.join("cdp/v1/vms").join(vm).join("vda/journal");
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".idx"))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_lagging_target_gets_the_same_chain_after_restarts() {
    let mut d = Daemon::builder()
        .disk_random("vda", 8 * MIB, 5)
        .args(["--segment-age", "30ms"])
        .start();
    let a = d.work_dir().join("a");
    let b = d.work_dir().join("b");
    std::fs::create_dir_all(&a).unwrap();
    // B's cdp/ is a file, not a directory: every put to it fails.
    std::fs::create_dir_all(&b).unwrap();
    std::fs::write(b.join("cdp"), b"not a directory").unwrap();
    let cfg = d.work_dir().join("cdp.toml");
    std::fs::write(
        &cfg,
        format!(
            "[target.a]\nurl = \"file://{}\"\n[target.b]\nurl = \"file://{}\"\n\
             [policy.default]\ntargets = [\"a\", \"b\"]\n",
            a.display(),
            b.display()
        ),
    )
    .unwrap();
    for i in 0..2 {
        qemu_io(&d, "vda", &phase(i));
        wait_sealed(&d);
        ship_once(&d, &cfg);
    }
    qemu_io(&d, "vda", &phase(2));
    wait_sealed(&d);
    d.term();
    let log = ship_once(&d, &cfg);
    assert!(a.join("cdp/v1/vms").exists(), "{log}");
    let only_a = indexes(&a, &d.vm_uuid);
    assert!(
        only_a.len() >= 3,
        "{:?}",
        only_a.iter().map(|x| &x.0).collect::<Vec<_>>()
    );
    // B comes back: it gets the whole backlog from a new shipper.
    std::fs::remove_file(b.join("cdp")).unwrap();
    ship_once(&d, &cfg);
    let on_b = indexes(&b, &d.vm_uuid);
    assert_eq!(
        only_a.iter().map(|x| &x.0).collect::<Vec<_>>(),
        on_b.iter().map(|x| &x.0).collect::<Vec<_>>()
    );
    for ((name, x), (_, y)) in only_a.iter().zip(&on_b) {
        assert!(x == y, "{name} differs between the targets");
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    for root in [&a, &b] {
        let store = Store::open(&format!("file://{}", root.display()), None).unwrap();
        let r = rt
            .block_on(cdp_repo::verify::verify(&store, &d.vm_uuid, false))
            .unwrap();
        // No baseline was taken: only what the journal says matters here.
        assert!(
            r.problems
                .iter()
                .all(|p| p.kind == cdp_repo::verify::Kind::Unrestorable),
            "{:?}",
            r.problems
        );
        let notes = r.disks[0].chain.join("\n");
        assert!(notes.contains("chain head not anchored"), "{notes}");
        assert!(!notes.contains("not recorded"), "{notes}");
        // Every index but the first links to the one before it.
        let with_link = on_b
            .iter()
            .filter(|(n, x)| {
                cdp_repo::format::SegmentIndex::decode(n, x)
                    .unwrap()
                    .meta
                    .prev
                    .is_some()
            })
            .count();
        assert_eq!(with_link, on_b.len() - 1);
    }
}
