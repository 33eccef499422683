//! Object integrity: each index against its name and itself, each
//! segment object against its index (`--deep`: every frame, record and
//! CRC), each baseline against its name, and the chunks baselines name
//! (`--deep`: fetched and checked against their name).

use std::collections::{BTreeMap, HashMap};

use cdp_core::journal::format::{self as jf, RECORD_HEADER_LEN};
use futures::StreamExt;

use crate::format::{self as rf, Baseline, SegmentIndex};
use crate::restore::{tick_with, Tick, Ticker};
use crate::store::Store;

use super::collect::DiskScanner;
use super::{get, last_component, list, problem, strip_key, Checked, DiskScan, Kind, VerifyError};

pub(super) fn index(
    i: &SegmentIndex,
    vm: &str,
    disk: &str,
    first: u64,
    last: u64,
) -> Result<(), String> {
    let m = &i.meta;
    if m.vm_uuid != vm || m.disk != disk {
        return Err(format!(
            "index is of VM {} disk {}, not of {vm} {disk}",
            m.vm_uuid, m.disk
        ));
    }
    if m.first_seq != first || m.last_seq != last {
        return Err(format!(
            "index says seq {}-{}, its name {first}-{last}",
            m.first_seq, m.last_seq
        ));
    }
    if i.entries.is_empty() {
        return Err("index has no records".into());
    }
    let seqs_ok = i.entries.windows(2).all(|w| w[0].seq < w[1].seq)
        && i.entries[0].seq >= first
        && i.entries.last().unwrap().seq == last;
    if !seqs_ok {
        return Err("index records are not in seq order within the segment's range".into());
    }
    let pos_ok = i
        .entries
        .windows(2)
        .all(|w| w[0].payload_pos < w[1].payload_pos)
        && i.entries[0].payload_pos >= (jf::SEGMENT_HEADER_LEN + RECORD_HEADER_LEN) as u64
        && i.entries.last().unwrap().payload_pos <= m.raw_size;
    if !pos_ok {
        return Err("index record positions are out of order or outside the segment".into());
    }
    let frames_ok = !i.frames.is_empty()
        && i.frames[0].raw_offset == 0
        && i.frames[0].object_offset == 0
        && i.frames
            .windows(2)
            .all(|w| w[0].raw_offset < w[1].raw_offset && w[0].object_offset < w[1].object_offset)
        && i.frames.last().unwrap().raw_offset < m.raw_size
        && i.frames.last().unwrap().object_offset < m.object_size;
    if !frames_ok {
        return Err("index frame table is inconsistent".into());
    }
    Ok(())
}

/// Where each record ends in the raw segment: where the next one begins
/// (the last one: the end of the segment, conservatively).
fn record_ends(i: &SegmentIndex) -> Vec<u64> {
    let mut ends: Vec<u64> = i
        .entries
        .iter()
        .skip(1)
        .map(|e| e.payload_pos - RECORD_HEADER_LEN as u64)
        .collect();
    ends.push(i.meta.raw_size);
    ends
}

/// The first record (index into entries) that reaches raw offset `from`.
pub(super) fn first_record_at(i: &SegmentIndex, from: u64) -> usize {
    let ends = record_ends(i);
    ends.partition_point(|&e| e <= from)
}

