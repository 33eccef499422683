//! Tamper evidence in a clear repository (docs/REPOSITORY_FORMAT.md, "Chain
//! of indexes"): real cdpd and cdp-shipper ship several segments of a disk
//! to `file://`, then an attacker who can write the repository edits its
//! history, keeping every checksum consistent where the format allows it.
//! Each time `cdpctl verify` exits non-zero naming the seq, and `cdpctl
//! restore` at a point after the edit refuses, leaving nothing behind; it
//! never exits 0 with wrong bytes. Indexes without links (written before
//! the chain existed) still verify, with a note.

use std::path::{Path, PathBuf};
use std::process::Command;

use cdp_repo::format::{self as rf, SegmentIndex};
use cdp_tests::fixture::{cdpctl, cdpctl_out, config, phase, qemu_io};
use cdp_tests::{bin, qemu_img_compare, run_ok, Daemon};
use serde_json::Value;

const MIB: u64 = 1 << 20;

struct Fixture {
    d: Daemon,
    cfg: PathBuf,
    repo: PathBuf,
    /// (mark label, seq, copy of the image there)
    marks: Vec<(String, u64, PathBuf)>,
}

fn build() -> Fixture {
    let d = Daemon::builder()
        .disk_random("vda", 8 * MIB, 41)
        .disk_random("vdb", 8 * MIB, 42)
        .args(["--segment-age", "30ms"])
        .start();
    let repo = d.work_dir().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let cfg = config(&d, &repo);
    cdpctl(&d, &cfg, &["baseline", &d.vm_uuid]);
    let mut marks = Vec::new();
    for i in 0..6 {
        qemu_io(&d, "vda", &phase(i));
        qemu_io(&d, "vdb", &phase(i + 7));
        let label = format!("m{i}");
        cdpctl(&d, &cfg, &["mark", &d.vm_uuid, &label]);
        let seq = d.status_json()["last_seq"].as_u64().unwrap();
        let copy = d.work_dir().join(format!("ref-{i}.img"));
        std::fs::copy(d.image("vda"), &copy).unwrap();
        cdp_tests::guest::wait_until("every record sealed", 60, || {
            d.status_json()["disks"]
                .as_array()
                .unwrap()
                .iter()
                .all(|k| k["open_segment_records"] == 0 && k["segments_waiting_seal"] == 0)
        });
        marks.push((label, seq, copy));
    }
    let mut d = d;
    d.term();
    run_ok(
        Command::new(bin("cdp-shipper"))
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
            .arg(&cfg),
    );
    // The host is gone: only the repository is left.
    std::fs::remove_dir_all(&d.state_dir).unwrap();
    std::fs::create_dir_all(&d.state_dir).unwrap();
    Fixture {
        d,
        cfg,
        repo,
        marks,
    }
}

impl Fixture {
    fn journal(&self, repo: &Path) -> PathBuf {
        repo.join("cdp/v1/vms")
            .join(&self.d.vm_uuid)
            .join("vda/journal")
    }

    fn copy(&self, name: &str) -> PathBuf {
        let to = self.d.work_dir().join(format!("repo-{name}"));
        run_ok(Command::new("cp").arg("-a").arg(&self.repo).arg(&to));
        to
    }

