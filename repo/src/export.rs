//! Instant recovery: a restore [`Plan`] read as a disk image at any byte
//! range, without materialising the image first (docs/DESIGN.md,
//! "Restore"). `cdpctl export` serves it over NBD through the generic
//! [`cdp_core::nbd::server`]; this module holds no sockets.
//!
//! Every read is answered from the plan's extent map on demand:
//! - journal extents from the records they come from, each record's CRC
//!   checked before any of its bytes is served;
//! - ranges no record covers from the baseline's chunk (checked against its
//!   BLAKE3 name), or zeros for a chunk recorded as zeros;
//! - ZERO/TRIM extents as zeros, without I/O.
//!
//! Decompressed chunks, decompressed segment frames and whole records are
//! kept in one bounded LRU cache, so that neighbouring reads do not fetch
//! again; concurrent reads of one object fetch it once. A read whose data
//! cannot be checked fails: the image never yields wrong bytes.
//! Local segment files (records not shipped yet) are opened once, at the
//! start, so a shipper trimming them meanwhile takes nothing away.
//! Fetches run on a tokio runtime through its handle, from the caller's
//! (blocking) threads.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::hash::Hash;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use cdp_core::journal::extents::Source;
use cdp_core::journal::format::{IndexEntry, Kind, RECORD_HEADER_LEN};
use cdp_core::nbd::server as nbd_server;
use thiserror::Error;

use crate::format as rf;
use crate::read::ReadError;
use crate::restore::{self, Plan, RestoreError, SegLoc, SegRef};
use crate::store::{with_retry, RetryPolicy, Store};

/// Default bound of the cache of decompressed chunks, frames and records.
pub const DEFAULT_CACHE_BYTES: u64 = 256 << 20;
/// Distinct reasons of read errors said on stderr (the rest are counted).
const MAX_REPORTED: usize = 32;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn corrupt(what: impl Into<String>, why: impl Into<String>) -> RestoreError {
    RestoreError::Corrupt {
        what: what.into(),
        why: why.into(),
    }
}

/// Why bytes of the image cannot be given. The image never gives wrong
/// bytes instead.
#[derive(Debug, Clone, Error)]
#[non_exhaustive]
pub enum ImageError {
    /// The plan does not describe the bytes asked for: a read beyond the
    /// disk, a chunk or record the plan's own tables do not have.
    #[error("{what}: {why}")]
    Plan { what: String, why: String },
    /// An object the bytes come from could not be fetched or checked.
    /// Shared by every read that waited for the same object.
    #[error("{what}: {source}")]
    Fetch {
        what: String,
        #[source]
        source: Arc<RestoreError>,
    },
}

fn plan_err(what: impl Into<String>, why: impl Into<String>) -> ImageError {
    ImageError::Plan {
        what: what.into(),
        why: why.into(),
    }
}

fn fetch_err(what: impl Into<String>) -> impl FnOnce(Arc<RestoreError>) -> ImageError {
    let what = what.into();
    move |source| ImageError::Fetch { what, source }
}

// ---------------------------------------------------------------------------
// Cache

/// A bounded LRU cache of loaded objects with single-flight loading: when
/// several threads want one missing key, one loads it and the others wait
/// for that result. Errors are not cached (the next read tries again).
pub struct Cache<K, V, E = Arc<RestoreError>> {
    inner: Mutex<Lru<K, V, E>>,
}

type Cell<V, E> = Arc<OnceLock<Result<V, E>>>;

struct Lru<K, V, E> {
    cap: u64,
    used: u64,
    tick: u64,
    map: HashMap<K, Slot<V, E>>,
    order: BTreeMap<u64, K>,
    hits: u64,
    misses: u64,
}

struct Slot<V, E> {
    cell: Cell<V, E>,
    size: u64,
    tick: u64,
}

/// Something the cache can weigh.
pub trait Weight {
    fn weight(&self) -> u64;
}

impl Weight for Arc<Vec<u8>> {
    fn weight(&self) -> u64 {
        self.len() as u64
    }
}

impl<K: Hash + Eq + Clone, V: Clone + Weight, E: Clone> Cache<K, V, E> {
    pub fn new(cap: u64) -> Self {
        Cache {
            inner: Mutex::new(Lru {
                cap,
                used: 0,
                tick: 0,
                map: HashMap::new(),
                order: BTreeMap::new(),
                hits: 0,
                misses: 0,
            }),
        }
    }

    /// The value of `key`, loaded with `load` if no other thread has it or
    /// is loading it. Every thread that waited gets the same error.
    pub fn get(&self, key: &K, load: impl FnOnce() -> Result<V, E>) -> Result<V, E> {
        self.get_evicting(key, load).0
    }