/// Deep check of one segment object: the index of the first record that
/// cannot be read back from it (`entries.len()` when all can), and what is
/// wrong with the object.
fn segment_object(i: &SegmentIndex, obj: &[u8]) -> (usize, Vec<String>) {
    let m = &i.meta;
    let mut wrong = Vec::new();
    if obj.len() as u64 != m.object_size {
        wrong.push(format!(
            "object is {} bytes, its index says {}",
            obj.len(),
            m.object_size
        ));
    }
    if blake3::hash(obj).to_hex().as_str() != m.object_blake3 {
        wrong.push("BLAKE3 does not match its index".into());
    }
    // Frame by frame, up to the first that does not decompress to its size.
    // Reserved up to 64 MiB: the index's word is not trusted further.
    let mut raw = Vec::with_capacity(m.raw_size.min(64 << 20) as usize);
    let mut bad_from: Option<u64> = None;
    for (k, f) in i.frames.iter().enumerate() {
        let (o_end, r_end) = match i.frames.get(k + 1) {
            Some(n) => (n.object_offset, n.raw_offset),
            None => (m.object_size, m.raw_size),
        };
        let piece = obj.get(f.object_offset as usize..(o_end as usize).min(obj.len()));
        let out = piece.and_then(|p| rf::decompress_bounded("frame", p, rf::FRAME_RAW).ok());
        match out {
            Some(d) if d.len() as u64 == r_end - f.raw_offset => raw.extend_from_slice(&d),
            Some(d) => {
                wrong.push(format!(
                    "frame {k} decompresses to {} bytes, expected {}",
                    d.len(),
                    r_end - f.raw_offset
                ));
                bad_from = Some(f.raw_offset);
                break;
            }
            None => {
                wrong.push(format!(
                    "frame {k} (object bytes {}-{}) does not decompress{}",
                    f.object_offset,
                    o_end,
                    if (obj.len() as u64) < o_end {
                        " (the object ends before it)"
                    } else {
                        ""
                    }
                ));
                bad_from = Some(f.raw_offset);
                break;
            }
        }
    }
    let limit = bad_from.map_or(i.entries.len(), |r| first_record_at(i, r));
    // Every record of what decompressed: CRCs and the index entries.
    let good = match jf::scan_segment(&raw) {
        Err(_) if raw.is_empty() => 0,
        Err(e) => {
            wrong.push(format!("segment header: {e}"));
            0
        }
        Ok(scan) => {
            let n = scan
                .records
                .iter()
                .zip(&i.entries)
                .take_while(|(r, e)| r.index_entry() == **e)
                .count();
            if n < limit {
                let why = match scan.records.get(n) {
                    Some(_) => "does not match its index entry".to_string(),
                    None => match &scan.tail {
                        jf::Tail::Torn { reason, .. } => reason.to_string(),
                        _ => "is not in the segment".to_string(),
                    },
                };
                wrong.push(format!("record seq {} {why}", i.entries[n].seq));
            } else if bad_from.is_none() {
                if !matches!(scan.tail, jf::Tail::Sealed(_)) {
                    wrong.push("segment is not sealed (no valid index record and trailer)".into());
                } else if scan.records.len() != i.entries.len() {
                    wrong.push(format!(
                        "segment holds {} records, its index {}",
                        scan.records.len(),
                        i.entries.len()
                    ));
                }
            }
            n
        }
    };
    (good.min(limit), wrong)
}

impl DiskScanner<'_> {
    /// A segment object against its index: the size listed and, `--deep`,
    /// its content. The records from the first one that cannot be read
    /// back are noted in `bad_records`.
    pub(super) async fn check_segment(
        &mut self,
        index: &SegmentIndex,
        listed_size: u64,
    ) -> Result<(), VerifyError> {
        let (a, b) = (index.meta.first_seq, index.meta.last_seq);
        let seg_key = rf::segment_key(self.vm, self.disk, a, b);
        let mut first_bad = index.entries.len();
        let mut wrong = Vec::new();
        if listed_size != index.meta.object_size {
            wrong.push(format!(
                "object is {listed_size} bytes, its index says {}",
                index.meta.object_size
            ));
            if listed_size < index.meta.object_size {
                first_bad = first_lost(index, listed_size);
            }
        }
        if self.deep {
            if let Some(obj) = get(self.store, &seg_key).await? {
                self.checked.fetched_objects += 1;
                self.checked.fetched_bytes += obj.len() as u64;
                let ix = index.clone();
                let (n, w) = tokio::task::spawn_blocking(move || segment_object(&ix, &obj))
                    .await
                    .expect("segment check panicked");
                first_bad = first_bad.min(n);
                wrong = w;
            }
        }
        if wrong.is_empty() {
            return Ok(());
        }
        let kind = if listed_size < index.meta.object_size {
            Kind::Truncated
        } else {
            Kind::Corrupt
        };
        let tail = if first_bad < index.entries.len() {
            let s = index.entries[first_bad].seq;
            self.bad_records.push(s);
            format!(": records from seq {s} on cannot be read from it")
        } else {
            ": every record in it still reads back intact".to_string()
        };
        let from = index.entries.get(first_bad).map(|e| e.seq);
        self.report(
            Some(seg_key),
            kind,
            format!("{}{tail}", wrong.join("; ")),
            from,
        );
        Ok(())
    }
}

