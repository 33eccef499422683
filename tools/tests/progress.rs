//! Progress and JSON (issue 15): `cdpctl restore`, `baseline`, `verify`,
//! `prune` and `export` with `--json` keep stdout one JSON document and
//! write JSON lines on stderr: progress events whose bytes never go back,
//! a last one whose bytes equal its total, that total being the work the
//! command really did (the disk's size, the bytes checked, freed, read),
//! then a `done` event (export: a `ready` event before it serves). The
//! `--dry-run` plans of restore and prune name what they would read or
//! delete, and change nothing.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use cdp_repo::format as rf;
use cdp_tests::fixture::{cdpctl_cmd, phase, qemu_io};
use cdp_tests::{qemu_img_compare, run, run_ok, wait_child, Daemon, STOP_TIMEOUT};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const DISK: u64 = 24 * MIB;
const PHASES: u64 = 5;

/// What a `cdpctl … --json` run wrote: its one stdout document and its
/// stderr events, each line parsed (a line that is not JSON fails).
struct JsonRun {
    doc: Value,
    events: Vec<Value>,
}

fn events_of(stderr: &str) -> Vec<Value> {
    stderr
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l)
                .unwrap_or_else(|e| panic!("stderr line is not JSON ({e}): {l:?}\n{stderr}"))
        })
        .collect()
}

/// Run cdpctl with `--json`; it must succeed.
fn json_run(d: &Daemon, cfg: &Path, args: &[&str]) -> JsonRun {
    let mut a = args.to_vec();
    a.push("--json");
    let out = run(&mut cdpctl_cmd(d, cfg, &a));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "cdpctl {a:?}: {}\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    let doc = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!("cdpctl {a:?}: stdout is not one JSON document ({e}): {stdout}")
    });
    JsonRun {
        doc,
        events: events_of(&stderr),
    }
}

/// The progress events of `op` are well formed, their bytes never go back
/// nor beyond what is known of the total, at most about four a second; the
/// last one has bytes == total and is followed by `done` (the last event of
/// all, unless `ready` or messages follow). Returns the final total.
fn check_progress(events: &[Value], op: &str) -> u64 {
    let progress: Vec<&Value> = events.iter().filter(|e| e["event"] == "progress").collect();
    assert!(
        !progress.is_empty(),
        "no progress event of {op}: {events:?}"
    );
    let mut last = 0;
    for e in &progress {
        assert_eq!(e["op"], op, "{e}");
        let (bytes, total) = (e["bytes"].as_u64().unwrap(), e["total"].as_u64().unwrap());
        assert!(
            bytes >= last,
            "bytes went back from {last}: {e}\n{events:?}"
        );
        assert!(bytes <= total, "more done than known: {e}");
        assert!(e["rate_bps"].is_u64(), "{e}");
        assert!(e["eta_s"].is_null() || e["eta_s"].is_f64(), "{e}");
        last = bytes;
    }
    let fin = progress.last().unwrap();
    assert_eq!(
        fin["bytes"], fin["total"],
        "the last progress event of {op} is not complete: {events:?}"
    );
    let at = events.iter().position(|e| std::ptr::eq(e, *fin)).unwrap();
    let done = &events[at + 1];
    assert_eq!(done["event"], "done", "{events:?}");
    assert_eq!(done["op"], op, "{done}");
    assert_eq!(done["bytes"], fin["bytes"], "{done}");
    // At most four a second, plus the first and the last.
    let secs = done["seconds"].as_f64().unwrap();
    let allowed = 2 + (secs * 4.0).ceil() as usize + 1;
    assert!(
        progress.len() <= allowed,
        "{} progress events in {secs} s: {events:?}",
        progress.len()
    );
    fin["total"].as_u64().unwrap()
}

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

fn sum_where(l: &BTreeMap<String, u64>, f: impl Fn(&str) -> bool) -> u64 {
    l.iter().filter(|(k, _)| f(k)).map(|(_, n)| n).sum()
}

/// A stopped daemon's VM shipped to a file:// repository: an online
/// baseline (taken with `--json`, its run kept), then phases of writes
/// 0.7 s apart with a mark and a reference copy of the image after each.
/// The policy keeps any point of the last second only.
struct Fixture {
    d: Daemon,
    repo: PathBuf,
    url: String,
    cfg: PathBuf,
    baseline: JsonRun,
    /// (mark, seq, ts_ns, reference copy) per phase.
    phases: Vec<(String, u64, u64, PathBuf)>,
}

