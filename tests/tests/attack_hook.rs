//! The libvirt hook runs as root inside trees QEMU's user owns
//! (`<run>/<uuid>/`, `<state>/vms/<uuid>/`; older versions also handed it
//! `<state>`, `<state>/vms` and `<run>`). An attacker holding that uid
//! (libvirt-qemu, 64055) plants symbolic links (and a hard link) at every
//! name the hook touches, pointing at a root-owned file and directory
//! outside the state directory; the real hook (`cdpctl libvirt-hook`) then
//! runs its prepare, start and release phases. The victims stay as they
//! were: same bytes, same owner, same mode, nothing added, nothing removed
//! (issue 11, item 6). The shared directories end up root's, mode 0755,
//! whoever owned them before, and a VM's directory owned by another user
//! (another VM's, `nobody` here) is refused, never re-owned (item 4).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use cdp_tests::bin;

const QEMU_UID: u32 = 64055;
const QEMU_GID: u32 = 107;
/// Another user: another VM's QEMU, or anyone else.
const OTHER_UID: u32 = 65534;
const UUID: &str = "6f1c2a8e-3b4d-4e5f-8a9b-0c1d2e3f4a5b";
const VICTIM_BYTES: &[u8] = b"root's secret, 0644, owned by root\n";

fn domain_xml() -> String {
    format!(
        r#"<domain type='kvm'>
  <name>web</name>
  <uuid>{UUID}</uuid>
  <metadata>
    <cdp:protection xmlns:cdp="urn:cdpd:protection:1"><cdp:disk target="vda"/></cdp:protection>
  </metadata>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/images/web.raw'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
  <seclabel type='dynamic' model='dac' relabel='yes'>
    <label>+{QEMU_UID}:+{QEMU_GID}</label>
  </seclabel>
</domain>"#
    )
}

struct Host {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    cfg: PathBuf,
    victim: PathBuf,
    victim_dir: PathBuf,
}

/// What must never change about a victim.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    bytes: Option<Vec<u8>>,
    uid: u32,
    gid: u32,
    mode: u32,
    entries: Vec<String>,
}

fn seen(p: &Path) -> Seen {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut entries = Vec::new();
    if m.is_dir() {
        for e in fs::read_dir(p).unwrap() {
            entries.push(e.unwrap().file_name().to_string_lossy().into_owned());
        }
        entries.sort();
    }
    Seen {
        bytes: m.is_file().then(|| fs::read(p).unwrap()),
        uid: m.uid(),
        gid: m.gid(),
        mode: m.mode() & 0o7777,
        entries,
    }
}