    /// Segments (first, last) of vda, in order.
    fn segments(&self) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = std::fs::read_dir(self.journal(&self.repo))
            .unwrap()
            .filter_map(|e| {
                let n = e.unwrap().file_name().into_string().unwrap();
                let (a, b, idx) = rf::parse_journal_name(&n)?;
                idx.then_some((a, b))
            })
            .collect();
        v.sort();
        v
    }

    fn path(&self, repo: &Path, (a, b): (u64, u64), ext: &str) -> PathBuf {
        self.journal(repo).join(format!("{a:020}-{b:020}.{ext}"))
    }

    /// Read, change and write back (checksum recomputed) an index.
    fn rewrite_index(&self, repo: &Path, s: (u64, u64), f: impl FnOnce(&mut SegmentIndex)) {
        let p = self.path(repo, s, "idx");
        let mut i = SegmentIndex::decode("k", &std::fs::read(&p).unwrap()).unwrap();
        f(&mut i);
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, i.encode()).unwrap();
    }

    fn verify(&self, repo: &Path) -> (bool, Value) {
        let url = format!("file://{}", repo.display());
        let out = cdpctl_out(
            &self.d,
            &self.cfg,
            &["verify", &self.d.vm_uuid, "--repo", &url, "--json"],
        );
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
        assert_eq!(out.status.success(), v["ok"] == true, "{v}");
        (out.status.success(), v)
    }

    /// Restore at mark `i`'s seq: Ok when restored (always byte-exact), Err when
    /// refused (nothing left behind).
    fn restore(&self, repo: &Path, i: usize) -> Result<(), String> {
        let dir = self.d.work_dir().join("out");
        std::fs::create_dir_all(&dir).unwrap();
        let out_path = dir.join("restored.img");
        let url = format!("file://{}", repo.display());
        let at = format!("seq:{}", self.marks[i].1);
        let out = cdpctl_out(
            &self.d,
            &self.cfg,
            &[
                "restore",
                &self.d.vm_uuid,
                "--disk",
                "vda",
                "--at",
                &at,
                "--output",
                out_path.to_str().unwrap(),
                "--repo",
                &url,
            ],
        );
        if out.status.success() {
            qemu_img_compare(out_path.as_os_str(), self.marks[i].2.as_os_str());
            std::fs::remove_file(&out_path).unwrap();
            return Ok(());
        }
        assert!(!out_path.exists(), "a refused restore left its output");
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// The index of mark `i`'s segment and the ones after it.
    fn segment_with_mark(&self, i: usize) -> usize {
        let seq = self.marks[i].1;
        self.segments()
            .iter()
            .position(|s| s.0 <= seq && seq <= s.1)
            .unwrap()
    }
}

/// The problems of a report that name `seq` in their text or key.
fn names_seq(v: &Value, a: u64, b: u64) -> bool {
    v["problems"].as_array().unwrap().iter().any(|p| {
        let t = p.to_string();
        t.contains(&format!("seq {a}-{b}")) || t.contains(&format!("{a:020}-{b:020}"))
    })
}

