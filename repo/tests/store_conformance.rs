//! One conformance suite for every storage backend: two S3-compatible
//! servers on loopback (moto, an emulator; Garage, a real object store, one
//! node) and a `file://` directory. Then how each fails: nothing listening, a
//! server that dies and comes back, bad credentials, bad URLs, a server that
//! ignores conditional writes (Garage).

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cdp_repo::store::{with_retry, RetryPolicy, Store, StoreError};
use common::{GarageServer, S3Server};

const BUCKET: &str = "cdp-test";
const MIB: usize = 1 << 20;

/// A store under test and what keeps its backend alive.
struct Fixture {
    store: Store,
    _server: Option<S3Server>,
    _garage: Option<GarageServer>,
    _dir: Option<tempfile::TempDir>,
}

impl Fixture {
    fn s3() -> Fixture {
        let server = S3Server::start(&[BUCKET]);
        let creds = server.credentials_file("testing", "testing");
        let store = Store::open(&server.url(BUCKET, "pre/fix"), Some(&creds)).unwrap();
        Fixture {
            store,
            _server: Some(server),
            _garage: None,
            _dir: None,
        }
    }

    /// Garage ignores `If-None-Match`: its URL says
    /// `conditional_put=check-first` (see `garage_ignores_conditional_writes_*`).
    fn garage() -> Fixture {
        let garage = GarageServer::start(&[BUCKET]);
        let url = format!(
            "{}&conditional_put=check-first",
            garage.url(BUCKET, "pre/fix")
        );
        let store = Store::open(&url, Some(&garage.credentials())).unwrap();
        Fixture {
            store,
            _server: None,
            _garage: Some(garage),
            _dir: None,
        }
    }

    fn file() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("file://{}", dir.path().display()), None).unwrap();
        Fixture {
            store,
            _server: None,
            _garage: None,
            _dir: Some(dir),
        }
    }
}

/// Pseudo-random bytes (xorshift), so a misplaced range shows.
fn pattern(len: usize, seed: u64) -> Bytes {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    Bytes::from(v)
}

fn keys(list: &[cdp_repo::store::ObjectMeta]) -> Vec<&str> {
    list.iter().map(|o| o.key.as_str()).collect()
}

/// Generate one test per check and backend: `s3::<check>` (moto),
/// `garage::<check>`, `file::<check>`.
macro_rules! conformance {
    ($($check:ident),* $(,)?) => {
        mod s3 {
            $(
                #[tokio::test]
                async fn $check() {
                    let f = super::Fixture::s3();
                    super::$check(&f.store).await;
                }
            )*
        }
        mod garage {
            $(
                #[tokio::test]
                async fn $check() {
                    let f = super::Fixture::garage();
                    super::$check(&f.store).await;
                }
            )*
        }
        mod file {
            $(
                #[tokio::test]
                async fn $check() {
                    let f = super::Fixture::file();
                    super::$check(&f.store).await;
                }
            )*
        }
    };
}

conformance!(
    roundtrip,
    get_range,
    list_sorted_with_prefix_semantics,
    delete,
    not_found,
    large_object,
    many_components,
    invalid_keys,
    check_and_free_space,
    readers_never_see_partial_objects,
);

#[tokio::test]
async fn s3_objects_are_created_never_replaced() {
    let f = Fixture::s3();
    objects_are_created_never_replaced(&f.store).await;
}

/// On Garage, with `conditional_put=check-first`: create-only holds for
/// one writer (the key is read before each put).
#[tokio::test]
async fn garage_objects_are_created_never_replaced() {
    let f = Fixture::garage();
    objects_are_created_never_replaced(&f.store).await;
}

#[tokio::test]
async fn file_objects_are_created_never_replaced() {
    let f = Fixture::file();
    objects_are_created_never_replaced(&f.store).await;
    // A refused put leaves nothing in the staging directory.
    let root = f.store.url().strip_prefix("file://").unwrap();
    let staging: Vec<_> = std::fs::read_dir(Path::new(root).join(".cdp-staging"))
        .unwrap()
        .collect();
    assert!(staging.is_empty(), "{staging:?}");
}

async fn roundtrip(s: &Store) {
    let data = pattern(1000, 1);
    s.put("cdp/v1/x", data.clone()).await.unwrap();
    assert_eq!(s.get("cdp/v1/x").await.unwrap(), data);
    // Replace (retention's, with the prune credential) replaces.
    s.replace("cdp/v1/x", Bytes::from_static(b"second"))
        .await
        .unwrap();
    assert_eq!(
        s.get("cdp/v1/x").await.unwrap(),
        Bytes::from_static(b"second")
    );
    // Empty objects exist.
    s.put("cdp/v1/empty", Bytes::new()).await.unwrap();
    assert_eq!(s.get("cdp/v1/empty").await.unwrap().len(), 0);
    let l = s.list("cdp/v1/").await.unwrap();
    assert_eq!(keys(&l), ["cdp/v1/empty", "cdp/v1/x"]);
    assert_eq!(l[0].size, 0);
    assert_eq!(l[1].size, 6);
    // Other allowed characters.
    let odd = "cdp/v1/a:b=c,d@e+f_g-h.i";
    s.put(odd, Bytes::from_static(b"1")).await.unwrap();
    assert_eq!(s.get(odd).await.unwrap(), Bytes::from_static(b"1"));
    // Listed under exactly the key it was put with (no escaping shows).
    assert_eq!(
        keys(&s.list("cdp/v1/").await.unwrap()),
        [odd, "cdp/v1/empty", "cdp/v1/x"]
    );
}