impl Host {
    fn new() -> Host {
        assert!(
            nix::unistd::geteuid().is_root(),
            "attack tests run the hook as root and the attacker as uid {QEMU_UID}: run them as root"
        );
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        let victim = root.join("victim");
        fs::write(&victim, VICTIM_BYTES).unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o644)).unwrap();
        let victim_dir = root.join("victim-dir");
        fs::create_dir(&victim_dir).unwrap();
        fs::set_permissions(&victim_dir, fs::Permissions::from_mode(0o755)).unwrap();
        // A file named like the one `release` removes.
        fs::write(victim_dir.join("domain.xml"), VICTIM_BYTES).unwrap();
        // The operator's directory holding the state and run directories
        // (root's; one test hands it to the attacker).
        fs::create_dir(root.join("lib")).unwrap();
        fs::set_permissions(root.join("lib"), fs::Permissions::from_mode(0o755)).unwrap();
        let cfg = root.join("cdp.toml");
        fs::write(
            &cfg,
            format!(
                "[paths]\nstate_dir = \"{0}/lib/state\"\nrun_dir = \"{0}/lib/run\"\n\
                 [target.t]\nurl = \"file://{0}/repo\"\n[policy.default]\ntargets = [\"t\"]\n",
                root.display()
            ),
        )
        .unwrap();
        Host {
            _tmp: tmp,
            root,
            cfg,
            victim,
            victim_dir,
        }
    }

    fn state(&self) -> PathBuf {
        self.root.join("lib/state")
    }

    fn run(&self) -> PathBuf {
        self.root.join("lib/run")
    }

    fn vm_state(&self) -> PathBuf {
        self.state().join("vms").join(UUID)
    }

    fn vm_run(&self) -> PathBuf {
        self.run().join(UUID)
    }

    /// The shared directories as an older cdpd left them: handed to QEMU's
    /// user (what lets that user plant links in them).
    fn as_an_older_version_left_it(&self) {
        for (d, mode) in [
            (self.state(), 0o750),
            (self.state().join("vms"), 0o750),
            (self.run(), 0o755),
        ] {
            fs::create_dir_all(&d).unwrap();
            std::os::unix::fs::chown(&d, Some(QEMU_UID), Some(QEMU_GID)).unwrap();
            fs::set_permissions(&d, fs::Permissions::from_mode(mode)).unwrap();
        }
    }

    /// `cdpctl libvirt-hook web OP SUB -`, the domain XML on stdin, as root.
    fn hook(&self, op: &str, sub: &str) -> Output {
        let mut child = Command::new(bin("cdpctl"))
            .arg("--config")
            .arg(&self.cfg)
            .args(["libvirt-hook", "web", op, sub, "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(domain_xml().as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    /// A shell script run as QEMU's user, and whether it succeeded.
    fn try_as_qemu(&self, script: &str) -> Output {
        Command::new("sh")
            .arg("-ec")
            .arg(script)
            .current_dir(&self.root)
            .uid(QEMU_UID)
            .gid(QEMU_GID)
            .output()
            .unwrap()
    }

    /// A shell script run as QEMU's user; it must succeed (the attack is real).
    fn as_qemu(&self, script: &str) {
        let out = self.try_as_qemu(script);
        assert!(
            out.status.success(),
            "the attacker (uid {QEMU_UID}) could not plant: {script}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn victims(&self) -> (Seen, Seen, Seen) {
        (
            seen(&self.victim),
            seen(&self.victim_dir),
            seen(&self.victim_dir.join("domain.xml")),
        )
    }
}

fn ok(out: &Output) {
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn links_planted_at_every_file_the_hook_touches_are_never_followed() {
    let h = Host::new();
    let before = h.victims();
    ok(&h.hook("prepare", "begin"));
    let vm_run = h.run().join(UUID);
    let vm_state = h.state().join("vms").join(UUID);
    assert_eq!(fs::metadata(&vm_run).unwrap().uid(), QEMU_UID);
    // The attacker plants links at each name, and a tree for own_tree.
    h.as_qemu(&format!(
        "v={v}; vd={vd}
         ln -sfn $v {run}/domain.xml.tmp
         ln -sfn $v {run}/domain.xml
         mkdir -p {st}/vda/journal
         ln -sfn $v {st}/shipper.lock
         ln -sfn $v {st}/domain.xml
         ln -sfn $vd {st}/vdb
         ln -sfn $v {st}/vda/journal/0000000000000001.seg
         ln -sfn $vd {st}/vda/journal/sub",
        v = h.victim.display(),
        vd = h.victim_dir.display(),
        run = vm_run.display(),
        st = vm_state.display(),
    ));
    // Where the kernel lets a user hard-link another's file
    // (fs.protected_hardlinks = 0), a second name for the victim.
    fs::hard_link(&h.victim, vm_state.join("vda/journal/hard")).unwrap();
    let before = (
        before.0.bytes,
        before.0.uid,
        before.0.mode,
        before.1,
        before.2,
    );
    for (op, sub) in [("prepare", "begin"), ("start", "begin")] {
        let out = h.hook(op, sub);
        let now = h.victims();
        assert_eq!(
            (now.0.bytes, now.0.uid, now.0.mode, now.1, now.2),
            before,
            "{op} {sub} changed a victim"
        );
        ok(&out);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("left alone"), "{err}");
    }
    // The definition is a file of its own, the links beside it untouched.
    let def = fs::symlink_metadata(vm_run.join("domain.xml")).unwrap();
    assert!(def.is_file());
    assert_eq!((def.uid(), def.mode() & 0o777), (QEMU_UID, 0o600));
    assert!(fs::read_to_string(vm_run.join("domain.xml"))
        .unwrap()
        .contains(UUID));
    assert!(fs::symlink_metadata(vm_state.join("vdb"))
        .unwrap()
        .file_type()
        .is_symlink());
    ok(&h.hook("release", "end"));
    assert_eq!(seen(&h.victim).bytes.as_deref(), Some(VICTIM_BYTES));
    assert_eq!(seen(&h.victim).uid, 0);
}

/// Owner and mode of `p` (not following a link).
fn owner_mode(p: &Path) -> (u32, u32) {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.uid(), m.mode() & 0o7777)
}

#[test]
fn shared_directories_end_up_roots_even_when_an_older_version_gave_them_to_qemu() {
    let h = Host::new();
    h.as_an_older_version_left_it();
    for (op, sub) in [("prepare", "begin"), ("start", "begin")] {
        let out = h.hook(op, sub);
        ok(&out);
        for d in [h.state(), h.state().join("vms"), h.run()] {
            assert_eq!(owner_mode(&d), (0, 0o755), "{op} {sub}: {}", d.display());
        }
        for d in [h.vm_state(), h.vm_run()] {
            assert_eq!(
                owner_mode(&d),
                (QEMU_UID, 0o700),
                "{op} {sub}: {}",
                d.display()
            );
        }
        if op == "prepare" {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("now root's") && err.contains(&h.state().display().to_string()),
                "the hook says it re-owned them: {err}"
            );
        }
    }
    // QEMU's user can no longer add anything beside its own directories.
    for d in [h.state(), h.state().join("vms"), h.run()] {
        let out = h.try_as_qemu(&format!(
            "ln -s {} {}/planted",
            h.victim.display(),
            d.display()
        ));
        assert!(
            !out.status.success(),
            "uid {QEMU_UID} wrote into {}",
            d.display()
        );
    }
}

#[test]
fn links_planted_at_the_directories_themselves_are_refused() {
    let h = Host::new();
    let before = h.victims();
    // Each directory the hook opens becomes a link to a root-owned
    // directory (holding a `domain.xml` of its own), planted by QEMU's user
    // where an older version let it: in the shared directories it was
    // handed, and at `<state>` itself in an operator's directory it can
    // write.
    let lib = h.root.join("lib");
    for (what, path) in [
        ("<run>/<uuid>", h.vm_run()),
        ("<state>/vms/<uuid>", h.vm_state()),
        ("<state>/vms", h.state().join("vms")),
        ("<state>", h.state()),
    ] {
        ok(&h.hook("prepare", "begin"));
        h.as_an_older_version_left_it();
        if what == "<state>" {
            std::os::unix::fs::chown(&lib, Some(QEMU_UID), Some(QEMU_GID)).unwrap();
        }
        h.as_qemu(&format!(
            "rm -rf {p}\nln -s {vd} {p}",
            vd = h.victim_dir.display(),
            p = path.display(),
        ));
        for (op, sub) in [("prepare", "begin"), ("start", "begin"), ("release", "end")] {
            let out = h.hook(op, sub);
            assert_eq!(
                h.victims(),
                before,
                "{what} a link: {op} {sub} changed a victim"
            );
            if op != "release" {
                assert!(!out.status.success(), "{what} a link: {out:?}");
                assert!(
                    String::from_utf8_lossy(&out.stderr).contains("symbolic link"),
                    "{out:?}"
                );
            }
        }
        // The shared directories the hook reached are root's again: the
        // attacker cannot plant there any more.
        let reached: &[PathBuf] = match what {
            "<run>/<uuid>" => &[h.state(), h.state().join("vms"), h.run()],
            "<state>/vms/<uuid>" | "<state>/vms" => &[h.state()],
            _ => &[],
        };
        for d in reached {
            assert_eq!(owner_mode(d), (0, 0o755), "{what} a link: {}", d.display());
        }
        // Back to a sane tree before the next one (as root, the operator).
        fs::remove_file(&path).unwrap();
        std::os::unix::fs::chown(&lib, Some(0), Some(0)).unwrap();
    }
    ok(&h.hook("prepare", "begin"));
    assert_eq!(h.victims(), before);
}

#[test]
fn a_vm_directory_owned_by_another_user_is_refused_not_reowned() {
    let h = Host::new();
    ok(&h.hook("prepare", "begin"));
    for d in [h.vm_state(), h.vm_run()] {
        // Another user's tree (another VM's QEMU, or anyone's) where this
        // VM's would be: a directory and a file in it.
        let file = d.join("theirs");
        fs::write(&file, b"another user's data").unwrap();
        for p in [&d, &file] {
            std::os::unix::fs::chown(p, Some(OTHER_UID), Some(OTHER_UID)).unwrap();
        }
        let before = (owner_mode(&d), owner_mode(&file));
        for (op, sub) in [("prepare", "begin"), ("start", "begin")] {
            let out = h.hook(op, sub);
            assert!(!out.status.success(), "{}: {out:?}", d.display());
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains(&format!("owned by uid {OTHER_UID}"))
                    && err.contains(&format!("chown -R {QEMU_UID}")),
                "{err}"
            );
            assert_eq!((owner_mode(&d), owner_mode(&file)), before, "{op} {sub}");
        }
        // The operator gives it back; the VM starts again.
        fs::remove_file(&file).unwrap();
        std::os::unix::fs::chown(&d, Some(QEMU_UID), Some(QEMU_GID)).unwrap();
        ok(&h.hook("prepare", "begin"));
    }
}
