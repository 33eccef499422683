//! cdp-agent runs as root and works on every VM's state. QEMU's user
//! (libvirt-qemu, uid 64055 here) owns that state, its catalog included
//! (issue 11, item 1): it rewrites its rows to name root-owned files outside
//! the state directory as its disk image or a segment. Root's agent then
//! adopts the VM. Before privilege separation the agent replayed the
//! journal onto the named file, deleted it when trimming, or read it into
//! the repository as a baseline. Now the VM's adoption runs as the VM's
//! user (`cdp-agent adopt-vm`): each victim stays as it was, and nothing
//! of it reaches the repository.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cdp_tests::fixture::{cdpctl, phase, qemu_io};
use cdp_tests::{bin, run, run_ok, Daemon};

const MIB: u64 = 1 << 20;
const QEMU_UID: u32 = 64055;
const QEMU_GID: u32 = 107;

/// A shell script run as QEMU's user; it must succeed (the attack is real).
fn as_qemu(script: &str) {
    cdp_tests::fixture::as_user(QEMU_UID, QEMU_GID, script);
}

/// The catalog QEMU's user writes: the VM's own, or the host catalog of
/// the versions before per-VM catalogs (so that the test shows the attack
/// on the old code too).
fn writable_catalog(d: &Daemon) -> PathBuf {
    let per_vm = d.catalog_path();
    if per_vm.exists() {
        per_vm
    } else {
        d.state_dir.join("catalog.sqlite")
    }
}

fn sql(d: &Daemon, statements: &str) {
    as_qemu(&format!(
        "sqlite3 {} \"{statements}\"",
        writable_catalog(d).display()
    ));
}

struct Host {
    d: Daemon,
    cfg: PathBuf,
    repo: PathBuf,
    _victim_dir: tempfile::TempDir,
    victim_dir: PathBuf,
}

/// A root-owned file in a root-owned directory outside the state: QEMU's
/// user can neither write, delete nor (mode 0600) read it.
fn victim(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, bytes).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    p
}

fn assert_untouched(p: &Path, bytes: &[u8], mode: u32) {
    let m = fs::metadata(p).unwrap_or_else(|e| panic!("{} is gone: {e}", p.display()));
    assert_eq!((m.uid(), m.gid()), (0, 0), "{} was chowned", p.display());
    assert_eq!(m.mode() & 0o7777, mode, "{} was chmodded", p.display());
    assert!(fs::read(p).unwrap() == bytes, "{} was changed", p.display());
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_containing(&p, needle));
        } else if fs::read(&p)
            .unwrap_or_default()
            .windows(needle.len())
            .any(|w| w == needle)
        {
            out.push(p);
        }
    }
    out
}

