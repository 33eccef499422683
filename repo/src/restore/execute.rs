//! Executing a [`Plan`]: every byte of the disk once, to a [`Sink`], the
//! journal extents and the baseline's chunks fetched at the same time.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use cdp_core::journal::extents::Source;
use cdp_core::journal::format::{IndexEntry, RECORD_HEADER_LEN};
use futures::StreamExt;

use super::aligned::{AlignedBuf, POOL_LEN};
use super::history::SegRef;
use super::plan::Plan;
use super::read::{check_record, decompress_chunk_into, read_chunk_file, read_raw};
use super::sink::Sink;
use super::{io_err, RestoreError};
use crate::format as rf;
use crate::read::ReadError;
use crate::store::{with_retry, RetryPolicy, Store};

#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct RestoreStats {
    pub bytes: u64,
    pub journal_records: u64,
    pub journal_bytes: u64,
    pub chunks_fetched: u64,
    pub chunk_bytes: u64,
}

pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// Progress of long work whose total is learnt on the way (loading a
/// history, verify, retention): `Found(n)`, n more units of work are known
/// (the total grows); `Done(n)`, n of them are finished. Every unit found
/// is reported done once, whatever became of it. Called from any thread;
/// the callback does no I/O of the work's (the caller's display only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tick {
    Found(u64),
    Done(u64),
}

/// The callback of [`Tick`]s.
pub type Ticker = Arc<dyn Fn(Tick) + Send + Sync>;

/// Report `t` to `ticker`, if any.
pub fn tick_with(ticker: Option<&Ticker>, t: Tick) {
    if let Some(f) = ticker {
        f(t)
    }
}

fn tick(progress: &Option<Progress>, n: u64) {
    if let Some(p) = progress {
        p(n)
    }
}

/// Journal extents of one segment: (start, end, payload position).
type SegExtents = Vec<(u64, u64, u64)>;

/// Run a plan: every byte of the disk once, to `sink`.
pub async fn execute(
    plan: &Plan,
    store: Option<&Store>,
    sink: Arc<dyn Sink>,
    progress: Option<Progress>,
) -> Result<RestoreStats, RestoreError> {
    let mut stats = RestoreStats::default();
    // 1. Journal extents, grouped by segment; each referenced record is read
    //    whole and its CRC checked.
    let by_seg = journal_extents(plan, sink.as_ref(), &progress)?;
    let seg_jobs = by_seg.into_iter().map(|(i, extents)| {
        let seg = &plan.segments[i as usize];
        restore_segment(plan, store, seg, extents, sink.clone(), progress.clone())
    });
    let journal = futures::stream::iter(seg_jobs)
        .buffer_unordered(4)
        .collect::<Vec<_>>();
    // 2. The rest from the baseline's chunks, at the same time (the
    //    ranges are disjoint).
    let chunks = restore_chunks(plan, store, sink.clone(), progress.clone());
    let (journal, chunks) = futures::join!(journal, chunks);
    for r in journal {
        let (n, b) = r?;
        stats.journal_records += n;
        stats.journal_bytes += b;
    }
    (stats.chunks_fetched, stats.chunk_bytes) = chunks?;
    stats.bytes = plan.size;
    Ok(stats)
}

/// Every chunk of the baseline the plan needs, fetched, decoded and
/// written 8 at a time. Returns (chunks fetched, bytes).
async fn restore_chunks(
    plan: &Plan,
    store: Option<&Store>,
    sink: Arc<dyn Sink>,
    progress: Option<Progress>,
) -> Result<(u64, u64), RestoreError> {
    let jobs = (0..plan.baseline.chunks.len())
        .map(|i| restore_chunk(plan, store, i, sink.clone(), progress.clone()));
    let mut stream = futures::stream::iter(jobs).buffered(8);
    let mut done = (0, 0);
    while let Some(r) = stream.next().await {
        let (n, bytes) = r?;
        done.0 += n;
        done.1 += bytes;
    }
    Ok(done)
}

/// Journal extents that follow on on the disk are written together, in
/// runs of at most this many bytes.
const RUN_LEN: u64 = 8 << 20;

