//! Two protected VMs on one host (issue 11, acceptance: "With two VMs
//! protected on one host, VM A's QEMU user cannot connect to VM B's sockets,
//! read B's journal or write B's catalog"). One state and one run directory,
//! root-owned 0755 as in production; VM A's cdpd runs as libvirt-qemu (uid
//! 64055), VM B's as nobody (uid 65534), each with its own per-VM
//! directories (0700) as the libvirt hook makes them.
//!
//! The attacker is a real process of A's uid running real clients (nbdinfo,
//! qemu-io, cdpctl, sqlite3, cat and a raw socket client). Two layers stand
//! between it and B: file permissions (B's directories 0700, its sockets
//! and files 0600), then, for the sockets, cdpd's `SO_PEERCRED` check. The
//! test tries each attack with B as cdpd left it, where the connection
//! fails with EACCES before reaching B's cdpd (which logs nothing), and
//! again after root opened B's directories (0755) and sockets (0777), where
//! the connection reaches B's cdpd, which closes it unanswered and logs the
//! refused uid. B's image, journal and catalog are compared byte for byte
//! before and after; A uses its own disk through its own socket throughout,
//! and B's user reaches what A is refused, so that no check passes for a
//! reason of its own (a wrong path, a broken client).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cdp_tests::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;
/// VM A's QEMU user: libvirt-qemu, group kvm.
const A: (u32, u32) = (64055, 107);
/// VM B's QEMU user: nobody, group nogroup.
const B: (u32, u32) = (65534, 65534);

/// Runs `cmd` as `who` (a real process of that uid and gid, without root's
/// supplementary groups: std drops them when root sets a uid).
fn run_as(who: (u32, u32), cmd: &mut Command) -> Output {
    run(cmd.uid(who.0).gid(who.1).env("HOME", "/nonexistent"))
}

fn text(out: &Output) -> String {
    format!(
        "status {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// What a raw client of one unix socket saw.
#[derive(Debug, PartialEq, Eq)]
enum Reached {
    /// `connect` failed with this errno: the socket was not reached.
    Refused(i64),
    /// Connected; this many bytes came back before the server closed (at
    /// most 18: an NBD greeting, or the start of a reply line).
    Answered(u64),
}

/// Connects to `socket` as `who`, sends `send` (a line) if not empty, and
/// reads what comes back, as QEMU or a control client would start.
fn raw_client(who: (u32, u32), socket: &Path, send: &str) -> Reached {
    let python = Path::new("/usr/bin/python3");
    assert!(
        python.is_file(),
        "this test needs /usr/bin/python3 (apt-get install python3)"
    );
    let script = r#"
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(15)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print(json.dumps({"errno": e.errno}))
    sys.exit(0)
data = b""
try:
    if sys.argv[2]:
        s.sendall(sys.argv[2].encode() + b"\n")
    while len(data) < 18 and b"\n" not in data:
        b = s.recv(4096)
        if not b:
            break
        data += b
except OSError:
    pass
print(json.dumps({"bytes": min(len(data), 18)}))
"#;
    let out = run_as(
        who,
        Command::new(python)
            .arg("-c")
            .arg(script)
            .arg(socket)
            .arg(send),
    );
    assert!(out.status.success(), "raw client: {}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("raw client: {e}: {}", text(&out)));
    match (v["errno"].as_i64(), v["bytes"].as_u64()) {
        (Some(e), _) => Reached::Refused(e),
        (None, Some(n)) => Reached::Answered(n),
        _ => panic!("raw client: unexpected output {v}"),
    }
}

fn uid_of_process(pid: u32) -> u32 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Uid in /proc/{pid}/status"))
}

/// (owner uid, permission bits) of a path, not following a link.
fn owner_mode(p: &Path) -> (u32, u32) {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.uid(), m.mode() & 0o7777)
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

/// Every file under `dir` (recursively): its bytes, owner and mode.
fn tree(dir: &Path) -> BTreeMap<PathBuf, (Vec<u8>, u32, u32)> {
    let mut out = BTreeMap::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(tree(&p));
        } else {
            let (uid, mode) = owner_mode(&p);
            out.insert(p.clone(), (fs::read(&p).unwrap(), uid, mode));
        }
    }
    out
}

