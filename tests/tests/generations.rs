//! History is append-only (issue 12, item 3): a VM whose state directory is
//! lost, or that starts on a second host sharing the repository, starts a
//! new history whose seqs are above every earlier one's
//! (`cdp_core::session::new_history_base`), with a GAP "new history". No
//! repository object is ever replaced, every point of every generation
//! restores byte-exact from the repository alone.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use cdp_tests::fixture::{cdpctl, config_without_space_floor, phase, qemu_io, shipper_once_cmd};
use cdp_tests::{assert_files_equal, copy_sparse, records_of_kind, run_ok, Daemon};

const MIB: u64 = 1 << 20;

/// What identifies one stored object: a replaced file gets a new inode
/// (create-only puts link or rename a new file in) or new bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    mtime_ns: i128,
    bytes: Vec<u8>,
}

/// Every object of the `file://` repository at `repo`, by key.
fn objects(repo: &Path) -> BTreeMap<String, Stamp> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Stamp>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                walk(root, &p, out);
            } else {
                let key = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(
                    key,
                    Stamp {
                        ino: m.ino(),
                        mtime_ns: i128::from(m.mtime()) * 1_000_000_000
                            + i128::from(m.mtime_nsec()),
                        bytes: std::fs::read(&p).unwrap(),
                    },
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(repo, repo, &mut out);
    out
}

/// Every object in `before` is still there, unchanged (same inode, mtime
/// and bytes); leases (a shipper's liveness, not history) may come and go.
fn assert_nothing_replaced(before: &BTreeMap<String, Stamp>, after: &BTreeMap<String, Stamp>) {
    let mut replaced = Vec::new();
    for (k, s) in before {
        if k.contains("/leases/") {
            continue;
        }
        match after.get(k) {
            Some(a) if a == s => {}
            Some(_) => replaced.push(format!("{k}: replaced")),
            None => replaced.push(format!("{k}: gone")),
        }
    }
    assert!(
        replaced.is_empty(),
        "objects replaced or gone: {replaced:#?}"
    );
    assert!(
        after.len() > before.len(),
        "the new generation shipped nothing"
    );
}

/// A point: a mark taken after writes, and the image as it was then.
struct Point {
    label: String,
    seq: u64,
    copy: PathBuf,
}

/// Write `phases`, then mark, and keep a copy of the image at the mark.
fn write_and_mark(d: &Daemon, cfg: &Path, phases: &[u64], label: &str) -> Point {
    for &i in phases {
        qemu_io(d, "vda", &phase(i));
    }
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

/// The seqs of this daemon's journal (SESSION_START first), and the reason
/// of its first GAP.
fn first_records(d: &Daemon) -> (u64, String) {
    let recs = d.journal_records();
    let start = records_of_kind(&recs, "SESSION_START")[0]["seq"]
        .as_u64()
        .unwrap();
    let gap = records_of_kind(&recs, "GAP")
        .first()
        .map(|g| g.to_string())
        .unwrap_or_default();
    (start, gap)
}

/// One generation: start cdpd on `state`, a baseline, writes and a mark,
/// stop, ship everything. Returns the generation's first seq and its point.
fn generation(
    d: &mut Daemon,
    cfg: &Path,
    state: &Path,
    phases: &[u64],
    label: &str,
) -> (u64, Point) {
    d.state_dir = state.to_path_buf();
    std::fs::create_dir_all(state).unwrap();
    d.start();
    let (first, gap) = first_records(d);
    assert!(
        gap.contains("new history"),
        "a fresh state directory starts with a GAP \"new history\": {gap}"
    );
    cdpctl(d, cfg, &["baseline", &d.vm_uuid]);
    let p = write_and_mark(d, cfg, phases, label);
    d.term();
    run_ok(&mut shipper_once_cmd(d, cfg));
    (first, p)
}

/// Restore `at` from the repository alone; it must equal the point's copy.
fn restore_from_repo(d: &Daemon, cfg: &Path, repo: &Path, p: &Point, at: &str) {
    let out = d.work_dir().join(format!("restored-{}.img", p.label));
    cdp_tests::fixture::restore_from_repo_ok(d, cfg, repo, "vda", at, &out);
    assert_files_equal(&out, &p.copy);
}

#[test]
fn a_lost_state_directory_and_a_second_host_never_replace_history() {
    let mut d = Daemon::builder()
        .disk_random("vda", 8 * MIB, 71)
        .args(["--segment-age", "20ms"])
        .prepare();
    let repo = d.work_dir().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let cfg = config_without_space_floor(&d, &repo);
    let state1 = d.root.join("state-1");

    // Generation 1: two points.
    d.state_dir = state1.clone();
    std::fs::create_dir_all(&state1).unwrap();
    d.start();
    cdpctl(&d, &cfg, &["baseline", &d.vm_uuid]);
    let mut points = vec![write_and_mark(&d, &cfg, &[0, 1], "g1-a")];
    points.push(write_and_mark(&d, &cfg, &[2], "g1-b"));
    let g1_last = {
        let recs = d.journal_records();
        recs.iter().filter_map(|r| r["seq"].as_u64()).max().unwrap()
    };
    d.term();
    run_ok(&mut shipper_once_cmd(&d, &cfg));
    let mut before = objects(&repo);

    // Generation 2: the state directory is lost; the VM starts again on
    // this host (same uuid, same image, same repository).
    std::fs::remove_dir_all(&state1).unwrap();
    let (g2_first, p) = generation(&mut d, &cfg, &state1, &[3, 4], "g2-a");
    assert!(
        g2_first > g1_last,
        "generation 2 starts at {g2_first}, not above {g1_last}"
    );
    points.push(p);
    let after = objects(&repo);
    assert_nothing_replaced(&before, &after);
    before = after;

    // Generation 3: a second host (its own, fresh state directory), while
    // the first host's state is still there.
    let state2 = d.root.join("state-2");
    let (g3_first, p) = generation(&mut d, &cfg, &state2, &[5], "g3-a");
    assert!(
        g3_first > g2_first,
        "generation 3 starts at {g3_first}, not above {g2_first}"
    );
    points.push(p);
    assert_nothing_replaced(&before, &objects(&repo));

    // Every point of every generation restores byte-exact from the
    // repository alone, at its seq. By label, the newest generation's: an
    // older generation's history may have lost records after it (its
    // host's state is gone), where the same label could be newer, so
    // restore asks for the seq there (the repository side's rule).
    for p in &points {
        restore_from_repo(&d, &cfg, &repo, p, &format!("seq:{}", p.seq));
    }
    let newest = points.last().unwrap();
    restore_from_repo(&d, &cfg, &repo, newest, &format!("mark:{}", newest.label));
}
