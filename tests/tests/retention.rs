//! Retention end to end: a long timeline of write phases (a mark and a
//! reference copy of the image after each) shipped to a file:// repository,
//! then `cdpctl prune` with second-scale tiers. Every kept point restores
//! byte for byte, points thinned away are refused naming the kept ones, the
//! repository shrank, `cdpctl verify` is clean; a dry run changes nothing;
//! a running export (its lease) holds every deletion back until it stops;
//! a prune stopped mid-way leaves every kept point restorable; a second
//! prune is a no-op. And a prune SIGKILLed at each of its steps (under
//! ptrace, right before a chosen put or delete), run after run, leaves every
//! kept point restorable and verify clean, and the next run completes it.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use cdp_tests::fixture::{cdpctl, cdpctl_cmd, cdpctl_out, phase, qemu_io};
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
            ("time", cdp_core::time::fmt_ns(p.ts_ns + 1_000_000)),
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
            // SAFETY: kill takes two integers; the child is ours and not yet reaped.
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

/// A stopped daemon's VM with a long timeline shipped to a file://
/// repository whose policy keeps every point of the last 2 s and one per
/// second for 4 s.
struct Timeline {
    d: Daemon,
    repo: PathBuf,
    cfg: PathBuf,
    phases: Vec<Phase>,
}

fn timeline() -> Timeline {
    timeline_in(false)
}

