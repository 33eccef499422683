//! `cdpctl restore --in-place` runs as root and overwrites a disk. Whoever
//! writes the repository (`vm.json`'s `source_path`) or the catalog
//! (`disks.path`, writable by QEMU's user) must not choose which file that
//! is (issue 11, item 5). The attacker here is libvirt-qemu (uid 64055): it
//! rewrites both to name a root-owned file outside the state directory, the
//! same size as the disk; root then restores in place without `--target`.
//! The victim stays as it was; the disk libvirt names is the one restored;
//! a `--target` that is a symbolic link is refused.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use cdp_tests::fixture::{cdpctl, cdpctl_cmd, config, phase, qemu_io, shipper_once_cmd};
use cdp_tests::{assert_files_equal, run, run_ok, Daemon};

const MIB: u64 = 1 << 20;
const QEMU_UID: u32 = 64055;
const QEMU_GID: u32 = 107;

struct Host {
    d: Daemon,
    cfg: PathBuf,
    repo: PathBuf,
    /// The disk as it was at the point restored.
    reference: PathBuf,
    _victim_dir: tempfile::TempDir,
    victim: PathBuf,
    victim_bytes: Vec<u8>,
    /// A directory for the fake `virsh` the test puts first on PATH.
    bin: PathBuf,
}

/// A shell script run as QEMU's user; it must succeed (the attack is real).
fn as_qemu(script: &str) {
    cdp_tests::fixture::as_user(QEMU_UID, QEMU_GID, script);
}

fn chown_tree(p: &Path) {
    run_ok(
        Command::new("chown")
            .arg("-R")
            .arg(format!("{QEMU_UID}:{QEMU_GID}"))
            .arg(p),
    );
}

/// Every file named `name` under `dir`.
fn find(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(find(&p, name));
        } else if p.file_name().is_some_and(|n| n == name) {
            out.push(p);
        }
    }
    out
}