/// [`tree`] of B's state once B's cdpd has sealed what it was writing
/// (the same twice, a second apart): from then on an idle cdpd changes
/// nothing there. The WAL index (`-shm`) is left out: it is shared memory
/// that SQLite rewrites (read marks) for readers; the rows are in the
/// database and its WAL.
fn settled_tree(dir: &Path) -> BTreeMap<PathBuf, (Vec<u8>, u32, u32)> {
    let mut last = tree_without_shm(dir);
    for _ in 0..30 {
        std::thread::sleep(std::time::Duration::from_secs(1));
        let now = tree_without_shm(dir);
        if now == last {
            return now;
        }
        last = now;
    }
    panic!(
        "{} never settled: its cdpd keeps writing while idle",
        dir.display()
    );
}

fn tree_without_shm(dir: &Path) -> BTreeMap<PathBuf, (Vec<u8>, u32, u32)> {
    let mut t = tree(dir);
    t.retain(|p, _| !p.to_string_lossy().ends_with("-shm"));
    t
}

/// The journal segments of `disk`.
fn segments(d: &Daemon, disk: &str) -> Vec<PathBuf> {
    let dir = d
        .state_dir
        .join("vms")
        .join(&d.vm_uuid)
        .join(disk)
        .join("journal");
    let mut v: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no segment in {}", dir.display());
    v
}

fn control_socket(d: &Daemon) -> PathBuf {
    d.run_dir.join(&d.vm_uuid).join("control.sock")
}

/// `qemu-io` on `d`'s disk `vda` through its NBD socket, as `who`.
fn qemu_io_as(who: (u32, u32), d: &Daemon, cmds: &[&str]) -> Output {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    run_as(who, cmd.arg(d.uri("vda")))
}

fn cdpctl_status_as(who: (u32, u32), d: &Daemon) -> Output {
    run_as(
        who,
        Command::new(bin("cdpctl"))
            .args(["status", "--json", "--vm-uuid", &d.vm_uuid, "--run-dir"])
            .arg(&d.run_dir),
    )
}

fn sqlite_as(who: (u32, u32), catalog: &Path, sql: &str) -> Output {
    run_as(who, Command::new("sqlite3").arg(catalog).arg(sql))
}

/// B's log lines saying it refused uid `uid` on `socket`.
fn refusals(d: &Daemon, socket: &str, uid: u32) -> usize {
    d.log()
        .lines()
        .filter(|l| l.contains(&format!("refused a connection to {socket} from uid {uid}")))
        .count()
}

fn protocol_errors(d: &Daemon) -> u64 {
    d.status_json()["disks"][0]["protocol_errors"]
        .as_u64()
        .expect("status has disks[0].protocol_errors")
}

/// A's uid uses its own disk: a write through A's socket lands in A's
/// image and reads back. Guards against every refusal below coming from a
/// client that cannot work as that uid at all.
fn a_uses_its_own_disk(a: &Daemon, pattern: u8, off: u64) {
    let w = format!("write -P {pattern} {off} 64k");
    let r = format!("read -P {pattern} {off} 64k");
    let out = qemu_io_as(A, a, &[&w, &r]);
    assert!(
        out.status.success()
            && !String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed"),
        "A's uid cannot use its own disk through its own socket: {}",
        text(&out)
    );
    assert_eq!(
        read_at(&a.image("vda"), off, 65536),
        vec![pattern; 65536],
        "A's write did not reach A's image"
    );
}