/// The timeline, in a repository made with `cdpctl repo init --encrypt`
/// when `encrypted` (the target names its key file).
fn timeline_in(encrypted: bool) -> Timeline {
    let mut d = Daemon::builder()
        .disk("vda", 16 * MIB)
        .args(["--segment-age", "30ms"])
        .start();
    let repo = d.work_dir().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let mut key_line = String::new();
    if encrypted {
        let key = d.work_dir().join("repo.key");
        run_ok(
            Command::new(bin("cdpctl"))
                .args([
                    "repo",
                    "init",
                    &format!("file://{}", repo.display()),
                    "--encrypt",
                    "--key-file",
                ])
                .arg(&key),
        );
        key_line = format!("key_file = \"{}\"\n", key.display());
    }
    let cfg = d.work_dir().join("cdp.toml");
    std::fs::write(
        &cfg,
        format!(
            "[target.primary]\nurl = \"file://{}\"\n{key_line}[policy.default]\ntargets = [\"primary\"]\n\
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
    Timeline {
        d,
        repo,
        cfg,
        phases,
    }
}

/// The phases a prune keeps, from its (dry run) report: those in the
/// window and those that are kept points.
fn kept_phases(report: &Value, phases: &[Phase]) -> Vec<u64> {
    let window = report["window_from_seq"].as_u64().unwrap();
    let points: Vec<u64> = report["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["seq"].as_u64().unwrap())
        .collect();
    phases
        .iter()
        .map(|p| p.seq)
        .filter(|s| *s >= window || points.contains(s))
        .collect()
}

fn verify_ok(d: &Daemon, cfg: &Path, tag: &str) {
    let v: Value =
        serde_json::from_str(&cdpctl(d, cfg, &["verify", &d.vm_uuid, "--json"])).unwrap();
    assert_eq!(v["ok"], true, "verify {tag}: {v}");
}

/// The same prune on an encrypted repository (keyed chunk names, sealed
/// objects): it thins, every kept point restores byte-exact, verify is
/// clean, the thinned points are refused, and a second prune is a no-op.
#[test]
fn prune_on_an_encrypted_repository_keeps_every_kept_point() {
    let Timeline {
        d,
        repo,
        cfg,
        phases,
    } = timeline_in(true);
    assert!(repo.join("cdp/v1/keys/repo-key.json").exists());
    let now = cdp_core::time::fmt_ns(phases.last().unwrap().ts_ns + 500_000_000);
    let before = listing(&repo);
    let dry = prune(&d, &cfg, &now, &["--dry-run"]);
    let kept = kept_phases(&dry, &phases);
    assert!(kept.len() < phases.len(), "nothing to thin: {dry}");
    let full = prune(&d, &cfg, &now, &[]);
    let after = listing(&repo);
    assert!(
        count(&after, ".seg.zst") < count(&before, ".seg.zst"),
        "{full}"
    );
    assert!(count(&after, "/chunks/") > 0, "{full}");
    check_kept(&d, &cfg, &phases, &kept, &full, "encrypted");
    verify_ok(&d, &cfg, "encrypted, after prune");
    let gone = phases.iter().find(|p| !kept.contains(&p.seq)).unwrap();
    let out = d.work_dir().join("never.img");
    let o = restore(&d, &cfg, &format!("seq:{}", gone.seq), &out);
    assert!(!o.status.success() && !out.exists());
    let again_before = listing(&repo);
    prune(&d, &cfg, &now, &[]);
    assert_eq!(
        listing(&repo),
        again_before,
        "a second prune changed the repository"
    );
}

#[test]
fn prune_thins_a_long_timeline_and_every_kept_point_restores() {
    let Timeline {
        d,
        repo,
        cfg,
        phases,
    } = timeline();
    // The policy applied half a second after the last phase.
    let now_ns = phases.last().unwrap().ts_ns + 500_000_000;
    let now = cdp_core::time::fmt_ns(now_ns);
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
    let points = dry["points"].as_array().unwrap();
    let kept = kept_phases(&dry, &phases);
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
    verify_ok(&d, &cfg, "after a partial prune");

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
            cdp_core::time::fmt_ns(p.ts_ns + 1_000_000),
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
    verify_ok(&d, &cfg, "after prune");
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

/// A change a prune makes to the repository, seen at the entry of its
/// system call: a put (the rename that publishes an object) or a delete.
#[derive(Debug, Clone)]
struct Change {
    delete: bool,
    key: String,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let op = if self.delete { "delete" } else { "put" };
        write!(f, "{op} {}", self.key)
    }
}

enum Traced {
    /// SIGKILLed at the entry of `before`'s system call: it was not made,
    /// every change in `done` was.
    Killed { before: Change, done: Vec<Change> },
    /// Ran to its end.
    Exited {
        status: std::process::ExitStatus,
        done: Vec<Change>,
    },
}

/// ptrace(2) with the pointer-sized arguments it takes.
fn ptrace(req: libc::c_uint, tid: libc::pid_t, addr: usize, data: usize) -> libc::c_long {
    // SAFETY: the callers pass either 0 or the address of a live local of the size the
    // request writes (PTRACE_GET_SYSCALL_INFO gets size_of_val of its buffer).
    unsafe {
        libc::ptrace(
            req,
            tid,
            addr as *mut libc::c_void,
            data as *mut libc::c_void,
        )
    }
}

/// The NUL-terminated string at `addr` in `tid`'s memory.
fn read_c_string(tid: libc::pid_t, addr: u64) -> Option<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mem = std::fs::File::open(format!("/proc/{tid}/mem")).ok()?;
    let mut out = Vec::new();
    let mut at = addr;
    while out.len() < 8192 {
        // Never across a page: the next one may not be mapped.
        let mut buf = vec![0u8; 4096 - (at % 4096) as usize];
        let n = mem.read_at(&mut buf, at).ok()?;
        if n == 0 {
            return None;
        }
        if let Some(z) = buf[..n].iter().position(|&b| b == 0) {
            out.extend_from_slice(&buf[..z]);
            return Some(out);
        }
        out.extend_from_slice(&buf[..n]);
        at += n as u64;
    }
    None
}

/// The repository change `tid`, stopped at a system call's entry, is about
/// to make, if any.
fn change_at(tid: libc::pid_t, repo: &Path) -> Option<Change> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: ptrace_syscall_info is plain old data; all zeroes is a valid value.
    let mut info: libc::ptrace_syscall_info = unsafe { std::mem::zeroed() };
    let n = ptrace(
        libc::PTRACE_GET_SYSCALL_INFO,
        tid,
        std::mem::size_of_val(&info),
        &mut info as *mut _ as usize,
    );
    if n <= 0 || info.op != libc::PTRACE_SYSCALL_INFO_ENTRY {
        return None;
    }
    // SAFETY: op is PTRACE_SYSCALL_INFO_ENTRY, so the kernel filled the `entry` member.
    let e = unsafe { info.u.entry };
    // The path that disappears (unlink) or appears (the target of a link,
    // which publishes a created object, or of a rename, which publishes a
    // replacing one), and the directory fd a relative one is resolved from
    // (the file backend works relative to directory fds).
    let (delete, dirfd, path) = match e.nr as libc::c_long {
        libc::SYS_unlinkat => (true, Some(e.args[0]), e.args[1]),
        libc::SYS_linkat => (false, Some(e.args[2]), e.args[3]),
        libc::SYS_renameat2 => (false, Some(e.args[2]), e.args[3]),
        #[cfg(target_arch = "x86_64")]
        libc::SYS_unlink => (true, None, e.args[0]),
        #[cfg(target_arch = "x86_64")]
        libc::SYS_rename => (false, None, e.args[1]),
        #[cfg(target_arch = "x86_64")]
        libc::SYS_renameat => (false, Some(e.args[2]), e.args[3]),
        _ => return None,
    };
    let path = read_c_string(tid, path)?;
    let mut path = std::path::PathBuf::from(std::ffi::OsStr::from_bytes(&path));
    if let Some(fd) = dirfd.filter(|fd| path.is_relative() && *fd as i32 != libc::AT_FDCWD) {
        path = std::fs::read_link(format!("/proc/{tid}/fd/{}", fd as i32))
            .ok()?
            .join(path);
    }
    let key = path.strip_prefix(repo).ok()?.to_str()?.to_string();
    // The staging directory is not the repository.
    (!key.starts_with(".cdp-staging")).then_some(Change { delete, key })
}

/// Run `cmd` under ptrace, stopped at the entry and exit of each of its
/// system calls; each change to `repo` it is about to make is passed to
/// `kill_before` (with the number made before it) and, when that says so,
/// the process is SIGKILLed there, its system call not made: exactly the
/// repository a crash between two changes leaves.
fn run_traced(
    mut cmd: Command,
    repo: &Path,
    log: &Path,
    mut kill_before: impl FnMut(usize, &Change) -> bool,
) -> Traced {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    fn wait(pid: libc::pid_t) -> (libc::pid_t, libc::c_int) {
        let mut st = 0;
        loop {
            // SAFETY: waitpid writes one int into `st`, a live local.
            let r = unsafe { libc::waitpid(pid, &mut st, libc::__WALL) };
            if r > 0 {
                return (r, st);
            }
            let e = std::io::Error::last_os_error();
            assert_eq!(e.kind(), std::io::ErrorKind::Interrupted, "waitpid: {e}");
        }
    }
    // SAFETY: between fork and exec the closure only calls ptrace(PTRACE_TRACEME), which is
    // async-signal-safe, and allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            if ptrace(libc::PTRACE_TRACEME, 0, 0, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // Its own process group: the waits below are for its threads only,
    // never another test's children.
    let child = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let pid = child.id() as libc::pid_t;
    // Stopped at its exec.
    let (_, st) = wait(pid);
    assert!(
        libc::WIFSTOPPED(st) && libc::WSTOPSIG(st) == libc::SIGTRAP,
        "{cmd:?}: not stopped at exec under ptrace: status {st:#x}"
    );
    let opts = libc::PTRACE_O_TRACESYSGOOD | libc::PTRACE_O_TRACECLONE | libc::PTRACE_O_EXITKILL;
    assert_eq!(
        ptrace(libc::PTRACE_SETOPTIONS, pid, 0, opts as usize),
        0,
        "PTRACE_SETOPTIONS: {}",
        std::io::Error::last_os_error()
    );
    ptrace(libc::PTRACE_SYSCALL, pid, 0, 0);
    let mut done = Vec::new();
    let mut killed = None;
    let status: std::process::ExitStatus = loop {
        let (tid, st) = wait(-pid);
        if libc::WIFEXITED(st) || libc::WIFSIGNALED(st) {
            if tid == pid {
                break std::process::ExitStatus::from_raw(st);
            }
            continue;
        }
        let sig = libc::WSTOPSIG(st);
        let mut deliver = 0;
        if sig == libc::SIGTRAP | 0x80 {
            if killed.is_none() {
                if let Some(c) = change_at(tid, repo) {
                    if kill_before(done.len(), &c) {
                        // Stopped at the entry: the call is never made.
                        // SAFETY: kill takes two integers; `pid` is our traced child.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                        killed = Some(c);
                        continue;
                    }
                    done.push(c);
                }
            }
        } else if st >> 16 == 0 && sig != libc::SIGTRAP && sig != libc::SIGSTOP {
            // A signal for the process (not a ptrace event, not a new
            // thread's first stop): pass it on.
            deliver = sig as usize;
        }
        // ESRCH once it is being killed: nothing to resume.
        ptrace(libc::PTRACE_SYSCALL, tid, 0, deliver);
    };
    drop(child);
    match killed {
        Some(before) => {
            assert_eq!(
                status.signal(),
                Some(libc::SIGKILL),
                "killed before {before}"
            );
            Traced::Killed { before, done }
        }
        None => Traced::Exited { status, done },
    }
}

/// The steps of a prune, in its order (README, REPOSITORY_FORMAT.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    /// A chunk of an exact baseline.
    Chunk,
    /// An exact baseline's JSON.
    Baseline,
    /// The retention manifest.
    Manifest,
    /// A journal segment's index or segment.
    Journal,
    /// A baseline no kept point uses.
    OldBaseline,
    /// A chunk no baseline names.
    Garbage,
    /// An older manifest (or an expired lease).
    OldManifest,
}

