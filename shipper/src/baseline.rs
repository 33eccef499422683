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
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use cdp_core::catalog::{BaselineRow, Catalog};
use cdp_core::time::now_ns;
use cdp_repo::format::{self as rf, Baseline, CHUNK_SIZE};
use cdp_repo::store::{with_retry, RetryPolicy, Store, StoreError};
use futures::StreamExt;
use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

use crate::error::{Result, ShipError};

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

/// One baseline to take: a disk of a VM, to one target.
pub struct BaselineJob<'a> {
    pub store: &'a Store,
    /// The target's name (catalog rows and errors).
    pub target: &'a str,
    /// The target's upload rate, shared with its other uploads.
    pub throttle: &'a crate::throttle::Throttle,
    pub retry: &'a RetryPolicy,
    pub catalog: &'a Arc<Mutex<Catalog>>,
    /// Where the VM's cdpd listens (its settled seq, while it runs).
    pub run_dir: &'a Path,
    pub vm: &'a str,
    pub disk: &'a str,
    /// The disk's image (a file or a block device).
    pub image: &'a Path,
    /// The image already opened (by root, from libvirt's definition, for a
    /// process working as the VM's user): read instead of opening `image`.
    pub opened: Option<&'a File>,
}

/// Where a disk's image stands for a baseline: the newest seq whose image
/// write is complete, and how many times its journal has entered degraded
/// mode in this cdpd's life (0 when cdpd is not running).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    pub seq: u64,
    pub times_degraded: u64,
}

/// The newest seq of a disk whose image write is complete: from the running
/// cdpd (under its disk lock), else from the catalog, but only once the last
/// capture session has ended (cdpd stopped, or its journal recovered): a
/// cdpd that is alive but does not answer, or one killed before its journal
/// was recovered, leaves the image ahead of the catalog, and a baseline
/// taken then would be inexact (issue 12): [`ShipError::UnsettledImage`].
/// A disk whose journal is full right now takes writes it does not journal:
/// [`ShipError::DegradedImage`]. (Stopped, the image holds what the guest
/// wrote, journaled or not: a baseline of it is exact at the catalog's seq.)
pub fn settled(run_dir: &Path, catalog: &Mutex<Catalog>, vm: &str, disk: &str) -> Result<Settled> {
    let sock = cdp_core::layout::RunDir::new(run_dir)
        .vm(vm)
        .control_socket();
    if sock.exists() {
        if let Ok(status) = cdp_core::control::Client::new(&sock).status() {
            if let Some(d) = status.disks.iter().find(|d| d.disk == disk) {
                if d.degraded {
                    return Err(ShipError::DegradedImage {
                        vm: vm.to_string(),
                        disk: disk.to_string(),
                    });
                }
                return Ok(Settled {
                    seq: d.last_seq,
                    times_degraded: d.times_degraded,
                });
            }
        }
    }
    let cat = catalog.lock().unwrap();
    if cat.last_session(vm)?.is_some_and(|s| s.end_kind.is_none()) {
        return Err(ShipError::UnsettledImage { vm: vm.to_string() });
    }
    let seq = cat.last_seq(vm)?.0;
    // A gap a tool recorded while the VM was stopped (unprotected writes,
    // an in-place restore) is journaled only at the next start: until
    // then the image differs from every seq the journal has, and a
    // baseline labelled with one would restore wrong bytes there.
    if let Some((_, reason)) = cat
        .gaps_after(vm, seq.saturating_sub(1))?
        .into_iter()
        .find(|(d, _)| d == disk)
    {
        return Err(ShipError::PendingGap {
            vm: vm.to_string(),
            disk: disk.to_string(),
            reason,
        });
    }
    Ok(Settled {
        seq,
        times_degraded: 0,
    })
}

/// Is [off, off+len) entirely a hole?
fn is_hole(f: &File, off: u64, len: u64) -> bool {
    match lseek(f.as_raw_fd(), off as nix::libc::off_t, Whence::SeekData) {
        Ok(data) => data as u64 >= off + len,
        // ENXIO: no data after `off`. Other errors (no SEEK_DATA support): read it.
        Err(e) => e == Errno::ENXIO,
    }
}

/// All chunk hashes the repository holds.
async fn existing_chunks(job: &BaselineJob<'_>) -> Result<HashSet<String>> {
    let list = with_retry("list chunks", job.retry, || {
        job.store.list(rf::CHUNKS_PREFIX)
    })
    .await
    .map_err(ShipError::store(job.target))?;
    Ok(list
        .into_iter()
        .filter_map(|o| o.key.rsplit('/').next().map(str::to_string))
        .collect())
}