#[test]
fn verify_and_restore_catch_edited_history() {
    let f = build();
    let segs = f.segments();
    assert!(segs.len() >= 6, "too few segments to attack: {segs:?}");
    // Intact: verify is clean, every mark restores, the chain is recorded
    // from the second segment and its head is said to be unanchored.
    let (ok, v) = f.verify(&f.repo);
    assert!(ok, "{v}");
    let url = format!("file://{}", f.repo.display());
    let text = cdpctl_out(&f.d, &f.cfg, &["verify", &f.d.vm_uuid, "--repo", &url]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("chain head not anchored"), "{text}");
    let notes = v["disks"][0]["chain"].to_string();
    assert!(notes.contains("chain head not anchored"), "{notes}");
    assert!(!notes.contains("not recorded"), "{notes}");
    for i in 0..f.marks.len() {
        f.restore(&f.repo, i).unwrap();
    }
    // The segment holding mark 2 and the one before: the attacks hit
    // history in the middle, mark 4 and later lie after it.
    let k = f.segment_with_mark(2);
    assert!(k >= 1 && k + 2 < segs.len(), "{k} of {segs:?}");
    assert!(f.segment_with_mark(4) > k + 1);

    // 1. A middle segment deleted, the later indexes' record bases made to
    //    follow on (the record chain alone sees nothing).
    let r = f.copy("deleted");
    let gone = segs[k];
    let gone_idx =
        SegmentIndex::decode("k", &std::fs::read(f.path(&r, gone, "idx")).unwrap()).unwrap();
    std::fs::remove_file(f.path(&r, gone, "idx")).unwrap();
    std::fs::remove_file(f.path(&r, gone, "seg.zst")).unwrap();
    for s in &segs[k + 1..] {
        f.rewrite_index(&r, *s, |i| i.meta.record_base -= gone_idx.meta.records);
    }

    let (ok, v) = f.verify(&r);
    assert!(!ok, "deleted segment not seen: {v}");
    assert!(
        names_seq(&v, gone.0, gone.1),
        "the deleted seq is not named: {v}"
    );
    let e = f
        .restore(&r, 4)
        .expect_err("restored across a deleted segment");
    assert!(e.contains("missing") || e.contains("unusable"), "{e}");
    f.restore(&r, 0).unwrap();

    // 2. An index rewritten (consistent, checksum recomputed): the next
    //    index names other bytes.
    let r = f.copy("rewritten");
    let victim = segs[k];
    f.rewrite_index(&r, victim, |i| i.meta.last_ts_ns += 1);
    let (ok, v) = f.verify(&r);
    assert!(!ok, "rewritten index not seen: {v}");
    assert!(names_seq(&v, victim.0, victim.1), "{v}");
    f.restore(&r, 4)
        .expect_err("restored through a rewritten index");

    // 3. Two segments' objects swapped (both files under each other's names).
    let r = f.copy("swapped");
    let (a, b) = (segs[k], segs[k + 1]);
    for ext in ["idx", "seg.zst"] {
        let tmp = f.journal(&r).join("tmp");
        std::fs::rename(f.path(&r, a, ext), &tmp).unwrap();
        std::fs::rename(f.path(&r, b, ext), f.path(&r, a, ext)).unwrap();
        std::fs::rename(&tmp, f.path(&r, b, ext)).unwrap();
    }
    let (ok, v) = f.verify(&r);
    assert!(
        !ok && names_seq(&v, a.0, a.1),
        "swapped segments not seen: {v}"
    );
    f.restore(&r, 4)
        .expect_err("restored through swapped segments");

    // 4. A valid segment of another disk (vdb) put into vda's journal, its
    //    index saying vda (checksum recomputed).
    let r = f.copy("foreign");
    let vdb = r.join("cdp/v1/vms").join(&f.d.vm_uuid).join("vdb/journal");
    let foreign: (u64, u64) = std::fs::read_dir(&vdb)
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().into_string().unwrap();
            let (a, b, idx) = rf::parse_journal_name(&n)?;
            idx.then_some((a, b))
        })
        // Between two vda segments after segment k; where exactly depends on
        // when the 30 ms segment age sealed (a loaded machine splits a
        // phase's write and its mark into two segments).
        .filter(|s| s.0 > segs[k].1 && segs.windows(3).any(|w| s.0 > w[0].1 && s.1 < w[2].0))
        .min()
        .expect("a vdb segment between two vda segments");
    for ext in ["idx", "seg.zst"] {
        let name = format!("{:020}-{:020}.{ext}", foreign.0, foreign.1);
        std::fs::copy(vdb.join(&name), f.journal(&r).join(&name)).unwrap();
    }
    f.rewrite_index(&r, foreign, |i| i.meta.disk = "vda".into());
    let (ok, v) = f.verify(&r);
    assert!(
        !ok && names_seq(&v, foreign.0, foreign.1),
        "foreign segment not seen: {v}"
    );
    f.restore(&r, 5)
        .expect_err("restored through another disk's segment");

    // 5. Indexes without links (a repository written before the chain):
    //    verify passes and says where the chain is not recorded.
    // (Later indexes linked again to the new bytes, as a shipper upgraded
    // after segment k writes them.)
    let r = f.copy("old");
    let mut prev_hash = String::new();
    for (n, s) in segs.iter().enumerate() {
        f.rewrite_index(&r, *s, |i| match i.meta.prev.as_mut() {
            Some(_) if n <= k => i.meta.prev = None,
            Some(l) => l.index_blake3 = prev_hash.clone(),
            None => {}
        });
        prev_hash = rf::index_blake3(&std::fs::read(f.path(&r, *s, "idx")).unwrap());
    }
    let (ok, v) = f.verify(&r);
    assert!(ok, "an old repository fails: {v}");
    let notes = v["disks"][0]["chain"].to_string();
    assert!(
        notes.contains(&format!("not recorded before seq {}", segs[k].0)),
        "{notes}"
    );
    f.restore(&r, 5).unwrap();
}