fn fixture(seed: u64) -> Fixture {
    let mut d = Daemon::builder()
        .disk_random("vda", DISK, seed)
        .args(["--segment-age", "30ms"])
        .start();
    let repo = d.work_dir().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let cfg = d.work_dir().join("cdp.toml");
    std::fs::write(
        &cfg,
        format!(
            "[target.primary]\nurl = \"file://{}\"\n[policy.default]\ntargets = [\"primary\"]\n\
             [policy.default.retention]\nany_point = \"1s\"\n",
            repo.display()
        ),
    )
    .unwrap();
    let baseline = json_run(&d, &cfg, &["baseline", &d.vm_uuid]);
    let mut phases = Vec::new();
    for i in 0..PHASES {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(700));
        }
        qemu_io(&d, "vda", &phase(i));
        let mark = format!("phase-{i}");
        let m = run_ok(&mut cdpctl_cmd(
            &d,
            &cfg,
            &["mark", &d.vm_uuid, &mark, "--json"],
        ));
        let m: Value = serde_json::from_slice(&m.stdout).unwrap();
        let copy = d.work_dir().join(format!("ref-{i}.img"));
        std::fs::copy(d.image("vda"), &copy).unwrap();
        phases.push((
            mark,
            m["seq"].as_u64().unwrap(),
            m["ts_ns"].as_u64().unwrap(),
            copy,
        ));
    }
    d.term();
    run_ok(&mut cdp_tests::fixture::shipper_once_cmd(&d, &cfg));
    let url = format!("file://{}", repo.display());
    Fixture {
        d,
        repo,
        url,
        cfg,
        baseline,
        phases,
    }
}

/// `cdpctl baseline --json`: the total is the disk's size (one target),
/// every byte of it scanned; stdout is the baselines taken.
#[test]
fn baseline_progress_covers_every_byte_of_the_disk() {
    let f = fixture(41);
    let total = check_progress(&f.baseline.events, "baseline");
    assert_eq!(total, DISK, "{:?}", f.baseline.events);
    for e in f
        .baseline
        .events
        .iter()
        .filter(|e| e["event"] == "progress")
    {
        assert_eq!(e["total"], DISK, "the total is known from the start: {e}");
    }
    let taken = f.baseline.doc.as_array().expect("an array of baselines");
    assert_eq!(taken.len(), 1, "{}", f.baseline.doc);
    let key = taken[0]["baseline"]["key"].as_str().unwrap();
    assert!(f.repo.join(key).is_file(), "{key} is not in the repository");
}