/// The plan's journal extents grouped by segment; the zero extents are
/// given to the sink right away.
fn journal_extents(
    plan: &Plan,
    sink: &dyn Sink,
    progress: &Option<Progress>,
) -> Result<HashMap<u32, SegExtents>, RestoreError> {
    let mut by_seg: HashMap<u32, SegExtents> = HashMap::new();
    for (s, e, src) in plan.extents.iter() {
        match src {
            Source::Journal { segment, pos } => {
                by_seg.entry(segment).or_default().push((s, e, pos))
            }
            Source::Zero => {
                sink.zero(s, e - s).map_err(io_err(Path::new(&plan.disk)))?;
                tick(progress, e - s);
            }
        }
    }
    Ok(by_seg)
}

/// One segment's extents: the records they come from, read and checked
/// whole, then the extents written. Returns (records, bytes).
async fn restore_segment(
    plan: &Plan,
    store: Option<&Store>,
    seg: &SegRef,
    extents: SegExtents,
    sink: Arc<dyn Sink>,
    progress: Option<Progress>,
) -> Result<(u64, u64), RestoreError> {
    let recs = records_of(seg, &extents);
    let runs = read_runs(plan, store, seg, &recs).await?;
    // Checking and writing run on the blocking pool, beside the chunks.
    let disk = plan.disk.clone();
    tokio::task::spawn_blocking(move || {
        // The run holding raw position `pos`: its start and bytes.
        let at = |pos: u64| {
            let (lo, raw) = &runs[runs.partition_point(|r| r.0 <= pos) - 1];
            (*lo, raw)
        };
        for r in &recs {
            let (lo, raw) = at(r.payload_pos - RECORD_HEADER_LEN as u64);
            let a = (r.payload_pos - RECORD_HEADER_LEN as u64 - lo) as usize;
            let b = (r.payload_pos + r.length - lo) as usize;
            check_record(&disk, r, &raw[a..b])?;
        }
        let piece = |&(s, e, pos): &(u64, u64, u64)| {
            let (lo, raw) = at(pos);
            let a = (pos - lo) as usize;
            &raw[a..a + (e - s) as usize]
        };
        let bytes = write_extents(sink.as_ref(), &extents, piece, &progress)
            .map_err(io_err(Path::new(&disk)))?;
        Ok::<_, RestoreError>((recs.len() as u64, bytes))
    })
    .await
    .expect("restore worker panicked")
}

/// Write a segment's extents (sorted by disk offset, disjoint), `piece`
/// giving each one's bytes. Extents that follow on on the disk are copied
/// together into runs of aligned buffers of up to [`RUN_LEN`] bytes and
/// written with one [`Sink::write_gathered`]: a journal of small records
/// costs a few large writes, not one write (and one wait on the file's
/// lock) per record. Returns the bytes written.
fn write_extents<'a>(
    sink: &dyn Sink,
    extents: &'a [(u64, u64, u64)],
    piece: impl Fn(&'a (u64, u64, u64)) -> &'a [u8],
    progress: &Option<Progress>,
) -> std::io::Result<u64> {
    let mut bytes = 0;
    let mut i = 0;
    while i < extents.len() {
        let start = extents[i].0;
        let mut j = i + 1;
        while j < extents.len()
            && extents[j].0 == extents[j - 1].1
            && extents[j].1 - start <= RUN_LEN
        {
            j += 1;
        }
        let end = extents[j - 1].1;
        if j == i + 1 {
            sink.write(start, piece(&extents[i]))?;
        } else {
            let mut bufs: Vec<AlignedBuf> = Vec::new();
            let mut filled = 0;
            let mut at = start;
            for x in &extents[i..j] {
                let mut src = piece(x);
                while !src.is_empty() {
                    if bufs.is_empty() || filled == POOL_LEN {
                        bufs.push(AlignedBuf::take(POOL_LEN.min((end - at) as usize)));
                        filled = 0;
                    }
                    let buf = bufs.last_mut().expect("just pushed");
                    let n = src.len().min(buf.len() - filled);
                    buf[filled..filled + n].copy_from_slice(&src[..n]);
                    (filled, at, src) = (filled + n, at + n as u64, &src[n..]);
                }
            }
            sink.write_gathered(start, &bufs)?;
        }
        bytes += end - start;
        tick(progress, end - start);
        i = j;
    }
    Ok(bytes)
}