async fn get_range(s: &Store) {
    let data = pattern(10_000, 2);
    s.put("r/obj", data.clone()).await.unwrap();
    for r in [
        0..1u64,
        0..10_000,
        1..2,
        4096..8192,
        9_999..10_000,
        123..9_877,
    ] {
        let got = s.get_range("r/obj", r.clone()).await.unwrap();
        assert_eq!(
            got,
            data.slice(r.start as usize..r.end as usize),
            "range {r:?}"
        );
    }
    // An empty range is empty, without asking the backend.
    assert_eq!(s.get_range("r/obj", 5..5).await.unwrap().len(), 0);
    // A range past the end is an error, and a permanent one.
    for r in [9_000..10_001u64, 10_000..10_010, 20_000..20_001] {
        match s.get_range("r/obj", r.clone()).await {
            Err(e) => {
                eprintln!("range {r:?} past the end: {e}");
                assert!(!e.is_transient(), "{e}");
                assert!(
                    !matches!(e, StoreError::NotFound { .. }),
                    "range {r:?}: {e}"
                );
            }
            Ok(b) => panic!("range {r:?} past the end returned {} bytes", b.len()),
        }
    }
    let e = s.get_range("r/missing", 0..1).await.unwrap_err();
    assert!(matches!(e, StoreError::NotFound { .. }), "{e}");
}

async fn list_sorted_with_prefix_semantics(s: &Store) {
    let mut put = vec![
        "a/b/2", "a/b/10", "a/b/1", "a/bc/1", "a/bcd", "a/b/c/d", "b/x", "a0",
    ];
    // Put in a scrambled order: the listing sorts.
    put.reverse();
    put.swap(1, 5);
    for (i, k) in put.iter().enumerate() {
        s.put(k, pattern(i + 1, i as u64)).await.unwrap();
    }
    let l = s.list("a/b/").await.unwrap();
    assert_eq!(keys(&l), ["a/b/1", "a/b/10", "a/b/2", "a/b/c/d"]);
    for o in &l {
        let i = put.iter().position(|k| *k == o.key).unwrap();
        assert_eq!(o.size, (i + 1) as u64, "{}", o.key);
    }
    assert_eq!(
        keys(&s.list("a/").await.unwrap()),
        ["a/b/1", "a/b/10", "a/b/2", "a/b/c/d", "a/bc/1", "a/bcd"]
    );
    assert_eq!(keys(&s.list("a/bc/").await.unwrap()), ["a/bc/1"]);
    assert_eq!(keys(&s.list("a/b/c/").await.unwrap()), ["a/b/c/d"]);
    // A partial last component is a plain string prefix.
    assert_eq!(
        keys(&s.list("a/b").await.unwrap()),
        ["a/b/1", "a/b/10", "a/b/2", "a/b/c/d", "a/bc/1", "a/bcd"]
    );
    assert_eq!(keys(&s.list("a/bc").await.unwrap()), ["a/bc/1", "a/bcd"]);
    let all = s.list("").await.unwrap();
    let mut want = put.clone();
    want.sort();
    assert_eq!(keys(&all), want);
    assert!(s.list("nothing/here/").await.unwrap().is_empty());
    // A key as a directory prefix lists nothing (there is nothing under it).
    assert!(s.list("a/bcd/").await.unwrap().is_empty());
}