fn step(c: &Change) -> Step {
    let k = c.key.as_str();
    match (c.delete, k) {
        (false, k) if k.contains("/chunks/") => Step::Chunk,
        (false, k) if k.contains("/baselines/") => Step::Baseline,
        (false, k) if k.contains("/retention/") => Step::Manifest,
        (true, k) if k.contains("/journal/") => Step::Journal,
        (true, k) if k.contains("/baselines/") => Step::OldBaseline,
        (true, k) if k.contains("/chunks/") => Step::Garbage,
        (true, k) if k.contains("/retention/") || k.contains("/leases/") => Step::OldManifest,
        _ => panic!("a prune made a change it should not: {c}"),
    }
}

/// Where each run of a prune is killed, one after the other: before the
/// change `nth` (from 0) of its step in that run (or of any step, None),
/// or at the first change of a later step when the run has no such one.
/// Each run resumes what the killed ones left.
const KILLS: &[(Option<Step>, usize)] = &[
    (None, 3),                    // a few chunks of the first exact baseline
    (Some(Step::Baseline), 0),    // an exact baseline's chunks, not its JSON
    (Some(Step::Manifest), 0),    // every exact baseline, no manifest
    (Some(Step::Journal), 1),     // an index deleted, its segment not
    (Some(Step::Journal), 4),     // a few segments deleted
    (Some(Step::OldBaseline), 0), // the journal below the window deleted
    (Some(Step::Garbage), 1),     // a chunk deleted
    (Some(Step::OldManifest), 0), // everything but the older manifests
];

