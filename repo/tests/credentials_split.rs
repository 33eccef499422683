//! The credentials split (issue 11, "Credentials split"; docs/CREDENTIALS.md):
//! retention and prune use a target's `prune_credentials_file`, shipping
//! only its `credentials_file`; a prune credential other users can read is
//! refused. Against a real S3 server on loopback (moto) that checks every
//! request's signature.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use cdp_core::config::{Retention, Target};
use cdp_core::journal::format::Kind;
use cdp_core::journal::writer::{OpenSegment, Record};
use cdp_repo::format as rf;
use cdp_repo::store::{shared_credential_warning, Store, StoreError};
use common::S3Server;

const VM: &str = "0b5c6a3e-1d2f-4a5b-8c9d-0e1f2a3b4c5d";
const MIB: u64 = 1 << 20;

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn target(url: &str, creds: &Path, prune: Option<&Path>) -> Target {
    Target {
        url: url.to_string(),
        delay: None,
        credentials_file: Some(creds.to_path_buf()),
        prune_credentials_file: prune.map(Path::to_path_buf),
        rate: None,
        capacity: None,
        key_file: None,
        passphrase_file: None,
    }
}

/// A VM's history as the shipper leaves it: a baseline of an empty disk at
/// seq 1, then one sealed segment (a 4 KiB write at seq 6). Retention with
/// a one-second window far in the future starts the window at seq 6: it
/// writes an exact baseline there and deletes the old baseline.
async fn ship_history(s: &Store, work: &Path) {
    s.put(rf::FORMAT_KEY, Bytes::from(rf::format_marker()))
        .await
        .unwrap();
    let vm_json = serde_json::json!({"uuid": VM, "name": "guest", "disks": [
        {"name": "vda", "size": MIB, "source_path": "/nonexistent/vda.img"}]});
    s.put(&rf::vm_json_key(VM), Bytes::from(vm_json.to_string()))
        .await
        .unwrap();
    let b = rf::Baseline {
        vm_uuid: VM.into(),
        disk: "vda".into(),
        size: MIB,
        chunk_size: rf::CHUNK_SIZE,
        s0: 1,
        s1: 1,
        started_ns: 1,
        finished_ns: 2,
        chunks: vec![None],
    };
    s.put(
        &rf::baseline_key(VM, "vda", 1, 1),
        Bytes::from(serde_json::to_vec(&b).unwrap()),
    )
    .await
    .unwrap();
    let uuid: Vec<u8> = (0..16)
        .map(|i| {
            let hex: String = VM.chars().filter(|c| *c != '-').collect();
            u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap()
        })
        .collect();
    let mut seg = OpenSegment::create(work, uuid.try_into().unwrap(), 6, 0, 10).unwrap();
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
    s.put(&rf::segment_key(VM, "vda", 6, 6), Bytes::from(obj))
        .await
        .unwrap();
    s.put(&rf::index_key(VM, "vda", 6, 6), Bytes::from(idx.encode()))
        .await
        .unwrap();
}

async fn keys(s: &Store) -> Vec<String> {
    s.list("")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect()
}

struct Creds {
    _dir: tempfile::TempDir,
    good: PathBuf,
    bad: PathBuf,
}

/// Two credential files for the same moto user: the right secret and a
/// wrong one, both mode 0600 owned by this user (root).
fn creds(server: &S3Server) -> Creds {
    let (id, secret) = server.enable_auth();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.cred");
    let bad = dir.path().join("bad.cred");
    std::fs::copy(server.credentials_file(&id, &secret), &good).unwrap();
    std::fs::copy(server.credentials_file(&id, "wrong-secret"), &bad).unwrap();
    chmod(&good, 0o600);
    chmod(&bad, 0o600);
    Creds {
        _dir: dir,
        good,
        bad,
    }
}