/// `cdpctl restore --dry-run --json` names the baseline, the journal
/// segments and the chunks it would read and writes nothing; the restore
/// itself reports every byte of the disk once, and its image is the
/// reference copy.
#[test]
fn restore_progress_is_the_disk_size_and_the_dry_run_plan_writes_nothing() {
    let f = fixture(42);
    let (d, cfg) = (&f.d, &f.cfg);
    let (mark, _, _, copy) = &f.phases[2];
    let at = format!("mark:{mark}");
    let out = d.work_dir().join("restored.img");
    let common = [
        "restore",
        &d.vm_uuid,
        "--disk",
        "vda",
        "--at",
        &at,
        "--repo",
        &f.url,
        "--no-local",
    ];
    let before = listing(&f.repo);
    let mut dry_args = common.to_vec();
    dry_args.extend(["--dry-run", "--output", out.to_str().unwrap()]);
    let dry = json_run(d, cfg, &dry_args);
    let plan = &dry.doc;
    let baseline_key = f.baseline.doc[0]["baseline"]["key"].as_str().unwrap();
    assert_eq!(plan["baseline"], baseline_key, "{plan}");
    assert_eq!(plan["size"], DISK, "{plan}");
    let segs = plan["journal_segments"].as_array().unwrap();
    assert!(!segs.is_empty(), "the point needs journal records: {plan}");
    for s in segs {
        assert_eq!(s["in"], "repository", "{plan}");
        let key = rf::segment_key(
            &d.vm_uuid,
            "vda",
            s["first_seq"].as_u64().unwrap(),
            s["last_seq"].as_u64().unwrap(),
        );
        assert!(before.contains_key(&key), "{key} is not in the repository");
    }
    let chunks = plan["baseline_chunks"].as_u64().unwrap();
    let baseline_bytes = plan["baseline_bytes"].as_u64().unwrap();
    assert!(
        chunks > 0 && chunks <= DISK.div_ceil(rf::CHUNK_SIZE),
        "{plan}"
    );
    assert!(
        baseline_bytes > 0 && baseline_bytes + plan["journal_bytes"].as_u64().unwrap() <= DISK,
        "{plan}"
    );
    assert!(!out.exists(), "a dry run wrote {}", out.display());
    assert!(!d.work_dir().join("restored.img.partial").exists());
    assert_eq!(listing(&f.repo), before, "a dry run changed the repository");
    assert!(
        !dry.events.iter().any(|e| e["event"] == "progress"),
        "a dry run restores nothing: {:?}",
        dry.events
    );

    let mut args = common.to_vec();
    args.extend(["--output", out.to_str().unwrap()]);
    let r = json_run(d, cfg, &args);
    let total = check_progress(&r.events, "restore");
    assert_eq!(total, DISK, "{:?}", r.events);
    for e in r.events.iter().filter(|e| e["event"] == "progress") {
        assert_eq!(e["total"], DISK, "{e}");
    }
    assert_eq!(r.doc["stats"]["bytes"], DISK, "{}", r.doc);
    assert_eq!(r.doc["baseline"], baseline_key, "{}", r.doc);
    qemu_img_compare(out.as_os_str(), copy.as_os_str());
}

/// `cdpctl verify --json`, quick and `--deep`: the bytes checked are those
/// of every segment object and chunk of the VM (deep: fetched, the
/// report's `fetched_bytes`).
#[test]
fn verify_progress_is_the_bytes_of_segments_and_chunks_checked() {
    let f = fixture(43);
    let (d, cfg) = (&f.d, &f.cfg);
    let l = listing(&f.repo);
    let journal = rf::journal_prefix(&d.vm_uuid, "vda");
    let segments = sum_where(&l, |k| k.starts_with(&journal) && k.ends_with(".seg.zst"));
    let chunks = sum_where(&l, |k| k.starts_with(rf::CHUNKS_PREFIX));
    assert!(segments > 0 && chunks > 0, "{l:?}");
    // From the policy's target: which one is read is a message event too.
    let quick = json_run(d, cfg, &["verify", &d.vm_uuid]);
    assert_eq!(quick.doc["ok"], true, "{}", quick.doc);
    assert!(
        quick.events.iter().any(|e| e["event"] == "message"
            && e["text"]
                .as_str()
                .is_some_and(|t| t.contains("reading from target primary"))),
        "{:?}",
        quick.events
    );
    assert_eq!(check_progress(&quick.events, "verify"), segments + chunks);
    let deep = json_run(d, cfg, &["verify", &d.vm_uuid, "--deep", "--repo", &f.url]);
    assert_eq!(deep.doc["ok"], true, "{}", deep.doc);
    let total = check_progress(&deep.events, "verify");
    assert_eq!(total, segments + chunks, "{:?}", deep.events);
    assert_eq!(deep.doc["checked"]["fetched_bytes"], total, "{}", deep.doc);
}

