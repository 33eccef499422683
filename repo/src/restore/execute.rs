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

/// Run a plan: every byte of the disk once, to `sink`; returns once the
/// sink has written all it was given ([`Sink::finish`]).
pub async fn execute(
    plan: &Plan,
    store: Option<&Store>,
    sink: Arc<dyn Sink>,
    progress: Option<Progress>,
) -> Result<RestoreStats, RestoreError> {
    let r = execute_all(plan, store, sink.clone(), progress).await;
    // Waiting for the writer blocks: off the runtime's threads.
    let finished = tokio::task::spawn_blocking(move || sink.finish())
        .await
        .expect("restore writer's finish panicked");
    settle(r, finished, &plan.disk)
}

/// The outcome of a restore from its work's and its writer's: a write
/// error of the writer wins over what it caused (hand-overs refused once
/// it had stopped); a job never handed over is the consequence of the
/// work's own error, or else an error of its own: never success.
fn settle(
    r: Result<RestoreStats, RestoreError>,
    finished: std::io::Result<()>,
    disk: &str,
) -> Result<RestoreStats, RestoreError> {
    use super::writer::WriterError;
    let Err(e) = finished else { return r };
    let stopped = |x: &RestoreError| {
        matches!(x, RestoreError::Io { source, .. }
            if matches!(WriterError::of(source), Some(WriterError::Stopped)))
    };
    match (&r, WriterError::of(&e)) {
        (Err(x), Some(WriterError::Write { .. })) if stopped(x) => Err(io_err(Path::new(disk))(e)),
        (Err(_), _) => r,
        (Ok(_), _) => Err(io_err(Path::new(disk))(e)),
    }
}

