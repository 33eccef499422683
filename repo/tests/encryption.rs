//! The encryption layer (docs/REPOSITORY_FORMAT.md, "Encryption"): sealing
//! roundtrips, any tampering fails, no input panics; and through a real
//! `file://` store: a repository with a key refuses readers without it or
//! with a wrong one, a flipped bit and a swapped object fail, a clear
//! repository is unchanged, ranged reads and listed sizes are plain.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use bytes::Bytes;
use cdp_repo::crypto::{self, KeyObject, KeySource, Keys};
use cdp_repo::format::ChunkNamer;
use cdp_repo::store::{Store, StoreError};
use proptest::prelude::*;

fn keys(secret: &[u8]) -> Keys {
    KeyObject::create(&KeySource::KeyFile("k".into()), secret)
        .unwrap()
        .1
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn seal_roundtrips_and_any_tamper_fails(
        data in proptest::collection::vec(any::<u8>(), 0..200_000),
        flip in any::<usize>(),
        bit in 0u8..8,
        cut in any::<usize>(),
    ) {
        let k = keys(&[7u8; 32]);
        let name = "cdp/v1/vms/u/vda/journal/1-2.seg.zst";
        let sealed = k.seal(name, &data);
        prop_assert_eq!(sealed.len() as u64, crypto::sealed_len(data.len() as u64));
        prop_assert_eq!(crypto::plain_len(sealed.len() as u64), Some(data.len() as u64));
        prop_assert_eq!(&k.open(name, &sealed).unwrap(), &data);
        // Deterministic: the same object sealed again is the same bytes.
        prop_assert_eq!(&k.seal(name, &data), &sealed);
        // Any flipped bit fails.
        let mut bad = sealed.clone();
        let i = flip % bad.len();
        bad[i] ^= 1 << bit;
        prop_assert!(k.open(name, &bad).is_err());
        // Cut short fails.
        let c = cut % sealed.len();
        prop_assert!(k.open(name, &sealed[..c]).is_err());
        // Another name (a swapped object) fails; another key fails.
        prop_assert!(k.open("cdp/v1/vms/u/vda/journal/3-4.seg.zst", &sealed).is_err());
        prop_assert!(keys(&[8u8; 32]).open(name, &sealed).is_err());
    }

    #[test]
    fn opening_any_bytes_never_panics(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let k = keys(&[1u8; 32]);
        let _ = k.open("a", &data);
        let _ = crypto::plain_len(data.len() as u64);
        let _ = KeyObject::decode(&data);
        if let Ok((h, plain)) = crypto::parse_header("a", &data) {
            let _ = k.open_blocks("a", &h, plain, 0, &data[32..]);
        }
    }

    #[test]
    fn plain_len_inverts_sealed_len(n in 0u64..(1 << 40)) {
        prop_assert_eq!(crypto::plain_len(crypto::sealed_len(n)), Some(n));
    }
}

fn secret_file(dir: &Path, name: &str, body: &[u8], mode: u32) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

fn open(root: &Path, key: Option<KeySource>) -> Store {
    Store::open(&format!("file://{}", root.display()), None)
        .unwrap()
        .with_key_source(key)
}

#[test]
fn secret_files_readable_by_others_are_refused_with_the_chmod() {
    let d = tempfile::tempdir().unwrap();
    let p = secret_file(d.path(), "k", &[3u8; 32], 0o644);
    let e = KeySource::KeyFile(p.clone())
        .read()
        .unwrap_err()
        .to_string();
    assert!(e.contains("chmod"), "{e}");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(KeySource::KeyFile(p.clone()).read().unwrap(), vec![3u8; 32]);
    let short = secret_file(d.path(), "s", b"short", 0o600);
    assert!(KeySource::KeyFile(short).read().is_err());
    let link = d.path().join("link");
    std::os::unix::fs::symlink(&p, &link).unwrap();
    assert!(KeySource::KeyFile(link).read().is_err());
}

