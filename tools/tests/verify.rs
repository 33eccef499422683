//! `cdpctl verify` finds what is missing or corrupt in a real repository and
//! says which points it makes unrestorable; restore refuses those points and
//! leaves no output behind, still restores the others byte for byte, and no
//! damage ever yields a wrong image. `cdpctl restore-config` gives the VM
//! definition in force at a point, storage paths remapped.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cdp_tests::fixture::{cdpctl, cdpctl_out, config, phase, qemu_io};
use cdp_tests::{bin, qemu_img_compare, run_ok, Daemon};
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn ship(d: &Daemon, cfg: &Path, vm_config: Option<&Path>) {
    let mut c = Command::new(bin("cdp-shipper"));
    c.args([
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
    .arg(cfg);
    if let Some(x) = vm_config {
        c.arg("--vm-config").arg(x);
    }
    run_ok(&mut c);
}

/// A point with the image as it was there.
struct Snap {
    name: String,
    seq: u64,
    time: String,
    copy: PathBuf,
}

fn snapshot(d: &Daemon, cfg: &Path, i: u64) -> Snap {
    let name = format!("phase-{i}");
    cdpctl(d, cfg, &["mark", &d.vm_uuid, &name]);
    let seq = d.status_json()["last_seq"].as_u64().unwrap();
    let copy = d.work_dir().join(format!("ref-{i}.img"));
    std::fs::copy(d.image("vda"), &copy).unwrap();
    let time = humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string();
    // Each phase has segments of its own: wait until the sealer (segment age
    // 30 ms) has sealed everything, the mark included.
    cdp_tests::guest::wait_until("every record of the phase sealed", 60, || {
        d.status_json()["disks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k["open_segment_records"] == 0 && k["segments_waiting_seal"] == 0)
    });
    Snap {
        name,
        seq,
        time,
        copy,
    }
}

/// A repository made of: baseline B1, phases 0-1, baseline B2, phases 2-5,
/// each phase ending with a mark and a reference copy.
struct Fixture {
    d: Daemon,
    cfg: PathBuf,
    repo: PathBuf,
    snaps: Vec<Snap>,
    latest: PathBuf,
}

fn build() -> Fixture {
    let mut d = Daemon::builder()
        .disk_random("vda", 8 * MIB, 77)
        .args(["--segment-age", "30ms"])
        .start();
    let repo = d.work_dir().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let cfg = config(&d, &repo);
    let mut snaps = Vec::new();
    cdpctl(&d, &cfg, &["baseline", &d.vm_uuid]);
    for i in 0..6 {
        if i == 2 {
            cdpctl(&d, &cfg, &["baseline", &d.vm_uuid]);
        }
        qemu_io(&d, "vda", &phase(i));
        snaps.push(snapshot(&d, &cfg, i));
    }
    d.term();
    ship(&d, &cfg, None);
    let latest = d.work_dir().join("ref-latest.img");
    std::fs::copy(d.image("vda"), &latest).unwrap();
    // The host is gone: only the repository is left.
    std::fs::remove_dir_all(&d.state_dir).unwrap();
    std::fs::create_dir_all(&d.state_dir).unwrap();
    Fixture {
        d,
        cfg,
        repo,
        snaps,
        latest,
    }
}

impl Fixture {
    fn vm_dir(&self, repo: &Path) -> PathBuf {
        repo.join("cdp/v1/vms").join(&self.d.vm_uuid)
    }

    /// A copy of the repository to damage.
    fn copy(&self, name: &str) -> PathBuf {
        let to = self.d.work_dir().join(format!("repo-{name}"));
        run_ok(Command::new("cp").arg("-a").arg(&self.repo).arg(&to));
        to
    }

    /// Segments (first, last) of vda, in order.
    fn segments(&self) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = std::fs::read_dir(self.vm_dir(&self.repo).join("vda/journal"))
            .unwrap()
            .filter_map(|e| {
                let n = e.unwrap().file_name().into_string().unwrap();
                let stem = n.strip_suffix(".idx")?;
                let (a, b) = stem.split_once('-')?;
                Some((a.parse().unwrap(), b.parse().unwrap()))
            })
            .collect();
        v.sort();
        v
    }

    /// The first segment holding records of phase `i` (after the previous mark).
    fn segment_of_phase(&self, i: usize) -> (u64, u64) {
        let after = self.snaps[i - 1].seq;
        let s = self
            .segments()
            .into_iter()
            .find(|s| s.0 > after && s.1 <= self.snaps[i].seq)
            .unwrap_or_else(|| panic!("no segment of phase {i}: {:?}", self.segments()));
        assert!(
            self.segments().iter().any(|x| x.0 > s.1),
            "the segment is not in the middle"
        );
        s
    }

    fn journal_key(&self, (a, b): (u64, u64), ext: &str) -> String {
        format!(
            "cdp/v1/vms/{}/vda/journal/{a:020}-{b:020}.{ext}",
            self.d.vm_uuid
        )
    }

    fn baseline_chunks(&self, n: usize) -> (String, Vec<String>) {
        let dir = self.vm_dir(&self.repo).join("vda/baselines");
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names.len(), 2, "{names:?}");
        let j: Value =
            serde_json::from_slice(&std::fs::read(dir.join(&names[n])).unwrap()).unwrap();
        let chunks = j["chunks"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c.as_str().map(str::to_string))
            .collect();
        (
            format!("cdp/v1/vms/{}/vda/baselines/{}", self.d.vm_uuid, names[n]),
            chunks,
        )
    }

    /// A chunk only the first baseline names (its content changed before
    /// the second): only points restored from B1 read it.
    fn b1_only_chunk(&self) -> String {
        let (_, b1) = self.baseline_chunks(0);
        let (_, b2) = self.baseline_chunks(1);
        let h = b1
            .iter()
            .find(|h| !b2.contains(h))
            .expect("a chunk only B1 names");
        format!("cdp/v1/chunks/{}/{h}", &h[..2])
    }

    fn verify(&self, repo: &Path, deep: bool) -> (bool, Value, String) {
        let url = format!("file://{}", repo.display());
        let mut args = vec!["verify", &self.d.vm_uuid, "--repo", &url, "--json"];
        if deep {
            args.push("--deep");
        }
        let out = cdpctl_out(&self.d, &self.cfg, &args);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "verify --json: {e}: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        assert_eq!(v["ok"].as_bool().unwrap(), out.status.success(), "{v}");
        // The human form says the same.
        args.retain(|a| *a != "--json");
        let human = cdpctl_out(&self.d, &self.cfg, &args);
        assert_eq!(human.status.success(), out.status.success());
        let text = String::from_utf8_lossy(&human.stdout).into_owned();
        (out.status.success(), v, text)
    }

    /// Every point, by mark, seq and time, with its reference copy.
    fn points(&self) -> Vec<(String, String, PathBuf)> {
        let mut v = Vec::new();
        for s in &self.snaps {
            v.push((
                format!("{} by mark", s.name),
                format!("mark:{}", s.name),
                s.copy.clone(),
            ));
            v.push((
                format!("{} by seq", s.name),
                format!("seq:{}", s.seq),
                s.copy.clone(),
            ));
            v.push((
                format!("{} by time", s.name),
                s.time.clone(),
                s.copy.clone(),
            ));
        }
        v.push(("latest".into(), "latest".into(), self.latest.clone()));
        v
    }

    /// Restore `at` from `repo`: Ok when it restored (and the image equals
    /// `reference`), Err(message) when it refused, having left no file.
    fn restore(&self, repo: &Path, at: &str, reference: &Path) -> Result<(), String> {
        let dir = self.d.work_dir().join("out");
        std::fs::create_dir_all(&dir).unwrap();
        let out_path = dir.join("restored.img");
        let url = format!("file://{}", repo.display());
        let out = cdpctl_out(
            &self.d,
            &self.cfg,
            &[
                "restore",
                &self.d.vm_uuid,
                "--disk",
                "vda",
                "--at",
                at,
                "--output",
                out_path.to_str().unwrap(),
                "--repo",
                &url,
            ],
        );
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        if out.status.success() {
            // Never a wrong image.
            qemu_img_compare(out_path.as_os_str(), reference.as_os_str());
            std::fs::remove_file(&out_path).unwrap();
            assert_eq!(left.len(), 1, "{left:?}");
            return Ok(());
        }
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            left.is_empty(),
            "a failed restore at {at} left {left:?} behind: {err}"
        );
        assert!(err.contains("cdpctl: error:"), "{err}");
        Err(err)
    }

    /// Restore every point from `repo`: each either refuses or is exact.
    /// Returns the points that were refused, with the messages.
    fn restore_all(&self, repo: &Path) -> Vec<(String, String)> {
        let mut refused = Vec::new();
        for (name, at, reference) in self.points() {
            if let Err(e) = self.restore(repo, &at, &reference) {
                refused.push((name, e));
            }
        }
        refused
    }
}