    /// The value of `key` if it is loaded (counted as a hit and made the
    /// most recently used), without loading it.
    pub fn peek(&self, key: &K) -> Option<V> {
        let mut l = lock(&self.inner);
        l.tick += 1;
        let tick = l.tick;
        let slot = l.map.get_mut(key)?;
        let v = match slot.cell.get() {
            Some(Ok(v)) => v.clone(),
            _ => return None,
        };
        let old = std::mem::replace(&mut slot.tick, tick);
        l.order.remove(&old);
        l.order.insert(tick, key.clone());
        l.hits += 1;
        Some(v)
    }

    /// [`Cache::get`], also returning the entries this load pushed out of
    /// the cache (for the caller to keep elsewhere, outside the lock).
    pub fn get_evicting(
        &self,
        key: &K,
        load: impl FnOnce() -> Result<V, E>,
    ) -> (Result<V, E>, Vec<(K, V)>) {
        let mut evicted = Vec::new();
        let cell = {
            let mut l = lock(&self.inner);
            l.tick += 1;
            let tick = l.tick;
            match l.map.get_mut(key) {
                Some(slot) => {
                    let old = std::mem::replace(&mut slot.tick, tick);
                    let cell = slot.cell.clone();
                    l.order.remove(&old);
                    l.order.insert(tick, key.clone());
                    l.hits += 1;
                    cell
                }
                None => {
                    let cell: Cell<V, E> = Arc::new(OnceLock::new());
                    l.map.insert(
                        key.clone(),
                        Slot {
                            cell: cell.clone(),
                            size: 0,
                            tick,
                        },
                    );
                    l.order.insert(tick, key.clone());
                    l.misses += 1;
                    cell
                }
            }
        };
        let mut loaded = false;
        let r = cell
            .get_or_init(|| {
                loaded = true;
                load()
            })
            .clone();
        if loaded {
            let mut l = lock(&self.inner);
            let ours = l.map.get(key).is_some_and(|s| Arc::ptr_eq(&s.cell, &cell));
            if ours {
                match &r {
                    Ok(v) => {
                        let size = v.weight();
                        l.map.get_mut(key).unwrap().size = size;
                        l.used += size;
                        evicted = l.evict(key);
                    }
                    Err(_) => {
                        let slot = l.map.remove(key).unwrap();
                        l.order.remove(&slot.tick);
                    }
                }
            }
        }
        (r, evicted)
    }

    /// (bytes held, hits, misses).
    pub fn stats(&self) -> (u64, u64, u64) {
        let l = lock(&self.inner);
        (l.used, l.hits, l.misses)
    }
}