/// Prune reads `prune_credentials_file`, never the shipping credential:
/// with a wrong secret in `credentials_file` and the right one in
/// `prune_credentials_file`, shipping is refused and retention runs
/// (writes its exact baseline, deletes the old history).
#[tokio::test]
async fn prune_uses_the_prune_credential_and_shipping_never_does() {
    let server = S3Server::start(&["split"]);
    let c = creds(&server);
    let url = server.url("split", "r");
    let work = tempfile::tempdir().unwrap();
    let owner = Store::open(&url, Some(&c.good)).unwrap();
    ship_history(&owner, work.path()).await;
    let before = keys(&owner).await;

    let t = target(&url, &c.bad, Some(&c.good));
    // Shipping (Store::for_target, what cdp-shipper opens) uses the bad
    // credential: refused, nothing written.
    let ship = Store::for_target(&t).unwrap();
    let e = ship
        .put("cdp/v1/chunks/x", Bytes::from_static(b"x"))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Auth { .. }), "{e:?}");
    assert_eq!(keys(&owner).await, before);
    // No warning: the target has its own prune credential.
    assert_eq!(shared_credential_warning("offsite", &t), None);

    // Prune (Store::for_prune, what cdpctl prune and the agent open) uses the
    // good one: retention runs, writes (chunk, exact baseline, manifest)
    // and deletes.
    let prune = Store::for_prune(&t).unwrap();
    let r = Retention {
        any_point: std::time::Duration::from_secs(1),
        thin: vec![],
    };
    let far = cdp_core::time::now_ns() + 3600 * 1_000_000_000;
    let report = cdp_repo::retention::apply(&prune, VM, &r, far, false)
        .await
        .unwrap();
    assert_eq!(report.synthetic_baselines, 1, "{report:?}");
    assert_eq!(report.baselines_deleted, 1, "{report:?}");
    let after = keys(&owner).await;
    assert!(
        !after.contains(&rf::baseline_key(VM, "vda", 1, 1)),
        "{after:?}"
    );
    assert!(
        after.contains(&rf::baseline_key(VM, "vda", 6, 6)),
        "{after:?}"
    );
    // The prune is the only one of the two that could delete: with the
    // roles swapped, retention is refused before it deletes anything.
    let swapped = target(&url, &c.good, Some(&c.bad));
    Store::for_target(&swapped).unwrap().check().await.unwrap();
    let e = cdp_repo::retention::apply(&Store::for_prune(&swapped).unwrap(), VM, &r, far, false)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("access denied"), "{e}");
    assert_eq!(keys(&owner).await, after);
}

/// A prune credential group or others can read, or that another user owns,
/// is refused at load with how to fix it; the shipper, which never reads
/// it, does not care. Without one, prune falls back to `credentials_file`
/// and says that shipping and pruning share a credential.
#[tokio::test]
async fn a_prune_credential_others_can_read_is_refused() {
    let server = S3Server::start(&["perm"]);
    let c = creds(&server);
    let url = server.url("perm", "");
    let t = target(&url, &c.good, Some(&c.good));
    for mode in [0o644, 0o640, 0o604, 0o660] {
        chmod(&c.good, mode);
        let e = Store::for_prune(&t).unwrap_err();
        assert!(matches!(e, StoreError::Config { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("chmod 600"), "{mode:o}: {msg}");
        assert!(msg.contains(&c.good.display().to_string()), "{msg}");
        assert!(msg.contains(&format!("{mode:04o}")), "{msg}");
        // Shipping never reads it: the shipping store opens and works.
        Store::for_target(&t).unwrap().check().await.unwrap();
    }
    chmod(&c.good, 0o600);
    Store::for_prune(&t).unwrap().check().await.unwrap();
    // Owned by another user (the QEMU user, say): refused too.
    std::os::unix::fs::chown(&c.good, Some(64055), None).unwrap();
    let msg = Store::for_prune(&t).unwrap_err().to_string();
    assert!(msg.contains("chown root"), "{msg}");
    std::os::unix::fs::chown(&c.good, Some(0), None).unwrap();
    // A symlink to a good file is not the file.
    let link = c.good.with_extension("link");
    std::os::unix::fs::symlink(&c.good, &link).unwrap();
    let msg = Store::for_prune(&target(&url, &c.good, Some(&link)))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("not a regular file"), "{msg}");

    // No prune credential: prune uses the shipping one, with the warning.
    let shared = target(&url, &c.good, None);
    Store::for_prune(&shared).unwrap().check().await.unwrap();
    let w = shared_credential_warning("offsite", &shared).unwrap();
    assert!(w.contains("shipping and pruning share a credential"), "{w}");
    assert!(!w.contains('\n'), "{w}");
}