async fn delete(s: &Store) {
    s.put("d/1", Bytes::from_static(b"one")).await.unwrap();
    s.put("d/2", Bytes::from_static(b"two")).await.unwrap();
    s.delete("d/1").await.unwrap();
    assert!(matches!(
        s.get("d/1").await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(keys(&s.list("d/").await.unwrap()), ["d/2"]);
    // Deleting a missing object succeeds (as on S3).
    s.delete("d/1").await.unwrap();
    s.delete("d/never").await.unwrap();
    s.delete("d/2").await.unwrap();
    assert!(s.list("d/").await.unwrap().is_empty());
}

async fn not_found(s: &Store) {
    let e = s.get("cdp/v1/missing").await.unwrap_err();
    match &e {
        StoreError::NotFound { key, url } => {
            assert_eq!(key, "cdp/v1/missing");
            assert_eq!(url, s.url());
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert!(!e.is_transient());
    assert!(e.to_string().contains("cdp/v1/missing"), "{e}");
    // A "directory" is not an object.
    s.put("nf/dir/obj", Bytes::from_static(b"x")).await.unwrap();
    assert!(matches!(
        s.get("nf/dir").await,
        Err(StoreError::NotFound { .. })
    ));
}

async fn large_object(s: &Store) {
    let data = pattern(20 * MIB + 12_345, 3);
    let t = Instant::now();
    s.put("big/obj", data.clone()).await.unwrap();
    let got = s.get("big/obj").await.unwrap();
    assert!(got == data, "20 MiB object differs after the roundtrip");
    let r = 7 * MIB as u64 + 3..13 * MIB as u64 + 5;
    assert_eq!(
        s.get_range("big/obj", r.clone()).await.unwrap(),
        data.slice(r.start as usize..r.end as usize)
    );
    assert_eq!(s.list("big/").await.unwrap()[0].size, data.len() as u64);
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "20 MiB took {:?}",
        t.elapsed()
    );
}

async fn many_components(s: &Store) {
    let parts: Vec<String> = (0..40).map(|i| format!("c{i:02}")).collect();
    let key = parts.join("/");
    s.put(&key, Bytes::from_static(b"deep")).await.unwrap();
    assert_eq!(s.get(&key).await.unwrap(), Bytes::from_static(b"deep"));
    let mid = format!("{}/", parts[..20].join("/"));
    assert_eq!(keys(&s.list(&mid).await.unwrap()), [key.as_str()]);
    // A journal-like layout: many siblings, listed in replay order.
    let prefix = "cdp/v1/vms/0b7c5a8e-2f1d-4e57-9a4c-1f2e3d4c5b6a/vda/journal/";
    let mut want = Vec::new();
    for i in (0..50u64).rev() {
        let k = format!("{prefix}{:020}-{:020}.seg.zst", i * 100, i * 100 + 99);
        s.put(&k, Bytes::from(vec![b'j'; i as usize]))
            .await
            .unwrap();
        want.push(k);
    }
    want.sort();
    let got = s.list(prefix).await.unwrap();
    assert_eq!(
        keys(&got),
        want.iter().map(String::as_str).collect::<Vec<_>>()
    );
}

async fn invalid_keys(s: &Store) {
    for bad in [
        "",
        "/abs",
        "a/../b",
        "..",
        "a//b",
        "a/",
        "a/.hidden",
        "sp ace",
        "a\\b",
        "a~b",
        "a%2Fb",
    ] {
        let e = s.put(bad, Bytes::from_static(b"x")).await.unwrap_err();
        assert!(matches!(e, StoreError::InvalidKey { .. }), "{bad:?}: {e}");
        assert!(!e.is_transient());
        assert!(
            matches!(s.get(bad).await, Err(StoreError::InvalidKey { .. })),
            "{bad:?}"
        );
        assert!(
            matches!(s.delete(bad).await, Err(StoreError::InvalidKey { .. })),
            "{bad:?}"
        );
    }
    for bad in ["/", "../", "a//"] {
        assert!(
            matches!(s.list(bad).await, Err(StoreError::InvalidKey { .. })),
            "{bad:?}"
        );
    }
    // Nothing was written.
    assert!(s.list("").await.unwrap().is_empty());
}

async fn check_and_free_space(s: &Store) {
    s.check().await.unwrap();
    if s.url().starts_with("file://") {
        assert!(s.free_space().unwrap() > 0);
    } else {
        assert_eq!(s.free_space(), None);
    }
}

/// Writers replace an object (`Store::replace`) while readers read it:
/// every read sees one whole version, never a mix or a prefix.
async fn readers_never_see_partial_objects(s: &Store) {
    const LEN: usize = 2 * MIB;
    s.put("atomic/obj", Bytes::from(vec![0u8; LEN]))
        .await
        .unwrap();
    let writer = {
        let s = s.clone();
        tokio::spawn(async move {
            for i in 1..=12u8 {
                s.replace("atomic/obj", Bytes::from(vec![i; LEN]))
                    .await
                    .unwrap();
            }
        })
    };
    let mut reads = 0;
    // moto answers a GET or a LIST racing a PUT of the same key with a 500
    // now and then: a transient server error, retried as the shipper would.
    let retry = RetryPolicy::default();
    while !writer.is_finished() {
        let b = with_retry("get", &retry, || s.get("atomic/obj"))
            .await
            .unwrap();
        assert_eq!(b.len(), LEN, "a partial object was visible");
        assert!(b.iter().all(|&x| x == b[0]), "a mixed object was visible");
        let l = with_retry("list", &retry, || s.list("atomic/"))
            .await
            .unwrap();
        assert_eq!(keys(&l), ["atomic/obj"], "staging files are visible");
        reads += 1;
    }
    writer.await.unwrap();
    assert!(reads > 0);
    assert_eq!(s.get("atomic/obj").await.unwrap()[0], 12);
}

/// `Store::put` creates, never replaces: a second put of other bytes under
/// a key is refused with an error naming the key and the original stays
/// (docs/SPECIFICATION.md, "Trust boundaries"); the same bytes again (a
/// re-upload after a crash) succeed; nothing is left behind in staging.
async fn objects_are_created_never_replaced(s: &Store) {
    let key = "cdp/v1/vms/u/vda/journal/0000000000000001-0000000000000002.seg.zst";
    let original = pattern(3000, 7);
    s.put(key, original.clone()).await.unwrap();
    // Other bytes, same length and different length.
    for other in [pattern(3000, 8), Bytes::from_static(b"short")] {
        let e = s.put(key, other).await.unwrap_err();
        assert!(matches!(e, StoreError::Exists { .. }), "{e:?}");
        assert!(!e.is_transient(), "{e}");
        assert!(e.to_string().contains(key), "{e}");
        assert!(e.to_string().contains("never replaced"), "{e}");
        assert_eq!(s.get(key).await.unwrap(), original, "the original changed");
    }
    // Identical bytes again: success, unchanged.
    s.put(key, original.clone()).await.unwrap();
    assert_eq!(s.get(key).await.unwrap(), original);
    // An empty object, twice.
    s.put("cdp/v1/empty", Bytes::new()).await.unwrap();
    s.put("cdp/v1/empty", Bytes::new()).await.unwrap();
    let e = s
        .put("cdp/v1/empty", Bytes::from_static(b"x"))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Exists { .. }), "{e:?}");
    assert_eq!(s.get("cdp/v1/empty").await.unwrap().len(), 0);
    assert_eq!(
        keys(&s.list("").await.unwrap()),
        ["cdp/v1/empty", key],
        "a refused put left something behind"
    );
}

// ---------------------------------------------------------------------------
// Backend specifics.

/// Keys live under the URL's prefix: `s3://bucket/pre/fix` + `k` is object
/// `pre/fix/k`; a store at the bucket root sees it there.
#[tokio::test]
async fn s3_keys_live_under_the_url_prefix() {
    let server = S3Server::start(&[BUCKET]);
    let creds = server.credentials_file("testing", "testing");
    let inner = Store::open(&server.url(BUCKET, "pre/fix"), Some(&creds)).unwrap();
    let root = Store::open(&server.url(BUCKET, ""), Some(&creds)).unwrap();
    let sibling = Store::open(&server.url(BUCKET, "pre/fixed"), Some(&creds)).unwrap();
    inner
        .put("cdp/v1/x", Bytes::from_static(b"in"))
        .await
        .unwrap();
    sibling
        .put("cdp/v1/y", Bytes::from_static(b"sib"))
        .await
        .unwrap();
    assert_eq!(
        root.get("pre/fix/cdp/v1/x").await.unwrap(),
        Bytes::from_static(b"in")
    );
    assert_eq!(keys(&inner.list("").await.unwrap()), ["cdp/v1/x"]);
    assert_eq!(keys(&sibling.list("").await.unwrap()), ["cdp/v1/y"]);
    assert_eq!(
        keys(&root.list("pre/").await.unwrap()),
        ["pre/fix/cdp/v1/x", "pre/fixed/cdp/v1/y"]
    );
    inner.check().await.unwrap();
    root.check().await.unwrap();
}

#[tokio::test]
async fn file_objects_are_files_under_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&format!("file://{}", dir.path().display()), None).unwrap();
    s.put("cdp/v1/x", Bytes::from_static(b"data"))
        .await
        .unwrap();
    assert_eq!(std::fs::read(dir.path().join("cdp/v1/x")).unwrap(), b"data");
    // Leftovers of an interrupted put (in the staging directory) and hidden
    // files are not objects.
    s.check().await.unwrap();
    std::fs::write(dir.path().join(".cdp-staging/123-0-0"), b"partial").unwrap();
    std::fs::write(dir.path().join("cdp/.hidden"), b"h").unwrap();
    assert_eq!(keys(&s.list("").await.unwrap()), ["cdp/v1/x"]);
    // check() removes staging leftovers older than an hour, not fresh ones
    // (another process may be writing them).
    let stale = dir.path().join(".cdp-staging/99-0-0");
    std::fs::write(&stale, b"old").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&stale)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - Duration::from_secs(7200))
        .unwrap();
    s.check().await.unwrap();
    assert!(!stale.exists());
    assert!(dir.path().join(".cdp-staging/123-0-0").exists());
    // The root may be given with a trailing slash, or as file://localhost/.
    let s2 = Store::open(&format!("file://localhost{}/", dir.path().display()), None).unwrap();
    assert_eq!(
        s2.get("cdp/v1/x").await.unwrap(),
        Bytes::from_static(b"data")
    );
}