impl Host {
    /// A VM as production lays it out: root owns `<state>` and
    /// `<state>/vms`, QEMU's user the VM's state, its image and the
    /// repository. `kill` leaves the capture session open (a killed cdpd),
    /// with an unsealed segment the agent must recover.
    fn new(seed: u64, kill: bool) -> Host {
        assert!(
            nix::unistd::geteuid().is_root(),
            "attack tests run cdp-agent as root and the attacker as uid {QEMU_UID}: run them as root"
        );
        let mut d = Daemon::builder()
            .disk_random("vda", 8 * MIB, seed)
            .args(["--segment-age", if kill { "1h" } else { "20ms" }])
            .start();
        let repo = d.work_dir().join("repo");
        fs::create_dir_all(&repo).unwrap();
        let cfg = d.work_dir().join("cdp.toml");
        fs::write(
            &cfg,
            format!(
                "[target.primary]\nurl = \"file://{}\"\n[policy.default]\ntargets = [\"primary\"]\n[agent]\nmetrics_listen = \"\"\n",
                repo.display()
            ),
        )
        .unwrap();
        fs::set_permissions(&cfg, fs::Permissions::from_mode(0o644)).unwrap();
        if !kill {
            cdpctl(&d, &cfg, &["baseline", &d.vm_uuid]);
        }
        for i in 0..2 {
            qemu_io(&d, "vda", &phase(i));
        }
        if kill {
            d.kill9();
        } else {
            d.term();
        }
        let top = d.work_dir().parent().unwrap().to_path_buf();
        for p in [top.clone(), d.work_dir(), d.state_dir.clone()] {
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        }
        if d.state_dir.join("vms").exists() {
            fs::set_permissions(d.state_dir.join("vms"), fs::Permissions::from_mode(0o755))
                .unwrap();
        }
        let owned = [
            d.state_dir.join("vms").join(&d.vm_uuid),
            d.image("vda").parent().unwrap().to_path_buf(),
            repo.clone(),
            // The host catalog of older versions (QEMU's user could write it).
            d.state_dir.join("catalog.sqlite"),
            d.state_dir.join("catalog.sqlite-wal"),
            d.state_dir.join("catalog.sqlite-shm"),
        ];
        if d.state_dir.join("catalog.sqlite").exists() {
            // Versions with one host catalog gave QEMU's user the state
            // directory itself (this makes the test show the attack there).
            std::os::unix::fs::chown(&d.state_dir, Some(QEMU_UID), Some(QEMU_GID)).unwrap();
        }
        for p in owned.iter().filter(|p| p.exists()) {
            run_ok(
                Command::new("chown")
                    .arg("-R")
                    .arg(format!("{QEMU_UID}:{QEMU_GID}"))
                    .arg(p),
            );
        }
        let victim_dir = tempfile::tempdir().unwrap();
        fs::set_permissions(victim_dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        Host {
            victim_dir: victim_dir.path().to_path_buf(),
            _victim_dir: victim_dir,
            d,
            cfg,
            repo,
        }
    }

    /// `cdp-agent run --once` as root.
    fn agent_once(&self) -> Output {
        run(Command::new(bin("cdp-agent"))
            .arg("run")
            .arg("--once")
            .arg("--config")
            .arg(&self.cfg)
            .arg("--state-dir")
            .arg(&self.d.state_dir)
            .arg("--run-dir")
            .arg(&self.d.run_dir))
    }
}

/// Journal replay onto `disks.path`: a killed cdpd's open segment is redone
/// onto whatever file the catalog names.
#[test]
fn recovery_never_writes_a_file_the_catalog_names() {
    let h = Host::new(81, true);
    let bytes = vec![0x5au8; 8 * MIB as usize];
    let v = victim(&h.victim_dir, "victim.img", &bytes, 0o644);
    sql(&h.d, &format!("UPDATE disks SET path = '{}'", v.display()));
    let out = h.agent_once();
    assert_untouched(&v, &bytes, 0o644);
    // It is the VM's failure, said plainly (the image it names cannot be
    // opened by the VM's user), not a silent success.
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&h.d.vm_uuid), "{err}");
}

/// As libvirt leaves it after the VM stopped: the image is root's again
/// (0600), and the hook's root-owned `<state>/vms/<uuid>.images` names it.
/// The agent opens that image for the VM's child and recovers the killed
/// cdpd's journal onto it, still never onto what the catalog names.
#[test]
fn recovery_uses_the_image_libvirt_names_even_when_root_owns_it() {
    let h = Host::new(85, true);
    let image = h.d.image("vda");
    std::os::unix::fs::chown(&image, Some(0), Some(0)).unwrap();
    fs::set_permissions(&image, fs::Permissions::from_mode(0o600)).unwrap();
    let images =
        h.d.state_dir
            .join("vms")
            .join(format!("{}.images", h.d.vm_uuid));
    fs::write(
        &images,
        serde_json::json!({ "vda": image.display().to_string() }).to_string(),
    )
    .unwrap();
    fs::set_permissions(&images, fs::Permissions::from_mode(0o644)).unwrap();
    let bytes = vec![0x5au8; 8 * MIB as usize];
    let v = victim(&h.victim_dir, "victim.img", &bytes, 0o644);
    sql(&h.d, &format!("UPDATE disks SET path = '{}'", v.display()));
    let out = h.agent_once();
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let a = report["adopted"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["vm_uuid"] == h.d.vm_uuid.as_str())
        .unwrap_or_else(|| panic!("not adopted: {report}"));
    assert_eq!(a["recovered"]["previous_end"], "crash", "{a}");
    assert!(
        a["recovered"]["sealed_segments"].as_u64().unwrap() >= 1,
        "{a}"
    );
    assert_untouched(&v, &bytes, 0o644);
    // The image stays root's: nothing was handed to QEMU's user.
    let m = fs::metadata(&image).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o7777), (0, 0o600));
    // The baseline the child took is of that image too (not of the file the
    // catalog named): the repository alone restores it byte for byte.
    cdp_tests::fixture::assert_repo_restores_image(&h.d, &h.cfg, &h.repo, "vda");
}