/// What scanning the image found: one entry per chunk (its hash, `None` for
/// a hole or zeros), and what was uploaded.
struct Scan {
    chunks: Vec<Option<String>>,
    data: u64,
    uploaded: u64,
    bytes_uploaded: u64,
}

/// A chunk read and hashed: its hash and, when the repository lacks it and
/// no other chunk of this scan uploads it, its compressed body.
type Prepared = Option<(String, Option<Vec<u8>>)>;

/// Read, hash and (when fresh) compress the chunk at `off` on a blocking thread.
fn prepare_chunk(
    f: &File,
    off: u64,
    len: u64,
    have: &HashSet<String>,
    uploaded: &Mutex<HashSet<String>>,
    image: &Path,
    namer: &rf::ChunkNamer,
) -> Result<Prepared> {
    if is_hole(f, off, len) {
        return Ok(None);
    }
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, off)
        .map_err(ShipError::io("reading", image))?;
    if buf.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    // Keyed in an encrypted repository (docs/REPOSITORY_FORMAT.md, "Encryption").
    let h = namer.name(&buf);
    let fresh = !have.contains(&h) && uploaded.lock().unwrap().insert(h.clone());
    let body = if fresh {
        Some(rf::compress_chunk(&buf).map_err(ShipError::io("compressing a chunk of", image))?)
    } else {
        None
    };
    Ok(Some((h, body)))
}

/// Read every chunk of the image and upload those the repository lacks,
/// four at a time (read, hash and compress on blocking threads).
async fn scan_image(
    job: &BaselineJob<'_>,
    f: File,
    size: u64,
    progress: Option<cdp_repo::restore::Progress>,
) -> Result<Scan> {
    let n = size.div_ceil(CHUNK_SIZE);
    let f = Arc::new(f);
    let have = Arc::new(existing_chunks(job).await?);
    let namer = with_retry("chunk names", job.retry, || job.store.chunk_namer())
        .await
        .map_err(ShipError::store(job.target))?;
    let uploaded = Arc::new(Mutex::new(HashSet::<String>::new()));
    let image = Arc::new(job.image.to_path_buf());
    let results: Vec<Result<(Option<String>, u64)>> = futures::stream::iter(0..n)
        .map(|i| {
            let (f, have, uploaded, image) =
                (f.clone(), have.clone(), uploaded.clone(), image.clone());
            let namer = namer.clone();
            let progress = progress.clone();
            async move {
                let off = i * CHUNK_SIZE;
                let len = CHUNK_SIZE.min(size - off);
                let prepared = tokio::task::spawn_blocking(move || {
                    let r = prepare_chunk(&f, off, len, &have, &uploaded, &image, &namer);
                    if let Some(p) = &progress {
                        p(len);
                    }
                    r
                })
                .await
                .map_err(|source| ShipError::Task {
                    what: "reading a chunk",
                    source,
                })??;
                match prepared {
                    None => Ok((None, 0)),
                    Some((h, None)) => Ok((Some(h), 0)),
                    Some((h, Some(body))) => {
                        let key = rf::chunk_key(&h);
                        let body = bytes::Bytes::from(body);
                        let nb = body.len() as u64;
                        with_retry(&key, job.retry, || async {
                            job.throttle.acquire(nb).await;
                            job.store.put(&key, body.clone()).await
                        })
                        .await
                        .map_err(ShipError::store(job.target))?;
                        Ok((Some(h), nb))
                    }
                }
            }
        })
        .buffered(4)
        .collect()
        .await;
    let mut scan = Scan {
        chunks: Vec::with_capacity(n as usize),
        data: 0,
        uploaded: 0,
        bytes_uploaded: 0,
    };
    for r in results {
        let (h, nb) = r?;
        if h.is_some() {
            scan.data += 1;
        }
        if nb > 0 {
            scan.uploaded += 1;
            scan.bytes_uploaded += nb;
        }
        scan.chunks.push(h);
    }
    Ok(scan)
}

/// Whether the baseline object at `key` describes the same disk contents
/// as `b` (only its times differ).
async fn same_baseline(store: &Store, key: &str, b: &Baseline) -> bool {
    let Ok(body) = store.get(key).await else {
        return false;
    };
    Baseline::decode(key, &body).is_ok_and(|there| {
        (
            there.size,
            there.chunk_size,
            there.s0,
            there.s1,
            &there.chunks,
        ) == (b.size, b.chunk_size, b.s0, b.s1, &b.chunks)
    })
}