// ---------------------------------------------------------------------------
// Failure behaviour.

fn quick_retry() -> RetryPolicy {
    RetryPolicy {
        initial_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(400),
        max_attempts: 4,
        deadline: Duration::from_secs(5),
        on_retry: None,
    }
}

#[tokio::test]
async fn s3_unreachable_endpoint() {
    let port = common::free_port();
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("creds");
    std::fs::write(
        &creds,
        "[default]\naws_access_key_id=a\naws_secret_access_key=b\n",
    )
    .unwrap();
    let url = format!("s3://{BUCKET}/p?endpoint=http://127.0.0.1:{port}&region=us-east-1");
    // Opening does no I/O: it succeeds.
    let s = Store::open(&url, Some(&creds)).unwrap();
    let t = Instant::now();
    let e = s.check().await.unwrap_err();
    eprintln!("check: {e}");
    assert!(matches!(e, StoreError::Unreachable { .. }), "{e:?}");
    assert!(e.is_transient());
    let msg = e.to_string();
    assert!(msg.contains(&url), "{msg}");
    assert!(msg.contains("is the S3 endpoint up"), "{msg}");
    assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
    assert!(msg.to_lowercase().contains("refused"), "{msg}");
    for e in [
        s.put("k", Bytes::from_static(b"x")).await.unwrap_err(),
        s.get("k").await.unwrap_err(),
        s.list("").await.unwrap_err(),
        s.delete("k").await.unwrap_err(),
    ] {
        assert!(matches!(e, StoreError::Unreachable { .. }), "{e:?}");
    }
    // Retry is bounded and returns the last error as it was.
    let tries = Arc::new(AtomicU32::new(0));
    let policy = RetryPolicy {
        on_retry: Some({
            let tries = tries.clone();
            Arc::new(
                move |_what: &str, _e: &StoreError, _n: u32, _wait: Duration| {
                    tries.fetch_add(1, Ordering::Relaxed);
                },
            )
        }),
        ..quick_retry()
    };
    let e = with_retry("put k", &policy, || s.put("k", Bytes::from_static(b"x")))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Unreachable { .. }), "{e:?}");
    assert_eq!(tries.load(Ordering::Relaxed), 3, "4 attempts, 3 waits");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_server_stopped_then_restarted() {
    let mut server = S3Server::start(&[BUCKET]);
    let creds = server.credentials_file("testing", "testing");
    let s = Store::open(&server.url(BUCKET, "p"), Some(&creds)).unwrap();
    s.put("before", Bytes::from_static(b"1")).await.unwrap();

    server.stop();
    let e = s.put("during", Bytes::from_static(b"2")).await.unwrap_err();
    assert!(matches!(e, StoreError::Unreachable { .. }), "{e:?}");
    let e = s.check().await.unwrap_err();
    assert!(e.is_transient(), "{e:?}");

    // Bring it back while with_retry keeps trying.
    let restarter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        server.restart();
        server
    });
    let waits = Arc::new(AtomicU32::new(0));
    let policy = RetryPolicy {
        initial_delay: Duration::from_millis(100),
        max_delay: Duration::from_millis(500),
        max_attempts: 200,
        deadline: Duration::from_secs(40),
        on_retry: Some({
            let waits = waits.clone();
            Arc::new(move |_: &str, e: &StoreError, _: u32, _: Duration| {
                assert!(e.is_transient());
                waits.fetch_add(1, Ordering::Relaxed);
            })
        }),
    };
    let t = Instant::now();
    with_retry("put during", &policy, || {
        s.put("during", Bytes::from_static(b"2"))
    })
    .await
    .unwrap();
    assert!(waits.load(Ordering::Relaxed) >= 1, "the put never failed");
    let _server = restarter.join().unwrap();
    assert_eq!(s.get("during").await.unwrap(), Bytes::from_static(b"2"));
    s.check().await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(40));
}

