//! Leases: a reader that needs a VM's repository objects to stay while it
//! works (a restore, an export, a baseline being taken) writes
//! `cdp/v1/vms/<vm>/leases/<id>.json` before it reads, keeps it fresh while
//! it works and removes it at the end. Retention defers every deletion of
//! the VM's objects while an unexpired lease exists, and every deletion of
//! chunks while one exists for any VM (chunks are shared). A holder that
//! dies leaves its lease behind: it expires and is then ignored (and
//! removed by the next prune).

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
    key: String,
    refresher: Option<tokio::task::JoinHandle<()>>,
}

impl Held {
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Stop refreshing and remove the lease.
    pub async fn release(mut self) {
        if let Some(t) = self.refresher.take() {
            t.abort();
        }
        let retry = RetryPolicy::default();
        let _ = with_retry(&self.key, &retry, || self.store.delete(&self.key)).await;
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
    let (s, k, h, w) = (
        store.clone(),
        key.clone(),
        holder.to_string(),
        what.to_string(),
    );
    let refresher = tokio::spawn(async move {
        loop {
            tokio::time::sleep(ttl / 3).await;
            let b = body(&h, &w, created, ttl);
            let retry = RetryPolicy::default();
            let _ = with_retry(&k, &retry, || s.put(&k, b.clone())).await;
        }
    });
    Ok(Held {
        store: store.clone(),
        key,
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
            Ok(b) => out.push((o.key, serde_json::from_slice::<Lease>(&b).ok())),
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
