use super::*;
use std::sync::atomic::AtomicUsize;
use std::sync::Condvar;
use std::time::Duration;

/// Every `write_at` it is given: (offset, bytes, number of pieces).
type Log = Arc<Mutex<Vec<(u64, Vec<u8>, usize)>>>;
/// Every `write_back` it is given: (offset, length).
type Hints = Arc<Mutex<Vec<(u64, u64)>>>;

/// A target that records its writes; closed `gate` makes every write wait;
/// a write touching `fail_at` fails with ENOSPC.
#[derive(Clone, Default)]
struct Recorder {
    log: Log,
    hints: Hints,
    gate: Arc<(Mutex<bool>, Condvar)>,
    fail_at: Option<u64>,
}

impl Recorder {
    fn set_gate(&self, open: bool) {
        *self.gate.0.lock().unwrap() = open;
        self.gate.1.notify_all();
    }
}

impl Target for Recorder {
    fn write_at(&mut self, offset: u64, bufs: &[&[u8]]) -> io::Result<()> {
        let (open, cv) = &*self.gate;
        drop(cv.wait_while(open.lock().unwrap(), |o| !*o).unwrap());
        let data: Vec<u8> = bufs.concat();
        if let Some(f) = self.fail_at {
            if (offset..offset + data.len() as u64).contains(&f) {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
        }
        self.log.lock().unwrap().push((offset, data, bufs.len()));
        Ok(())
    }
    fn write_back(&mut self, offset: u64, len: u64) {
        self.hints.lock().unwrap().push((offset, len));
    }
}

fn open_recorder() -> Recorder {
    let r = Recorder::default();
    r.set_gate(true);
    r
}

/// Piece `i` of a test: 4 KiB at offset `i * 4 KiB`, bytes from `i`.
fn piece(i: u64) -> (u64, Bytes) {
    let data: Vec<u8> = (0..4096u64).map(|b| (i * 7 + b / 3) as u8).collect();
    (i * 4096, Bytes::from(data))
}

/// Jobs handed over out of order, from several threads, some with no
/// pieces and some with two, reach the target in job order: the ordered
/// pieces' offsets ascend. Pieces given with `write_owned` are written too.
#[test]
fn ordered_jobs_are_written_in_disk_order() {
    let rec = open_recorder();
    let out = Arc::new(OrderedFile::with_target(rec.clone()).unwrap());
    let jobs = 200u64;
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let out = out.clone();
            std::thread::spawn(move || {
                // Thread t gives jobs t, t+4, … in descending order.
                let mut mine: Vec<u64> = (0..jobs).filter(|j| j % 4 == t).collect();
                mine.reverse();
                for j in mine {
                    let pieces = match j % 5 {
                        0 => vec![],
                        1 => vec![piece(2 * j), piece(2 * j + 1)],
                        _ => vec![piece(2 * j)],
                    };
                    out.write_ordered(j, pieces).unwrap();
                }
                out.write_owned(1 << 30 | t << 12, piece(t).1).unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    out.finish().unwrap();
    let log = rec.log.lock().unwrap();
    let ordered: Vec<u64> = log
        .iter()
        .filter(|w| w.0 < 1 << 30)
        .flat_map(|(at, data, _)| (0..data.len() as u64 / 4096).map(move |k| at + k * 4096))
        .collect();
    let mut want: Vec<u64> = (0..jobs)
        .flat_map(|j| match j % 5 {
            0 => vec![],
            1 => vec![2 * j, 2 * j + 1],
            _ => vec![2 * j],
        })
        .map(|i| i * 4096)
        .collect();
    assert_eq!(
        ordered, want,
        "ordered pieces not written in ascending order"
    );
    want.clear();
    for (at, data, _) in log.iter() {
        for (k, c) in data.chunks(4096).enumerate() {
            let i = if *at >= 1 << 30 {
                (at - (1 << 30)) / 4096
            } else {
                at / 4096 + k as u64
            };
            assert_eq!(c, &piece(i).1[..], "bytes at {at} + {k} pages");
        }
    }
    assert_eq!(log.iter().filter(|w| w.0 >= 1 << 30).count(), 4);
}

/// Pieces that follow on on the disk are written together, at most GATHER
/// bytes at a time; a piece that does not follow on starts a new write.
#[test]
fn adjacent_pieces_are_gathered() {
    let mut rec = open_recorder();
    let mb = 1u64 << 20;
    let big = |at: u64| (at, Bytes::from(vec![(at / mb) as u8; mb as usize]));
    let mut batch: Vec<(u64, Bytes)> = (0..10).map(|i| big(i * mb)).collect();
    batch.push(big(20 * mb));
    batch.push(piece(0));
    write_batch(&mut rec, &batch).unwrap();
    let log = rec.log.lock().unwrap();
    let shape: Vec<(u64, usize, usize)> = log.iter().map(|w| (w.0, w.1.len(), w.2)).collect();
    assert_eq!(
        shape,
        vec![
            (0, 8 << 20, 8),
            (8 * mb, 2 << 20, 2),
            (20 * mb, 1 << 20, 1),
            (0, 4096, 1)
        ]
    );
    assert!(log[1].1[..mb as usize].iter().all(|&b| b == 8));
}

/// While the target does not take writes, a producer is held once the
/// queue is full: at most 2 × QUEUE pieces are accepted (QUEUE queued, at
/// most QUEUE taken by the writer), never all of them.
#[test]
fn the_queue_is_bounded() {
    let rec = Recorder::default(); // gate closed
    let out = Arc::new(OrderedFile::with_target(rec.clone()).unwrap());
    let sent = Arc::new(AtomicUsize::new(0));
    let total = 5 * QUEUE as u64;
    let producer = {
        let (out, sent) = (out.clone(), sent.clone());
        std::thread::spawn(move || {
            for i in 0..total {
                let (at, data) = piece(i);
                out.write_owned(at, data).unwrap();
                sent.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let held = sent.load(Ordering::SeqCst);
    assert!(held >= QUEUE, "the queue takes QUEUE pieces ({held})");
    assert!(
        held <= 2 * QUEUE,
        "{held} pieces accepted by a writer that writes nothing"
    );
    assert!(!producer.is_finished());
    rec.set_gate(true);
    producer.join().unwrap();
    out.finish().unwrap();
    let written: usize = rec.log.lock().unwrap().iter().map(|w| w.1.len()).sum();
    assert_eq!(written as u64, total * 4096);
}

/// A failed write fails `finish` with its offset and the OS error; nothing
/// is written after it, and producers are told the writer stopped.
#[test]
fn a_failed_write_fails_the_output() {
    let mut rec = open_recorder();
    rec.fail_at = Some(5 * 4096 + 10);
    let out = OrderedFile::with_target(rec.clone()).unwrap();
    // Once the writer has failed, hand-overs are refused (or dropped).
    for j in 0..50 {
        let _ = out.write_ordered(j, vec![piece(j)]);
    }
    let e = out.finish().unwrap_err();
    match WriterError::of(&e) {
        Some(WriterError::Write { offset, source, .. }) => {
            assert!(*offset <= 5 * 4096, "{e}");
            assert_eq!(source.raw_os_error(), Some(libc::ENOSPC));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(e.kind(), io::Error::from_raw_os_error(libc::ENOSPC).kind());
    let log = rec.log.lock().unwrap();
    assert!(log.iter().all(|w| w.0 + (w.1.len() as u64) <= 5 * 4096));
    // Finished: anything more is refused.
    assert!(out.write_owned(0, piece(0).1).is_err());
}

/// A job that is never handed over holds back the jobs after it, and
/// `finish` says so instead of succeeding with a hole in the file.
#[test]
fn a_missing_job_is_an_error_not_a_hole() {
    let rec = open_recorder();
    let out = OrderedFile::with_target(rec.clone()).unwrap();
    for j in [0, 2, 3] {
        out.write_ordered(j, vec![piece(j)]).unwrap();
    }
    let e = out.finish().unwrap_err();
    assert!(
        matches!(
            WriterError::of(&e),
            Some(WriterError::Unwritten { next: 1 })
        ),
        "{e}"
    );
    let log = rec.log.lock().unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].0, 0);
}

/// Into a real file: pieces of any length at any offset, gathered or not,
/// give exactly the bytes handed over (short `pwritev`s resumed; more
/// pieces than one call takes).
#[test]
fn a_file_gets_every_byte() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("out");
    let f = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    let size = 3 << 20;
    f.set_len(size).unwrap();
    let disk: Vec<u8> = (0..size).map(|i| (i * 13 + i / 4099) as u8 | 1).collect();
    let out = OrderedFile::new(f.try_clone().unwrap()).unwrap();
    // 600 small pieces (more than MAX_IOV), then odd sizes.
    let mut cuts: Vec<u64> = (0..600).map(|i| i * 1000).collect();
    cuts.extend([700_000, 700_001, 1 << 20, (1 << 20) + 4095, 2 << 20, size]);
    for (j, w) in cuts.windows(2).enumerate() {
        let data = Bytes::copy_from_slice(&disk[w[0] as usize..w[1] as usize]);
        out.write_ordered(j as u64, vec![(w[0], data)]).unwrap();
    }
    out.finish().unwrap();
    f.sync_all().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), disk);

    let g = File::options().write(true).open(&path).unwrap();
    let bufs: Vec<Vec<u8>> = (0..MAX_IOV + 7).map(|i| vec![i as u8; 100 + i]).collect();
    let refs: Vec<&[u8]> = bufs.iter().map(|b| &b[..]).collect();
    write_all_vectored_at(&g, 12345, &refs).unwrap();
    let back = std::fs::read(&path).unwrap();
    assert_eq!(
        &back[12345..12345 + refs.concat().len()],
        &refs.concat()[..]
    );
}

/// Writeback of ordered pieces is started a WINDOW at a time, in disk
/// order, covering every ordered byte once (the rest at the end); a large
/// piece written as it comes gets its own.
#[test]
fn writeback_is_started_a_window_at_a_time() {
    let rec = open_recorder();
    let out = OrderedFile::with_target(rec.clone()).unwrap();
    let mb = 1u64 << 20;
    let n = 2 * WINDOW / mb + 3;
    for j in 0..n {
        let data = Bytes::from(vec![j as u8; mb as usize]);
        out.write_ordered(j, vec![(100 * mb + j * mb, data)])
            .unwrap();
    }
    out.write_owned(0, Bytes::from(vec![1u8; mb as usize]))
        .unwrap();
    out.write_owned(mb, Bytes::from(vec![1u8; 4096])).unwrap();
    out.finish().unwrap();
    let hints = rec.hints.lock().unwrap();
    let ordered: Vec<(u64, u64)> = hints.iter().copied().filter(|h| h.0 >= 100 * mb).collect();
    assert!(ordered.len() >= 2, "{hints:?}");
    assert!(
        ordered[..ordered.len() - 1].iter().all(|h| h.1 >= WINDOW),
        "{hints:?}"
    );
    let mut at = 100 * mb;
    for h in &ordered {
        assert_eq!(h.0, at, "windows follow on: {hints:?}");
        at += h.1;
    }
    assert_eq!(at, 100 * mb + n * mb, "every ordered byte hinted once");
    assert!(hints.contains(&(0, mb)), "{hints:?}");
    assert!(
        !hints.iter().any(|h| h.0 == mb),
        "a small piece gets none: {hints:?}"
    );
}