/// moto accepts any access key by default; with its auth switched on (an IAM
/// user created first, then `/moto-api/reset-auth`) it checks keys and
/// signatures like AWS.
#[tokio::test]
async fn s3_bad_credentials() {
    let server = S3Server::start(&[BUCKET]);
    let url = server.url(BUCKET, "p");
    // Before auth is on, any key works: this is moto's default.
    let any = Store::open(&url, Some(&server.credentials_file("anything", "goes"))).unwrap();
    any.check().await.unwrap();

    let (id, secret) = server.enable_auth();
    let good = Store::open(&url, Some(&server.credentials_file(&id, &secret))).unwrap();
    good.check().await.unwrap();
    good.put("k", Bytes::from_static(b"v")).await.unwrap();
    assert_eq!(good.get("k").await.unwrap(), Bytes::from_static(b"v"));

    let unknown_key = Store::open(
        &url,
        Some(&server.credentials_file("AKIAUNKNOWN0000000000", "x")),
    )
    .unwrap();
    let wrong_secret =
        Store::open(&url, Some(&server.credentials_file(&id, "wrong-secret"))).unwrap();
    for (what, s) in [
        ("unknown key", &unknown_key),
        ("wrong secret", &wrong_secret),
    ] {
        let e = s.check().await.unwrap_err();
        eprintln!("{what}: {e}");
        assert!(matches!(e, StoreError::Auth { .. }), "{what}: {e:?}");
        assert!(!e.is_transient(), "{what}");
        let msg = e.to_string();
        assert!(msg.contains("check AWS_ACCESS_KEY_ID"), "{what}: {msg}");
        assert!(msg.contains(&url), "{what}: {msg}");
        assert!(
            matches!(
                s.put("k2", Bytes::from_static(b"x")).await,
                Err(StoreError::Auth { .. })
            ),
            "{what}: put"
        );
        assert!(
            matches!(s.get("k").await, Err(StoreError::Auth { .. })),
            "{what}: get"
        );
        // Permanent: with_retry makes one attempt.
        let n = AtomicU32::new(0);
        let e = with_retry("get k", &quick_retry(), || {
            n.fetch_add(1, Ordering::Relaxed);
            s.get("k")
        })
        .await
        .unwrap_err();
        assert!(matches!(e, StoreError::Auth { .. }), "{what}");
        assert_eq!(n.load(Ordering::Relaxed), 1, "{what}");
    }
    let e = unknown_key.check().await.unwrap_err();
    assert!(e.to_string().contains("InvalidAccessKeyId"), "{e}");
    let e = wrong_secret.check().await.unwrap_err();
    assert!(e.to_string().contains("SignatureDoesNotMatch"), "{e}");
    // Nothing was written by the refused stores.
    assert_eq!(keys(&good.list("").await.unwrap()), ["k"]);
}

