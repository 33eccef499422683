//! Baselines: the whole disk as content-addressed chunks.
//!
//! Taken online without pausing the guest ("fuzzy", docs/DESIGN.md, "Baselines"): the scan
//! starts after seq s0 and ends at s1. Every byte the guest changes during
//! the scan has a journal record with seq > s0, so the baseline replayed with
//! the journal after s0 is exact for every point at or after s1. Holes are
//! neither read nor stored; all-zero chunks are stored as "none"; a chunk the
//! repository has already is not uploaded again.

use std::collections::HashSet;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use cdp_core::catalog::Catalog;
use cdp_core::time::now_ns;
use cdp_repo::format::{self as rf, Baseline, CHUNK_SIZE};
use cdp_repo::store::{with_retry, RetryPolicy, Store};
use futures::StreamExt;

#[derive(Debug, Clone, serde::Serialize)]
pub struct BaselineResult {
    pub key: String,
    pub s0: u64,
    pub s1: u64,
    pub chunks_total: u64,
    pub chunks_data: u64,
    pub chunks_uploaded: u64,
    pub bytes_uploaded: u64,
}

/// The newest seq of a disk whose image write is complete: from the running
/// cdpd (under its disk lock), else from the catalog (VM stopped).
pub fn settled_seq(run_dir: &Path, catalog: &Mutex<Catalog>, vm: &str, disk: &str) -> Result<u64> {
    let sock = cdp_core::layout::RunDir::new(run_dir)
        .vm(vm)
        .control_socket();
    if sock.exists() {
        if let Ok(status) = cdp_core::control::Client::new(&sock).status() {
            if let Some(d) = status.disks.iter().find(|d| d.disk == disk) {
                return Ok(d.last_seq);
            }
        }
    }
    Ok(catalog.lock().unwrap().last_seq(vm)?.0)
}

/// Is [off, off+len) entirely a hole?
fn is_hole(f: &File, off: u64, len: u64) -> bool {
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
    if r < 0 {
        // ENXIO: no data after `off`. Other errors (no SEEK_DATA support): read it.
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
    }
    r as u64 >= off + len
}

/// All chunk hashes the repository holds.
async fn existing_chunks(store: &Store, retry: &RetryPolicy) -> Result<HashSet<String>> {
    let list = with_retry("list chunks", retry, || store.list(rf::CHUNKS_PREFIX)).await?;
    Ok(list
        .into_iter()
        .filter_map(|o| o.key.rsplit('/').next().map(str::to_string))
        .collect())
}

#[allow(clippy::too_many_arguments)]
pub async fn take(
    store: &Store,
    retry: &RetryPolicy,
    catalog: &Arc<Mutex<Catalog>>,
    target: &str,
    vm: &str,
    disk: &str,
    image: &Path,
    run_dir: &Path,
) -> Result<BaselineResult> {
    let started = now_ns();
    // Retention deletes no chunk while this baseline counts on the ones it
    // finds (on an error path the lease expires by itself).
    let lease = cdp_repo::lease::acquire(
        store,
        vm,
        "baseline",
        &format!("{disk} baseline"),
        cdp_repo::lease::DEFAULT_TTL,
    )
    .await?;
    let s0 = settled_seq(run_dir, catalog, vm, disk)?;
    let have = existing_chunks(store, retry).await?;
    let f = File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let size = {
        let r = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_END) };
        anyhow::ensure!(
            r >= 0,
            "size of {}: {}",
            image.display(),
            std::io::Error::last_os_error()
        );
        r as u64
    };
    let n = size.div_ceil(CHUNK_SIZE);
    let f = Arc::new(f);
    let uploaded = Arc::new(Mutex::new(HashSet::<String>::new()));
    let have = Arc::new(have);
    // Read, hash and compress on blocking threads; upload a few at a time.
    let results: Vec<Result<(Option<String>, u64)>> = futures::stream::iter(0..n)
        .map(|i| {
            let (f, have, uploaded, store, retry) = (
                f.clone(),
                have.clone(),
                uploaded.clone(),
                store.clone(),
                retry.clone(),
            );
            async move {
                let off = i * CHUNK_SIZE;
                let len = CHUNK_SIZE.min(size - off);
                let prepared = tokio::task::spawn_blocking(
                    move || -> Result<Option<(String, Option<Vec<u8>>)>> {
                        if is_hole(&f, off, len) {
                            return Ok(None);
                        }
                        let mut buf = vec![0u8; len as usize];
                        f.read_exact_at(&mut buf, off)?;
                        if buf.iter().all(|&b| b == 0) {
                            return Ok(None);
                        }
                        let h = blake3::hash(&buf).to_hex().to_string();
                        let fresh =
                            !have.contains(&h) && uploaded.lock().unwrap().insert(h.clone());
                        let body = if fresh {
                            Some(rf::compress_chunk(&buf)?)
                        } else {
                            None
                        };
                        Ok(Some((h, body)))
                    },
                )
                .await??;
                match prepared {
                    None => Ok((None, 0)),
                    Some((h, None)) => Ok((Some(h), 0)),
                    Some((h, Some(body))) => {
                        let key = rf::chunk_key(&h);
                        let body = bytes::Bytes::from(body);
                        let nb = body.len() as u64;
                        with_retry(&key, &retry, || store.put(&key, body.clone())).await?;
                        Ok((Some(h), nb))
                    }
                }
            }
        })
        .buffered(4)
        .collect()
        .await;
    let mut chunks = Vec::with_capacity(n as usize);
    let (mut up, mut bytes_up, mut data) = (0u64, 0u64, 0u64);
    for r in results {
        let (h, nb) = r?;
        if h.is_some() {
            data += 1;
        }
        if nb > 0 {
            up += 1;
            bytes_up += nb;
        }
        chunks.push(h);
    }
    let s1 = settled_seq(run_dir, catalog, vm, disk)?.max(s0);
    let b = Baseline {
        vm_uuid: vm.to_string(),
        disk: disk.to_string(),
        size,
        chunk_size: CHUNK_SIZE,
        s0,
        s1,
        started_ns: started,
        finished_ns: now_ns(),
        chunks,
    };
    let key = rf::baseline_key(vm, disk, s1, s0);
    let body = bytes::Bytes::from(serde_json::to_vec(&b)?);
    with_retry(&key, retry, || store.put(&key, body.clone())).await?;
    catalog
        .lock()
        .unwrap()
        .add_baseline(vm, disk, target, s0, s1, &key, now_ns(), n, up)?;
    lease.release().await;
    Ok(BaselineResult {
        key,
        s0,
        s1,
        chunks_total: n,
        chunks_data: data,
        chunks_uploaded: up,
        bytes_uploaded: bytes_up,
    })
}
