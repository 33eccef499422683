//! A disk resized while the VM is stopped (issue 12, item 6): cdpd's next
//! start compares the image's size with the size the catalog recorded and
//! journals a RESIZE {"old_size", "new_size"} (offset 0, length the new
//! size) before serving; the local replay and a restore from the repository
//! at a point before or after each resize have the size, and the bytes, the
//! image had at that point (grow: the new tail zeros unless written; shrink:
//! the tail dropped).

use std::path::{Path, PathBuf};
use std::process::Command;

use cdp_tests::fixture::{cdpctl, config_without_space_floor, qemu_io, shipper_once_cmd};
use cdp_tests::{assert_files_equal, copy_sparse, records_of_kind, require_tool, run_ok, Daemon};

const MIB: u64 = 1 << 20;

struct Point {
    label: String,
    seq: u64,
    copy: PathBuf,
}

/// Writes, then a mark, and a copy of the image as it is at the mark.
fn write_and_mark(d: &Daemon, cfg: &Path, cmds: &[String], label: &str) -> Point {
    let mut cmds = cmds.to_vec();
    cmds.push("flush".into());
    qemu_io(d, "vda", &cmds);
    let m: serde_json::Value =
        serde_json::from_str(&cdpctl(d, cfg, &["mark", &d.vm_uuid, label, "--json"])).unwrap();
    let copy = d.work_dir().join(format!("{label}.img"));
    copy_sparse(&d.image("vda"), &copy);
    Point {
        label: label.into(),
        seq: m["seq"].as_u64().unwrap(),
        copy,
    }
}

fn qemu_img_resize(image: &Path, size: u64, shrink: bool) {
    let mut c = Command::new(require_tool("qemu-img"));
    c.args(["resize", "-f", "raw"]);
    if shrink {
        c.arg("--shrink");
    }
    c.arg(image).arg(size.to_string());
    run_ok(&mut c);
    assert_eq!(std::fs::metadata(image).unwrap().len(), size);
}

/// The journal's RESIZE records: (offset, length, old_size, new_size).
fn resizes(d: &Daemon) -> Vec<(u64, u64, u64, u64)> {
    let recs = d.journal_records();
    records_of_kind(&recs, "RESIZE")
        .iter()
        .map(|r| {
            let n = |v: &serde_json::Value| v.as_u64().unwrap_or_else(|| panic!("{r}"));
            (
                n(&r["offset"]),
                n(&r["length"]),
                n(&r["info"]["old_size"]),
                n(&r["info"]["new_size"]),
            )
        })
        .collect()
}

/// Restore `p` at its seq from the repository alone: the image as it was then.
fn assert_restores(d: &Daemon, cfg: &Path, repo: &Path, p: &Point) {
    let out = d.work_dir().join(format!("restored-{}.img", p.label));
    let at = format!("seq:{}", p.seq);
    cdp_tests::fixture::restore_from_repo_ok(d, cfg, repo, "vda", &at, &out);
    assert_files_equal(&out, &p.copy);
}

/// The local journal replayed onto the initial image up to `p` (the
/// journal is not trimmed: nothing is shipped before the end).
fn assert_replays(d: &Daemon, p: &Point) {
    let onto = d.work_dir().join(format!("replayed-{}.img", p.label));
    copy_sparse(&d.disk("vda").initial, &onto);
    d.replay("vda", &onto, Some(&format!("seq:{}", p.seq)));
    assert_files_equal(&onto, &p.copy);
}

#[test]
fn a_disk_grown_then_shrunk_while_stopped_restores_at_each_size() {
    let mut d = Daemon::builder()
        .disk_random("vda", 8 * MIB, 91)
        .args(["--segment-age", "20ms"])
        .prepare();
    let repo = d.work_dir().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let cfg = config_without_space_floor(&d, &repo);
    d.start();
    // The baseline is of the 8 MiB disk; every later point is rebuilt from it.
    cdpctl(&d, &cfg, &["baseline", &d.vm_uuid]);
    let mut points = vec![write_and_mark(
        &d,
        &cfg,
        &["write -P 0x11 0 64k".into(), "write -P 0x12 7m 1m".into()],
        "before-grow",
    )];
    d.term();
    assert!(resizes(&d).is_empty(), "no resize yet: {:?}", resizes(&d));

    // Grow to 12 MiB while stopped; the next start journals RESIZE.
    qemu_img_resize(&d.image("vda"), 12 * MIB, false);
    d.start();
    assert_eq!(resizes(&d), vec![(0, 12 * MIB, 8 * MIB, 12 * MIB)]);
    // The new tail reads as zeros until written; write past the old end.
    points.push(write_and_mark(
        &d,
        &cfg,
        &["write -P 0x21 9m 64k".into(), "write -P 0x22 7m 64k".into()],
        "after-grow",
    ));
    d.term();

    // Shrink to 6 MiB while stopped: the tail (with the writes at 7 and 9
    // MiB) is gone from the image and from every later point.
    qemu_img_resize(&d.image("vda"), 6 * MIB, true);
    d.start();
    assert_eq!(
        resizes(&d),
        vec![
            (0, 12 * MIB, 8 * MIB, 12 * MIB),
            (0, 6 * MIB, 12 * MIB, 6 * MIB)
        ]
    );
    points.push(write_and_mark(
        &d,
        &cfg,
        &["write -P 0x31 5m 64k".into()],
        "after-shrink",
    ));
    d.term();
    // A start without a resize journals none.
    d.start();
    d.term();
    assert_eq!(resizes(&d).len(), 2);

    // The local journal: the whole replay equals the image, and each
    // point's replay the image as it was then.
    d.check_replay_invariant("vda");
    for p in &points {
        assert_replays(&d, p);
    }
    // The repository: everything shipped at once, then every point from it.
    run_ok(&mut shipper_once_cmd(&d, &cfg));
    for p in &points {
        assert_restores(&d, &cfg, &repo, p);
    }
}
