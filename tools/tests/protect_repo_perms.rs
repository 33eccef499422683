//! `cdpctl protect` prepares a `file://` repository for QEMU's user, who
//! runs the VM's shipper, or refuses with the exact command (issue 15).
//! The real cdpctl, with a fake `virsh` on its PATH (protect reads and
//! defines the VM through virsh; no libvirtd here); every "can QEMU's user
//! write it" is checked by a real process running as libvirt-qemu.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cdp_tests::bin;

/// libvirt-qemu, QEMU's user on Debian (the config names none).
const QEMU_UID: u32 = 64055;
const QEMU_GID: u32 = 107;
const UUID: &str = "6f1e2d3c-4b5a-4968-8776-5a4b3c2d1e0f";

struct Host {
    dir: tempfile::TempDir,
}

impl Host {
    fn new() -> Host {
        let dir = tempfile::tempdir().unwrap();
        // QEMU's user must be able to reach what is prepared for it.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let d = dir.path();
        let fake = d.join("bin");
        std::fs::create_dir(&fake).unwrap();
        std::fs::write(
            fake.join("virsh"),
            "#!/bin/sh\n# fake virsh: -c URI COMMAND ARGS\nshift 2\ncase \"$1\" in\n\
             dumpxml) cat \"$FAKE_DOMAIN_XML\" ;;\n\
             define) cp \"$2\" \"$FAKE_DOMAIN_XML.defined\" ;;\n\
             domstate) echo running ;;\n\
             *) echo \"fake virsh: $*\" >&2; exit 1 ;;\nesac\n",
        )
        .unwrap();
        std::fs::set_permissions(fake.join("virsh"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let disk = d.join("vda.raw");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        std::fs::write(
            d.join("domain.xml"),
            format!(
                "<domain type='kvm'>\n  <name>permvm</name>\n  <uuid>{UUID}</uuid>\n  \
                 <devices>\n    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n    \
                 <disk type='file' device='disk'>\n      <driver name='qemu' type='raw'/>\n      \
                 <source file='{}'/>\n      <target dev='vda' bus='virtio'/>\n    </disk>\n  \
                 </devices>\n</domain>\n",
                disk.display()
            ),
        )
        .unwrap();
        Host { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `cdpctl protect permvm --disk vda` with the repository at `repo`.
    fn protect(&self, repo: &Path) -> Output {
        let d = self.path();
        let cfg = d.join("cdp.toml");
        std::fs::write(
            &cfg,
            format!(
                "[paths]\nstate_dir = \"{0}/state\"\nrun_dir = \"{0}/run\"\n\
                 [target.primary]\nurl = \"file://{1}\"\n\
                 [policy.default]\ntargets = [\"primary\"]\n",
                d.display(),
                repo.display()
            ),
        )
        .unwrap();
        let _ = std::fs::remove_file(self.defined());
        let path = format!(
            "{}:{}",
            d.join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let out = Command::new(bin("cdpctl"))
            .args(["protect", "permvm", "--disk", "vda", "--config"])
            .arg(&cfg)
            .env("PATH", path)
            .env("FAKE_DOMAIN_XML", d.join("domain.xml"))
            .output()
            .unwrap();
        eprintln!(
            "protect: {}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn defined(&self) -> PathBuf {
        self.path().join("domain.xml.defined")
    }
}

/// `mkdir -p PATH` as QEMU's user: whether it worked.
fn qemu_user_mkdir(p: &Path) -> bool {
    Command::new(cdp_tests::require_tool("setpriv"))
        .args([
            "--reuid",
            &QEMU_UID.to_string(),
            "--regid",
            &QEMU_GID.to_string(),
            "--init-groups",
            "mkdir",
            "-p",
        ])
        .arg(p)
        .output()
        .unwrap()
        .status
        .success()
}

fn owner_mode(p: &Path) -> (u32, u32, u32) {
    let m = std::fs::symlink_metadata(p).unwrap();
    (m.uid(), m.gid(), m.mode() & 0o7777)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_missing_repository_is_created_for_qemus_user() {
    let h = Host::new();
    let repo = h.path().join("srv/repo");
    assert!(!qemu_user_mkdir(&repo.join("cdp/v1/vms")), "precondition");
    let out = h.protect(&repo);
    assert!(
        stderr(&out).contains(&format!("created {}", repo.display())),
        "{}",
        stderr(&out)
    );
    assert_eq!(owner_mode(&repo), (QEMU_UID, QEMU_GID, 0o750));
    assert!(qemu_user_mkdir(&repo.join("cdp/v1/vms").join(UUID)));
    assert!(qemu_user_mkdir(&repo.join("cdp/v1/chunks/ab")));
}

#[test]
fn roots_repository_gets_a_cdp_tree_for_qemus_user_and_stays_roots() {
    let h = Host::new();
    let repo = h.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    std::fs::set_permissions(&repo, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert!(!qemu_user_mkdir(&repo.join("cdp")), "precondition");
    let out = h.protect(&repo);
    assert!(
        stderr(&out).contains(&format!("created {}", repo.join("cdp").display())),
        "{}",
        stderr(&out)
    );
    // The operator's directory is as it was; only what protect made is the user's.
    assert_eq!(owner_mode(&repo), (0, 0, 0o755));
    assert_eq!(owner_mode(&repo.join("cdp")), (QEMU_UID, QEMU_GID, 0o750));
    assert!(qemu_user_mkdir(&repo.join("cdp/v1/vms").join(UUID)));
    assert!(qemu_user_mkdir(&repo.join("cdp/v1/chunks/ab")));
    assert!(!qemu_user_mkdir(&repo.join("elsewhere")));
}

#[test]
fn a_tree_qemus_user_cannot_write_is_refused_with_the_command_that_fixes_it() {
    let h = Host::new();
    let repo = h.path().join("repo");
    // A root `cdpctl baseline` made the tree before, say.
    let vms = repo.join("cdp/v1/vms");
    std::fs::create_dir_all(&vms).unwrap();
    for p in [
        repo.clone(),
        repo.join("cdp"),
        repo.join("cdp/v1"),
        vms.clone(),
    ] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let out = h.protect(&repo);
    assert!(!out.status.success());
    let err = stderr(&out);
    let cmd = format!("chown -R libvirt-qemu:kvm {}", repo.join("cdp").display());
    assert!(err.contains(&format!("run `{cmd}` as root")), "{err}");
    assert!(err.contains("libvirt-qemu (uid 64055)"), "{err}");
    // Nothing changed: the VM is not defined, the tree is root's.
    assert!(!h.defined().exists());
    assert_eq!(owner_mode(&vms), (0, 0, 0o755));
    assert!(!qemu_user_mkdir(&vms.join(UUID)));

    // The command it names, run as it says, is enough.
    let ran = Command::new("sh").arg("-c").arg(&cmd).output().unwrap();
    assert!(ran.status.success(), "{ran:?}");
    let out = h.protect(&repo);
    assert!(!stderr(&out).contains("protect again"), "{}", stderr(&out));
    assert!(qemu_user_mkdir(&vms.join(UUID)));
    assert!(qemu_user_mkdir(&repo.join("cdp/v1/chunks/ab")));
}