#[tokio::test]
async fn s3_missing_bucket_is_a_clear_error() {
    let server = S3Server::start(&[BUCKET]);
    let creds = server.credentials_file("testing", "testing");
    let s = Store::open(&server.url("no-such-bucket", "p"), Some(&creds)).unwrap();
    let e = s.check().await.unwrap_err();
    eprintln!("{e}");
    assert!(matches!(e, StoreError::Config { .. }), "{e:?}");
    assert!(!e.is_transient());
    assert!(
        e.to_string().contains("\"no-such-bucket\" does not exist"),
        "{e}"
    );
}

/// An S3 server without conditional writes that says so (501 to a PUT with
/// `If-None-Match: *`): a clear, permanent error, not a retried server
/// failure. (A tiny HTTP server on loopback: moto supports the header.)
#[tokio::test]
async fn s3_without_conditional_writes_is_a_clear_error() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in listener.incoming() {
            let Ok(mut c) = c else { continue };
            let mut buf = [0u8; 65536];
            let _ = c.read(&mut buf);
            let body = "<?xml version=\"1.0\"?><Error><Code>NotImplemented</Code>\
                        <Message>A header you provided implies functionality that is not implemented</Message></Error>";
            let _ = write!(
                c,
                "HTTP/1.1 501 Not Implemented\r\nContent-Type: application/xml\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("creds");
    std::fs::write(
        &creds,
        "[default]\naws_access_key_id = a\naws_secret_access_key = b\n",
    )
    .unwrap();
    let url = format!("s3://b/p?endpoint=http://127.0.0.1:{port}&region=us-east-1");
    let s = Store::open(&url, Some(&creds)).unwrap();
    let e = s.put("k", Bytes::from_static(b"x")).await.unwrap_err();
    assert!(matches!(e, StoreError::Config { .. }), "{e:?}");
    assert!(!e.is_transient());
    assert!(
        e.to_string()
            .contains("does not support conditional writes"),
        "{e}"
    );
}

fn open_err(url: &str, creds: Option<&Path>) -> StoreError {
    match Store::open(url, creds) {
        Ok(_) => panic!("{url} opened"),
        Err(e) => {
            assert!(!e.is_transient(), "{e}");
            e
        }
    }
}

#[test]
fn bad_urls_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("creds");
    std::fs::write(
        &creds,
        "[default]\naws_access_key_id=a\naws_secret_access_key=b\n",
    )
    .unwrap();
    let c = Some(creds.as_path());

    let e = open_err(
        "s3://b/p?endpoint=http://127.0.0.1:9000&regoin=us-east-1",
        c,
    );
    assert!(matches!(e, StoreError::Config { .. }), "{e:?}");
    assert!(
        e.to_string().contains("unknown query key \"regoin\""),
        "{e}"
    );
    let e = open_err("s3://b/p?region=a&region=b", c);
    assert!(e.to_string().contains("twice"), "{e}");
    let e = open_err("s3://key:secret@b/p?endpoint=http://127.0.0.1:9000", c);
    assert!(e.to_string().contains("never go in the URL"), "{e}");
    let e = open_err("s3:///p", c);
    assert!(e.to_string().contains("no bucket"), "{e}");
    let e = open_err("s3://b/p?endpoint=ftp://x", c);
    assert!(e.to_string().contains("endpoint"), "{e}");
    let e = open_err("s3://b/a%20b?endpoint=http://127.0.0.1:9000", c);
    assert!(e.to_string().contains("invalid prefix"), "{e}");
    let e = open_err("s3://b:9000/p", c);
    assert!(e.to_string().contains("?endpoint="), "{e}");
    let e = open_err("gs://b/p", c);
    assert!(e.to_string().contains("unsupported scheme"), "{e}");
    let e = open_err("not a url", None);
    assert!(e.to_string().contains("not a valid URL"), "{e}");
    let e = open_err(
        "s3://b/p?endpoint=http://127.0.0.1:9000",
        Some(&dir.path().join("missing-creds")),
    );
    assert!(
        e.to_string().contains("cannot read the credentials file"),
        "{e}"
    );
    // Without a credentials file, the environment must have them.
    if std::env::var_os("AWS_ACCESS_KEY_ID").is_none()
        && std::env::var_os("AWS_SECRET_ACCESS_KEY").is_none()
    {
        let e = open_err("s3://b/p?endpoint=http://127.0.0.1:9000", None);
        assert!(e.to_string().contains("no S3 credentials"), "{e}");
        assert!(e.to_string().contains("AWS_ACCESS_KEY_ID"), "{e}");
    }

    let root = dir.path().display();
    let e = open_err(&format!("file://{root}?mode=fast"), None);
    assert!(e.to_string().contains("unknown query key"), "{e}");
    let e = open_err("file://relative/path", None);
    assert!(e.to_string().contains("absolute path"), "{e}");
    let e = open_err(&format!("file://{root}"), c);
    assert!(e.to_string().contains("no credentials file"), "{e}");
}