fn problem<'a>(v: &'a Value, key: &str) -> &'a Value {
    v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["key"] == key)
        .unwrap_or_else(|| panic!("no problem reported for {key}: {v:#}"))
}

fn marks_of(p: &Value) -> Vec<String> {
    p["marks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_string())
        .collect()
}

/// Does the problem report `seq` as unrestorable?
fn covers(p: &Value, seq: u64) -> bool {
    p["unrestorable"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["from_seq"].as_u64().unwrap() <= seq && seq <= r["to_seq"].as_u64().unwrap())
}

/// The problem makes exactly the points of these phases unrestorable.
fn assert_costs(f: &Fixture, p: &Value, phases: &[usize]) {
    for (i, s) in f.snaps.iter().enumerate() {
        assert_eq!(covers(p, s.seq), phases.contains(&i), "phase {i}: {p:#}");
    }
}

fn flip(path: &Path) {
    let mut b = std::fs::read(path).unwrap();
    let mid = b.len() / 2;
    for x in &mut b[mid..mid + 16] {
        *x ^= 0xa5;
    }
    std::fs::write(path, b).unwrap();
}

fn truncate(path: &Path) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let n = f.metadata().unwrap().len();
    f.set_len(n / 2).unwrap();
}

fn refused_names(r: &[(String, String)]) -> Vec<&str> {
    r.iter().map(|(n, _)| n.as_str()).collect()
}