/// The records a segment's extents come from, in segment order, once each.
fn records_of(seg: &SegRef, extents: &SegExtents) -> Vec<IndexEntry> {
    let mut recs: Vec<IndexEntry> = Vec::new();
    for &(s, e, pos) in extents {
        let idx = seg.entries.partition_point(|x| x.payload_pos <= pos) - 1;
        let r = &seg.entries[idx];
        debug_assert!(pos + (e - s) <= r.payload_pos + r.length);
        if recs.last().is_none_or(|l| l.payload_pos != r.payload_pos) {
            recs.push(*r);
        }
    }
    recs.sort_by_key(|r| r.payload_pos);
    recs.dedup_by_key(|r| r.payload_pos);
    recs
}

/// Runs of records close together, each read with one ranged GET of the
/// frames that hold it: a segment with a few surviving records costs those
/// records' frames, not the whole segment. Returns (raw start, bytes) per
/// run, in order.
async fn read_runs(
    plan: &Plan,
    store: Option<&Store>,
    seg: &SegRef,
    recs: &[IndexEntry],
) -> Result<Vec<(u64, Vec<u8>)>, RestoreError> {
    const SPLIT: u64 = 2 * rf::FRAME_RAW as u64;
    let mut bounds: Vec<(u64, u64)> = Vec::new();
    for r in recs {
        let (a, b) = (
            r.payload_pos - RECORD_HEADER_LEN as u64,
            r.payload_pos + r.length,
        );
        match bounds.last_mut() {
            Some(l) if a < l.1 + SPLIT => l.1 = l.1.max(b),
            _ => bounds.push((a, b)),
        }
    }
    futures::stream::iter(bounds.into_iter().map(|(lo, hi)| async move {
        let raw = read_raw(store, &plan.vm, &plan.disk, seg, lo..hi).await?;
        Ok::<_, RestoreError>((lo, raw))
    }))
    .buffered(4)
    .collect::<Vec<_>>()
    .await
    .into_iter()
    .collect()
}

/// Chunk `i` of the baseline, for the ranges no journal extent covers: zeros
/// for a chunk that is all zeros, else fetched, checked against its name and
/// written. Returns (chunks fetched, bytes).
async fn restore_chunk(
    plan: &Plan,
    store: Option<&Store>,
    i: usize,
    sink: Arc<dyn Sink>,
    progress: Option<Progress>,
) -> Result<(u64, u64), RestoreError> {
    let b = &plan.baseline;
    let start = i as u64 * b.chunk_size;
    let end = (start + b.chunk_size).min(b.size);
    // Of a disk shrunk since the baseline, only what is left of it.
    if start >= plan.size {
        return Ok((0, 0));
    }
    let gaps = plan.extents.uncovered(start, end.min(plan.size));
    if gaps.is_empty() {
        return Ok((0, 0));
    }
    let Some(hash) = &b.chunks[i] else {
        for (s, e) in gaps {
            sink.zero(s, e - s).map_err(io_err(Path::new(&plan.disk)))?;
            tick(&progress, e - s);
        }
        return Ok((0, 0));
    };
    let store = store.ok_or_else(|| RestoreError::Corrupt {
        what: rf::chunk_key(hash),
        why: "baseline chunks are in the repository, and no repository was given".into(),
    })?;
    let key = rf::chunk_key(hash);
    // A local object (file://) is read straight into the buffer written
    // from; if it cannot be opened, `get` (with retries) says why.
    let obj = match store.open_local(&key).await {
        Ok(Some((file, size))) => Chunk::File(file, size),
        _ => {
            let retry = RetryPolicy::default();
            let obj: Bytes = with_retry(&key, &retry, || store.get(&key))
                .await
                .map_err(ReadError::from)?;
            Chunk::Bytes(obj)
        }
    };
    // Keyed names in an encrypted repository (docs/REPOSITORY_FORMAT.md, "Encryption").
    let namer = store.chunk_namer().await.map_err(ReadError::from)?;
    // Decompressing, hashing and writing run on the blocking pool: in
    // parallel, off the thread that fetches, into a pooled buffer.
    let (hash, disk) = (hash.clone(), plan.disk.clone());
    tokio::task::spawn_blocking(move || {
        let mut data = AlignedBuf::take((end - start) as usize);
        match obj {
            Chunk::File(f, size) => read_chunk_file(&namer, &hash, &f, size, &mut data)?,
            Chunk::Bytes(b) => decompress_chunk_into(&namer, &hash, &b, &mut data)?,
        }
        for (s, e) in gaps {
            sink.write(s, &data[(s - start) as usize..(e - start) as usize])
                .map_err(io_err(Path::new(&disk)))?;
            tick(&progress, e - s);
        }
        Ok((1, end - start))
    })
    .await
    .expect("restore worker panicked")
}