/// Take a baseline of `job.disk` to `job.store` and record it in the catalog.
pub async fn take(job: &BaselineJob<'_>) -> Result<BaselineResult> {
    take_with_progress(job, None).await
}

/// [`take`], reporting to `progress` the bytes of the image scanned (every
/// chunk's length once, holes included: the disk's size in all).
pub async fn take_with_progress(
    job: &BaselineJob<'_>,
    progress: Option<cdp_repo::restore::Progress>,
) -> Result<BaselineResult> {
    let (vm, disk) = (job.vm, job.disk);
    let started = now_ns();
    // Retention deletes no chunk while this baseline counts on the ones it
    // finds (on an error path the lease expires by itself).
    let lease = cdp_repo::lease::acquire(
        job.store,
        vm,
        "baseline",
        &format!("{disk} baseline"),
        cdp_repo::lease::DEFAULT_TTL,
    )
    .await
    .map_err(|source| ShipError::Lease {
        target: job.target.to_string(),
        source: Box::new(source),
    })?;
    let before = settled(job.run_dir, job.catalog, vm, disk)?;
    let s0 = before.seq;
    let mut f = match job.opened {
        Some(f) => f.try_clone(),
        None => File::open(job.image),
    }
    .map_err(ShipError::io("opening", job.image))?;
    // A block device has no length in its metadata: ask where its end is.
    let size = f
        .seek(SeekFrom::End(0))
        .map_err(ShipError::io("finding the size of", job.image))?;
    let scan = scan_image(job, f, size, progress).await?;
    let after = settled(job.run_dir, job.catalog, vm, disk)?;
    // Degraded (and back) during the scan: writes reached the image that no
    // record replays onto it (issue 12).
    if after.times_degraded != before.times_degraded {
        return Err(ShipError::DegradedImage {
            vm: vm.to_string(),
            disk: disk.to_string(),
        });
    }
    let s1 = after.seq.max(s0);
    let n = scan.chunks.len() as u64;
    let b = Baseline {
        vm_uuid: vm.to_string(),
        disk: disk.to_string(),
        size,
        chunk_size: CHUNK_SIZE,
        s0,
        s1,
        started_ns: started,
        finished_ns: now_ns(),
        chunks: scan.chunks,
    };
    let key = rf::baseline_key(vm, disk, s1, s0);
    let body = bytes::Bytes::from(serde_json::to_vec(&b).expect("a baseline serializes"));
    let put = || async {
        job.throttle.acquire(body.len() as u64).await;
        job.store.put(&key, body.clone()).await
    };
    match with_retry(&key, job.retry, put).await {
        Ok(()) => {}
        // Taken again at the same point (a disk idle since): the baseline
        // there names the same chunks and is kept (objects are created,
        // never replaced; docs/CREDENTIALS.md).
        Err(StoreError::Exists { .. }) if same_baseline(job.store, &key, &b).await => {}
        Err(e) => return Err(ShipError::store(job.target)(e)),
    }
    job.catalog.lock().unwrap().add_baseline(
        vm,
        &BaselineRow {
            disk: disk.to_string(),
            target: job.target.to_string(),
            s0,
            s1,
            key: key.clone(),
            created_ns: now_ns(),
            chunks_total: n,
            chunks_uploaded: scan.uploaded,
        },
    )?;
    lease.release().await;
    Ok(BaselineResult {
        key,
        s0,
        s1,
        chunks_total: n,
        chunks_data: scan.data,
        chunks_uploaded: scan.uploaded,
        bytes_uploaded: scan.bytes_uploaded,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const VM: &str = "0b5c6a3e-1d2f-4a5b-8c9d-0e1f2a3b4c5d";

    /// Without an answer from cdpd, the catalog's seq is used only once the
    /// capture session has ended; an open one (cdpd hung, or killed before
    /// its journal was recovered) gives no baseline rather than an inexact one.
    #[test]
    fn no_settled_seq_is_guessed_while_the_session_is_open() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::open(dir.path(), VM).unwrap();
        cat.upsert_vm(VM, "web").unwrap();
        cat.set_last_seq(VM, 41, 1).unwrap();
        let id = cat.start_session(VM, "boot", 1, 2, 3, "first").unwrap();
        let cat = Mutex::new(cat);
        let run = dir.path().join("run");
        let e = settled(&run, &cat, VM, "vda").unwrap_err();
        assert!(matches!(e, ShipError::UnsettledImage { .. }), "{e}");
        assert!(e.is_transient());
        cat.lock().unwrap().end_session(id, 5, "crash").unwrap();
        assert_eq!(settled(&run, &cat, VM, "vda").unwrap().seq, 41);
    }
}