/// The points of these phases were refused (by seq; by mark: `mark_bad`),
/// and the others restored.
fn assert_refused(r: &[(String, String)], bad: &[usize], mark_bad: &[usize], latest_bad: bool) {
    let names = refused_names(r);
    for i in 0..6 {
        for (how, bad) in [("seq", bad), ("mark", mark_bad)] {
            let n = format!("phase-{i} by {how}");
            assert_eq!(
                names.contains(&n.as_str()),
                bad.contains(&i),
                "{n}: refused {r:#?}"
            );
        }
    }
    assert_eq!(names.contains(&"latest"), latest_bad, "{names:?}");
}

/// Journal damage after a mark may hide a newer mark of the same label:
/// every mark before it is refused too (by seq, those points restore).
const ALL: [usize; 6] = [0, 1, 2, 3, 4, 5];

#[test]
fn verify_reports_damage_and_restore_never_yields_a_wrong_image() {
    let f = build();
    // A clean repository verifies, quick and deep, and everything restores.
    let (ok, v, text) = f.verify(&f.repo, false);
    assert!(ok, "{v:#}");
    assert!(text.contains("OK"), "{text}");
    let (ok, v, _) = f.verify(&f.repo, true);
    assert!(ok, "{v:#}");
    let disk = &v["disks"][0];
    assert_eq!(disk["baselines"].as_array().unwrap().len(), 2);
    assert_eq!(disk["marks"].as_array().unwrap().len(), 6);
    assert_eq!(disk["restorable"].as_array().unwrap().len(), 1, "{disk:#}");
    assert!(
        v["checked"]["fetched_objects"].as_u64().unwrap() > 10,
        "{v:#}"
    );
    assert!(f.restore_all(&f.repo).is_empty());

    let chunk = f.b1_only_chunk();
    let p3 = f.segment_of_phase(3);
    let p4 = f.segment_of_phase(4);

    // Acceptance: corrupt one object, delete another, truncate a third.
    let r = f.copy("three");
    flip(&r.join(&chunk));
    std::fs::remove_file(r.join(f.journal_key(p4, "idx"))).unwrap();
    truncate(&r.join(f.journal_key(p3, "seg.zst")));
    let (ok, quick, text) = f.verify(&r, false);
    assert!(!ok);
    // The quick check sees the missing and the truncated object…
    let t = problem(&quick, &f.journal_key(p3, "seg.zst"));
    assert_eq!(t["kind"], "truncated", "{t:#}");
    assert_costs(&f, t, &[3, 4, 5]);
    assert!(marks_of(t).contains(&"phase-5".to_string()), "{t:#}");
    let m = problem(&quick, &f.journal_key(p4, "idx"));
    assert_eq!(m["kind"], "missing", "{m:#}");
    assert!(text.contains(&f.journal_key(p3, "seg.zst")), "{text}");
    assert!(text.contains(&f.journal_key(p4, "idx")), "{text}");
    // …and --deep the corrupt chunk too, and which points it costs.
    let (ok, deep, _) = f.verify(&r, true);
    assert!(!ok);
    let c = problem(&deep, &chunk);
    assert_eq!(c["kind"], "corrupt", "{c:#}");
    // B2 is consistent from the phase-1 mark on: only phase 0 needs B1.
    assert_eq!(marks_of(c), ["phase-0"], "{c:#}");
    assert_costs(&f, c, &[0]);
    problem(&deep, &f.journal_key(p3, "seg.zst"));
    problem(&deep, &f.journal_key(p4, "idx"));
    let unrestorable = deep["disks"][0]["unrestorable"].as_array().unwrap();
    assert!(!unrestorable.is_empty(), "{deep:#}");
    let refused = f.restore_all(&r);
    assert_refused(&refused, &[0, 3, 4, 5], &ALL, true);
    let msg = &refused
        .iter()
        .find(|(n, _)| n == "phase-0 by seq")
        .unwrap()
        .1;
    assert!(msg.contains(&chunk), "{msg}");
    let msg = &refused
        .iter()
        .find(|(n, _)| n == "phase-3 by seq")
        .unwrap()
        .1;
    assert!(msg.contains(&f.journal_key(p3, "seg.zst")), "{msg}");
    let msg = &refused
        .iter()
        .find(|(n, _)| n == "phase-2 by mark")
        .unwrap()
        .1;
    assert!(
        msg.contains(&format!("restore at seq:{}", f.snaps[2].seq)),
        "{msg}"
    );

    // One at a time.
    // A corrupt segment: only --deep fetches it; points that need it fail.
    let r = f.copy("flip-seg");
    let key = f.journal_key(p3, "seg.zst");
    flip(&r.join(&key));
    assert!(
        f.verify(&r, false).0,
        "the quick check does not fetch segments"
    );
    let (ok, v, _) = f.verify(&r, true);
    assert!(!ok);
    let p = problem(&v, &key);
    assert_eq!(p["kind"], "corrupt");
    assert_costs(&f, p, &[3, 4, 5]);
    // Its index is intact, so it still says which of its records are marks. Only a mark
    // record inside the corrupt data may hide a newer mark of the same label (then every
    // older mark is refused too). Whether phase 3's mark landed in p3 or in a segment of
    // its own depends on when the sealer (30 ms age) cut the segment, which varies with
    // the machine's load: expect what the layout implies.
    let mark_in_p3 = p3.1 >= f.snaps[3].seq;
    let mark_bad: &[usize] = if mark_in_p3 { &ALL } else { &[3, 4, 5] };
    assert_refused(&f.restore_all(&r), &[3, 4, 5], mark_bad, true);

    // A segment object deleted in the middle of the chain.
    let r = f.copy("rm-seg");
    let key = f.journal_key(p3, "seg.zst");
    std::fs::remove_file(r.join(&key)).unwrap();
    let (ok, v, _) = f.verify(&r, false);
    assert!(!ok);
    assert_eq!(problem(&v, &key)["kind"], "missing");
    assert_costs(&f, problem(&v, &key), &[3, 4, 5]);
    let refused = f.restore_all(&r);
    assert_refused(&refused, &[3, 4, 5], &ALL, true);
    let msg = &refused.iter().find(|(n, _)| n == "latest").unwrap().1;
    assert!(msg.contains("missing"), "{msg}");

    // An index deleted in the middle of the chain.
    let r = f.copy("rm-idx");
    let key = f.journal_key(p3, "idx");
    std::fs::remove_file(r.join(&key)).unwrap();
    let (ok, v, _) = f.verify(&r, false);
    assert!(!ok);
    let p = problem(&v, &key);
    assert_eq!(p["kind"], "missing");
    assert_costs(&f, p, &[3, 4, 5]);
    assert!(marks_of(p).contains(&"phase-4".to_string()), "{p:#}");
    assert_refused(&f.restore_all(&r), &[3, 4, 5], &ALL, true);

    // A truncated index: the others are still used.
    let r = f.copy("cut-idx");
    let key = f.journal_key(p3, "idx");
    truncate(&r.join(&key));
    let (ok, v, _) = f.verify(&r, false);
    assert!(!ok);
    assert_eq!(problem(&v, &key)["kind"], "corrupt");
    assert_costs(&f, problem(&v, &key), &[3, 4, 5]);
    assert_refused(&f.restore_all(&r), &[3, 4, 5], &ALL, true);

    // A truncated chunk: --deep finds it.
    let r = f.copy("cut-chunk");
    truncate(&r.join(&chunk));
    let (ok, v, _) = f.verify(&r, true);
    assert!(!ok);
    assert_costs(&f, problem(&v, &chunk), &[0]);
    assert_refused(&f.restore_all(&r), &[0], &[0], false);

    // A missing chunk: the quick check sees it in the one listing.
    let r = f.copy("rm-chunk");
    std::fs::remove_file(r.join(&chunk)).unwrap();
    let (ok, v, _) = f.verify(&r, false);
    assert!(!ok);
    assert_eq!(problem(&v, &chunk)["kind"], "missing");
    assert_costs(&f, problem(&v, &chunk), &[0]);
    assert_refused(&f.restore_all(&r), &[0], &[0], false);

    // A damaged baseline: restore falls back to the older one.
    let r = f.copy("cut-baseline");
    let (key, _) = f.baseline_chunks(1);
    truncate(&r.join(&key));
    let (ok, v, _) = f.verify(&r, false);
    assert!(!ok);
    assert_eq!(problem(&v, &key)["kind"], "corrupt");
    assert_costs(&f, problem(&v, &key), &[]);
    assert_refused(&f.restore_all(&r), &[], &[], false);
}