/// The first record of a segment object truncated to `size` bytes that is
/// lost: the frames from the one the object ends in are.
fn first_lost(index: &SegmentIndex, size: u64) -> usize {
    let k = index
        .frames
        .iter()
        .zip(
            index
                .frames
                .iter()
                .skip(1)
                .map(|f| f.object_offset)
                .chain([index.meta.object_size]),
        )
        .position(|(_, end)| end > size)
        .unwrap_or(0);
    first_record_at(index, index.frames[k].raw_offset)
}

/// Is a baseline consistent with its name (`s0`, `s1`), its VM and disk,
/// and itself?
pub(super) fn baseline(
    bl: &Baseline,
    vm: &str,
    disk: &str,
    s0: u64,
    s1: u64,
) -> Result<(), String> {
    let n = if bl.chunk_size == 0 {
        u64::MAX
    } else {
        bl.size.div_ceil(bl.chunk_size)
    };
    if bl.vm_uuid != vm || bl.disk != disk {
        return Err(format!("baseline is of VM {} disk {}", bl.vm_uuid, bl.disk));
    }
    if bl.s1 != s1 || bl.s0 != s0 || bl.s0 > bl.s1 {
        return Err(format!(
            "baseline says s0 {} s1 {}, its name s0 {s0} s1 {s1}",
            bl.s0, bl.s1
        ));
    }
    if bl.chunks.len() as u64 != n {
        return Err(format!(
            "baseline lists {} chunks, a {}-byte disk has {n}",
            bl.chunks.len(),
            bl.size
        ));
    }
    let not_hex = |h: &String| {
        h.len() != 64
            || !h
                .bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    };
    if bl.chunks.iter().flatten().any(not_hex) {
        return Err("baseline names a chunk that is not a BLAKE3 hex".into());
    }
    Ok(())
}

/// Chunks by hash: their length, and the baselines naming them (scan,
/// baseline index).
type Referenced = BTreeMap<String, (usize, Vec<(usize, usize)>)>;

/// A chunk that is wrong: (hash, kind, what).
type BadChunk = (String, Kind, String);

/// The chunks the baselines of every disk name, each checked once: listed
/// (one LIST of the chunks) and, `--deep`, fetched and checked against its
/// name. A bad chunk is a problem of each disk whose baseline names it,
/// and that baseline cannot be used.
pub(super) async fn chunks(
    store: &Store,
    deep: bool,
    scans: &mut [DiskScan],
    checked: &mut Checked,
    tick: Option<&Ticker>,
) -> Result<(), VerifyError> {
    let referenced = referenced_chunks(scans);
    checked.chunks = referenced.len() as u64;
    if referenced.is_empty() {
        return Ok(());
    }
    let present: HashMap<String, u64> = list(store, rf::CHUNKS_PREFIX)
        .await?
        .into_iter()
        .map(|o| (last_component(&o.key).to_string(), o.size))
        .collect();
    // The bytes of the chunks there: listed, and (quick) checked by it.
    let found = referenced.keys().filter_map(|h| present.get(h)).sum();
    tick_with(tick, Tick::Found(found));
    if !deep {
        tick_with(tick, Tick::Done(found));
    }
    let mut bad: Vec<BadChunk> = Vec::new();
    for h in referenced.keys() {
        match present.get(h) {
            None => bad.push((h.clone(), Kind::Missing, "chunk missing".into())),
            Some(0) => bad.push((h.clone(), Kind::Truncated, "chunk object is empty".into())),
            Some(_) => {}
        }
    }
    if deep {
        let todo: Vec<(String, usize)> = referenced
            .iter()
            .filter(|(h, _)| present.get(*h).is_some_and(|&n| n > 0))
            .map(|(h, (len, _))| (h.clone(), *len))
            .collect();
        bad.extend(
            fetch_chunks(store, todo, checked, &|h: &str| {
                tick_with(tick, Tick::Done(present.get(h).copied().unwrap_or(0)))
            })
            .await?,
        );
    }
    bad.sort();
    for (h, kind, what) in bad {
        blame_chunk(scans, &referenced[&h].1, &h, kind, &what);
    }
    Ok(())
}