async fn execute_all(
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
/// checked 8 at a time, and handed to the sink as ordered job `i` (chunk
/// `i`, so in disk order). Returns (chunks fetched, bytes).
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
/// together into runs of pooled buffers of up to [`RUN_LEN`] bytes, each
/// buffer handed over with [`Sink::write_owned`]: a journal of small
/// records costs a few large writes, not one write per record. Returns the
/// bytes written.
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
        let mut at = start;
        for b in bufs {
            let n = b.len() as u64;
            sink.write_owned(at, Bytes::from_owner(b))?;
            at += n;
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
/// handed to the sink as ordered job `i` (with no pieces when there is
/// nothing to write: every job is handed over once, unless this fails).
/// Returns (chunks fetched, bytes).
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
    let gaps = if start >= plan.size {
        Vec::new()
    } else {
        plan.extents.uncovered(start, end.min(plan.size))
    };
    let hash = match &b.chunks[i] {
        Some(hash) if !gaps.is_empty() => hash.clone(),
        _ => {
            for &(s, e) in &gaps {
                sink.zero(s, e - s).map_err(io_err(Path::new(&plan.disk)))?;
                tick(&progress, e - s);
            }
            let disk = plan.disk.clone();
            return tokio::task::spawn_blocking(move || {
                sink.write_ordered(i as u64, Vec::new())
                    .map_err(io_err(Path::new(&disk)))
                    .map(|()| (0, 0))
            })
            .await
            .expect("restore worker panicked");
        }
    };
    let store = store.ok_or_else(|| RestoreError::Corrupt {
        what: rf::chunk_key(&hash),
        why: "baseline chunks are in the repository, and no repository was given".into(),
    })?;
    let key = rf::chunk_key(&hash);
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
    // Decompressing and hashing run on the blocking pool: in parallel, off
    // the thread that fetches, into a pooled buffer that is then handed
    // over, only once its name is checked.
    let disk = plan.disk.clone();
    tokio::task::spawn_blocking(move || {
        let mut data = AlignedBuf::take((end - start) as usize);
        match obj {
            Chunk::File(f, size) => read_chunk_file(&namer, &hash, &f, size, &mut data)?,
            Chunk::Bytes(b) => decompress_chunk_into(&namer, &hash, &b, &mut data)?,
        }
        let data = Bytes::from_owner(data);
        let pieces = gaps
            .iter()
            .map(|&(s, e)| (s, data.slice((s - start) as usize..(e - start) as usize)))
            .collect();
        sink.write_ordered(i as u64, pieces)
            .map_err(io_err(Path::new(&disk)))?;
        tick(&progress, gaps.iter().map(|(s, e)| e - s).sum());
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

    /// Records every write it is given; an owned one's bytes are marked
    /// by `true`.
    #[derive(Default)]
    struct Log(Mutex<Vec<(u64, Vec<u8>, bool)>>);

    impl Sink for Log {
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.0.lock().unwrap().push((offset, data.to_vec(), false));
            Ok(())
        }
        fn zero(&self, _offset: u64, _len: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn write_owned(&self, offset: u64, data: Bytes) -> std::io::Result<()> {
            self.0.lock().unwrap().push((offset, data.to_vec(), true));
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
        assert!(writes.iter().all(|w| w.2), "every buffer is handed over");
        let starts: Vec<u64> = writes.iter().map(|w| w.0).collect();
        let mb = POOL_LEN as u64;
        let mut want = vec![0, 10 * k];
        want.extend((0..RUN_LEN / mb).map(|i| base + i * mb));
        want.push(base + RUN_LEN);
        assert_eq!(starts, want, "runs of whole buffers, a new run after a gap");
        assert_eq!(writes[0].1.len() as u64, 3 * k, "3 blocks in one buffer");
        assert_eq!(writes[1].1.len() as u64, k);
        assert!(writes[2..10].iter().all(|w| w.1.len() as u64 == mb));
        assert_eq!(writes[10].1.len() as u64, 2 * k);
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

    /// A writer target that records (offset, bytes) of every write.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Writes>>);
    type Writes = Vec<(u64, Vec<u8>)>;

    impl crate::restore::writer::Target for Recorder {
        fn write_at(&mut self, offset: u64, bufs: &[&[u8]]) -> std::io::Result<()> {
            self.0.lock().unwrap().push((offset, bufs.concat()));
            Ok(())
        }
    }

    /// A plan of `n` baseline chunks of 64 KiB, no journal; chunk 3 is
    /// zeros, chunk `bad` (if any) is named for other bytes than its
    /// object holds. Returns the plan and the disk's bytes.
    async fn chunk_plan(store: &Store, n: usize, bad: Option<usize>) -> (Plan, Vec<u8>) {
        let cs = 64 << 10;
        let mut disk = vec![0u8; n * cs];
        let mut chunks = Vec::new();
        for (i, c) in disk.chunks_mut(cs).enumerate() {
            if i == 3 {
                chunks.push(None);
                continue;
            }
            let mut x = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            for b in c.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = (x >> 24) as u8;
            }
            let obj = rf::compress_chunk(c).unwrap();
            let mut name = rf::ChunkNamer::Plain.name(c);
            if bad == Some(i) {
                name = rf::ChunkNamer::Plain.name(b"other bytes");
            }
            let _ = store.put(&rf::chunk_key(&name), Bytes::from(obj)).await;
            chunks.push(Some(name));
        }
        let baseline = rf::Baseline {
            vm_uuid: "vm".into(),
            disk: "vda".into(),
            size: disk.len() as u64,
            chunk_size: cs as u64,
            s0: 0,
            s1: 0,
            started_ns: 0,
            finished_ns: 0,
            chunks,
        };
        let plan = Plan {
            vm: "vm".into(),
            disk: "vda".into(),
            size: disk.len() as u64,
            point_seq: 0,
            baseline_key: "baseline".into(),
            baseline,
            extents: cdp_core::journal::extents::ExtentMap::new(),
            segments: Vec::new(),
            records: 0,
        };
        (plan, disk)
    }

    /// Through [`OrderedFile`](crate::restore::OrderedFile), the chunks
    /// reach the file in disk order (the offsets of the writes ascend), and
    /// the file gets exactly the disk (zeros left as holes). A chunk whose
    /// object is not what its name says fails the restore with that error,
    /// and nothing from it onwards is written.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chunks_are_written_in_disk_order_and_stop_at_a_bad_one() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("file://{}", d.path().display()), None).unwrap();
        let n = 40;
        let (plan, disk) = chunk_plan(&store, n, None).await;
        let rec = Recorder::default();
        let sink = crate::restore::OrderedFile::with_target(rec.clone()).unwrap();
        let stats = execute(&plan, Some(&store), Arc::new(sink), None)
            .await
            .unwrap();
        assert_eq!(stats.chunks_fetched, n as u64 - 1);
        let writes = std::mem::take(&mut *rec.0.lock().unwrap());
        let offsets: Vec<u64> = writes.iter().map(|w| w.0).collect();
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "writes out of disk order: {offsets:?}"
        );
        let mut file = vec![0u8; disk.len()];
        for (at, data) in &writes {
            file[*at as usize..*at as usize + data.len()].copy_from_slice(data);
        }
        assert!(file == disk, "the restored bytes differ");

        let d = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("file://{}", d.path().display()), None).unwrap();
        let bad = 9;
        let (plan, _) = chunk_plan(&store, n, Some(bad)).await;
        let rec = Recorder::default();
        let sink = crate::restore::OrderedFile::with_target(rec.clone()).unwrap();
        let e = execute(&plan, Some(&store), Arc::new(sink), None)
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("does not match its hash"),
            "the chunk's error, not the writer's: {e}"
        );
        let writes = rec.0.lock().unwrap();
        let end = writes.iter().map(|w| w.0 + w.1.len() as u64).max();
        assert!(
            end <= Some(bad as u64 * (64 << 10)),
            "written past the bad chunk: up to {end:?}"
        );
    }
}
