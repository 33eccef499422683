//! Degraded mode (issue 12, "Degrade, never fail the guest";
//! docs/RELIABILITY.md, "A full journal"): a journal that cannot take more
//! (its filesystem full or under `journal_min_free`, or `journal_max`
//! reached) never fails a guest write. The written ranges go to the dirty
//! map; once there is room, cdpd journals a GAP {"resync": true}, journals
//! only the dirty ranges again as the image holds them (RESYNC records),
//! then RESYNCED, and the journal replayed equals the image again.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use cdp_tests::fixture::{cdpctl, config, shipper_once_cmd, Tmpfs};
use cdp_tests::{records_of_kind, require_tool, run, run_ok, Daemon};

const MIB: u64 = 1 << 20;

/// qemu-io commands against vda (writeback); every one must succeed: the
/// output is returned, and any error fails the test.
fn qemu_io_ok(d: &Daemon, cmds: &[String]) -> String {
    let mut c = Command::new(require_tool("qemu-io"));
    c.args(["-f", "raw", "-t", "writeback"]).arg(d.uri("vda"));
    for x in cmds {
        c.arg("-c").arg(x);
    }
    let out = run(&mut c);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let lower = text.to_lowercase();
    assert!(
        out.status.success()
            && !lower.contains("error")
            && !lower.contains("failed")
            && !lower.contains("no space"),
        "the guest saw an I/O error:\n{text}"
    );
    text
}

/// 1 MiB writes, a pattern per MiB, at MiB `from` to `to` (exclusive), then
/// a FLUSH; every one must succeed.
fn write_mibs(d: &Daemon, from: u64, to: u64, pattern: u8) {
    let mut cmds: Vec<String> = (from..to)
        .map(|i| format!("write -P {} {} 1M", pattern.wrapping_add(i as u8), i * MIB))
        .collect();
    cmds.push("flush".into());
    let out = qemu_io_ok(d, &cmds);
    let wrote = out.matches("wrote 1048576/1048576").count() as u64;
    assert_eq!(wrote, to - from, "{out}");
}

fn disk_status(d: &Daemon) -> Value {
    d.status_json()["disks"][0].clone()
}