/// A chunk object as fetched: a local file to read in place, or bytes.
enum Chunk {
    File(std::fs::File, u64),
    Bytes(Bytes),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records every write and gathered write it is given.
    #[derive(Default)]
    struct Log(Mutex<Vec<(u64, Vec<u8>, usize)>>);

    impl Sink for Log {
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.0.lock().unwrap().push((offset, data.to_vec(), 1));
            Ok(())
        }
        fn zero(&self, _offset: u64, _len: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn write_gathered(&self, offset: u64, bufs: &[AlignedBuf]) -> std::io::Result<()> {
            let data: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            self.0.lock().unwrap().push((offset, data, bufs.len()));
            Ok(())
        }
    }

    /// Extents that follow on on the disk are written together (at most
    /// RUN_LEN at a time), with the right bytes; the others one by one.
    #[test]
    fn adjacent_extents_are_written_together() {
        let k = 4096u64;
        // Disk offsets: 0..3 blocks adjacent; a gap; one block; then
        // RUN_LEN + 2 blocks adjacent (two runs); payload positions
        // deliberately out of order.
        let mut extents = vec![(0, k, 9 * k), (k, 2 * k, 0), (2 * k, 3 * k, 5 * k)];
        extents.push((10 * k, 11 * k, 3 * k));
        let base = 20 * k;
        let n = RUN_LEN / k + 2;
        extents.extend((0..n).map(|i| (base + i * k, base + (i + 1) * k, (i % 7) * k)));
        let payload = |pos: u64| -> Vec<u8> { (0..k).map(|i| (pos / k * 31 + i) as u8).collect() };
        let pieces: Vec<Vec<u8>> = extents.iter().map(|x| payload(x.2)).collect();
        let log = Log::default();
        let piece = |x: &(u64, u64, u64)| {
            let i = extents.iter().position(|y| y == x).unwrap();
            &pieces[i][..]
        };
        let bytes = write_extents(&log, &extents, piece, &None).unwrap();
        assert_eq!(bytes, extents.iter().map(|x| x.1 - x.0).sum::<u64>());
        let writes = log.0.into_inner().unwrap();
        let starts: Vec<u64> = writes.iter().map(|w| w.0).collect();
        let run2 = base + RUN_LEN;
        assert_eq!(starts, vec![0, 10 * k, base, run2]);
        assert_eq!(writes[0].2, 1, "3 blocks fit one buffer");
        assert_eq!(writes[1].2, 1);
        assert_eq!(writes[2].1.len() as u64, RUN_LEN);
        assert_eq!(writes[3].1.len() as u64, 2 * k);
        // Every byte where it belongs.
        for (at, data, _) in &writes {
            for (x, p) in extents.iter().zip(&pieces) {
                if x.0 >= *at && x.1 <= at + data.len() as u64 {
                    let a = (x.0 - at) as usize;
                    assert_eq!(&data[a..a + k as usize], &p[..]);
                }
            }
        }
    }
}