const DOMAIN_V1: &str = r#"<domain type='kvm'>
  <name>web</name>
  <memory unit='MiB'>1024</memory>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source file='/var/lib/libvirt/images/web.img'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
"#;

const DOMAIN_V2: &str = r#"<domain type='kvm'>
  <name>web</name>
  <memory unit='MiB'>4096</memory>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source file="/var/lib/libvirt/images/web.img"/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <source dev='/dev/vg0/web-data'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/images/agent.sock'/>
    </channel>
  </devices>
</domain>
"#;

#[test]
fn restore_config_gives_the_definition_in_force_at_a_point_remapped() {
    let mut d = Daemon::builder()
        .disk("vda", 8 * MIB)
        .args(["--segment-age", "30ms"])
        .start();
    let repo = d.work_dir().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let cfg = config(&d, &repo);
    let xml = d.work_dir().join("domain.xml");
    let pause = || std::thread::sleep(std::time::Duration::from_millis(60));
    qemu_io(&d, "vda", &phase(0));
    cdpctl(&d, &cfg, &["mark", &d.vm_uuid, "before"]);
    pause();
    std::fs::write(&xml, DOMAIN_V1).unwrap();
    ship(&d, &cfg, Some(&xml));
    pause();
    qemu_io(&d, "vda", &phase(1));
    cdpctl(&d, &cfg, &["mark", &d.vm_uuid, "between"]);
    let between_seq = d.status_json()["last_seq"].as_u64().unwrap();
    let between_time = humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string();
    pause();
    std::fs::write(&xml, DOMAIN_V2).unwrap();
    ship(&d, &cfg, Some(&xml));
    pause();
    cdpctl(&d, &cfg, &["mark", &d.vm_uuid, "after"]);
    let after_time = humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string();
    d.term();
    ship(&d, &cfg, Some(&xml));
    std::fs::remove_dir_all(&d.state_dir).unwrap();
    std::fs::create_dir_all(&d.state_dir).unwrap();
    let defs = std::fs::read_dir(repo.join("cdp/v1/vms").join(&d.vm_uuid).join("config"))
        .unwrap()
        .count();
    assert_eq!(defs, 2, "one stored definition per version");

    let url = format!("file://{}", repo.display());
    let n = std::cell::Cell::new(0);
    let restore_config = |at: &str, extra: &[&str]| -> (Output, PathBuf) {
        n.set(n.get() + 1);
        let out = d.work_dir().join(format!("domain-{}.xml", n.get()));
        let mut args = vec![
            "restore-config",
            &d.vm_uuid,
            "--at",
            at,
            "--output",
            out.to_str().unwrap(),
            "--repo",
            &url,
        ];
        args.extend_from_slice(extra);
        let o = cdpctl_out(&d, &cfg, &args);
        (o, out)
    };
    let expect = |at: &str, want: &str| {
        let (o, out) = restore_config(at, &[]);
        assert!(o.status.success(), "{at}: {o:?}");
        assert_eq!(std::fs::read_to_string(&out).unwrap(), want, "at {at}");
    };
    expect("mark:between", DOMAIN_V1);
    expect(&format!("seq:{between_seq}"), DOMAIN_V1);
    expect(&between_time, DOMAIN_V1);
    expect("mark:after", DOMAIN_V2);
    expect("latest", DOMAIN_V2);
    expect(&after_time, DOMAIN_V2);

    // Before the first definition: refused, nothing written.
    let (o, out) = restore_config("mark:before", &[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("before the first stored definition"), "{err}");
    assert!(!out.exists());

    // Remapped: the disk paths change, and nothing else.
    let (o, out) = restore_config(
        "mark:after",
        &[
            "--remap",
            "/var/lib/libvirt/images=/srv/restored",
            "--remap",
            "/dev/vg0/=/dev/vg9/",
        ],
    );
    assert!(o.status.success(), "{o:?}");
    let want = DOMAIN_V2
        .replace(
            "\"/var/lib/libvirt/images/web.img\"",
            "\"/srv/restored/web.img\"",
        )
        .replace("'/dev/vg0/web-data'", "'/dev/vg9/web-data'");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), want);
    assert!(want.contains("/var/lib/libvirt/images/agent.sock"));

    // Never overwrites.
    let out2 = d.work_dir().join("taken.xml");
    std::fs::write(&out2, "mine").unwrap();
    let o = cdpctl_out(
        &d,
        &cfg,
        &[
            "restore-config",
            &d.vm_uuid,
            "--at",
            "latest",
            "--output",
            out2.to_str().unwrap(),
            "--repo",
            &url,
        ],
    );
    assert!(!o.status.success());
    assert_eq!(std::fs::read_to_string(&out2).unwrap(), "mine");

    // A VM with no definition stored.
    let other = uuid::Uuid::new_v4().to_string();
    let o = cdpctl_out(
        &d,
        &cfg,
        &[
            "restore-config",
            &other,
            "--at",
            "latest",
            "--output",
            d.work_dir().join("none.xml").to_str().unwrap(),
            "--repo",
            &url,
        ],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no VM definition"),
        "{o:?}"
    );
}