/// Poll cdpd's status until `pred` holds (or fail after `secs`).
fn wait_status(d: &Daemon, secs: u64, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let t0 = Instant::now();
    loop {
        let s = disk_status(d);
        if pred(&s) {
            return s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "{what}: not within {secs}s; status: {s}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("status has no {k}: {v}"))
}

fn degraded(s: &Value) -> bool {
    s["journal_mode"] == "degraded" && s["degraded"] == true
}

fn normal_after_resync(s: &Value) -> bool {
    s["journal_mode"] == "normal" && u(s, "resyncs_done") >= 1
}

/// The journal's GAPs {"resync": true} and RESYNCEDs: every RESYNCED names
/// a resync GAP before it, the RESYNC records between them cover
/// `resynced` bytes, and there is at least one of each. Returns the bytes
/// of RESYNC records.
fn check_resync_records(d: &Daemon) -> u64 {
    let recs = d.journal_records();
    let gaps: Vec<&Value> = records_of_kind(&recs, "GAP")
        .into_iter()
        .filter(|g| g["info"]["resync"] == true)
        .collect();
    let resynced = records_of_kind(&recs, "RESYNCED");
    assert!(!gaps.is_empty(), "no GAP {{\"resync\": true}} journaled");
    assert!(!resynced.is_empty(), "no RESYNCED journaled");
    for r in &resynced {
        let g = r["info"]["gap_seq"].as_u64().expect("RESYNCED has gap_seq");
        assert!(
            gaps.iter().any(|x| x["seq"].as_u64() == Some(g)),
            "RESYNCED {r} names no resync GAP"
        );
        assert!(r["seq"].as_u64().unwrap() > g);
    }
    // No unbounded GAP of degraded mode: no new baseline is needed. (A
    // new VM's first session has a "new history" GAP.)
    let unbounded: Vec<_> = records_of_kind(&recs, "GAP")
        .into_iter()
        .filter(|g| g["info"]["resync"] != true)
        .filter(|g| {
            !g["info"]["reason"]
                .as_str()
                .unwrap_or("")
                .starts_with("new history")
        })
        .collect();
    assert!(unbounded.is_empty(), "unbounded GAPs: {unbounded:?}");
    recs.iter()
        .filter(|r| {
            r["flags"]
                .as_array()
                .is_some_and(|f| f.iter().any(|x| x == "RESYNC"))
        })
        .map(|r| {
            assert!(r["kind"] == "WRITE" || r["kind"] == "ZERO", "{r}");
            r["length"].as_u64().unwrap()
        })
        .sum()
}

/// Issue 12's acceptance: journal on a 4 MiB filesystem, 24 MiB written
/// through cdpd: no guest error; degraded with dirty bytes; room again =>
/// cdpd resyncs only the dirty ranges by itself, journals RESYNCED, and the
/// journal replayed equals the image; a restart is clean.
#[test]
fn a_full_journal_degrades_then_resyncs_only_the_dirty_ranges() {
    let disk_size = 128 * MIB;
    let mut d = Daemon::builder()
        .disk_random("vda", disk_size, 12)
        .prepare();
    let fs = Tmpfs::mount(&d.state_dir, "4M");
    d.start();
    write_mibs(&d, 0, 24, 0x40);
    let s = wait_status(&d, 60, "degraded", degraded);
    let dirty = u(&s, "dirty_bytes");
    assert!(
        (16 * MIB..=24 * MIB).contains(&dirty),
        "dirty bytes {dirty}: {s}"
    );
    assert!(u(&s, "degraded_since_ns") > 0, "{s}");
    assert_eq!(u(&s, "errors"), 0, "{s}");
    // Reads see what was written, degraded or not.
    qemu_io_ok(
        &d,
        &["read -P 0x57 23M 1M".into(), "read -P 0x40 0 1M".into()],
    );

    fs.resize("512M");
    let s = wait_status(&d, 60, "resynced", normal_after_resync);
    assert_eq!(
        u(&s, "resync_bytes_read"),
        dirty,
        "the resync read exactly the dirty ranges: {s}"
    );
    assert!(u(&s, "resync_bytes_read") < disk_size / 4);
    assert_eq!(u(&s, "dirty_bytes"), 0, "{s}");
    // Journaling again.
    write_mibs(&d, 100, 102, 0x70);
    assert_eq!(check_resync_records(&d), dirty);
    d.term();
    d.check_replay_invariant("vda");

    d.start();
    let s = disk_status(&d);
    assert_eq!(s["journal_mode"], "normal", "{s}");
    write_mibs(&d, 3, 5, 0x90);
    d.term();
    d.check_replay_invariant("vda");
}

/// cdpd SIGKILLed while degraded: the next start finds the dirty map, and
/// resyncs from it (with the newest bytes, not the journal's older ones).
#[test]
fn a_kill_while_degraded_resumes_the_resync_from_the_map() {
    let mut d = Daemon::builder().disk_random("vda", 64 * MIB, 13).prepare();
    let fs = Tmpfs::mount(&d.state_dir, "4M");
    d.start();
    // Journaled first, then overwritten while degraded.
    write_mibs(&d, 0, 1, 0x10);
    write_mibs(&d, 8, 30, 0x20);
    wait_status(&d, 60, "degraded", degraded);
    write_mibs(&d, 0, 1, 0xa0);
    let dirty = u(&disk_status(&d), "dirty_bytes");
    assert!(dirty > 16 * MIB, "{dirty}");
    d.kill9();
    fs.resize("512M");
    d.start();
    let s = wait_status(&d, 60, "resynced after the restart", normal_after_resync);
    assert_eq!(u(&s, "resync_bytes_read"), dirty, "{s}");
    qemu_io_ok(
        &d,
        &["read -P 0xa0 0 1M".into(), "read -P 0x3d 29M 1M".into()],
    );
    d.term();
    assert_eq!(check_resync_records(&d), dirty);
    d.check_replay_invariant("vda");
}

fn write_config(d: &Daemon, name: &str, text: &str) -> std::path::PathBuf {
    let p = d.work_dir().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// `journal_max` reached on a filesystem with plenty of room degrades the
/// same way; a higher bound (after a stop) lets the next start resync.
#[test]
fn journal_max_reached_degrades_the_same_way() {
    let mut d = Daemon::builder().disk_random("vda", 64 * MIB, 14).prepare();
    let small = write_config(
        &d,
        "small.toml",
        "[policy.default]\njournal_max = \"4MiB\"\njournal_min_free = \"0\"\n",
    );
    d.extra.extend(["--config".into(), small.into_os_string()]);
    d.start();
    write_mibs(&d, 0, 20, 0x30);
    let s = wait_status(&d, 60, "degraded by journal_max", degraded);
    let dirty = u(&s, "dirty_bytes");
    assert!(dirty >= 12 * MIB, "{s}");
    assert!(u(&s, "journal_bytes") <= 6 * MIB, "{s}");
    write_mibs(&d, 40, 42, 0x50);
    let dirty = u(&disk_status(&d), "dirty_bytes");
    d.term();

    let big = write_config(
        &d,
        "big.toml",
        "[policy.default]\njournal_max = \"1GiB\"\njournal_min_free = \"0\"\n",
    );
    d.extra = vec!["--config".into(), big.into_os_string()];
    d.start();
    let s = wait_status(&d, 60, "resynced", normal_after_resync);
    assert_eq!(u(&s, "resync_bytes_read"), dirty, "{s}");
    d.term();
    assert_eq!(check_resync_records(&d), dirty);
    d.check_replay_invariant("vda");
}

/// Ship and trim everything sealed (`cdp-shipper run --once`).
fn ship(d: &Daemon, cfg: &Path) {
    run_ok(&mut shipper_once_cmd(d, cfg));
}

fn restore_at(d: &Daemon, cfg: &Path, repo: &Path, at: &str, out: &Path) {
    cdp_tests::fixture::restore_from_repo_ok(d, cfg, repo, "vda", at, out);
}

/// The whole way round with a repository: `journal_max` reached while the
/// shipper is away, the shipper ships and trims (the room comes back the
/// way it does on a host), cdpd resyncs by itself; a point before the
/// window and one after it restore byte-exact from the repository. (Needs
/// the repository side of RESYNCED: restore heals a resync GAP.)
#[test]
fn points_before_and_after_the_window_restore_from_the_repository() {
    let mut d = Daemon::builder().disk_random("vda", 32 * MIB, 15).prepare();
    let repo = d.work_dir().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let cfg = config(&d, &repo);
    let text = std::fs::read_to_string(&cfg).unwrap()
        + "journal_max = \"4MiB\"\njournal_min_free = \"0\"\nsegment_size = \"1MiB\"\n";
    std::fs::write(&cfg, text).unwrap();
    d.extra
        .extend(["--config".into(), cfg.clone().into_os_string()]);
    d.start();
    write_mibs(&d, 0, 2, 0x11);
    ship(&d, &cfg);
    cdpctl(&d, &cfg, &["mark", &d.vm_uuid, "before"]);
    let before = d.work_dir().join("before.img");
    std::fs::copy(d.image("vda"), &before).unwrap();

    write_mibs(&d, 4, 24, 0x22);
    wait_status(&d, 60, "degraded", degraded);
    let t0 = Instant::now();
    loop {
        ship(&d, &cfg);
        if normal_after_resync(&disk_status(&d)) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "{}",
            disk_status(&d)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // The point after the window must not fall into a new one: the
    // resync's records may still fill most of the 4 MiB journal, and the
    // sealer measures the room trimming gave back only once a second. A
    // restart with room to spare (a clean stop: no GAP) rules that out.
    let roomy = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("journal_max = \"4MiB\"", "journal_max = \"1GiB\"");
    assert!(roomy.contains("journal_max = \"1GiB\""), "{roomy}");
    std::fs::write(&cfg, roomy).unwrap();
    d.term();
    d.start();
    write_mibs(&d, 30, 31, 0x33);
    cdpctl(&d, &cfg, &["mark", &d.vm_uuid, "after"]);
    let after = d.work_dir().join("after.img");
    std::fs::copy(d.image("vda"), &after).unwrap();
    d.term();
    ship(&d, &cfg);

    for (at, want) in [("mark:before", &before), ("mark:after", &after)] {
        let out = d.work_dir().join("restored.img");
        let _ = std::fs::remove_file(&out);
        restore_at(&d, &cfg, &repo, at, &out);
        cdp_tests::assert_files_equal(&out, want);
    }
}

/// A dirty map that does not check out is never trusted: the next start
/// journals an unbounded GAP (a new baseline is needed), as before degraded
/// mode existed, and journals normally.
#[test]
fn a_corrupt_dirty_map_falls_back_to_an_unbounded_gap() {
    let mut d = Daemon::builder().disk_random("vda", 16 * MIB, 16).start();
    write_mibs(&d, 0, 1, 0x10);
    d.term();
    let map = d
        .state_dir
        .join("vms")
        .join(&d.vm_uuid)
        .join("vda")
        .join("dirty.map");
    let mut bytes = std::fs::read(&map).expect("cdpd made the dirty map at start");
    bytes[64] ^= 0xff; // bits set behind the bitmap CRC's back
    std::fs::write(&map, &bytes).unwrap();
    d.start();
    wait_status(&d, 60, "the GAP journaled", |_| {
        records_of_kind(&d.journal_records(), "GAP")
            .iter()
            .any(|g| {
                g["info"]["reason"]
                    .as_str()
                    .unwrap_or("")
                    .contains("dirty map")
            })
    });
    assert_eq!(disk_status(&d)["journal_mode"], "normal");
    write_mibs(&d, 2, 3, 0x20);
    d.term();
    let recs = d.journal_records();
    let gap = records_of_kind(&recs, "GAP")
        .into_iter()
        .find(|g| {
            g["info"]["reason"]
                .as_str()
                .unwrap_or("")
                .contains("dirty map")
        })
        .unwrap()
        .clone();
    assert!(gap["info"]["resync"].is_null(), "unbounded: {gap}");
    assert!(records_of_kind(&recs, "RESYNCED").is_empty());
    d.check_replay_invariant("vda");
}

/// fio (nbd engine, two connections, random 64 KiB writes with CRC verify)
/// writing far past a 4 MiB journal filesystem that is grown while fio
/// still writes: no job errs, every block verifies, the resync runs while
/// the guest writes, and the journal replayed equals the image.
#[test]
fn fio_with_verify_through_a_full_journal_and_a_resync_under_writes() {
    require_tool("fio");
    let mut d = Daemon::builder().disk_random("vda", 64 * MIB, 17).prepare();
    let fs = Tmpfs::mount(&d.state_dir, "4M");
    d.start();
    let cwd = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("fio");
    cmd.current_dir(cwd.path())
        .args(["--output-format=json", "--ioengine=nbd"])
        .arg(format!("--uri={}", d.uri("vda")))
        .args([
            "--rw=randwrite",
            "--bs=64k",
            "--iodepth=8",
            "--size=32m",
            "--io_size=96m",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--randrepeat=0",
            "--name=a",
            "--offset=0",
            "--name=b",
            "--offset=32m",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let fio = cmd.spawn().expect("fio");
    wait_status(&d, 60, "degraded under fio", degraded);
    fs.resize("1G");
    let out = fio.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fio failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = cdp_tests::parse_json_lenient(&stdout);
    for job in report["jobs"].as_array().unwrap() {
        assert_eq!(job["error"], 0, "{stdout}");
    }
    let s = wait_status(&d, 60, "resynced", normal_after_resync);
    assert_eq!(u(&s, "errors"), 0, "{s}");
    d.term();
    check_resync_records(&d);
    d.check_replay_invariant("vda");
}