/// Everything A's uid tries against B; `open` says whether root has
/// loosened B's directories and sockets (then only cdpd's peer check and
/// the files' own modes stand in the way).
fn a_attacks_b(b: &Daemon, open: bool) {
    let layer = if open { "peer check" } else { "permissions" };
    let eacces = nix::errno::Errno::EACCES as i64;
    let expect = if open {
        Reached::Answered(0)
    } else {
        Reached::Refused(eacces)
    };
    // NBD: a raw client sees EACCES at connect (permissions) or a
    // connection closed before the greeting (peer check).
    assert_eq!(
        raw_client(A, &b.socket("vda"), ""),
        expect,
        "{layer}: A's uid on B's NBD socket"
    );
    // The real clients fail, saying why.
    let info = run_as(A, Command::new("nbdinfo").arg(b.uri("vda")));
    let io = qemu_io_as(A, b, &["write -P 238 0 64k"]);
    for (name, out) in [("nbdinfo", &info), ("qemu-io write", &io)] {
        let all = text(out);
        eprintln!("{layer}: {name} as A on B's NBD socket: {all}");
        assert!(
            !out.status.success(),
            "{layer}: {name} as A on B's socket worked: {all}"
        );
        assert_eq!(
            all.contains("Permission denied"),
            !open,
            "{layer}: {name} as A on B's socket failed for another reason than expected: {all}"
        );
    }
    // Control socket: a raw request, then cdpctl status.
    assert_eq!(
        raw_client(A, &control_socket(b), r#"{"cmd":"status"}"#),
        expect,
        "{layer}: A's uid on B's control socket"
    );
    let st = cdpctl_status_as(A, b);
    eprintln!("{layer}: cdpctl status as A on B: {}", text(&st));
    assert_eq!(
        text(&st).contains("Permission denied"),
        !open,
        "{layer}: cdpctl status as A on B failed for another reason than expected: {}",
        text(&st)
    );
    assert!(
        !st.status.success(),
        "{layer}: cdpctl status as A on B: {}",
        text(&st)
    );
    assert!(
        !String::from_utf8_lossy(&st.stdout).contains(&b.vm_uuid),
        "{layer}: cdpctl status as A told B's status: {}",
        text(&st)
    );
    // Journal: no segment of B can be read (directory 0700, or file 0600).
    for seg in segments(b, "vda") {
        let out = run_as(A, Command::new("cat").arg(&seg));
        assert!(
            !out.status.success() && out.stdout.is_empty(),
            "{layer}: A's uid read B's segment {}: {}",
            seg.display(),
            text(&out)
        );
        assert!(text(&out).contains("Permission denied"), "{}", text(&out));
    }
    let ls = run_as(
        A,
        Command::new("ls").arg(b.state_dir.join("vms").join(&b.vm_uuid)),
    );
    assert_eq!(
        ls.status.success(),
        open,
        "{layer}: ls of B's state as A: {}",
        text(&ls)
    );
    // Catalog: neither written nor read.
    let cat = b.catalog_path();
    for sql in [
        "UPDATE disks SET path = '/etc/shadow';",
        "INSERT INTO vms (uuid, name) VALUES ('x', 'y');",
        "SELECT disk, path FROM disks;",
    ] {
        let out = sqlite_as(A, &cat, sql);
        assert!(
            !out.status.success(),
            "{layer}: sqlite3 as A on B's catalog ran {sql}: {}",
            text(&out)
        );
        assert!(
            text(&out).contains("unable to open database"),
            "{layer}: sqlite3 as A on B's catalog failed for another reason: {}",
            text(&out)
        );
    }
    let w = run_as(
        A,
        Command::new("sh")
            .arg("-c")
            .arg("echo garbage >> \"$1\"")
            .arg("sh")
            .arg(&cat),
    );
    assert!(
        !w.status.success(),
        "{layer}: A appended to B's catalog: {}",
        text(&w)
    );
}

#[test]
fn one_vms_qemu_user_cannot_reach_another_vms_sockets_journal_or_catalog() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test runs cdpd and the attacker as uids {} and {}: run it as root",
        A.0,
        B.0
    );
    for tool in ["nbdinfo", "qemu-io", "sqlite3"] {
        require_tool(tool);
    }
    // One host: one state and one run directory, root's, 0755.
    let host = tempfile::tempdir().unwrap();
    chmod(host.path(), 0o755);
    let (state, run_dir) = (host.path().join("state"), host.path().join("run"));
    let mut a = Daemon::builder()
        .vm_name("vm-a")
        .disk_random("vda", 8 * MIB, 11)
        .host_dirs(&state, &run_dir)
        .as_user(A.0, A.1)
        .start();
    let mut b = Daemon::builder()
        .vm_name("vm-b")
        .disk_random("vda", 8 * MIB, 12)
        .args(["--segment-age", "200ms"])
        .host_dirs(&state, &run_dir)
        .as_user(B.0, B.1)
        .start();

    // The layout is production's, and each cdpd runs as its VM's user.
    assert_eq!(uid_of_process(a.pid()), A.0);
    assert_eq!(uid_of_process(b.pid()), B.0);
    for shared in [state.clone(), state.join("vms"), run_dir.clone()] {
        assert_eq!(owner_mode(&shared), (0, 0o755), "{}", shared.display());
    }
    for (d, who) in [(&a, A), (&b, B)] {
        let vm_state = state.join("vms").join(&d.vm_uuid);
        let vm_run = run_dir.join(&d.vm_uuid);
        for dir in [&vm_state, &vm_run] {
            assert_eq!(owner_mode(dir), (who.0, 0o700), "{}", dir.display());
        }
        for sock in [d.socket("vda"), control_socket(d)] {
            assert_eq!(owner_mode(&sock), (who.0, 0o600), "{}", sock.display());
        }
    }

    // Both VMs write; B's through B's own uid, A's through A's.
    let out = qemu_io_as(B, &b, &["write -P 66 1M 256k", "write -z 3M 64k"]);
    assert!(
        out.status.success(),
        "B's uid on its own disk: {}",
        text(&out)
    );
    a_uses_its_own_disk(&a, 65, 0);
    // A's own journal, catalog and control socket are A's to use: the same
    // clients that fail on B's work on A's.
    let own_seg = run_as(A, Command::new("cat").arg(&segments(&a, "vda")[0]));
    assert!(
        own_seg.status.success() && !own_seg.stdout.is_empty(),
        "{}",
        text(&own_seg)
    );
    let own_cat = sqlite_as(A, &a.catalog_path(), "SELECT disk FROM disks;");
    assert!(
        own_cat.status.success() && String::from_utf8_lossy(&own_cat.stdout).contains("vda"),
        "{}",
        text(&own_cat)
    );
    assert_eq!(
        raw_client(A, &control_socket(&a), r#"{"cmd":"status"}"#),
        Reached::Answered(18),
        "A's uid on its own control socket"
    );
    let own_st = cdpctl_status_as(A, &a);
    assert!(own_st.status.success(), "{}", text(&own_st));
    let own_info = run_as(A, Command::new("nbdinfo").arg(a.uri("vda")));
    assert!(own_info.status.success(), "{}", text(&own_info));

    // What B holds, before A tries anything.
    let b_state = state.join("vms").join(&b.vm_uuid);
    let b_image = read_file(&b.image("vda"));
    let b_files = settled_tree(&b_state);
    assert!(
        b_files.keys().any(|p| p.ends_with("catalog.sqlite"))
            && b_files
                .keys()
                .any(|p| p.extension().is_some_and(|x| x == "seg")),
        "B's state has no catalog or segment: {:?}",
        b_files.keys()
    );
    // cdpd's umask: every file of B's state is B's alone.
    for (p, (_, uid, mode)) in &b_files {
        assert_eq!(
            (*uid, mode & 0o077),
            (B.0, 0),
            "{} is open to others",
            p.display()
        );
    }
    let b_errors = protocol_errors(&b);

    // Layer 1, file permissions: nothing of A's reaches B's cdpd.
    a_attacks_b(&b, false);
    assert_eq!(
        protocol_errors(&b),
        b_errors,
        "a connection reached B's cdpd"
    );
    for s in ["disk vda's NBD socket", "the control socket"] {
        assert_eq!(
            refusals(&b, s, A.0),
            0,
            "B's cdpd saw A on {s}: {}",
            b.log()
        );
    }
    a_uses_its_own_disk(&a, 67, 2 * MIB);

    // Layer 2: root opens B's directories and sockets to everyone. Only
    // cdpd's peer check (and the files' own modes) stand in A's way now.
    let b_run = run_dir.join(&b.vm_uuid);
    chmod(&b_run, 0o755);
    for sock in [b.socket("vda"), control_socket(&b)] {
        chmod(&sock, 0o777);
    }
    for dir in [
        b_state.clone(),
        b_state.join("vda"),
        b_state.join("vda").join("journal"),
    ] {
        chmod(&dir, 0o755);
    }
    // B's own uid now reaches all of it through the same clients and
    // paths, so a refusal of A below is about A's uid only.
    assert_eq!(
        raw_client(B, &b.socket("vda"), ""),
        Reached::Answered(18),
        "B's uid on B's opened NBD socket"
    );
    let info = run_as(B, Command::new("nbdinfo").arg(b.uri("vda")));
    assert!(
        info.status.success(),
        "B's uid: nbdinfo on B: {}",
        text(&info)
    );
    assert_eq!(
        raw_client(B, &control_socket(&b), r#"{"cmd":"status"}"#),
        Reached::Answered(18),
        "B's uid on B's opened control socket"
    );
    let seg = run_as(B, Command::new("cat").arg(&segments(&b, "vda")[0]));
    assert!(
        seg.status.success() && !seg.stdout.is_empty(),
        "{}",
        text(&seg)
    );
    let b_errors = protocol_errors(&b);

    a_attacks_b(&b, true);
    // The connections reached B's cdpd, which refused them by uid.
    for s in ["disk vda's NBD socket", "the control socket"] {
        assert_eq!(
            refusals(&b, s, A.0),
            1,
            "B's cdpd did not log refusing uid {} on {s}:\n{}",
            A.0,
            b.log()
        );
    }
    // The raw client, nbdinfo and qemu-io: three refused NBD connections.
    let refused = protocol_errors(&b) - b_errors;
    assert!(
        refused >= 3,
        "B counted {refused} refused NBD connections, not 3"
    );
    a_uses_its_own_disk(&a, 68, 3 * MIB);
    a.assert_alive("after A's attacks on B");
    b.assert_alive("after A's attacks on B");

    // B's disk, journal and catalog are as they were.
    assert!(read_file(&b.image("vda")) == b_image, "B's image changed");
    let after = tree_without_shm(&b_state);
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        b_files.keys().collect::<Vec<_>>(),
        "the files of B's state changed"
    );
    for (p, before) in &b_files {
        let now = &after[p];
        assert_eq!(
            (now.1, now.2),
            (before.1, before.2),
            "{} was chowned or chmodded",
            p.display()
        );
        assert!(now.0 == before.0, "{} changed", p.display());
    }
    // And each VM's journal still replays onto its image.
    a.term();
    b.term();
    a.check_replay_invariant("vda");
    b.check_replay_invariant("vda");
}

