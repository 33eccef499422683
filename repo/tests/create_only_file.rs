//! A `file://` repository owned by the agent's identity and shared with the
//! shippers through a group (docs/CREDENTIALS.md, "file:// targets"):
//! directories root creates take the root's group-write and set-group-ID
//! bits plus the sticky bit, so QEMU's user (a real unprivileged uid here)
//! can add objects but cannot delete, rename over or rewrite root's.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::Bytes;
use cdp_repo::store::{Store, StoreError};

/// QEMU's user on Debian/Ubuntu (and its group).
const QEMU_USER: u32 = 64055;
const VM: &str = "0b5c6a3e-1d2f-4a5b-8c9d-0e1f2a3b4c5d";

/// Run `sh -c script` in `dir` as QEMU's user; whether it succeeded.
fn as_qemu(dir: &Path, script: &str) -> bool {
    Command::new("sh")
        .args(["-c", script])
        .uid(QEMU_USER)
        .gid(QEMU_USER)
        .current_dir(dir)
        .status()
        .unwrap()
        .success()
}

fn repo() -> (tempfile::TempDir, PathBuf) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test runs root's writes against an unprivileged user: run it as root"
    );
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let repo = tmp.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    // The recipe: root:<shippers' group>, 3770 (set-group-ID, sticky).
    std::os::unix::fs::chown(&repo, Some(0), Some(QEMU_USER)).unwrap();
    std::fs::set_permissions(&repo, std::fs::Permissions::from_mode(0o3770)).unwrap();
    (tmp, repo)
}

#[tokio::test]
async fn qemus_user_adds_objects_but_cannot_remove_or_replace_roots() {
    let (_tmp, root) = repo();
    let store = Store::open(&format!("file://{}", root.display()), None).unwrap();
    let dir = format!("cdp/v1/vms/{VM}/retention");
    let key = format!("{dir}/00000000000000000001.json");
    store
        .put(&key, Bytes::from_static(b"root's manifest"))
        .await
        .unwrap();
    // Every directory root made: root:<group>, the root's bits plus sticky.
    let mut d = PathBuf::new();
    for comp in dir.split('/') {
        d.push(comp);
        let m = std::fs::metadata(root.join(&d)).unwrap();
        assert_eq!(
            (m.uid(), m.gid(), m.mode() & 0o7777),
            (0, QEMU_USER, 0o3770),
            "{d:?}"
        );
    }
    let m = std::fs::metadata(root.join(".cdp-staging")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o3770, ".cdp-staging");

    let at = root.join(&dir);
    // QEMU's user can ship: it creates objects of its own there.
    assert!(
        as_qemu(&at, "echo shipped > mine && test -f mine"),
        "QEMU's user cannot create an object in a directory root made"
    );
    // Root's own put never replaces what is there (its own or another's).
    let e = store
        .put(&format!("{dir}/mine"), Bytes::from_static(b"root's"))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Exists { .. }), "{e:?}");
    assert_eq!(std::fs::read(at.join("mine")).unwrap(), b"shipped\n");
    // QEMU's user cannot delete root's object, rename over it, rewrite it,
    // nor remove or rename root's directories (what it can remove is its
    // own objects: DAC cannot prevent that).
    let name = "00000000000000000001.json";
    assert!(!as_qemu(&at, &format!("rm -f {name} && ! test -e {name}")));
    assert!(!as_qemu(&at, &format!("mv -f mine {name}")));
    assert!(!as_qemu(&at, &format!("echo evil > {name}")));
    assert!(!as_qemu(&root, &format!("rm -rf cdp/v1/vms/{VM}")));
    assert!(!as_qemu(&root.join(&dir).join(".."), "mv retention gone"));
    assert_eq!(
        std::fs::read(root.join(&key)).unwrap(),
        b"root's manifest",
        "root's object changed"
    );
}