/// `cdpctl prune --dry-run --json` lists the objects it would delete (all
/// there, none deleted) and reports their bytes; the prune then deletes
/// them, its progress total the bytes it freed.
#[test]
fn prune_progress_is_the_bytes_freed_and_the_dry_run_deletes_nothing() {
    let f = fixture(44);
    let (d, cfg) = (&f.d, &f.cfg);
    // The policy applied half a second after the last phase: every phase
    // but the last is out of the one-second window.
    let now = cdp_core::time::fmt_ns(f.phases.last().unwrap().2 + 500_000_000);
    let before = listing(&f.repo);
    let dry = json_run(d, cfg, &["prune", &d.vm_uuid, "--now", &now, "--dry-run"]);
    assert_eq!(listing(&f.repo), before, "a dry run changed the repository");
    let report = &dry.doc["targets"][0];
    assert_eq!(report["dry_run"], true, "{report}");
    let would: Vec<&str> = report["would_delete"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    let journal = rf::journal_prefix(&d.vm_uuid, "vda");
    let doomed_segments: Vec<&str> = would
        .iter()
        .copied()
        .filter(|k| k.starts_with(&journal) && k.ends_with(".seg.zst"))
        .collect();
    assert_eq!(
        doomed_segments.len() as u64,
        report["segments_deleted"].as_u64().unwrap(),
        "{report}"
    );
    assert!(!doomed_segments.is_empty(), "nothing to thin: {report}");
    let mut bytes = 0;
    for k in &would {
        bytes += before
            .get(*k)
            .unwrap_or_else(|| panic!("{k} would be deleted but is not there"));
    }
    assert_eq!(report["bytes_freed"], bytes, "{report}");
    assert_eq!(
        check_progress(&dry.events, "prune"),
        bytes,
        "{:?}",
        dry.events
    );

    let real = json_run(d, cfg, &["prune", &d.vm_uuid, "--now", &now]);
    let report = &real.doc["targets"][0];
    assert_eq!(report["dry_run"], false, "{report}");
    let freed = report["bytes_freed"].as_u64().unwrap();
    assert!(freed > 0, "{report}");
    assert_eq!(
        check_progress(&real.events, "prune"),
        freed,
        "{:?}",
        real.events
    );
    let after = listing(&f.repo);
    for k in doomed_segments {
        assert!(!after.contains_key(k), "{k} is still there: {report}");
    }
    let gone: u64 = before
        .iter()
        .filter(|(k, _)| !after.contains_key(*k))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(gone, freed, "the bytes freed are the bytes gone: {report}");
}

/// `cdpctl export --json`: the progress of preparing (the bytes of the
/// disk's indexes and baselines read), then `ready` with the NBD URI
/// before it serves; stdout stays empty, as without `--json`.
#[test]
fn export_progress_is_the_indexes_and_baselines_read_then_ready() {
    let f = fixture(45);
    let d = &f.d;
    let socket = d.work_dir().join("export.sock");
    let mut c = cdpctl_cmd(
        d,
        &f.cfg,
        &[
            "export",
            &d.vm_uuid,
            "--disk",
            "vda",
            "--at",
            "latest",
            "--socket",
            socket.to_str().unwrap(),
            "--repo",
            &f.url,
            "--no-local",
            "--json",
        ],
    );
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // stderr's lines, read on a thread: a missing ready event fails the
    // test after a minute instead of hanging it.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let mut events = Vec::new();
    loop {
        let Ok(l) = rx.recv_timeout(Duration::from_secs(60)) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("export was not ready within a minute (or ended): {events:?}");
        };
        let e: Value = serde_json::from_str(&l)
            .unwrap_or_else(|err| panic!("stderr line is not JSON ({err}): {l:?}"));
        let ready = e["event"] == "ready";
        events.push(e);
        if ready {
            break;
        }
    }
    let ready = events.last().unwrap().clone();
    assert_eq!(
        ready["uri"],
        format!("nbd+unix:///vda?socket={}", socket.display()),
        "{ready}"
    );
    assert_eq!(ready["size"], DISK, "{ready}");
    // It serves once ready: the socket is there.
    assert!(
        std::os::unix::net::UnixStream::connect(&socket).is_ok(),
        "nothing listens on {} after ready",
        socket.display()
    );
    let total = check_progress(&events, "export");
    let l = listing(&f.repo);
    let journal = rf::journal_prefix(&d.vm_uuid, "vda");
    let baselines = rf::baseline_prefix(&d.vm_uuid, "vda");
    let read = sum_where(&l, |k| k.starts_with(&journal) && k.ends_with(".idx"))
        + sum_where(&l, |k| k.starts_with(&baselines));
    assert_eq!(total, read, "{events:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut stdout).unwrap();
    let st = wait_child(child, STOP_TIMEOUT).expect("export did not stop on SIGTERM");
    assert!(st.success(), "export: {st:?} (signal {:?})", st.signal());
    reader.join().unwrap();
    let rest: Vec<String> = rx.try_iter().collect();
    let after = events_of(&rest.join("\n"));
    assert!(
        after.iter().all(|e| e["event"] == "message"),
        "after ready only messages: {after:?}"
    );
    assert!(stdout.is_empty(), "export wrote to stdout: {stdout:?}");
}