/// Trimming deletes `segments.path` once every target has the segment.
#[test]
fn trimming_never_deletes_a_file_the_catalog_names() {
    let h = Host::new(82, false);
    let bytes = b"root's file".to_vec();
    let v = victim(&h.victim_dir, "victim.dat", &bytes, 0o644);
    // A segment row every target "has", whose local file is the victim.
    sql(
        &h.d,
        &format!(
            "INSERT INTO segments(vm_uuid, disk, first_seq, last_seq, first_ts_ns, last_ts_ns, records, record_base, size_bytes, sealed, path, local) VALUES('{u}', 'vda', 900000, 900009, 1, 2, 10, 900000, 100, 1, '{p}', 1);
             INSERT INTO shipments VALUES('{u}', 'vda', 900000, 'primary', 'k', 1, 100);",
            u = h.d.vm_uuid,
            p = v.display()
        ),
    );
    let _ = h.agent_once();
    assert_untouched(&v, &bytes, 0o644);
}

/// Names are paths too: a disk named `../../..` (its journal then "under"
/// the victim's directory) or an absolute name, with a sealed, shipped
/// segment row to trim, makes root's agent touch nothing outside the VM's
/// state.
#[test]
fn dot_dot_and_absolute_names_in_the_catalog_reach_nothing() {
    let h = Host::new(86, false);
    let bytes = b"root's file".to_vec();
    let v = victim(&h.victim_dir, "00000000000000900000.seg", &bytes, 0o644);
    let depth =
        h.d.state_dir
            .join("vms")
            .join(&h.d.vm_uuid)
            .components()
            .count();
    let up = "../".repeat(depth + 2);
    let names = [
        format!("{up}{}", h.victim_dir.strip_prefix("/").unwrap().display()),
        h.victim_dir.display().to_string(),
    ];
    for disk in &names {
        sql(
            &h.d,
            &format!(
                "INSERT INTO disks(vm_uuid, disk, path, size) VALUES('{u}', '{disk}', '{img}', 4096);
                 INSERT INTO segments(vm_uuid, disk, first_seq, last_seq, first_ts_ns, last_ts_ns, records, record_base, size_bytes, sealed, path, local) VALUES('{u}', '{disk}', 900000, 900009, 1, 2, 10, 900000, 100, 1, '{p}', 1);
                 INSERT INTO shipments VALUES('{u}', '{disk}', 900000, 'primary', 'k', 1, 100);",
                u = h.d.vm_uuid,
                img = v.display(),
                p = v.display(),
            ),
        );
    }
    let _ = h.agent_once();
    assert_untouched(&v, &bytes, 0o644);
    let left: Vec<_> = fs::read_dir(&h.victim_dir).unwrap().collect();
    assert_eq!(
        left.len(),
        1,
        "something was created next to the victim: {left:?}"
    );
}

/// A baseline reads `disks.path` into the repository.
#[test]
fn a_baseline_never_reads_a_file_the_catalog_names() {
    let h = Host::new(83, false);
    // No baseline yet for a disk the catalog adds, whose image is root's
    // secret (mode 0600).
    let mut secret = Vec::new();
    while secret.len() < MIB as usize {
        secret.extend_from_slice(b"TOP-SECRET-ROOT-ONLY-");
    }
    let v = victim(&h.victim_dir, "secret.img", &secret, 0o600);
    sql(
        &h.d,
        &format!(
            "INSERT INTO disks(vm_uuid, disk, path, size) VALUES('{u}', 'vdz', '{p}', {n})",
            u = h.d.vm_uuid,
            p = v.display(),
            n = secret.len()
        ),
    );
    let _ = h.agent_once();
    assert_untouched(&v, &secret, 0o600);
    let leaked = files_containing(&h.repo, b"TOP-SECRET-ROOT-ONLY-");
    assert!(
        leaked.is_empty(),
        "root's file reached the repository: {leaked:?}"
    );
}

/// A link planted at the shipper lock (or at the catalog) is never
/// followed, and nothing is handed to QEMU's user.
#[test]
fn links_in_the_vm_state_are_never_followed_or_chowned() {
    let h = Host::new(84, false);
    let bytes = b"root's config".to_vec();
    let lock_victim = victim(&h.victim_dir, "lock-victim", &bytes, 0o644);
    let vm_dir = h.d.state_dir.join("vms").join(&h.d.vm_uuid);
    as_qemu(&format!(
        "rm -f {lock} && ln -s {v} {lock}",
        lock = vm_dir.join("shipper.lock").display(),
        v = lock_victim.display()
    ));
    let _ = h.agent_once();
    assert_untouched(&lock_victim, &bytes, 0o644);
}
