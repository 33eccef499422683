//! A repository written by someone else (a compromised VM's shipper, anyone
//! with write access to the bucket or share) gains nothing from root's
//! programs: no write, deletion or read through a symbolic link below a
//! `file://` root, and a decompression bomb or a malformed object is a clear
//! error in bounded memory, never a panic (issue 11, items 3 and 9).
//!
//! These run as root (the tests of this workspace do): the attacker is a real
//! unprivileged uid (libvirt-qemu, as QEMU runs) that owns the repository.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use cdp_core::journal::format::{IndexEntry, Kind};
use cdp_core::journal::writer::{OpenSegment, Record};
use cdp_repo::format as rf;
use cdp_repo::store::{Store, StoreError};

/// QEMU's user on Debian/Ubuntu: the attacker.
const ATTACKER: u32 = 64055;
const VM: &str = "0b5c6a3e-1d2f-4a5b-8c9d-0e1f2a3b4c5d";
/// What a child cdpctl may map at most: an unbounded allocation fails.
const AS_LIMIT: u64 = 512 << 20;
const MIB: u64 = 1 << 20;

fn need_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests run root's programs against an unprivileged attacker: run them as root"
    );
}

/// A directory the attacker can reach, with a repository root it owns and a
/// victim directory of root's beside it.
struct Scene {
    _tmp: tempfile::TempDir,
    repo: PathBuf,
    victim: PathBuf,
}

impl Scene {
    fn new() -> Scene {
        need_root();
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().to_path_buf();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
        let repo = base.join("repo");
        std::fs::create_dir(&repo).unwrap();
        std::os::unix::fs::chown(&repo, Some(ATTACKER), Some(ATTACKER)).unwrap();
        let victim = base.join("victim");
        std::fs::create_dir(&victim).unwrap();
        for i in 0..3 {
            let f = victim.join(format!("disk{i}.img"));
            std::fs::write(&f, format!("precious {i}")).unwrap();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
            age(&f, Duration::from_secs(7200));
        }
        Scene {
            _tmp: tmp,
            repo,
            victim,
        }
    }

    fn url(&self) -> String {
        format!("file://{}", self.repo.display())
    }

    /// Run a command as the attacker; it must succeed.
    fn attacker(&self, prog: &str, args: &[&str]) {
        let out = Command::new(prog)
            .args(args)
            .uid(ATTACKER)
            .gid(ATTACKER)
            .current_dir(&self.repo)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "attacker's {prog} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Every victim file is still there, with its content, owner and mode;
    /// nothing was added.
    fn assert_victim_intact(&self) {
        let mut names: Vec<String> = std::fs::read_dir(&self.victim)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["disk0.img", "disk1.img", "disk2.img"]);
        for i in 0..3 {
            let f = self.victim.join(format!("disk{i}.img"));
            assert_eq!(
                std::fs::read_to_string(&f).unwrap(),
                format!("precious {i}")
            );
            let m = std::fs::metadata(&f).unwrap();
            assert_eq!(
                (m.uid(), m.gid(), m.mode() & 0o7777),
                (0, 0, 0o600),
                "{f:?}"
            );
        }
        let m = std::fs::metadata(&self.victim).unwrap();
        assert_eq!((m.uid(), m.gid()), (0, 0), "victim directory chowned");
    }
}