impl<K: Hash + Eq + Clone, V: Clone, E> Lru<K, V, E> {
    /// Drop the least recently used entries until the cache fits, keeping
    /// `keep` (the entry just loaded) even if it alone is over the bound.
    /// Returns the entries dropped.
    fn evict(&mut self, keep: &K) -> Vec<(K, V)> {
        let mut out = Vec::new();
        while self.used > self.cap {
            // Entries still loading weigh nothing yet: never evicted.
            let loaded = |k: &K| self.map.get(k).is_some_and(|s| s.size > 0);
            let Some((&t, k)) = self.order.iter().find(|(_, k)| *k != keep && loaded(k)) else {
                break;
            };
            let k = k.clone();
            self.order.remove(&t);
            if let Some(s) = self.map.remove(&k) {
                self.used -= s.size;
                if let Some(Ok(v)) = s.cell.get() {
                    out.push((k, v.clone()));
                }
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------
// Reading a plan

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    /// A baseline chunk, by the first chunk index with its hash.
    Chunk(u32),
    /// A decompressed frame of a repository segment: (segment, frame).
    Frame(u32, u32),
    /// A whole checked record (header + payload): (segment, payload pos).
    Record(u32, u64),
}

/// A decompressed frame, and which of the records wholly inside it were
/// checked (by payload position): checked once, served many times.
struct FrameBuf {
    data: Vec<u8>,
    checked: Mutex<HashSet<u64>>,
}

#[derive(Clone)]
enum Val {
    Bytes(Arc<Vec<u8>>),
    Frame(Arc<FrameBuf>),
}

impl Weight for Val {
    fn weight(&self) -> u64 {
        match self {
            Val::Bytes(b) => b.len() as u64,
            Val::Frame(f) => f.data.len() as u64,
        }
    }
}

impl Val {
    fn bytes(self) -> Arc<Vec<u8>> {
        match self {
            Val::Bytes(b) => b,
            Val::Frame(_) => unreachable!("frames are read through PointImage::frame"),
        }
    }
    fn frame(self) -> Arc<FrameBuf> {
        match self {
            Val::Frame(f) => f,
            Val::Bytes(_) => unreachable!("bytes are not frames"),
        }
    }
}

/// Decoded journal bytes (frames, whole records) pushed out of the cache,
/// kept in an unlinked temporary file so that they are never fetched and
/// decompressed again: a full sequential read of a disk whose journal
/// records are scattered over many frames would otherwise decode each
/// frame again for every part of the disk it holds records of (issue 13).
/// A record read from here is CRC-checked again before any of its bytes
/// is served, like a record read from the repository. The file grows to at
/// most the journal frames the plan reads; a write that fails (no space)
/// only stops spilling.
struct Spill {
    file: File,
    next: std::sync::atomic::AtomicU64,
    full: std::sync::atomic::AtomicBool,
    /// Key → (offset in the file, raw segment position of its first byte,
    /// length).
    at: Mutex<HashMap<Key, (u64, u64, u64)>>,
}

impl Spill {
    /// An unlinked file (`O_TMPFILE`, mode 0600) in `$TMPDIR`, else
    /// `/var/tmp` (on disk, where `/tmp` may be memory). None where neither
    /// can have one: the export then works without spilling.
    fn new() -> Option<Spill> {
        use std::os::unix::fs::OpenOptionsExt;
        let dirs = [
            std::env::var_os("TMPDIR").map(std::path::PathBuf::from),
            Some("/var/tmp".into()),
            Some(std::env::temp_dir()),
        ];
        let file = dirs.into_iter().flatten().find_map(|d| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .mode(0o600)
                .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
                .open(d)
                .ok()
        })?;
        Some(Spill {
            file,
            next: Default::default(),
            full: Default::default(),
            at: Mutex::new(HashMap::new()),
        })
    }

    /// Keep `data`, the raw segment bytes from position `base`, as `key`.
    fn put(&self, key: Key, base: u64, data: &[u8]) {
        use std::sync::atomic::Ordering::Relaxed;
        if self.full.load(Relaxed) || lock(&self.at).contains_key(&key) {
            return;
        }
        let off = self.next.fetch_add(data.len() as u64, Relaxed);
        match self.file.write_all_at(data, off) {
            Ok(()) => {
                lock(&self.at).insert(key, (off, base, data.len() as u64));
            }
            Err(_) => self.full.store(true, Relaxed),
        }
    }

    /// The raw segment bytes `range`, if the entry `key` kept them.
    fn get(&self, key: &Key, range: std::ops::Range<u64>) -> Option<io::Result<Vec<u8>>> {
        let (off, base, len) = *lock(&self.at).get(key)?;
        if range.start < base || range.end > base + len {
            return None;
        }
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        Some(
            self.file
                .read_exact_at(&mut buf, off + (range.start - base))
                .map(|()| buf),
        )
    }
}

/// A plan, readable at any byte range.
pub struct PointImage {
    plan: Plan,
    store: Option<Store>,
    rt: tokio::runtime::Handle,
    cache: Cache<Key, Val>,
    /// For each baseline chunk, the first chunk index with the same hash.
    chunk_ids: Vec<u32>,
    /// The local segment files the plan reads, opened once: a shipper that
    /// trims them while the export runs does not take their bytes away.
    local: HashMap<u32, File>,
    /// Where decoded journal bytes go when the cache drops them.
    spill: Option<Spill>,
    reported: Mutex<HashSet<String>>,
}

impl PointImage {
    /// The image of `plan`. `store` is the repository its baseline chunks and
    /// shipped segments are in; `rt` runs the fetches; `cache_bytes` bounds
    /// the cache. Opens the local segment files the plan reads.
    pub fn new(
        plan: Plan,
        store: Option<Store>,
        rt: tokio::runtime::Handle,
        cache_bytes: u64,
    ) -> Result<PointImage, RestoreError> {
        let mut first: HashMap<&str, u32> = HashMap::new();
        let chunk_ids = plan
            .baseline
            .chunks
            .iter()
            .enumerate()
            .map(|(i, c)| match c {
                Some(h) => *first.entry(h.as_str()).or_insert(i as u32),
                None => i as u32,
            })
            .collect();
        let mut local = HashMap::new();
        for (_, _, src) in plan.extents.iter() {
            let Source::Journal { segment, .. } = src else {
                continue;
            };
            if local.contains_key(&segment) {
                continue;
            }
            if let Some(SegLoc::Local(path)) = plan.segments.get(segment as usize).map(|s| &s.loc) {
                let f = cdp_core::journal::open_local_segment(path).map_err(|e| {
                    RestoreError::Corrupt {
                        what: path.display().to_string(),
                        why: e.to_string(),
                    }
                })?;
                local.insert(segment, f);
            }
        }
        Ok(PointImage {
            plan,
            store,
            rt,
            cache: Cache::new(cache_bytes),
            chunk_ids,
            local,
            spill: Spill::new(),
            reported: Mutex::new(HashSet::new()),
        })
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn size(&self) -> u64 {
        self.plan.size
    }

    /// Bytes of the disk that come from journal records at this point.
    pub fn journal_bytes(&self) -> u64 {
        self.plan
            .extents
            .iter()
            .filter(|(_, _, src)| matches!(src, Source::Journal { .. }))
            .map(|(s, e, _)| e - s)
            .sum()
    }

    /// The cache's bound.
    pub fn cache_bytes(&self) -> u64 {
        lock(&self.cache.inner).cap
    }

    /// (bytes cached, hits, misses).
    pub fn cache_stats(&self) -> (u64, u64, u64) {
        self.cache.stats()
    }

    /// Fill `buf` with the disk's bytes at `offset`, as they were at the
    /// plan's point. Fails (and `buf` must be discarded) if any byte of it
    /// cannot be fetched or checked.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.plan.size)
            .ok_or_else(|| {
                plan_err(
                    &self.plan.disk,
                    format!("read of {} bytes at {offset} is beyond the disk", buf.len()),
                )
            })?;
        let mut at = offset;
        for (s, e, src) in self.plan.extents.overlapping(offset, end) {
            if s > at {
                self.read_base(at, &mut buf[(at - offset) as usize..(s - offset) as usize])?;
            }
            let out = &mut buf[(s - offset) as usize..(e - offset) as usize];
            match src {
                Source::Zero => out.fill(0),
                Source::Journal { segment, pos } => self.read_journal(segment, pos, out)?,
            }
            at = e;
        }
        if at < end {
            self.read_base(at, &mut buf[(at - offset) as usize..])?;
        }
        Ok(())
    }

    /// Bytes no record covers: from the baseline.
    fn read_base(&self, start: u64, out: &mut [u8]) -> Result<(), ImageError> {
        let b = &self.plan.baseline;
        let cs = b.chunk_size;
        if cs == 0 {
            return Err(plan_err(&self.plan.baseline_key, "chunk size 0"));
        }
        let end = start + out.len() as u64;
        let mut at = start;
        while at < end {
            let i = at / cs;
            let c_start = i * cs;
            let c_end = (c_start + cs).min(b.size);
            let part_end = end.min(c_end);
            let dst = &mut out[(at - start) as usize..(part_end - start) as usize];
            match b.chunks.get(i as usize) {
                None => {
                    return Err(plan_err(
                        &self.plan.baseline_key,
                        format!("no chunk {i}: the baseline lists {}", b.chunks.len()),
                    ))
                }
                Some(None) => dst.fill(0),
                Some(Some(hash)) => {
                    let len = (c_end - c_start) as usize;
                    let data = self
                        .load(Key::Chunk(self.chunk_ids[i as usize]), || {
                            self.fetch_chunk(hash, len)
                                .map(Val::Bytes)
                                .map_err(Arc::new)
                        })
                        .map_err(fetch_err(format!("{} at {at}", self.plan.disk)))?
                        .bytes();
                    let a = (at - c_start) as usize;
                    dst.copy_from_slice(&data[a..a + dst.len()]);
                }
            }
            at = part_end;
        }
        Ok(())
    }

    fn fetch_chunk(&self, hash: &str, len: usize) -> Result<Arc<Vec<u8>>, RestoreError> {
        let store = self.store.as_ref().ok_or_else(|| {
            corrupt(
                rf::chunk_key(hash),
                "baseline chunks are in the repository, and no repository was given",
            )
        })?;
        let data = self.rt.block_on(restore::fetch_chunk(store, hash, len))?;
        if data.len() != len {
            return Err(corrupt(
                rf::chunk_key(hash),
                format!("chunk is {} bytes, expected {len}", data.len()),
            ));
        }
        Ok(Arc::new(data))
    }

    /// Bytes of a journal extent: `pos` is the payload position of its
    /// first byte in segment `segment`.
    fn read_journal(&self, segment: u32, pos: u64, out: &mut [u8]) -> Result<(), ImageError> {
        let disk = &self.plan.disk;
        let seg = self
            .plan
            .segments
            .get(segment as usize)
            .ok_or_else(|| plan_err(disk, format!("extent map names segment {segment}")))?;
        let idx = seg.entries.partition_point(|x| x.payload_pos <= pos);
        let r = idx
            .checked_sub(1)
            .map(|i| &seg.entries[i])
            .filter(|r| r.kind == Kind::Write && pos + out.len() as u64 <= r.payload_pos + r.length)
            .ok_or_else(|| {
                plan_err(
                    format!("{disk} segment {}-{}", seg.first_seq, seg.last_seq),
                    format!("no WRITE record holds payload position {pos}"),
                )
            })?;
        let off = (pos - r.payload_pos) as usize;
        let hpos = r.payload_pos - RECORD_HEADER_LEN as u64;
        let pend = r.payload_pos + r.length;
        if let SegLoc::Repo { frames, .. } = &seg.loc {
            let f0 = frame_of(frames, hpos);
            let f1 = frame_of(frames, pend - 1);
            if let (Some(f0), true) = (f0, f0 == f1) {
                // The whole record is in one frame: served from the frame
                // if it is cached, else from the spill file if the frame
                // went there, else from the frame fetched.
                let key = Key::Frame(segment, f0 as u32);
                let cached = self.cache.peek(&key).map(Val::frame);
                if cached.is_none() && self.serve_spilled(&key, r, off, out)? {
                    return Ok(());
                }
                let fr = match cached {
                    Some(fr) => fr,
                    None => self.frame(segment, seg, f0)?,
                };
                let base = frames[f0].raw_offset;
                let (a, b) = ((hpos - base) as usize, (pend - base) as usize);
                let at = || format!("{disk} at payload {pos}");
                if b > fr.data.len() {
                    let key = rf::segment_key(&self.plan.vm, disk, seg.first_seq, seg.last_seq);
                    let e = corrupt(key, "frame shorter than the index says");
                    return Err(fetch_err(at())(Arc::new(e)));
                }
                if !lock(&fr.checked).contains(&r.payload_pos) {
                    restore::check_record(disk, r, &fr.data[a..b])
                        .map_err(|e| fetch_err(at())(Arc::new(e)))?;
                    lock(&fr.checked).insert(r.payload_pos);
                }
                let p = a + RECORD_HEADER_LEN + off;
                out.copy_from_slice(&fr.data[p..p + out.len()]);
                return Ok(());
            }
        }
        // A local segment, or a record across frames: the record, whole.
        let key = Key::Record(segment, r.payload_pos);
        if self.cache.peek(&key).is_none() && self.serve_spilled(&key, r, off, out)? {
            return Ok(());
        }
        let rec = self
            .load(key, || {
                self.fetch_record(segment, seg, r)
                    .map(Val::Bytes)
                    .map_err(Arc::new)
            })
            .map_err(fetch_err(format!("{disk} at payload {pos}")))?
            .bytes();
        let p = RECORD_HEADER_LEN + off;
        out.copy_from_slice(&rec[p..p + out.len()]);
        Ok(())
    }

    /// The cache's entry `key`, loaded with `load` if missing; decoded
    /// journal bytes it pushes out go to the spill file.
    fn load(
        &self,
        key: Key,
        load: impl FnOnce() -> Result<Val, Arc<RestoreError>>,
    ) -> Result<Val, Arc<RestoreError>> {
        let (r, evicted) = self.cache.get_evicting(&key, load);
        if let Some(spill) = &self.spill {
            for (k, v) in evicted {
                match (k, v) {
                    (Key::Frame(s, f), Val::Frame(fr)) => {
                        let base = match self.plan.segments.get(s as usize).map(|x| &x.loc) {
                            Some(SegLoc::Repo { frames, .. }) => frames.get(f as usize),
                            _ => None,
                        };
                        if let Some(b) = base {
                            spill.put(k, b.raw_offset, &fr.data);
                        }
                    }
                    (Key::Record(_, ppos), Val::Bytes(b)) => {
                        spill.put(k, ppos - RECORD_HEADER_LEN as u64, &b);
                    }
                    // Chunks are fetched again: a sequential read needs
                    // each once.
                    _ => {}
                }
            }
        }
        r
    }

    /// Serve `out` (record `r`'s payload from `off`) from the spill file if
    /// the entry `key` went there: the record read whole and its CRC
    /// checked first. False if the spill file does not have it.
    fn serve_spilled(
        &self,
        key: &Key,
        r: &IndexEntry,
        off: usize,
        out: &mut [u8],
    ) -> Result<bool, ImageError> {
        let Some(spill) = &self.spill else {
            return Ok(false);
        };
        let hpos = r.payload_pos - RECORD_HEADER_LEN as u64;
        let Some(got) = spill.get(key, hpos..r.payload_pos + r.length) else {
            return Ok(false);
        };
        let at = || {
            format!(
                "{} at payload {}",
                self.plan.disk,
                r.payload_pos + off as u64
            )
        };
        let raw = got.map_err(|source| {
            let e = RestoreError::Io {
                path: "export spill file".into(),
                source,
            };
            fetch_err(at())(Arc::new(e))
        })?;
        restore::check_record(&self.plan.disk, r, &raw)
            .map_err(|e| fetch_err(at())(Arc::new(e)))?;
        let p = RECORD_HEADER_LEN + off;
        out.copy_from_slice(&raw[p..p + out.len()]);
        Ok(true)
    }

    fn fetch_record(
        &self,
        segment: u32,
        seg: &SegRef,
        r: &IndexEntry,
    ) -> Result<Arc<Vec<u8>>, RestoreError> {
        let hpos = r.payload_pos - RECORD_HEADER_LEN as u64;
        let range = hpos..r.payload_pos + r.length;
        let raw = match self.local.get(&segment) {
            Some(f) => {
                let mut b = vec![0u8; (range.end - range.start) as usize];
                f.read_exact_at(&mut b, range.start)
                    .map_err(|source| RestoreError::Io {
                        path: match &seg.loc {
                            SegLoc::Local(p) => p.clone(),
                            SegLoc::Repo { .. } => Default::default(),
                        },
                        source,
                    })?;
                b
            }
            None => self.rt.block_on(restore::read_raw(
                self.store.as_ref(),
                &self.plan.vm,
                &self.plan.disk,
                seg,
                range,
            ))?,
        };
        restore::check_record(&self.plan.disk, r, &raw)?;
        Ok(Arc::new(raw))
    }

    /// Frame `f` of a repository segment, decompressed.
    fn frame(&self, segment: u32, seg: &SegRef, f: usize) -> Result<Arc<FrameBuf>, ImageError> {
        let v = self
            .load(Key::Frame(segment, f as u32), || {
                self.fetch_frame(seg, f).map(Val::Frame).map_err(Arc::new)
            })
            .map_err(fetch_err(format!("{} segment frame", self.plan.disk)))?;
        Ok(v.frame())
    }

    fn fetch_frame(&self, seg: &SegRef, f: usize) -> Result<Arc<FrameBuf>, RestoreError> {
        let key = rf::segment_key(&self.plan.vm, &self.plan.disk, seg.first_seq, seg.last_seq);
        let SegLoc::Repo {
            frames,
            object_size,
        } = &seg.loc
        else {
            return Err(corrupt(key, "not a repository segment"));
        };
        let store = self.store.as_ref().ok_or_else(|| {
            corrupt(
                &key,
                "segment is only in the repository, and no repository was given",
            )
        })?;
        let Some(start) = frames.get(f).map(|x| x.object_offset) else {
            return Err(corrupt(key, format!("no frame {f} in the index")));
        };
        let end = frames.get(f + 1).map_or(*object_size, |n| n.object_offset);
        if end < start {
            return Err(corrupt(key, "frame table out of order"));
        }
        let retry = RetryPolicy::default();
        let obj = self
            .rt
            .block_on(with_retry(&key, &retry, || {
                store.get_range(&key, start..end)
            }))
            .map_err(ReadError::from)?;
        let data = rf::decompress_segment(&key, &obj, 1).map_err(ReadError::from)?;
        if let Some(n) = frames.get(f + 1) {
            if data.len() as u64 != n.raw_offset - frames[f].raw_offset {
                return Err(corrupt(
                    key,
                    format!(
                        "frame {f} is {} bytes, the index says {}",
                        data.len(),
                        n.raw_offset - frames[f].raw_offset
                    ),
                ));
            }
        }
        Ok(Arc::new(FrameBuf {
            data,
            checked: Mutex::new(HashSet::new()),
        }))
    }

    /// Say why a read failed on stderr the first time a given reason (a
    /// corrupt object, …) comes up: never once per request.
    fn note_error(&self, e: &ImageError) {
        let (what, why) = match e {
            ImageError::Plan { what, why } => (what.clone(), why.clone()),
            ImageError::Fetch { what, source } => (what.clone(), source.to_string()),
        };
        let mut r = lock(&self.reported);
        if r.len() < MAX_REPORTED && r.insert(why.clone()) {
            eprintln!("cdp export: reads failing with EIO ({what}): {why}");
        }
    }
}

/// The frame holding raw position `x`.
fn frame_of(frames: &[rf::Frame], x: u64) -> Option<usize> {
    frames.partition_point(|f| f.raw_offset <= x).checked_sub(1)
}

// ---------------------------------------------------------------------------
// As an NBD backend

/// A point image is a read-only NBD backend: served by
/// [`cdp_core::nbd::server`]. A read that fails says why on stderr (once per
/// reason) and reaches the client as EIO.
impl nbd_server::Backend for PointImage {
    fn size(&self) -> u64 {
        self.plan.size
    }

    fn read_only(&self) -> bool {
        true
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read(offset, buf).map_err(|e| {
            self.note_error(&e);
            io::Error::other(e)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    fn bytes(n: usize) -> Result<Arc<Vec<u8>>, String> {
        Ok(Arc::new(vec![0u8; n]))
    }

    #[test]
    fn lru_evicts_least_recently_used_within_its_bound() {
        let c: Cache<u32, Arc<Vec<u8>>, String> = Cache::new(300);
        for k in 0..3 {
            c.get(&k, || bytes(100)).unwrap();
        }
        // Touch 0: 1 becomes the oldest.
        c.get(&0, || panic!("0 is cached")).unwrap();
        c.get(&3, || bytes(100)).unwrap();
        assert_eq!(c.stats().0, 300);
        let mut reloaded = false;
        c.get(&1, || {
            reloaded = true;
            bytes(100)
        })
        .unwrap();
        assert!(reloaded, "1 was the least recently used");
        c.get(&0, || panic!("0 was used recently")).unwrap();
        // An entry larger than the whole bound is kept alone.
        c.get(&9, || bytes(1000)).unwrap();
        assert_eq!(c.stats().0, 1000);
        c.get(&9, || panic!("9 is cached")).unwrap();
    }

    #[test]
    fn a_load_hands_back_what_it_pushed_out_and_peek_never_loads() {
        let c: Cache<u32, Arc<Vec<u8>>, String> = Cache::new(200);
        assert!(c.get_evicting(&1, || bytes(100)).1.is_empty());
        assert!(c.get_evicting(&2, || bytes(100)).1.is_empty());
        assert!(c.peek(&3).is_none(), "3 was never loaded");
        // Peeking 1 makes 2 the least recently used: 3 pushes 2 out.
        assert!(c.peek(&1).is_some());
        let (v, out) = c.get_evicting(&3, || bytes(100));
        assert_eq!(v.unwrap().len(), 100);
        assert_eq!(out.iter().map(|(k, _)| *k).collect::<Vec<_>>(), vec![2]);
        assert!(c.peek(&2).is_none());
        assert_eq!(c.stats().0, 200);
    }

    #[test]
    fn the_spill_file_gives_back_exactly_what_was_put_and_nothing_else() {
        let Some(sp) = Spill::new() else {
            panic!("no O_TMPFILE in $TMPDIR, /var/tmp or the temp dir");
        };
        let a: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let b = vec![9u8; 3000];
        sp.put(Key::Frame(1, 2), 1 << 20, &a);
        sp.put(Key::Record(3, 700), 600, &b);
        // Put twice: the first stays.
        sp.put(Key::Frame(1, 2), 1 << 20, &b);
        let got = sp.get(&Key::Frame(1, 2), (1 << 20) + 10..(1 << 20) + 4010);
        assert!(got.unwrap().unwrap() == a[10..4010]);
        assert_eq!(sp.get(&Key::Record(3, 700), 600..3600).unwrap().unwrap(), b);
        // Outside what was kept, or never kept: not there.
        assert!(sp
            .get(&Key::Frame(1, 2), (1 << 20) + 4000..(1 << 20) + 5001)
            .is_none());
        assert!(sp
            .get(&Key::Frame(1, 2), (1 << 20) - 1..(1 << 20) + 1)
            .is_none());
        assert!(sp.get(&Key::Frame(1, 3), 0..1).is_none());
    }

    #[test]
    fn errors_are_not_cached() {
        let c: Cache<u32, Arc<Vec<u8>>, String> = Cache::new(300);
        assert!(c.get(&1, || Err("down".into())).is_err());
        assert_eq!(c.get(&1, || bytes(5)).unwrap().len(), 5);
        assert_eq!(c.stats().0, 5);
    }

    #[test]
    fn concurrent_misses_load_once() {
        let c: Arc<Cache<u32, Arc<Vec<u8>>, String>> = Arc::new(Cache::new(1 << 20));
        let loads = Arc::new(AtomicU64::new(0));
        let ts: Vec<_> = (0..8)
            .map(|_| {
                let (c, loads) = (c.clone(), loads.clone());
                std::thread::spawn(move || {
                    c.get(&7, || {
                        loads.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(50));
                        bytes(10)
                    })
                    .unwrap()
                })
            })
            .collect();
        for t in ts {
            assert_eq!(t.join().unwrap().len(), 10);
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
    }

    const CS: u64 = 4096;

    /// A point image of a baseline only: chunk 0 and 2 hold `data`'s
    /// bytes (the same chunk, stored once), chunk 1 reads as zeros, and a
    /// ZERO extent covers bytes 100..200. The chunk is in a `file://`
    /// repository.
    fn image(
        corrupt_chunk: bool,
    ) -> (
        tempfile::TempDir,
        tokio::runtime::Runtime,
        PointImage,
        Vec<u8>,
    ) {
        let d = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let store = Store::open(&format!("file://{}", d.path().display()), None).unwrap();
        let data: Vec<u8> = (0..CS).map(|i| (i % 253) as u8 + 1).collect();
        let hash = blake3::hash(&data).to_hex().to_string();
        let mut obj = rf::compress_chunk(&data).unwrap();
        if corrupt_chunk {
            // Valid zstd of other bytes: only the hash check can tell.
            obj = rf::compress_chunk(&vec![7u8; CS as usize]).unwrap();
        }
        rt.block_on(store.put(&rf::chunk_key(&hash), obj.into()))
            .unwrap();
        let mut extents = cdp_core::journal::extents::ExtentMap::new();
        extents.set(100, 200, Source::Zero);
        let plan = Plan {
            vm: "u-1".into(),
            disk: "vda".into(),
            size: 3 * CS,
            point_seq: 0,
            baseline_key: "b".into(),
            baseline: rf::Baseline {
                vm_uuid: "u-1".into(),
                disk: "vda".into(),
                size: 3 * CS,
                chunk_size: CS,
                s0: 0,
                s1: 0,
                started_ns: 0,
                finished_ns: 0,
                chunks: vec![Some(hash.clone()), None, Some(hash)],
            },
            extents,
            segments: Vec::new(),
            records: 0,
        };
        let img = PointImage::new(plan, Some(store), rt.handle().clone(), 1 << 20).unwrap();
        (d, rt, img, data)
    }

    #[test]
    fn a_point_image_reads_baseline_chunks_zeros_and_extents_with_one_fetch() {
        let (_d, _rt, img, data) = image(false);
        let mut want = data.clone();
        want[100..200].fill(0);
        want.extend(vec![0u8; CS as usize]);
        want.extend(&data);
        let mut buf = vec![0xffu8; 3 * CS as usize];
        img.read(0, &mut buf).unwrap();
        assert!(buf == want, "the whole disk");
        let mut part = vec![0u8; 300];
        img.read(CS - 150, &mut part).unwrap();
        assert!(part[..] == want[(CS - 150) as usize..(CS + 150) as usize]);
        // One chunk object, fetched once (chunks 0 and 2 share it).
        let (held, _hits, misses) = img.cache_stats();
        assert_eq!((held, misses), (CS, 1));
        // Read through the NBD backend interface.
        use nbd_server::Backend;
        assert_eq!(img.size(), 3 * CS);
        let mut b = vec![0u8; 10];
        img.read_at(&mut b, 2 * CS).unwrap();
        assert_eq!(b, data[..10]);
    }

    #[test]
    fn a_point_image_refuses_reads_beyond_the_disk_and_unchecked_bytes() {
        let (_d, _rt, img, _) = image(false);
        let mut b = vec![0u8; 10];
        let e = img.read(3 * CS - 5, &mut b).unwrap_err();
        assert!(matches!(e, ImageError::Plan { .. }), "{e}");
        let (_d, _rt, img, _) = image(true);
        let e = img.read(0, &mut b).unwrap_err();
        match &e {
            ImageError::Fetch { what, source } => {
                assert_eq!(what, "vda at 0");
                assert!(matches!(**source, RestoreError::Read(_)), "{source}");
            }
            other => panic!("{other}"),
        }
        // Zeros need no fetch; errors are not cached (each read tries again).
        img.read(CS, &mut b).unwrap();
        assert_eq!(b, vec![0u8; 10]);
        assert!(img.read(2 * CS, &mut b).is_err());
        assert_eq!(img.cache_stats().2, 2, "fetched again after the error");
        // Through the NBD interface the failure is an I/O error (EIO).
        use nbd_server::Backend;
        let e = img.read_at(&mut b, 0).unwrap_err();
        assert_eq!(e.raw_os_error(), None);
        assert_eq!(
            cdp_core::nbd::proto::nbd_errno(&e),
            cdp_core::nbd::proto::errno::EIO
        );
    }
}
