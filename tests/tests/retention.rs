//! Retention end to end: a long timeline of write phases (a mark and a
//! reference copy of the image after each) shipped to a file:// repository,
//! then `cdpctl prune` with second-scale tiers. Every kept point restores
//! byte for byte, points thinned away are refused naming the kept ones, the
//! repository shrank, `cdpctl verify` is clean; a dry run changes nothing;
//! a running export (its lease) holds every deletion back until it stops;
//! a prune stopped mid-way leaves every kept point restorable; a second
//! prune is a no-op.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use cdp_tests::fixture::{cdpctl, cdpctl_out, phase, qemu_io};
use cdp_tests::{bin, qemu_img_compare, run_ok, wait_child, Daemon, STOP_TIMEOUT};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const PHASES: u64 = 8;

/// Every file of the repository: key → size.
fn listing(repo: &Path) -> BTreeMap<String, u64> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, u64>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            let name = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if name.starts_with(".cdp-staging") {
                continue;
            }
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(name, e.metadata().unwrap().len());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(repo, repo, &mut out);
    out
}

fn count(l: &BTreeMap<String, u64>, part: &str) -> usize {
    l.keys().filter(|k| k.contains(part)).count()
}

struct Phase {
    copy: PathBuf,
    seq: u64,
    ts_ns: u64,
    mark: String,
}

fn prune(d: &Daemon, cfg: &Path, now: &str, extra: &[&str]) -> Value {
    let mut args = vec!["prune", d.vm_uuid.as_str(), "--json", "--now", now];
    args.extend_from_slice(extra);
    let out: Value = serde_json::from_str(&cdpctl(d, cfg, &args)).unwrap();
    out["targets"][0].clone()
}

fn restore(d: &Daemon, cfg: &Path, at: &str, out: &Path) -> std::process::Output {
    cdpctl_out(
        d,
        cfg,
        &[
            "restore",
            &d.vm_uuid,
            "--disk",
            "vda",
            "--at",
            at,
            "--output",
            out.to_str().unwrap(),
            "--no-local",
        ],
    )
}

