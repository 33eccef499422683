//! The libvirt hook runs as root inside trees QEMU's user owns
//! (`<run>/<uuid>/`, `<state>/vms/<uuid>/`, and today `<state>` and `<run>`
//! themselves). An attacker holding that uid (libvirt-qemu, 64055) plants
//! symbolic links (and a hard link) at every name the hook touches, pointing
//! at a root-owned file and directory outside the state directory; the real
//! hook (`cdpctl libvirt-hook`) then runs its prepare, start and release
//! phases. The victims stay as they were: same bytes, same owner, same mode,
//! nothing added, nothing removed (issue 11, item 6).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use cdp_tests::bin;

const QEMU_UID: u32 = 64055;
const QEMU_GID: u32 = 107;
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
        let cfg = root.join("cdp.toml");
        fs::write(
            &cfg,
            format!(
                "[paths]\nstate_dir = \"{0}/state\"\nrun_dir = \"{0}/run\"\n\
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
        self.root.join("state")
    }

    fn run(&self) -> PathBuf {
        self.root.join("run")
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

    /// A shell script run as QEMU's user; it must succeed (the attack is real).
    fn as_qemu(&self, script: &str) {
        let out = Command::new("sh")
            .arg("-ec")
            .arg(script)
            .current_dir(&self.root)
            .uid(QEMU_UID)
            .gid(QEMU_GID)
            .output()
            .unwrap();
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
         ln -sfn $vd {st}/vda/journal/sub
         ln -sfn $v {state}/catalog.sqlite
         ln -sfn $v {state}/catalog.sqlite-wal
         ln -sfn $vd {state}/catalog.sqlite-shm",
        v = h.victim.display(),
        vd = h.victim_dir.display(),
        run = vm_run.display(),
        st = vm_state.display(),
        state = h.state().display(),
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

#[test]
fn the_directories_themselves_replaced_by_links_are_refused() {
    let h = Host::new();
    ok(&h.hook("prepare", "begin"));
    let before = h.victims();
    let vm_run = h.run().join(UUID);
    let vm_state = h.state().join("vms").join(UUID);
    // Each per-VM directory in turn becomes a link to a root-owned
    // directory (holding a `domain.xml` of its own), then `<state>/vms`.
    let vms = h.state().join("vms");
    for (what, path) in [
        ("<run>/<uuid>", &vm_run),
        ("<state>/vms/<uuid>", &vm_state),
        ("<state>/vms", &vms),
    ] {
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
        // Back to a sane tree before the next one.
        h.as_qemu(&format!("rm -f {p}\nmkdir {p}", p = path.display()));
        ok(&h.hook("prepare", "begin"));
    }
    assert_eq!(h.victims(), before);
}