impl Host {
    fn new() -> Host {
        assert!(
            nix::unistd::geteuid().is_root(),
            "attack tests run cdpctl as root and the attacker as uid {QEMU_UID}: run them as root"
        );
        let mut d = Daemon::builder()
            .disk_random("vda", 8 * MIB, 7)
            .args(["--segment-age", "30ms"])
            .start();
        let repo = d.work_dir().join("repo");
        fs::create_dir_all(&repo).unwrap();
        let cfg = config(&d, &repo);
        cdpctl(&d, &cfg, &["baseline", &d.vm_uuid]);
        qemu_io(&d, "vda", &phase(1));
        d.term();
        run_ok(&mut shipper_once_cmd(&d, &cfg));
        let reference = d.work_dir().join("reference.img");
        fs::copy(d.image("vda"), &reference).unwrap();
        // The disk drifts from the point: a restore onto it changes it.
        qemu_img_zero_first_mib(&d.image("vda"));
        // Production: QEMU's user owns the VM's state (root owns <state>
        // and <state>/vms) and the repository.
        let top = d.work_dir().parent().unwrap().to_path_buf();
        fs::set_permissions(&top, fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(d.work_dir(), fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(&d.state_dir, fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(d.state_dir.join("vms"), fs::Permissions::from_mode(0o755)).unwrap();
        chown_tree(&d.state_dir.join("vms").join(&d.vm_uuid));
        chown_tree(&repo);
        let victim_dir = tempfile::tempdir().unwrap();
        fs::set_permissions(victim_dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let victim = victim_dir.path().join("victim.img");
        let victim_bytes: Vec<u8> = (0..8 * MIB).map(|i| (i % 251) as u8).collect();
        fs::write(&victim, &victim_bytes).unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o644)).unwrap();
        let bin = d.work_dir().join("fakebin");
        fs::create_dir_all(&bin).unwrap();
        Host {
            d,
            cfg,
            repo,
            reference,
            _victim_dir: victim_dir,
            victim,
            victim_bytes,
            bin,
        }
    }

    /// `virsh` as the test wants it: `script` is the body of a sh script.
    fn fake_virsh(&self, script: &str) {
        let p = self.bin.join("virsh");
        fs::write(&p, format!("#!/bin/sh\n{script}\n")).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// libvirt knows no such VM (or is not running).
    fn virsh_knows_nothing(&self) {
        self.fake_virsh("echo 'error: failed to connect to the hypervisor' >&2\nexit 1");
    }

    /// libvirt's definition names the real disk.
    fn virsh_names_the_disk(&self) {
        self.fake_virsh(&format!(
            "case \"$3\" in\n\
             dumpxml) cat <<'EOF'\n\
             <domain type='kvm'><name>web</name><uuid>{}</uuid><devices>\
             <disk type='file' device='disk'><driver name='qemu' type='raw'/>\
             <source file='{}'/><target dev='vda' bus='virtio'/></disk></devices></domain>\n\
             EOF\n;;\n\
             domstate) echo 'shut off';;\n\
             *) exit 1;;\n\
             esac",
            self.d.vm_uuid,
            self.d.image("vda").display()
        ));
    }

    /// Root's `cdpctl restore VM --disk vda --at latest --in-place EXTRA…`.
    fn restore_in_place(&self, state_dir: Option<&Path>, extra: &[&str]) -> std::process::Output {
        let mut args = vec![
            "restore",
            &self.d.vm_uuid,
            "--disk",
            "vda",
            "--at",
            "latest",
            "--in-place",
            "--yes",
        ];
        args.extend_from_slice(extra);
        let mut c = cdpctl_cmd(&self.d, &self.cfg, &args);
        if let Some(s) = state_dir {
            c.arg("--state-dir").arg(s).arg("--no-local");
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![self.bin.clone()];
        dirs.extend(std::env::split_paths(&path));
        c.env("PATH", std::env::join_paths(dirs).unwrap());
        run(&mut c)
    }

    fn assert_victim_untouched(&self, what: &str) {
        let m = fs::symlink_metadata(&self.victim).unwrap();
        assert!(m.is_file(), "{what}: the victim was replaced");
        assert_eq!(
            (m.uid(), m.gid(), m.mode() & 0o7777),
            (0, 0, 0o644),
            "{what}: the victim's owner or mode changed"
        );
        assert!(
            fs::read(&self.victim).unwrap() == self.victim_bytes,
            "{what}: the victim was overwritten"
        );
    }
}

fn qemu_img_zero_first_mib(image: &Path) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new().write(true).open(image).unwrap();
    f.write_all_at(&vec![0u8; MIB as usize], 0).unwrap();
}

#[test]
fn paths_from_the_repository_or_the_catalog_are_never_overwritten() {
    let h = Host::new();
    let victim = h.victim.display().to_string();
    // The catalog (QEMU's user writes it) names the victim as the disk.
    let catalog = h.d.catalog_path();
    as_qemu(&format!(
        "sqlite3 {} \"UPDATE disks SET path = '{victim}'\"",
        catalog.display()
    ));
    // So does the repository's vm.json.
    let vm_json = find(&h.repo, "vm.json");
    assert_eq!(vm_json.len(), 1, "{vm_json:?}");
    let mut j: serde_json::Value = serde_json::from_slice(&fs::read(&vm_json[0]).unwrap()).unwrap();
    j["disks"][0]["source_path"] = victim.clone().into();
    let crafted = h.d.work_dir().join("crafted.json");
    fs::write(&crafted, serde_json::to_vec(&j).unwrap()).unwrap();
    as_qemu(&format!(
        "cat {} > {}",
        crafted.display(),
        vm_json[0].display()
    ));

    // Without --target and without libvirt's definition: refused.
    h.virsh_knows_nothing();
    let out = h.restore_in_place(None, &[]);
    h.assert_victim_untouched("the catalog's path");
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--target"),
        "{out:?}"
    );
    // A new host (no catalog): only the repository names a path.
    let empty = tempfile::tempdir().unwrap();
    let out = h.restore_in_place(Some(empty.path()), &[]);
    h.assert_victim_untouched("vm.json's source_path");
    assert!(!out.status.success(), "{out:?}");

    // libvirt's definition names the disk: that is what is restored.
    h.virsh_names_the_disk();
    let out = h.restore_in_place(None, &[]);
    assert!(out.status.success(), "{out:?}");
    h.assert_victim_untouched("with libvirt's definition");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("overwriting {}", h.d.image("vda").display())),
        "{err}"
    );
    assert_files_equal(&h.d.image("vda"), &h.reference);
}

#[test]
fn a_target_that_is_a_symbolic_link_is_refused() {
    let h = Host::new();
    h.virsh_knows_nothing();
    let attacker = h.d.work_dir().join("attacker");
    fs::create_dir_all(&attacker).unwrap();
    chown_tree(&attacker);
    let link = attacker.join("vda.img");
    as_qemu(&format!("ln -s {} {}", h.victim.display(), link.display()));
    let out = h.restore_in_place(None, &["--target", link.to_str().unwrap()]);
    h.assert_victim_untouched("--target a link");
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("symbolic link"),
        "{out:?}"
    );
    assert!(fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    // The operator's own path works.
    let out = h.restore_in_place(None, &["--target", h.d.image("vda").to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert_files_equal(&h.d.image("vda"), &h.reference);
}