/// Each kept phase (its mark within reach, or in the window) restores to
/// its reference copy by mark, by seq and by time; each kept point of the
/// report restores.
fn check_kept(d: &Daemon, cfg: &Path, phases: &[Phase], kept: &[u64], report: &Value, tag: &str) {
    for (i, p) in phases.iter().enumerate() {
        if !kept.contains(&p.seq) {
            continue;
        }
        for (how, at) in [
            ("mark", format!("mark:{}", p.mark)),
            ("seq", format!("seq:{}", p.seq)),
            ("time", cdpd::time::fmt_ns(p.ts_ns + 1_000_000)),
        ] {
            let out = d.work_dir().join(format!("r-{tag}-{i}-{how}.img"));
            let o = restore(d, cfg, &at, &out);
            assert!(
                o.status.success(),
                "{tag}: restore at {at} (phase {i}) failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            qemu_img_compare(out.as_os_str(), p.copy.as_os_str());
            std::fs::remove_file(&out).unwrap();
        }
    }
    for p in report["points"].as_array().unwrap() {
        let seq = p["seq"].as_u64().unwrap();
        let out = d.work_dir().join(format!("r-{tag}-point-{seq}.img"));
        let o = restore(d, cfg, &format!("seq:{seq}"), &out);
        assert!(
            o.status.success(),
            "{tag}: kept point seq {seq} does not restore: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        // A point between phases is the state the phase before left.
        if let Some(ph) = phases.iter().find(|ph| ph.seq == seq) {
            qemu_img_compare(out.as_os_str(), ph.copy.as_os_str());
        }
        std::fs::remove_file(&out).unwrap();
    }
}

/// `cdpctl export` of the newest point, until dropped.
struct Export(Option<std::process::Child>);

impl Export {
    fn start(d: &Daemon, cfg: &Path) -> Export {
        let socket = d.work_dir().join("export.sock");
        let mut c = Command::new(bin("cdpctl"));
        c.args(["export", &d.vm_uuid, "--disk", "vda", "--at", "latest"])
            .arg("--socket")
            .arg(&socket)
            .args(["--ready-fd", "1", "--no-local"])
            .arg("--state-dir")
            .arg(&d.state_dir)
            .arg("--run-dir")
            .arg(&d.run_dir)
            .arg("--config")
            .arg(cfg);
        let mut child = c
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(d.work_dir().join("export.log")).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("READY"), "export: {line:?}");
        Export(Some(child))
    }

    fn stop(&mut self) {
        if let Some(c) = self.0.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            assert!(wait_child(c, STOP_TIMEOUT).is_some(), "export did not stop");
        }
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn prune_thins_a_long_timeline_and_every_kept_point_restores() {
    let mut d = Daemon::builder()
        .disk("vda", 16 * MIB)
        .args(["--segment-age", "30ms"])
        .start();
    let repo = d.work_dir().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let cfg = d.work_dir().join("cdp.toml");
    std::fs::write(
        &cfg,
        format!(
            "[target.primary]\nurl = \"file://{}\"\n[policy.default]\ntargets = [\"primary\"]\n\
             [policy.default.retention]\nany_point = \"2s\"\nthin = [{{ every = \"1s\", keep = \"4s\" }}]\n",
            repo.display()
        ),
    )
    .unwrap();
    cdpctl(&d, &cfg, &["baseline", &d.vm_uuid]);
    // The timeline: a phase of writes every 0.7 s, a mark and a reference
    // copy after each. Each phase also rewrites one chunk four times with
    // incompressible data: the journal grows much faster than the content.
    let noise = d.work_dir().join("noise.bin");
    let mut buf = vec![0u8; MIB as usize];
    cdp_tests::fill_pseudo_random(9, &mut buf);
    std::fs::write(&noise, &buf).unwrap();
    let mut phases = Vec::new();
    for i in 0..PHASES {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(700));
        }
        let mut cmds = phase(i);
        for _ in 0..4 {
            cmds.insert(0, format!("write -s {} {} 1m", noise.display(), 12 * MIB));
        }
        qemu_io(&d, "vda", &cmds);
        let mark = format!("phase-{i}");
        let m: Value =
            serde_json::from_str(&cdpctl(&d, &cfg, &["mark", &d.vm_uuid, &mark, "--json"]))
                .unwrap();
        let copy = d.work_dir().join(format!("ref-{i}.img"));
        std::fs::copy(d.image("vda"), &copy).unwrap();
        phases.push(Phase {
            copy,
            seq: m["seq"].as_u64().unwrap(),
            ts_ns: m["ts_ns"].as_u64().unwrap(),
            mark,
        });
    }
    d.term();
    run_ok(
        Command::new(bin("cdp-shipper"))
            .args(["run", "--once", "--vm-uuid", &d.vm_uuid])
            .arg("--state-dir")
            .arg(&d.state_dir)
            .arg("--run-dir")
            .arg(&d.run_dir)
            .arg("--config")
            .arg(&cfg),
    );
    // The policy applied half a second after the last phase.
    let now_ns = phases.last().unwrap().ts_ns + 500_000_000;
    let now = cdpd::time::fmt_ns(now_ns);
    let before = listing(&repo);
    let size_before: u64 = before.values().sum();

    // A dry run changes nothing and says what would happen.
    let dry = prune(&d, &cfg, &now, &["--dry-run"]);
    assert_eq!(listing(&repo), before, "a dry run changed the repository");
    assert!(dry["synthetic_baselines"].as_u64().unwrap() > 0, "{dry}");
    assert!(dry["segments_deleted"].as_u64().unwrap() > 0, "{dry}");

    // What the policy keeps: marks within reach (4 s), one point per second
    // within 4 s, and everything in the last 2 s.
    let window = dry["window_from_seq"].as_u64().unwrap();
    let points: Vec<u64> = dry["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["seq"].as_u64().unwrap())
        .collect();
    let kept: Vec<u64> = phases
        .iter()
        .map(|p| p.seq)
        .filter(|s| *s >= window || points.contains(s))
        .collect();
    let thinned: Vec<&Phase> = phases.iter().filter(|p| !kept.contains(&p.seq)).collect();
    assert!(
        !thinned.is_empty(),
        "the timeline is too short to thin: {dry}"
    );
    assert!(kept.len() >= 3, "{dry}");
    for p in &phases {
        if p.ts_ns + 4_000_000_000 >= now_ns {
            assert!(
                kept.contains(&p.seq),
                "mark {} is within reach (4 s): {dry}",
                p.mark
            );
        }
    }

    // A running export holds every deletion back.
    let mut export = Export::start(&d, &cfg);
    let held = prune(&d, &cfg, &now, &[]);
    assert_eq!(held["deferred_by_lease"], true, "{held}");
    assert!(held["deferred_objects"].as_u64().unwrap() > 0, "{held}");
    assert_eq!(held["segments_deleted"], 0, "{held}");
    assert_eq!(held["baselines_deleted"], 0, "{held}");
    assert_eq!(held["chunks_deleted"], 0, "{held}");
    assert_eq!(held["leases"][0]["holder"], "cdpctl export", "{held}");
    let during = listing(&repo);
    for k in before.keys() {
        assert!(during.contains_key(k), "{k} deleted under a lease");
    }
    assert!(held["synthetic_baselines"].as_u64().unwrap() > 0, "{held}");
    check_kept(&d, &cfg, &phases, &kept, &held, "leased");
    export.stop();
    assert_eq!(
        count(&listing(&repo), "/leases/"),
        0,
        "the export left its lease"
    );

    // Stopped after a few deletions (as a crash there would): every kept
    // point still restores, verify is clean.
    let part = prune(&d, &cfg, &now, &["--max-deletions", "5"]);
    assert!(part["left_for_next_prune"].as_u64().unwrap() > 0, "{part}");
    check_kept(&d, &cfg, &phases, &kept, &held, "partial");
    let v: Value =
        serde_json::from_str(&cdpctl(&d, &cfg, &["verify", &d.vm_uuid, "--json"])).unwrap();
    assert_eq!(v["ok"], true, "verify after a partial prune: {v}");

    // The whole prune.
    let full = prune(&d, &cfg, &now, &[]);
    assert_eq!(full["deferred_by_lease"], false, "{full}");
    let after = listing(&repo);
    let size_after: u64 = after.values().sum();
    eprintln!(
        "repository: {} objects, {size_before} bytes before; {} objects, {size_after} bytes after \
         ({} → {} segments, {} → {} baselines, {} → {} chunks); prune: {full}",
        before.len(),
        after.len(),
        count(&before, ".seg.zst"),
        count(&after, ".seg.zst"),
        count(&before, "/baselines/"),
        count(&after, "/baselines/"),
        count(&before, "/chunks/"),
        count(&after, "/chunks/"),
    );
    assert!(size_after < size_before, "{size_after} >= {size_before}");
    assert!(count(&after, ".seg.zst") < count(&before, ".seg.zst"));
    check_kept(&d, &cfg, &phases, &kept, &held, "pruned");

    // Thinned-away points are refused, naming the kept ones.
    for p in &thinned {
        for at in [
            format!("mark:{}", p.mark),
            format!("seq:{}", p.seq),
            cdpd::time::fmt_ns(p.ts_ns + 1_000_000),
        ] {
            let out = d.work_dir().join("never.img");
            let o = restore(&d, &cfg, &at, &out);
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                !o.status.success(),
                "{at} restored after retention removed it"
            );
            assert!(!out.exists());
            if !at.starts_with("mark:") {
                assert!(err.contains("retention"), "{at}: {err}");
                assert!(err.contains("seq:"), "{at}: {err}");
            } else {
                assert!(err.contains("no mark"), "{at}: {err}");
            }
        }
    }

    // verify is clean; points shows what is left.
    let v: Value =
        serde_json::from_str(&cdpctl(&d, &cfg, &["verify", &d.vm_uuid, "--json"])).unwrap();
    assert_eq!(v["ok"], true, "verify after prune: {v}");
    let pts: Value = serde_json::from_str(&cdpctl(
        &d,
        &cfg,
        &["points", &d.vm_uuid, "--json", "--no-local"],
    ))
    .unwrap();
    let disk = &pts["disks"][0];
    assert_eq!(
        disk["retention"]["any_point_from_seq"].as_u64(),
        Some(window),
        "{pts}"
    );
    assert_eq!(
        disk["retention"]["kept_points"].as_array().unwrap().len(),
        points.len(),
        "{pts}"
    );

    // A second prune at the same time is a no-op.
    let again_before = listing(&repo);
    let again = prune(&d, &cfg, &now, &[]);
    assert_eq!(
        listing(&repo),
        again_before,
        "second prune changed the repository: {again}"
    );
    for k in [
        "synthetic_baselines",
        "segments_deleted",
        "baselines_deleted",
        "chunks_deleted",
        "other_deleted",
    ] {
        assert_eq!(again[k], 0, "{k}: {again}");
    }
}
