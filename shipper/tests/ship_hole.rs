//! A hole in a disk's record-base chain (a segment lost with its catalog
//! row before it was shipped) is found by the shipper, recorded once as a
//! GAP, and followed by a new baseline; restore refuses the points in the
//! hole and restores the newest point exactly (issue 12, "The journal
//! directory is the source of truth").

use std::path::Path;

use cdp_core::catalog::Catalog;
use cdp_core::layout::StateDir;
use cdp_tests::fixture::{assert_repo_restores_image, cdpctl_out, qemu_io, shipper_once_cmd};
use cdp_tests::{run, Daemon};

const MIB: u64 = 1 << 20;

fn config(dir: &Path, repo: &Path) -> std::path::PathBuf {
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

fn ship(d: &Daemon, cfg: &Path) -> serde_json::Value {
    let out = run(&mut shipper_once_cmd(d, cfg));
    assert!(
        out.status.success(),
        "cdp-shipper failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("shipper prints its pass as JSON")
}

/// `n` writes of 64 KiB: with 100 KiB segments, one segment each.
fn write_segments(d: &Daemon, n: usize, pattern: u64) {
    let cmds: Vec<String> = (0..n)
        .flat_map(|i| {
            let off = (i as u64 % 16) * 64 * 1024;
            [
                format!("write -P {} {off} 64k", (pattern + i as u64) % 250),
                "flush".to_string(),
            ]
        })
        .collect();
    qemu_io(d, "vda", &cmds);
}

#[test]
fn a_lost_segment_is_a_gap_and_a_new_baseline() {
    let mut d = Daemon::builder()
        .disk_random("vda", 4 * MIB, 5)
        .args(["--segment-size", "102400", "--segment-age", "20ms"])
        .start();
    let repo = d.work_dir().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let cfg = config(&d.work_dir(), &repo);
    write_segments(&d, 3, 1);
    let first = ship(&d, &cfg);
    assert_eq!(first["baselines"], 1, "{first}");
    assert_eq!(first["holes"], 0, "{first}");

    // More segments, then cdpd stops; one segment in the middle is lost
    // with its row before the shipper saw it.
    write_segments(&d, 6, 40);
    d.term();
    let cat = Catalog::open(&d.state_dir, &d.vm_uuid).unwrap();
    let local: Vec<_> = cat
        .segments(&d.vm_uuid)
        .unwrap()
        .into_iter()
        .filter(|s| s.disk == "vda" && s.records > 0)
        .collect();
    let shipped_to = first["shipped"].as_u64().unwrap();
    assert!(shipped_to > 0);
    let jdir = StateDir::new(&d.state_dir).journal(&d.vm_uuid, "vda");
    let on_disk: Vec<_> = local
        .iter()
        .filter(|s| {
            jdir.join(cdp_core::journal::segment_file_name(s.first_seq))
                .exists()
        })
        .collect();
    assert!(on_disk.len() >= 4, "too few local segments: {on_disk:?}");
    let lost = on_disk[on_disk.len() / 2].clone();
    std::fs::remove_file(jdir.join(cdp_core::journal::segment_file_name(lost.first_seq))).unwrap();
    cat.delete_segment(&d.vm_uuid, "vda", lost.first_seq)
        .unwrap();
    drop(cat);

    let pass = ship(&d, &cfg);
    assert_eq!(pass["holes"], 1, "{pass}");
    assert_eq!(
        pass["baselines"], 1,
        "a new baseline follows the hole: {pass}"
    );
    let cat = Catalog::open(&d.state_dir, &d.vm_uuid).unwrap();
    let after = cat
        .segments(&d.vm_uuid)
        .unwrap()
        .into_iter()
        .find(|s| s.disk == "vda" && s.first_seq > lost.last_seq)
        .expect("a segment after the lost one");
    assert!(
        cat.has_gap_at(&d.vm_uuid, "vda", after.first_seq).unwrap(),
        "no GAP recorded at seq {}",
        after.first_seq
    );
    drop(cat);
    // Recorded once, not at every pass.
    let again = ship(&d, &cfg);
    assert_eq!(again["holes"], 0, "{again}");
    assert_eq!(again["baselines"], 0, "{again}");

    // The newest point restores exactly from the repository (the new
    // baseline); a point inside the hole is refused, never guessed.
    assert_repo_restores_image(&d, &cfg, &repo, "vda");
    let url = format!("file://{}", repo.display());
    let inside = format!("seq:{}", lost.last_seq);
    let out_path = d.work_dir().join("inside.img");
    let out = cdpctl_out(
        &d,
        &cfg,
        &[
            "restore",
            &d.vm_uuid,
            "--disk",
            "vda",
            "--at",
            &inside,
            "--no-local",
            "--repo",
            &url,
            "--output",
            out_path.to_str().unwrap(),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a point in the hole was restored: {err}"
    );
    assert!(err.contains("missing"), "{err}");
}