#[tokio::test]
async fn file_missing_root_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("not-there");
    let e = open_err(&format!("file://{}", missing.display()), None);
    assert!(matches!(e, StoreError::Config { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("{} does not exist", missing.display())),
        "{msg}"
    );
    assert!(msg.contains("create it"), "{msg}");

    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let e = open_err(&format!("file://{}", file.display()), None);
    assert!(e.to_string().contains("is not a directory"), "{e}");

    // A root that disappears after open: check says so; a get is NotFound.
    let gone = dir.path().join("gone");
    std::fs::create_dir(&gone).unwrap();
    let s = Store::open(&format!("file://{}", gone.display()), None).unwrap();
    s.check().await.unwrap();
    std::fs::remove_dir_all(&gone).unwrap();
    let e = s.check().await.unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
    assert!(matches!(s.get("k").await, Err(StoreError::NotFound { .. })));
}

// ---------------------------------------------------------------------------
// Garage specifics: a real server keeps its objects over a crash, checks
// keys and signatures, and ignores conditional writes.

/// Garage 2.5 ignores `If-None-Match: *` on PUT (a second PUT replaces the
/// object). Without `conditional_put=check-first` the store finds that out
/// at its first create-only put and refuses every create-only put, a
/// permanent configuration error naming the remedy; nothing was replaced
/// and no object is listed. With it, create-only holds (see
/// `garage_objects_are_created_never_replaced`).
#[tokio::test]
async fn garage_ignores_conditional_writes_and_is_refused_without_check_first() {
    let g = GarageServer::start(&[BUCKET]);
    let creds = g.credentials();
    let plain = Store::open(&g.url(BUCKET, "p"), Some(&creds)).unwrap();
    let e = plain
        .put("cdp/v1/x", Bytes::from_static(b"one"))
        .await
        .unwrap_err();
    eprintln!("{e}");
    assert!(matches!(e, StoreError::Config { .. }), "{e:?}");
    assert!(!e.is_transient());
    let msg = e.to_string();
    assert!(msg.contains("ignores If-None-Match"), "{msg}");
    assert!(msg.contains("conditional_put=check-first"), "{msg}");
    // Refused again without another probe; nothing is an object.
    let e = plain
        .put("cdp/v1/x", Bytes::from_static(b"one"))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Config { .. }), "{e:?}");
    assert!(plain.list("").await.unwrap().is_empty());
    // The probe object is there, under the prefix, with a hidden name.
    let root = Store::open(
        &format!("{}&conditional_put=check-first", g.url(BUCKET, "")),
        Some(&creds),
    )
    .unwrap();
    assert!(
        root.list("").await.unwrap().is_empty(),
        "hidden names listed"
    );
    // Replacing PUTs (retention's) still work on the plain URL.
    plain
        .replace("cdp/v1/r", Bytes::from_static(b"r1"))
        .await
        .unwrap();
    assert_eq!(
        plain.get("cdp/v1/r").await.unwrap(),
        Bytes::from_static(b"r1")
    );
}