/// Set a file's modification time `by` into the past.
fn age(f: &Path, by: Duration) {
    let t = SystemTime::now() - by;
    std::fs::File::options()
        .write(true)
        .open(f)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_cdp_staging_symlink_makes_root_delete_nothing_where_it_points() {
    let s = Scene::new();
    let victim = s.victim.to_str().unwrap();
    s.attacker("ln", &["-s", victim, ".cdp-staging"]);
    let store = Store::open(&s.url(), None).unwrap();
    // What cdp-agent (root) runs on every target before shipping or marking
    // it failing, and what root's put goes through.
    let checked = rt().block_on(store.check());
    let put = rt().block_on(store.put("cdp/v1/FORMAT", Bytes::from_static(b"x")));
    s.assert_victim_intact();
    let e = checked.unwrap_err().to_string();
    assert!(e.contains(".cdp-staging is a symbolic link"), "{e}");
    let e = put.unwrap_err().to_string();
    assert!(e.contains("symbolic link"), "{e}");
    // Left alone, for the operator to see.
    let link = std::fs::symlink_metadata(s.repo.join(".cdp-staging")).unwrap();
    assert!(link.file_type().is_symlink());
}

#[test]
fn a_symlink_inside_the_staging_directory_is_removed_not_followed() {
    let s = Scene::new();
    let store = Store::open(&s.url(), None).unwrap();
    rt().block_on(store.check()).unwrap();
    let target = s.victim.join("disk0.img");
    s.attacker("ln", &["-s", target.to_str().unwrap(), ".cdp-staging/old"]);
    s.attacker("touch", &["-h", "-d", "3 hours ago", ".cdp-staging/old"]);
    s.attacker(
        "ln",
        &["-s", s.victim.to_str().unwrap(), ".cdp-staging/olddir"],
    );
    s.attacker("touch", &["-h", "-d", "3 hours ago", ".cdp-staging/olddir"]);
    rt().block_on(store.check()).unwrap();
    s.assert_victim_intact();
    for stale in ["old", "olddir"] {
        assert!(
            std::fs::symlink_metadata(s.repo.join(".cdp-staging").join(stale)).is_err(),
            "stale link {stale} left"
        );
    }
}

#[test]
fn root_never_writes_reads_or_deletes_through_a_symlink_in_the_repository() {
    let s = Scene::new();
    let store = Store::open(&s.url(), None).unwrap();
    let rt = rt();
    // A key's parent directory is a symlink to the victim directory.
    s.attacker("ln", &["-s", s.victim.to_str().unwrap(), "cdp"]);
    let put = rt.block_on(store.put("cdp/disk0.img", Bytes::from_static(b"overwritten")));
    let got = rt.block_on(store.get("cdp/disk1.img"));
    let deleted = rt.block_on(store.delete("cdp/disk2.img"));
    s.assert_victim_intact();
    let e = put.unwrap_err().to_string();
    assert!(e.contains("symbolic link"), "{e}");
    let e = got.unwrap_err().to_string();
    assert!(e.contains("symbolic link"), "{e}");
    deleted.unwrap_err();
    // The key itself is a symlink to a victim file.
    std::fs::create_dir(s.repo.join("k")).unwrap();
    std::os::unix::fs::chown(s.repo.join("k"), Some(ATTACKER), Some(ATTACKER)).unwrap();
    for (leaf, i) in [("put", 0), ("get", 1), ("del", 2)] {
        let t = s.victim.join(format!("disk{i}.img"));
        s.attacker("ln", &["-s", t.to_str().unwrap(), &format!("k/{leaf}")]);
    }
    // A create-only put finds a name taken (by a symlink): refused, the
    // symlink neither followed nor replaced; a replace swaps the link itself.
    let e = rt
        .block_on(store.put("k/put", Bytes::from_static(b"new")))
        .unwrap_err();
    assert!(matches!(e, StoreError::Exists { .. }), "{e:?}");
    assert!(std::fs::symlink_metadata(s.repo.join("k/put"))
        .unwrap()
        .file_type()
        .is_symlink());
    s.assert_victim_intact();
    rt.block_on(store.replace("k/put", Bytes::from_static(b"new")))
        .unwrap();
    assert_eq!(std::fs::read(s.repo.join("k/put")).unwrap(), b"new");
    let e = rt.block_on(store.get("k/get")).unwrap_err().to_string();
    assert!(e.contains("symbolic link"), "{e}");
    rt.block_on(store.delete("k/del")).unwrap();
    assert!(std::fs::symlink_metadata(s.repo.join("k/del")).is_err());
    // Listing does not follow them either.
    let keys: Vec<String> = rt
        .block_on(store.list(""))
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(keys, ["k/put"]);
    s.assert_victim_intact();
}

// --- Hostile objects: bounded memory, clear errors, no panic -------------

/// cdpctl from `$CDP_BIN_DIR`, else the workspace's target/debug.
fn cdpctl() -> PathBuf {
    let dir = std::env::var_os("CDP_BIN_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"),
        PathBuf::from,
    );
    let p = dir.join("cdpctl");
    assert!(
        p.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

/// A repository made of objects written directly (as whoever wrote the
/// bucket), and a place for cdpctl's config, state and output.
struct HostileRepo {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    repo: PathBuf,
}

impl HostileRepo {
    fn new() -> HostileRepo {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().to_path_buf();
        let repo = base.join("repo");
        std::fs::create_dir_all(base.join("state")).unwrap();
        std::fs::write(base.join("cdp.toml"), "").unwrap();
        let r = HostileRepo {
            _tmp: tmp,
            base,
            repo,
        };
        r.put(rf::FORMAT_KEY, &rf::format_marker());
        let vm_json = serde_json::json!({"uuid": VM, "name": "guest", "disks": [
            {"name": "vda", "size": MIB, "source_path": "/nonexistent/vda.img"}]});
        r.put(&rf::vm_json_key(VM), vm_json.to_string().as_bytes());
        r
    }

    fn put(&self, key: &str, data: &[u8]) {
        let p = self.repo.join(key);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }

    fn baseline(&self, s: u64, chunks: Vec<Option<String>>) {
        let b = rf::Baseline {
            vm_uuid: VM.into(),
            disk: "vda".into(),
            size: chunks.len() as u64 * MIB,
            chunk_size: rf::CHUNK_SIZE,
            s0: s,
            s1: s,
            started_ns: 1,
            finished_ns: 2,
            chunks,
        };
        self.put(
            &rf::baseline_key(VM, "vda", s, s),
            &serde_json::to_vec(&b).unwrap(),
        );
    }

    /// A real sealed segment with one 4 KiB write at offset 0, seq 6, and
    /// its index: a point restore can resolve.
    fn journal(&self) {
        let uuid: Vec<u8> = (0..16)
            .map(|i| {
                let hex: String = VM.chars().filter(|c| *c != '-').collect();
                u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap()
            })
            .collect();
        let dir = self.base.join("journal");
        std::fs::create_dir_all(&dir).unwrap();
        let mut seg = OpenSegment::create(&dir, uuid.try_into().unwrap(), 6, 0, 10).unwrap();
        let data = [7u8; 4096];
        seg.append(
            6,
            10,
            [Record {
                kind: Kind::Write,
                flags: 0,
                offset: 0,
                length: 4096,
                payload: &data,
            }],
        )
        .unwrap();
        let sealed = seg.seal(11).unwrap();
        let raw = std::fs::read(&sealed.path).unwrap();
        let (obj, frames) = rf::compress_segment(&raw).unwrap();
        let idx = rf::SegmentIndex {
            meta: rf::IndexMeta {
                vm_uuid: VM.into(),
                disk: "vda".into(),
                first_seq: 6,
                last_seq: 6,
                record_base: 0,
                records: 1,
                first_ts_ns: 10,
                last_ts_ns: 10,
                raw_size: raw.len() as u64,
                object_size: obj.len() as u64,
                object_blake3: blake3::hash(&obj).to_hex().to_string(),
                prev: None,
            },
            frames,
            entries: seg.index.clone(),
        };
        self.put(&rf::segment_key(VM, "vda", 6, 6), &obj);
        self.put(&rf::index_key(VM, "vda", 6, 6), &idx.encode());
    }

    /// Run cdpctl under a 512 MiB address-space limit, sampling its peak
    /// RSS. Returns its output and the peak (KiB).
    fn cdpctl(&self, args: &[&str]) -> (Output, u64) {
        let mut child = Command::new("prlimit")
            .arg(format!("--as={AS_LIMIT}"))
            .arg("--")
            .arg(cdpctl())
            .arg("--config")
            .arg(self.base.join("cdp.toml"))
            .arg("--state-dir")
            .arg(self.base.join("state"))
            .args(args)
            .arg("--repo")
            .arg(format!("file://{}", self.repo.display()))
            // glibc reserves 64 MiB of address space per malloc arena.
            .env("MALLOC_ARENA_MAX", "2")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let status = format!("/proc/{}/status", child.id());
        let mut peak = 0u64;
        while child.try_wait().unwrap().is_none() {
            if let Ok(s) = std::fs::read_to_string(&status) {
                let hwm = s
                    .lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
                peak = peak.max(hwm.unwrap_or(0));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        (child.wait_with_output().unwrap(), peak)
    }
}

/// A failure that says what and where, in bounded memory, without a panic.
fn assert_clear_failure(what: &str, out: &Output, peak_kib: u64, expect: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{what} succeeded: {err}");
    assert!(!err.contains("panicked"), "{what} panicked: {err}");
    assert!(
        !err.contains("memory allocation"),
        "{what} ran out of memory: {err}"
    );
    for e in expect {
        assert!(err.contains(e), "{what}: no {e:?} in: {err}");
    }
    assert!(
        peak_kib < 256 * 1024,
        "{what} peaked at {peak_kib} KiB of RSS"
    );
}

/// zstd of `len` zero bytes, with or without the size in the frame header.
fn bomb(len: u64, declared: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = zstd::stream::Encoder::new(&mut out, 1).unwrap();
    if declared {
        enc.include_contentsize(true).unwrap();
        enc.set_pledged_src_size(Some(len)).unwrap();
    }
    let zeros = vec![0u8; MIB as usize];
    for _ in 0..len / MIB {
        std::io::Write::write_all(&mut enc, &zeros).unwrap();
    }
    enc.finish().unwrap();
    out
}

#[test]
fn a_decompression_bomb_chunk_is_refused_in_bounded_memory() {
    for declared in [false, true] {
        let r = HostileRepo::new();
        // 2 GiB of zeros: a few KB of zstd.
        let b = bomb(2 << 30, declared);
        assert!(b.len() < 256 * 1024, "bomb of {} bytes", b.len());
        let hash = blake3::hash(b"the chunk that should be here")
            .to_hex()
            .to_string();
        r.put(&rf::chunk_key(&hash), &b);
        r.baseline(5, vec![Some(hash.clone())]);
        r.journal();
        let out_img = r.base.join("out.img");
        let (out, peak) = r.cdpctl(&[
            "restore",
            VM,
            "--disk",
            "vda",
            "--at",
            "seq:6",
            "--output",
            out_img.to_str().unwrap(),
        ]);
        let key = rf::chunk_key(&hash);
        let what = format!("restore (declared size: {declared})");
        assert_clear_failure(&what, &out, peak, &[&key, "decompression bomb", "verify"]);
        let (out, peak) = r.cdpctl(&["verify", VM, "--deep"]);
        let what = format!("verify --deep (declared size: {declared})");
        assert_clear_failure(&what, &out, peak, &["problem"]);
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(report.contains(&key), "verify names the chunk: {report}");
        assert!(report.contains("decompression bomb"), "{report}");
    }
}

#[test]
fn an_oversized_object_is_not_read() {
    let r = HostileRepo::new();
    // A "chunk" of 600 MiB (sparse): more than any chunk may be.
    let hash = "ab".repeat(32);
    let p = r.repo.join(rf::chunk_key(&hash));
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::File::create(&p)
        .unwrap()
        .set_len(600 * MIB)
        .unwrap();
    r.baseline(5, vec![Some(hash)]);
    r.journal();
    let out_img = r.base.join("out.img");
    let (out, peak) = r.cdpctl(&[
        "restore",
        VM,
        "--disk",
        "vda",
        "--at",
        "seq:6",
        "--output",
        out_img.to_str().unwrap(),
    ]);
    assert_clear_failure("restore", &out, peak, &["more than the", "verify"]);
}

/// A segment index that passes its checksum but describes an impossible
/// segment: a raw size of 2^60 bytes, records far outside it.
fn malformed_index(object: &[u8]) -> Vec<u8> {
    rf::SegmentIndex {
        meta: rf::IndexMeta {
            vm_uuid: VM.into(),
            disk: "vda".into(),
            first_seq: 6,
            last_seq: 6,
            record_base: 0,
            records: 1,
            first_ts_ns: 10,
            last_ts_ns: 10,
            raw_size: 1 << 60,
            object_size: object.len() as u64,
            object_blake3: blake3::hash(object).to_hex().to_string(),
            prev: None,
        },
        frames: vec![rf::Frame {
            raw_offset: 0,
            object_offset: 0,
        }],
        entries: vec![IndexEntry {
            seq: 6,
            ts_ns: 10,
            offset: 0,
            length: 1 << 40,
            payload_pos: 1 << 50,
            kind: Kind::Write,
            flags: 0,
        }],
    }
    .encode()
}

#[test]
fn a_malformed_index_is_a_clear_error_without_a_panic() {
    let r = HostileRepo::new();
    r.baseline(5, vec![None]);
    let seg = rf::compress_chunk(b"not much of a segment").unwrap();
    r.put(&rf::segment_key(VM, "vda", 6, 6), &seg);
    let idx_key = rf::index_key(VM, "vda", 6, 6);
    r.put(&idx_key, &malformed_index(&seg));
    let (out, peak) = r.cdpctl(&["verify", VM, "--deep"]);
    assert_clear_failure("verify --deep", &out, peak, &["problem"]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains(&idx_key), "{report}");
    assert!(report.contains("more than the"), "{report}");
    let out_img = r.base.join("out.img");
    let (out, peak) = r.cdpctl(&[
        "restore",
        VM,
        "--disk",
        "vda",
        "--at",
        "seq:6",
        "--output",
        out_img.to_str().unwrap(),
    ]);
    let idx_name = "00000000000000000006-00000000000000000006.idx";
    assert_clear_failure("restore", &out, peak, &[idx_name, "cdpctl verify"]);
}