fn referenced_chunks(scans: &[DiskScan]) -> Referenced {
    let mut referenced = Referenced::new();
    for (d, s) in scans.iter().enumerate() {
        for (bi, (_, b)) in s.history.baselines.iter().enumerate() {
            for (ci, c) in b.chunks.iter().enumerate() {
                if let Some(h) = c {
                    let len = b.chunk_size.min(b.size - ci as u64 * b.chunk_size) as usize;
                    referenced
                        .entry(h.clone())
                        .or_insert((len, Vec::new()))
                        .1
                        .push((d, bi));
                }
            }
        }
    }
    referenced
}

/// `--deep`: fetch each chunk (hash, length) and check it against its name.
async fn fetch_chunks(
    store: &Store,
    todo: Vec<(String, usize)>,
    checked: &mut Checked,
    done: &dyn Fn(&str),
) -> Result<Vec<BadChunk>, VerifyError> {
    let mut bad = Vec::new();
    let mut results = futures::stream::iter(todo.into_iter().map(|(h, len)| async move {
        let key = rf::chunk_key(&h);
        let r = match get(store, &key).await {
            Ok(None) => Err((Kind::Missing, "chunk missing".to_string(), 0)),
            Ok(Some(obj)) => {
                let n = obj.len() as u64;
                // Keyed names in an encrypted repository (docs/REPOSITORY_FORMAT.md, "Encryption").
                let namer = store.chunk_namer().await?;
                match rf::decompress_chunk_named(&namer, &h, &obj, len) {
                    Ok(d) if d.len() == len => Ok(n),
                    Ok(d) => Err((
                        Kind::Corrupt,
                        format!("chunk is {} bytes, its baseline says {len}", d.len()),
                        n,
                    )),
                    Err(e) => Err((Kind::Corrupt, strip_key(&e.to_string(), &key), n)),
                }
            }
            Err(e) => return Err(e),
        };
        Ok((h, r))
    }))
    .buffer_unordered(8);
    while let Some(r) = results.next().await {
        let (h, r) = r?;
        done(&h);
        checked.fetched_objects += 1;
        match r {
            Ok(n) => checked.fetched_bytes += n,
            Err((kind, what, n)) => {
                checked.fetched_bytes += n;
                bad.push((h, kind, what));
            }
        }
    }
    Ok(bad)
}

/// A bad chunk `h`: a problem of every disk among `users` (scan, baseline),
/// from the oldest point of its baselines that name it, which cannot be
/// used.
fn blame_chunk(scans: &mut [DiskScan], users: &[(usize, usize)], h: &str, kind: Kind, what: &str) {
    for (d, s) in scans.iter_mut().enumerate() {
        let mine: Vec<usize> = users
            .iter()
            .filter(|(dd, _)| *dd == d)
            .map(|(_, b)| *b)
            .collect();
        if mine.is_empty() {
            continue;
        }
        let names: Vec<&str> = mine
            .iter()
            .map(|&b| last_component(&s.history.baselines[b].0))
            .collect();
        let mut p = problem(
            Some(&s.history.disk),
            Some(rf::chunk_key(h)),
            kind,
            format!("{what} (named by baseline {})", names.join(", ")),
        );
        p.from_seq = mine.iter().map(|&b| s.history.baselines[b].1.s1).min();
        for b in mine {
            s.bad_baselines.insert(b);
        }
        s.problems.push(p);
    }
}