/// Attack: VM A's QEMU user replaces its control socket with a symlink to a
/// socket only root may reach. `cdpctl status` and `cdpctl mark` (root)
/// talk to a VM's cdpd as the VM's user (the socket lies in a directory
/// that user owns), so the root-only socket is never connected to; once
/// the real socket is back, both work again.
#[test]
fn root_never_connects_through_a_control_socket_path_a_vm_owns() {
    use std::os::unix::net::UnixListener;
    let host = tempfile::tempdir().unwrap();
    chmod(host.path(), 0o755);
    let (state, run_dir) = (host.path().join("state"), host.path().join("run"));
    let a = Daemon::builder()
        .vm_name("vm-a")
        .disk_random("vda", MIB, 31)
        .host_dirs(&state, &run_dir)
        .as_user(A.0, A.1)
        .start();
    // Root's own service: a socket in a directory only root may search.
    let secret_dir = host.path().join("root-only");
    fs::create_dir(&secret_dir).unwrap();
    chmod(&secret_dir, 0o700);
    let secret = secret_dir.join("service.sock");
    let listener = UnixListener::bind(&secret).unwrap();
    listener.set_nonblocking(true).unwrap();

    let sock = control_socket(&a);
    let moved = sock.with_extension("real");
    let out = run_as(
        A,
        Command::new("sh").arg("-ec").arg(format!(
            "mv {0} {1} && ln -s {2} {0}",
            sock.display(),
            moved.display(),
            secret.display()
        )),
    );
    assert!(out.status.success(), "the attacker failed: {}", text(&out));
    let root_cdpctl = |args: &[&str]| {
        run(Command::new(bin("cdpctl"))
            .args(args)
            .arg("--run-dir")
            .arg(&run_dir)
            .arg("--state-dir")
            .arg(&state))
    };
    let status = ["status", "--json", "--vm-uuid", &a.vm_uuid];
    let mark = ["mark", &a.vm_uuid, "m1"];
    for args in [&status[..], &mark[..]] {
        let out = root_cdpctl(args);
        // status falls back to A's catalog (not running); mark fails.
        let refused = if args[0] == "status" {
            String::from_utf8_lossy(&out.stdout).contains("\"running\": false")
        } else {
            !out.status.success()
        };
        assert!(refused, "{args:?}: {}", text(&out));
        match listener.accept() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!(
                "cdpctl {args:?} as root reached root's socket through A's symlink: {other:?}"
            ),
        }
    }
    // The real socket back: root reaches A's cdpd (as A's user) again.
    fs::remove_file(&sock).unwrap();
    fs::rename(&moved, &sock).unwrap();
    for args in [&status[..], &mark[..]] {
        let out = root_cdpctl(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
    }
    let out = root_cdpctl(&status);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("\"running\": false"),
        "{}",
        text(&out)
    );
    assert!(listener.accept().is_err());
}