#[test]
fn prune_killed_at_any_moment_leaves_every_kept_point_restorable() {
    let started = std::time::Instant::now();
    let Timeline {
        d,
        repo,
        cfg,
        phases,
    } = timeline();
    let last = phases.last().unwrap().ts_ns;
    let mut killed_at = BTreeMap::new();
    // Half a second after the last phase (exact baselines, segments, the
    // first baseline go), then 3 s later (the exact baselines of the first
    // prune and their chunks go too).
    for (tag, now_ns) in [
        ("first", last + 500_000_000),
        ("later", last + 3_500_000_000),
    ] {
        let now = cdp_core::time::fmt_ns(now_ns);
        let dry = prune(&d, &cfg, &now, &["--dry-run"]);
        let kept = kept_phases(&dry, &phases);
        assert!(!kept.is_empty(), "{dry}");
        // Each kill of KILLS, then a run to its end.
        for (round, kill) in KILLS.iter().map(Some).chain([None]).enumerate() {
            let cmd = cdpctl_cmd(&d, &cfg, &["prune", &d.vm_uuid, "--json", "--now", &now]);
            let log = d.work_dir().join(format!("prune-{tag}-{round}.log"));
            let mut seen: BTreeMap<Step, usize> = BTreeMap::new();
            let traced = run_traced(cmd, &repo, &log, |done, c| {
                let s = step(c);
                let n = *seen.entry(s).and_modify(|n| *n += 1).or_insert(0);
                match kill {
                    None => false,
                    Some((None, nth)) => done == *nth,
                    Some((Some(at), nth)) => s > *at || (s == *at && n == *nth),
                }
            });
            let tag = format!("{tag}-prune-run{}", round + 1);
            match traced {
                Traced::Exited { status, done } => {
                    assert!(
                        status.success(),
                        "{tag}: {status}\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                    eprintln!("{tag}: completed, {} changes", done.len());
                    check_kept(&d, &cfg, &phases, &kept, &dry, &tag);
                    verify_ok(&d, &cfg, &tag);
                    break;
                }
                Traced::Killed { before, done } => {
                    eprintln!(
                        "{tag}: killed after {} changes, before {before}",
                        done.len()
                    );
                    *killed_at.entry(step(&before)).or_insert(0) += 1;
                    check_kept(&d, &cfg, &phases, &kept, &dry, &tag);
                    verify_ok(&d, &cfg, &tag);
                }
            }
        }
        // Another prune at the same time is a no-op.
        let before = listing(&repo);
        let again = prune(&d, &cfg, &now, &[]);
        assert_eq!(
            listing(&repo),
            before,
            "{tag}: second prune changed the repository: {again}"
        );
    }
    eprintln!(
        "killed before each step (times): {killed_at:?}, in {:?}",
        started.elapsed()
    );
    for s in [
        Step::Chunk,
        Step::Baseline,
        Step::Manifest,
        Step::Journal,
        Step::OldBaseline,
        Step::Garbage,
        Step::OldManifest,
    ] {
        assert!(
            killed_at.contains_key(&s),
            "never killed before a {s:?}: {killed_at:?}"
        );
    }
}