#[test]
fn store_layer_encrypts_authenticates_and_refuses_without_the_key() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("repo");
    std::fs::create_dir(&root).unwrap();
    let pass = secret_file(d.path(), "pass", b"correct horse battery\n", 0o600);
    let wrong = secret_file(d.path(), "wrong", b"incorrect horse battery\n", 0o600);
    let kf = secret_file(d.path(), "kf", &[9u8; 32], 0o600);
    let src = KeySource::PassphraseFile(pass);
    let rt = rt();
    let s = open(&root, Some(src.clone()));
    rt.block_on(s.init_encryption(&src)).unwrap();
    // Twice is refused: the repository already has a key.
    assert!(rt.block_on(s.init_encryption(&src)).is_err());

    let plain: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let k1 = "cdp/v1/vms/u/vda/journal/00000000000000000001-00000000000000000002.seg.zst";
    let k2 = "cdp/v1/vms/u/vda/journal/00000000000000000003-00000000000000000004.seg.zst";
    rt.block_on(s.put(k1, Bytes::from(plain.clone()))).unwrap();
    rt.block_on(s.put(k2, Bytes::from(vec![5u8; 1000])))
        .unwrap();
    // A re-upload of the same object is success (deterministic sealing).
    rt.block_on(s.put(k1, Bytes::from(plain.clone()))).unwrap();
    let raw = std::fs::read(root.join(k1)).unwrap();
    assert!(
        !raw.windows(64).any(|w| w == &plain[1000..1064]),
        "plain bytes stored"
    );
    assert_eq!(rt.block_on(s.get(k1)).unwrap(), plain);
    for r in [
        0..10u64,
        65_530..65_600,
        131_072..131_073,
        299_000..300_000,
        0..300_000,
    ] {
        let got = rt.block_on(s.get_range(k1, r.clone())).unwrap();
        assert_eq!(&got[..], &plain[r.start as usize..r.end as usize], "{r:?}");
    }
    let listed = rt.block_on(s.list("cdp/v1/vms/")).unwrap();
    assert_eq!(listed[0].size, plain.len() as u64);
    assert!(matches!(
        rt.block_on(s.chunk_namer()).unwrap(),
        ChunkNamer::Keyed(_)
    ));
    assert_ne!(
        rt.block_on(s.chunk_namer()).unwrap().name(b"x"),
        ChunkNamer::Plain.name(b"x")
    );

    // Without a key: refused, naming the option.
    let none = open(&root, None);
    let e = rt.block_on(none.get(k1)).unwrap_err().to_string();
    assert!(
        e.contains("passphrase_file") && e.contains("encrypted"),
        "{e}"
    );
    assert!(rt.block_on(none.put(k2, Bytes::from_static(b"x"))).is_err());
    assert!(rt.block_on(none.list("cdp/v1/vms/")).is_err());
    // A wrong passphrase, or a key file for a passphrase repository.
    let e = rt
        .block_on(open(&root, Some(KeySource::PassphraseFile(wrong))).get(k1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not unwrap"), "{e}");
    let e = rt
        .block_on(open(&root, Some(KeySource::KeyFile(kf))).get(k1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("passphrase_file"), "{e}");

    // A flipped bit, and a swapped object (k2's bytes under k1's name).
    let p1 = root.join(k1);
    let mut bad = raw.clone();
    bad[70_000] ^= 0x10;
    let replace = |bytes: &[u8]| {
        std::fs::remove_file(&p1).unwrap();
        std::fs::write(&p1, bytes).unwrap();
    };
    replace(&bad);
    let fresh = open(&root, Some(src.clone()));
    let e = rt.block_on(fresh.get(k1)).unwrap_err();
    assert!(matches!(e, StoreError::Sealed { .. }), "{e}");
    assert!(e.to_string().contains("fails authentication"), "{e}");
    assert!(rt.block_on(fresh.get_range(k1, 65_536..65_600)).is_err());
    assert_eq!(
        rt.block_on(fresh.get_range(k1, 0..100)).unwrap(),
        &plain[..100]
    );
    replace(&std::fs::read(root.join(k2)).unwrap());
    let e = rt.block_on(fresh.get(k1)).unwrap_err();
    assert!(matches!(e, StoreError::Sealed { .. }), "{e}");
}

#[test]
fn a_clear_repository_is_unchanged_and_a_key_for_it_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("repo");
    std::fs::create_dir(&root).unwrap();
    let kf = secret_file(d.path(), "kf", &[9u8; 32], 0o600);
    let rt = rt();
    let s = open(&root, None);
    rt.block_on(s.put("cdp/v1/x", Bytes::from_static(b"hello")))
        .unwrap();
    assert_eq!(std::fs::read(root.join("cdp/v1/x")).unwrap(), b"hello");
    assert_eq!(rt.block_on(s.chunk_namer()).unwrap(), ChunkNamer::Plain);
    let e = rt
        .block_on(open(&root, Some(KeySource::KeyFile(kf.clone()))).get("cdp/v1/x"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("has no key"), "{e}");
    // A repository with objects cannot be made encrypted.
    let e = rt
        .block_on(s.init_encryption(&KeySource::KeyFile(kf)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("already holds objects"), "{e}");
}