/// A bad value of `conditional_put` is refused when the URL is opened.
#[test]
fn conditional_put_values_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("creds");
    std::fs::write(
        &creds,
        "[default]\naws_access_key_id=a\naws_secret_access_key=b\n",
    )
    .unwrap();
    let e = open_err(
        "s3://b/p?endpoint=http://127.0.0.1:9000&conditional_put=maybe",
        Some(&creds),
    );
    assert!(e.to_string().contains("conditional_put=\"maybe\""), "{e}");
    for ok in ["required", "check-first"] {
        Store::open(
            &format!("s3://b/p?endpoint=http://127.0.0.1:9000&conditional_put={ok}"),
            Some(&creds),
        )
        .unwrap();
    }
}

/// Killed with SIGKILL and started again, Garage still has every object
/// (moto, in memory, loses them); puts during the outage are retried until
/// it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garage_killed_and_restarted_keeps_its_objects() {
    let mut g = GarageServer::start(&[BUCKET]);
    let url = format!("{}&conditional_put=check-first", g.url(BUCKET, "p"));
    let s = Store::open(&url, Some(&g.credentials())).unwrap();
    let big = pattern(3 * MIB + 17, 11);
    s.put("before", big.clone()).await.unwrap();
    g.stop();
    let e = s.put("during", Bytes::from_static(b"2")).await.unwrap_err();
    assert!(e.is_transient(), "{e:?}");
    let restarter = std::thread::spawn(move || {
        g.restart();
        g
    });
    let policy = RetryPolicy {
        initial_delay: Duration::from_millis(100),
        max_delay: Duration::from_millis(500),
        max_attempts: 400,
        deadline: Duration::from_secs(60),
        on_retry: None,
    };
    with_retry("put during", &policy, || {
        s.put("during", Bytes::from_static(b"2"))
    })
    .await
    .unwrap();
    let _g = restarter.join().unwrap();
    assert!(s.get("before").await.unwrap() == big, "lost over a restart");
    assert_eq!(s.get("during").await.unwrap(), Bytes::from_static(b"2"));
    assert_eq!(keys(&s.list("").await.unwrap()), ["before", "during"]);
}

/// Garage checks keys and signatures: an unknown key, a wrong secret and a
/// key without write permission are refused, permanently (one attempt).
#[tokio::test]
async fn garage_bad_credentials() {
    let g = GarageServer::start(&[BUCKET]);
    let url = format!("{}&conditional_put=check-first", g.url(BUCKET, "p"));
    let good = Store::open(&url, Some(&g.credentials())).unwrap();
    good.put("k", Bytes::from_static(b"v")).await.unwrap();
    let unknown = Store::open(
        &url,
        Some(&g.credentials_file("GK000000000000000000000000", &"0".repeat(64))),
    )
    .unwrap();
    let wrong = Store::open(&url, Some(&g.credentials_file(&g.key_id, &"f".repeat(64)))).unwrap();
    for (what, s) in [("unknown key", &unknown), ("wrong secret", &wrong)] {
        let e = s.check().await.unwrap_err();
        eprintln!("{what}: {e}");
        assert!(matches!(e, StoreError::Auth { .. }), "{what}: {e:?}");
        assert!(
            e.to_string().contains("check AWS_ACCESS_KEY_ID"),
            "{what}: {e}"
        );
        assert!(
            matches!(s.get("k").await, Err(StoreError::Auth { .. })),
            "{what}: get"
        );
        let n = AtomicU32::new(0);
        let e = with_retry("put k2", &quick_retry(), || {
            n.fetch_add(1, Ordering::Relaxed);
            s.put("k2", Bytes::from_static(b"x"))
        })
        .await
        .unwrap_err();
        assert!(matches!(e, StoreError::Auth { .. }), "{what}: {e:?}");
        assert_eq!(n.load(Ordering::Relaxed), 1, "{what}");
    }
    // A read-only key reads, and may not write or delete.
    let ro = Store::open(&url, Some(&g.add_key(BUCKET, &["--read"]))).unwrap();
    assert_eq!(ro.get("k").await.unwrap(), Bytes::from_static(b"v"));
    let e = ro.put("k3", Bytes::from_static(b"x")).await.unwrap_err();
    assert!(matches!(e, StoreError::Auth { .. }), "{e:?}");
    let e = ro.delete("k").await.unwrap_err();
    assert!(matches!(e, StoreError::Auth { .. }), "{e:?}");
    assert_eq!(keys(&good.list("").await.unwrap()), ["k"]);
    // A bucket that does not exist.
    let missing = Store::open(&g.url("no-such-bucket", "p"), Some(&g.credentials())).unwrap();
    let e = missing.check().await.unwrap_err();
    eprintln!("missing bucket: {e}");
    assert!(matches!(e, StoreError::Config { .. }), "{e:?}");
    assert!(
        e.to_string().contains("\"no-such-bucket\" does not exist"),
        "{e}"
    );
}
