//! Leases: a reader that needs a VM's repository objects to stay while it
//! works (a restore, an export, a baseline being taken) writes
//! `cdp/v1/vms/<vm>/leases/<id>.json` before it reads, keeps it fresh while
//! it works and removes it at the end. Retention defers every deletion of
//! the VM's objects while an unexpired lease exists, and every deletion of
//! chunks while one exists for any VM (chunks are shared). A holder that
//! dies leaves its lease behind: it expires and is then ignored (and
//! removed by the next prune).
//!
//! Objects are created, never replaced (a baseline's lease is written with
//! the shipping credential, which has no right to overwrite or delete):
//! a refresh writes a new lease object `<id>-r<n>.json` and then tries to
//! remove the previous one. Where the holder may not delete, the previous
//! objects stay until they expire, and retention removes them.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use thiserror::Error;

use crate::format::{self as rf, Lease};
use crate::store::{with_retry, RetryPolicy, Store, StoreError};

/// How long a lease lasts unless refreshed.
pub const DEFAULT_TTL: Duration = Duration::from_secs(600);

#[derive(Debug, Error)]
pub enum LeaseError {
    #[error("writing lease {key}: {source}")]
    Write {
        key: String,
        #[source]
        source: StoreError,
    },
    #[error("listing leases of VM {vm}: {source}")]
    List {
        vm: String,
        #[source]
        source: StoreError,
    },
}

impl LeaseError {
    /// True if trying again may succeed: the storage was unreachable or
    /// failed on its side.
    pub fn is_transient(&self) -> bool {
        match self {
            LeaseError::Write { source, .. } | LeaseError::List { source, .. } => {
                source.is_transient()
            }
        }
    }
}

fn hostname() -> String {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let h: String = h
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if h.is_empty() {
        "host".into()
    } else {
        h
    }
}

/// A lease this process holds; refreshed in the background (on the tokio
/// runtime it was taken on) until [`Held::release`] or drop.
pub struct Held {
    store: Store,
    /// The lease objects written and not (yet) removed, newest last.
    keys: Arc<Mutex<Vec<String>>>,
    refresher: Option<tokio::task::JoinHandle<()>>,
}

impl Held {
    /// The key of the newest lease object.
    pub fn key(&self) -> String {
        self.keys
            .lock()
            .unwrap()
            .last()
            .cloned()
            .unwrap_or_default()
    }

    /// Stop refreshing and remove the lease objects (where this credential
    /// may not delete, they expire).
    pub async fn release(mut self) {
        if let Some(t) = self.refresher.take() {
            t.abort();
        }
        let keys = std::mem::take(&mut *self.keys.lock().unwrap());
        let retry = RetryPolicy::default();
        for k in keys {
            let _ = with_retry(&k, &retry, || self.store.delete(&k)).await;
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // Not released (an error path): stop refreshing; the lease expires.
        if let Some(t) = self.refresher.take() {
            t.abort();
        }
    }
}

/// Refresh a lease every third of `ttl`: a new object each time (created,
/// never replacing one), then the previous ones removed where allowed.
async fn refresh(store: Store, keys: Arc<Mutex<Vec<String>>>, id: String, b: LeaseBody) {
    let mut n: u64 = 0;
    loop {
        tokio::time::sleep(b.ttl / 3).await;
        n += 1;
        let key = rf::lease_key(&b.vm, &format!("{id}-r{n}"));
        let body = body(&b.holder, &b.what, b.created, b.ttl);
        let retry = RetryPolicy::default();
        if with_retry(&key, &retry, || store.put(&key, body.clone()))
            .await
            .is_err()
        {
            continue;
        }
        let old: Vec<String> = {
            let mut k = keys.lock().unwrap();
            let old = k.clone();
            *k = vec![key];
            old
        };
        let mut kept = Vec::new();
        for k in old {
            if store.delete(&k).await.is_err() {
                kept.push(k);
            }
        }
        // Not removable (no delete right): still ours, released with the rest.
        keys.lock().unwrap().splice(0..0, kept);
    }
}

/// What a refresh writes again.
struct LeaseBody {
    vm: String,
    holder: String,
    what: String,
    created: u64,
    ttl: Duration,
}

fn body(holder: &str, what: &str, created_ns: u64, ttl: Duration) -> Bytes {
    let now = cdp_core::time::now_ns();
    Bytes::from(
        serde_json::to_vec(&Lease {
            holder: holder.into(),
            host: hostname(),
            pid: std::process::id(),
            created_ns,
            expires_ns: now + ttl.as_nanos() as u64,
            what: what.into(),
        })
        .unwrap(),
    )
}

/// Take a lease on VM `vm`'s objects for `holder` (e.g. "cdpctl restore"),
/// refreshed every third of `ttl` while held. Must be called inside a
/// tokio runtime.
pub async fn acquire(
    store: &Store,
    vm: &str,
    holder: &str,
    what: &str,
    ttl: Duration,
) -> Result<Held, LeaseError> {
    let created = cdp_core::time::now_ns();
    let id = format!("{}-{}-{created}", hostname(), std::process::id());
    let key = rf::lease_key(vm, &id);
    let retry = RetryPolicy::default();
    let b = body(holder, what, created, ttl);
    with_retry(&key, &retry, || store.put(&key, b.clone()))
        .await
        .map_err(|source| LeaseError::Write {
            key: key.clone(),
            source,
        })?;
    let keys = Arc::new(Mutex::new(vec![key]));
    let lb = LeaseBody {
        vm: vm.to_string(),
        holder: holder.to_string(),
        what: what.to_string(),
        created,
        ttl,
    };
    let refresher = tokio::spawn(refresh(store.clone(), keys.clone(), id, lb));
    Ok(Held {
        store: store.clone(),
        keys,
        refresher: Some(refresher),
    })
}

/// The leases of a VM: (key, lease or None when it does not decode).
pub async fn list(store: &Store, vm: &str) -> Result<Vec<(String, Option<Lease>)>, LeaseError> {
    let retry = RetryPolicy::default();
    let prefix = rf::lease_prefix(vm);
    let objs = with_retry(&prefix, &retry, || store.list(&prefix))
        .await
        .map_err(|source| LeaseError::List {
            vm: vm.into(),
            source,
        })?;
    let mut out = Vec::new();
    for o in objs.into_iter().filter(|o| o.key.ends_with(".json")) {
        match store.get(&o.key).await {
            Ok(b) => {
                let l = Lease::decode(&o.key, &b).ok();
                out.push((o.key, l))
            }
            // Released meanwhile.
            Err(StoreError::NotFound { .. }) => {}
            Err(source) => {
                return Err(LeaseError::List {
                    vm: vm.into(),
                    source,
                })
            }
        }
    }
    Ok(out)
}

/// The unexpired leases of a VM (one that does not decode is ignored: a
/// lease is written atomically, so it is not one).
pub async fn active(store: &Store, vm: &str, now_ns: u64) -> Result<Vec<Lease>, LeaseError> {
    Ok(list(store, vm)
        .await?
        .into_iter()
        .filter_map(|(_, l)| l.filter(|l| l.expires_ns > now_ns))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const VM: &str = "u-1";

    fn store() -> (tempfile::TempDir, Store) {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(&format!("file://{}", d.path().display()), None).unwrap();
        (d, s)
    }

    async fn lease_at(s: &Store, key: &str) -> Lease {
        serde_json::from_slice(&s.get(key).await.unwrap()).unwrap()
    }

    #[test]
    fn hostname_is_a_key_component() {
        let h = hostname();
        assert!(!h.is_empty());
        assert!(
            h.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "{h}"
        );
    }

    #[tokio::test]
    async fn a_lease_is_written_listed_active_and_removed_on_release() {
        let (_d, s) = store();
        let before = cdp_core::time::now_ns();
        let held = acquire(&s, VM, "cdpctl restore", "vda at seq:4", DEFAULT_TTL)
            .await
            .unwrap();
        assert!(
            held.key().starts_with(&rf::lease_prefix(VM)),
            "{}",
            held.key()
        );
        let l = lease_at(&s, &held.key()).await;
        assert_eq!(
            (l.holder.as_str(), l.what.as_str()),
            ("cdpctl restore", "vda at seq:4")
        );
        assert_eq!(l.pid, std::process::id());
        assert!(l.created_ns >= before);
        assert!(l.expires_ns >= l.created_ns + DEFAULT_TTL.as_nanos() as u64);

        let listed = list(&s, VM).await.unwrap();
        assert_eq!(listed, vec![(held.key(), Some(l.clone()))]);
        assert_eq!(active(&s, VM, before).await.unwrap(), vec![l.clone()]);
        // After it expires it no longer counts; another VM has none.
        assert!(active(&s, VM, l.expires_ns).await.unwrap().is_empty());
        assert!(active(&s, "u-2", before).await.unwrap().is_empty());

        let key = held.key();
        held.release().await;
        assert!(matches!(
            s.get(&key).await,
            Err(StoreError::NotFound { .. })
        ));
        assert!(list(&s, VM).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_lease_that_does_not_decode_is_listed_but_never_active() {
        let (_d, s) = store();
        let key = rf::lease_key(VM, "h-1-2");
        s.put(&key, Bytes::from_static(b"{\"holder\":"))
            .await
            .unwrap();
        // Not a lease object at all: not listed.
        let other = format!("{}notes.txt", rf::lease_prefix(VM));
        s.put(&other, Bytes::from_static(b"x")).await.unwrap();
        assert_eq!(list(&s, VM).await.unwrap(), vec![(key, None)]);
        assert!(active(&s, VM, 0).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_held_lease_is_refreshed_until_dropped() {
        let (_d, s) = store();
        let ttl = Duration::from_millis(300);
        let held = acquire(&s, VM, "baseline", "vda", ttl).await.unwrap();
        let key = held.key();
        let first = lease_at(&s, &key).await;
        // Refreshed every ttl/3, as a new object (never replacing one):
        // wait for one (bounded, for a busy machine).
        let t = std::time::Instant::now();
        let later = loop {
            tokio::time::sleep(ttl / 3).await;
            if held.key() != key {
                break lease_at(&s, &held.key()).await;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "never refreshed");
        };
        assert!(later.expires_ns > first.expires_ns);
        assert_eq!(later.created_ns, first.created_ns);
        // The previous object is removed (this store may delete).
        assert!(matches!(
            s.get(&key).await,
            Err(StoreError::NotFound { .. })
        ));
        // Dropped without release (an error path): no more refreshes, the
        // lease stays until it expires.
        drop(held);
        tokio::time::sleep(ttl).await;
        let last = list(&s, VM).await.unwrap();
        // One, or two when the drop cut a refresh between writing the new
        // object and deleting the old one (both expire by themselves).
        assert!((1..=2).contains(&last.len()), "{last:?}");
        tokio::time::sleep(ttl).await;
        assert_eq!(list(&s, VM).await.unwrap(), last, "refreshed after drop");
    }

    #[tokio::test]
    async fn listing_an_unreachable_repository_is_an_error_naming_the_vm() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("repo");
        std::fs::create_dir(&root).unwrap();
        let s = Store::open(&format!("file://{}", root.display()), None).unwrap();
        std::fs::remove_dir(&root).unwrap();
        match list(&s, VM).await {
            Err(e @ LeaseError::List { .. }) => {
                // A missing root is a configuration error: permanent.
                assert!(!e.is_transient(), "{e}");
                assert!(matches!(&e, LeaseError::List { vm, .. } if vm == VM));
            }
            other => panic!("{other:?}"),
        }
        match acquire(&s, VM, "x", "y", DEFAULT_TTL).await {
            Err(LeaseError::Write { key, .. }) => assert!(key.starts_with(&rf::lease_prefix(VM))),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a lease was written into a missing repository"),
        }
    }
}
