//! One NBD connection: handshake, then the transmission loop.
//!
//! The loop reads as many bytes as the socket has into one buffer, parses
//! every complete request in it, validates each once, and executes them as a
//! batch: one journal append, the image writes, the reads, one reply write.
//! No allocation or lock per request; counters are updated per batch.
//!
//! A batch that writes at least [`PIPELINE_MIN_BYTES`] runs on the
//! connection's second thread (the executor) while this one reads the next
//! requests into its other buffer: a large WRITE's payload streams in while
//! the one before it is journaled and applied. Batches still run one at a
//! time, in order: the next one starts only once the executor is done, so
//! a READ sees every write before it and replies keep their order, except
//! that where the image takes writes in place a batch's plain WRITEs are
//! answered once journaled, ahead of its other replies
//! ([`super::Vm::journal_and_apply_then`]).
//!
//! FLUSH and FUA requests are answered when the disk's sync thread reports
//! the group commit they joined: the connection's [`Replier`] is the
//! [`SyncWaiter`] and writes those replies, after the batch's others.
//!
//! Memory is bounded whatever the client sends: a connection reads into
//! the first [`WINDOW`] bytes of one of its two buffers (the second is
//! made at the first hand-off to the executor); a WRITE that does not fit in
//! the window is read alone, after taking what it needs beyond the window
//! from the budget of all connections ([`crate::limits::BUDGET`]), and
//! those pages go back to the kernel once it is applied; its payload must
//! arrive within the payload timeout. A batch holds at most
//! [`READ_BATCH_BYTES`] of READ data (or one READ, when larger), taken from
//! the same budget per batch, not per request, and a connection reads at
//! most one window ahead of its replies (a batch's replies are written
//! before the next batch runs). A client that leaves its replies unread
//! past the write timeout is dropped. Budget is taken at most once at a
//! time per connection and given back on every path out (see
//! [`crate::limits::Budget`]): no taker waits forever.
//!
//! [`transmit`] is generic over the stream's two halves so that the whole
//! pipeline runs in unit tests over a socket pair.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;

use super::batch::{Batch, Op, Req};
use super::{Disk, SyncJob, SyncWaiter, Vm};
use crate::limits::Deadline;
use cdp_core::nbd::handshake as server;
use cdp_core::nbd::proto::{self, errno, ExportInfo, Verdict};

/// Room for the largest request (header + 32 MiB payload) plus slack:
/// address space only, of which the pages are touched as they are used.
const BUF_CAP: usize = proto::MAX_PAYLOAD as usize + 256 * 1024;

/// The part of its buffer a connection reads into without taking from the
/// shared budget: requests, and WRITEs that fit (most guests write at most
/// 1 MiB at once). Every connection may keep this much resident in each of
/// its two buffers.
pub const WINDOW: usize = 2 << 20;

/// READ bytes answered in one batch, so held in its reply at once (a
/// single larger READ is a batch of its own; none exceeds MAX_PAYLOAD).
pub const READ_BATCH_BYTES: u64 = 4 << 20;

/// WRITE bytes a batch must hold to be journaled on the connection's
/// executor thread while this one reads the next batch: a 1 MiB WRITE's
/// payload then streams in while the one before is journaled and applied.
/// Smaller batches run on the reading thread (a hand-off costs a wake-up,
/// as long as a 4 KiB write takes).
const PIPELINE_MIN_BYTES: u64 = 256 * 1024;

/// The reply buffer's capacity (not touched until used): a batch's reply
/// fits, so steady reads allocate nothing; grown past it (by a READ larger
/// than a batch), it is given back after that batch.
const REPLY_KEEP: usize = READ_BATCH_BYTES as usize + (1 << 20);

#[derive(Debug, Error)]
pub enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("protocol: {0}")]
    Proto(#[from] proto::ProtoError),
    #[error(transparent)]
    Handshake(#[from] server::HandshakeError),
}

/// The writing half of a connection, shared with the sync thread.
pub struct Replier<W> {
    stream: Mutex<W>,
    /// A write failed (the client went away, or did not take its replies
    /// within the write timeout): the connection ends.
    dead: AtomicBool,
}

/// The writing half of a connection: writes that may be tried without
/// waiting (a reply sent while the disk's lock is held).
pub trait Sink: Write {
    /// Write what the socket takes now; `WouldBlock` when it takes nothing.
    fn try_write(&mut self, bytes: &[u8]) -> io::Result<usize>;
}

impl Sink for UnixStream {
    fn try_write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        use nix::sys::socket::{send, MsgFlags};
        use std::os::fd::AsRawFd;
        send(self.as_raw_fd(), bytes, MsgFlags::MSG_DONTWAIT).map_err(io::Error::from)
    }
}

impl<W: Sink> Replier<W> {
    pub fn new(stream: W) -> Self {
        Replier {
            stream: Mutex::new(stream),
            dead: AtomicBool::new(false),
        }
    }

    /// Send replies; a client that went away is not an error worth more
    /// than dropping the bytes and ending the connection.
    pub fn send(&self, bytes: &[u8]) {
        if bytes.is_empty() || self.is_dead() {
            return;
        }
        let mut s = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        if s.write_all(bytes).is_err() {
            self.dead.store(true, Ordering::Release);
        }
    }

    /// Send replies if that takes no wait: the stream is free (the sync
    /// thread is not writing) and the socket takes them at once. False
    /// when nothing was sent (the caller sends them later); a socket that
    /// took a part gets the rest as [`Replier::send`] sends it.
    pub fn send_now(&self, bytes: &[u8]) -> bool {
        if self.is_dead() {
            return true;
        }
        let Ok(mut s) = self.stream.try_lock() else {
            return false;
        };
        match s.try_write(bytes) {
            Ok(n) if n == bytes.len() => {}
            Ok(n) => {
                if s.write_all(&bytes[n..]).is_err() {
                    self.dead.store(true, Ordering::Release);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return false,
            Err(_) => self.dead.store(true, Ordering::Release),
        }
        true
    }

    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }
}

impl<W: Sink + Send> SyncWaiter for Replier<W> {
    /// The replies of requests that waited for a group commit.
    fn synced(&self, cookies: &[u64], result: Result<(), u32>) {
        let err = result.err().unwrap_or(0);
        // Formatted on the stack, 64 replies at a time: no allocation.
        let mut out = [0u8; 64 * proto::SIMPLE_REPLY_LEN];
        for chunk in cookies.chunks(64) {
            for (c, b) in chunk
                .iter()
                .zip(out.chunks_exact_mut(proto::SIMPLE_REPLY_LEN))
            {
                b.copy_from_slice(&proto::simple_reply(err, *c));
            }
            self.send(&out[..chunk.len() * proto::SIMPLE_REPLY_LEN]);
        }
    }
}

fn export_flags() -> u16 {
    proto::TFLAG_HAS_FLAGS
        | proto::TFLAG_SEND_FLUSH
        | proto::TFLAG_SEND_FUA
        | proto::TFLAG_SEND_TRIM
        | proto::TFLAG_SEND_WRITE_ZEROES
        | proto::TFLAG_CAN_MULTI_CONN
}

/// Serve one client until it disconnects. Errors end this connection only.
/// The whole handshake must be done within `limits.handshake_timeout` (a
/// client trickling bytes does not extend it); each reply write may wait at
/// most `limits.write_timeout`.
pub fn serve(
    vm: &Vm,
    disk: &Disk,
    stream: UnixStream,
    limits: &crate::limits::Limits,
) -> Result<(), ConnError> {
    let mut within = Deadline::new(&stream, Instant::now() + limits.handshake_timeout);
    if !handshake(disk, &mut within)? {
        return Ok(());
    }
    // A guest may stay idle for as long as it likes.
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(Some(limits.write_timeout))?;
    let wr = stream.try_clone()?;
    transmit(vm, disk, stream, wr, limits.payload_timeout)
}

/// The reading half of a connection: reads that can be given a timeout
/// (while the connection holds budget for a large WRITE).
pub trait Source: Read {
    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()>;
}

impl Source for UnixStream {
    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)
    }
}

/// The transmission phase: read batches from `rd` and answer on `wr` until
/// the client disconnects. A WRITE larger than the window must arrive
/// whole within `payload_timeout` of cdpd taking budget for it (a client
/// trickling it is dropped within twice that: each read waits at most
/// `payload_timeout`, and none starts after the deadline).
pub fn transmit<R, W>(
    vm: &Vm,
    disk: &Disk,
    rd: R,
    wr: W,
    payload_timeout: Duration,
) -> Result<(), ConnError>
where
    R: Source,
    W: Sink + Send + 'static,
{
    let Some(sync) = disk.sync_sender() else {
        return Ok(());
    };
    let replier = Arc::new(Replier::new(wr));
    std::thread::scope(|scope| {
        // The executor journals a large WRITE batch while this thread reads
        // the next one (docs/DESIGN.md, "Write path"); without it (the
        // thread could not be made) every batch runs here.
        let (to_exec, jobs) = mpsc::sync_channel::<Work>(1);
        let (done, from_exec) = mpsc::sync_channel::<Work>(1);
        let (r, s) = (replier.clone(), sync.clone());
        let exec = std::thread::Builder::new()
            .name("cdpd-exec".into())
            .spawn_scoped(scope, move || {
                for mut w in jobs {
                    w.execute(vm, disk, &r, &s);
                    if done.send(w).is_err() {
                        return;
                    }
                }
            })
            .ok()
            .map(|_| Executor {
                to: to_exec,
                from: from_exec,
                spare: None,
                busy: false,
            });
        let mut t = Transmission {
            vm,
            disk,
            rd,
            replier,
            sync,
            work: Work::new(),
            start: 0,
            end: 0,
            limit: WINDOW,
            held: 0,
            held_until: Instant::now(),
            payload_timeout,
            page: nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
                .ok()
                .flatten()
                .map_or(4096, |p| p as usize),
            held_back: false,
            exec,
        };
        // Dropping `t` ends the executor once its batch is done; the scope
        // waits for it, so every reply is written before this returns.
        t.run()
    })
}

/// One batch and everything its execution uses: the buffer its requests
/// were read into, its reply. Moved to the executor thread and back, so
/// nothing is allocated per batch.
struct Work {
    /// What was read from the client; requests and payloads are parsed in place.
    buf: Vec<u8>,
    batch: Batch,
    /// READ bytes of the batch: what its reply takes of the reply budget.
    read_bytes: u64,
    reply: Vec<u8>,
    /// Handles of the batch's requests that wait for the sync thread.
    sync_cookies: Vec<u64>,
}

/// The connection's second thread (see [`PIPELINE_MIN_BYTES`]).
struct Executor {
    to: SyncSender<Work>,
    from: Receiver<Work>,
    /// The second [`Work`], made at the first hand-off; `None` while the
    /// executor has it.
    spare: Option<Work>,
    busy: bool,
}

impl Executor {
    /// Wait for the batch handed off, if any: once this returns, every
    /// batch read so far is journaled, applied and answered.
    fn wait(&mut self) {
        if self.busy {
            self.busy = false;
            // The executor gives every batch back, unless it panicked:
            // then the connection's thread panics too (the scope does).
            if let Ok(w) = self.from.recv() {
                self.spare = Some(w);
            }
        }
    }
}

/// Negotiate options. Returns true when the client entered transmission.
fn handshake<S: Read + Write>(disk: &Disk, s: &mut S) -> Result<bool, ConnError> {
    let info = ExportInfo {
        size: disk.size,
        flags: export_flags(),
    };
    Ok(server::handshake(s, &disk.name, &info)?)
}

struct Transmission<'a, R, W> {
    vm: &'a Vm,
    disk: &'a Disk,
    rd: R,
    replier: Arc<Replier<W>>,
    sync: Sender<SyncJob>,
    /// The batch being read and parsed, in its buffer.
    work: Work,
    start: usize,
    end: usize,
    /// Reads stop here: [`WINDOW`], or the end of the one WRITE read alone
    /// while holding `held` bytes of the budget (given back once it is
    /// applied, or when the connection ends).
    limit: usize,
    held: u64,
    /// The WRITE held for must have arrived by then.
    held_until: Instant,
    payload_timeout: Duration,
    /// The system's page size: pages past the window are given back whole.
    page: usize,
    /// The last parse left complete requests in the buffer (the batch was
    /// full of READ data): answer them before reading more.
    held_back: bool,
    exec: Option<Executor>,
}

impl<R, W> Drop for Transmission<'_, R, W> {
    fn drop(&mut self) {
        if self.held > 0 {
            self.vm.budget.give(self.held);
        }
    }
}

impl<R: Source, W: Sink + Send + 'static> Transmission<'_, R, W> {
    fn run(&mut self) -> Result<(), ConnError> {
        loop {
            let close = self.parse_batch();
            if !self.work.batch.is_empty() {
                self.execute();
            }
            if close || self.replier.is_dead() {
                return Ok(());
            }
            self.release()?;
            if self.held_back {
                continue;
            }
            self.make_room()?;
            // Each read waits at most the payload timeout: a client
            // trickling a held WRITE is dropped within twice that.
            if self.held > 0 && Instant::now() >= self.held_until {
                return Err(io::Error::from(io::ErrorKind::TimedOut).into());
            }
            let n = match self.rd.read(&mut self.work.buf[self.end..self.limit]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                return Ok(());
            }
            self.end += n;
        }
    }

    /// Parse every complete request in the buffer. Returns true when the
    /// connection must close after this batch.
    fn parse_batch(&mut self) -> bool {
        let w = &mut self.work;
        w.batch.clear();
        self.held_back = false;
        let mut pos = self.start;
        let mut close = false;
        let mut read_bytes = 0u64;
        while self.end - pos >= proto::REQUEST_LEN {
            let req = match proto::parse_request(&w.buf[pos..pos + proto::REQUEST_LEN]) {
                Ok(r) => r,
                Err(_) => {
                    // The stream is out of step: nothing after this can be trusted.
                    self.disk
                        .stats
                        .protocol_errors
                        .fetch_add(1, Ordering::Relaxed);
                    close = true;
                    break;
                }
            };
            let verdict = proto::validate(&req, self.disk.size, false);
            let plen = match verdict {
                Verdict::RejectAndClose(_) | Verdict::Disconnect => 0,
                _ => req.payload_len(),
            };
            if self.end - pos - proto::REQUEST_LEN < plen {
                break;
            }
            if verdict == Verdict::Ok && req.kind == proto::CMD_READ {
                let len = u64::from(req.len);
                if read_bytes > 0 && read_bytes + len > READ_BATCH_BYTES {
                    self.held_back = true;
                    break;
                }
                read_bytes += len;
            }
            w.batch
                .reqs
                .push(Req::new(&req, verdict, pos + proto::REQUEST_LEN));
            pos += proto::REQUEST_LEN + plen;
            if !matches!(verdict, Verdict::Ok | Verdict::Reject(_)) {
                if matches!(verdict, Verdict::RejectAndClose(_)) {
                    self.disk
                        .stats
                        .protocol_errors
                        .fetch_add(1, Ordering::Relaxed);
                }
                close = true;
                break;
            }
        }
        self.start = pos;
        w.read_bytes = read_bytes;
        close
    }

    /// Keep room in the buffer for the request that is partly read.
    fn make_room(&mut self) -> io::Result<()> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            return Ok(());
        }
        let have = self.end - self.start;
        let need = if have >= proto::REQUEST_LEN {
            // Validated lengths: a write payload is at most MAX_PAYLOAD here
            // (a longer one closes the connection before we get here).
            let r = proto::parse_request(&self.work.buf[self.start..][..proto::REQUEST_LEN])
                .map(|r| r.payload_len())
                .unwrap_or(0);
            proto::REQUEST_LEN + r
        } else {
            proto::REQUEST_LEN
        };
        if self.start + need > self.limit || self.end == self.limit {
            self.work.buf.copy_within(self.start..self.end, 0);
            self.end = have;
            self.start = 0;
        }
        if need > self.limit {
            // A WRITE larger than the window, now at the buffer's start:
            // read it alone, with what it needs beyond the window taken
            // from the budget (waiting for it; nothing else is held).
            debug_assert_eq!(self.held, 0, "a held WRITE is alone in the buffer");
            let extra = (need - WINDOW) as u64;
            self.vm.budget.take(extra);
            self.held = extra;
            self.limit = need;
            self.held_until = Instant::now() + self.payload_timeout;
            self.rd.set_timeout(Some(self.payload_timeout))?;
        }
        Ok(())
    }

    /// Once the WRITE held for is applied (the buffer is empty), give its
    /// pages past the window back to the kernel and its bytes back to the
    /// budget.
    fn release(&mut self) -> io::Result<()> {
        if self.held == 0 || self.start != self.end {
            return Ok(());
        }
        // (The WRITE ended past the window; `max` keeps the range valid.)
        drop_pages(&mut self.work.buf[WINDOW..self.end.max(WINDOW)], self.page);
        self.vm.budget.give(self.held);
        self.held = 0;
        self.limit = WINDOW;
        self.start = 0;
        self.end = 0;
        self.rd.set_timeout(None)
    }

    /// Run the batch once the one before it is done: on the executor when
    /// it writes enough to be worth the hand-off (this thread goes on
    /// reading), else here.
    fn execute(&mut self) {
        let Some(ex) = self.exec.as_mut() else {
            self.work
                .execute(self.vm, self.disk, &self.replier, &self.sync);
            return;
        };
        ex.wait();
        // A held WRITE's buffer pages are given back right after it is
        // applied (`release`): it runs here.
        if self.held > 0 || self.work.batch.write_bytes() < PIPELINE_MIN_BYTES {
            self.work
                .execute(self.vm, self.disk, &self.replier, &self.sync);
            return;
        }
        // The partly read request after the batch moves to the other
        // buffer, which this thread reads into next.
        let mut next = ex.spare.take().unwrap_or_else(Work::new);
        let tail = self.end - self.start;
        next.buf[..tail].copy_from_slice(&self.work.buf[self.start..self.end]);
        self.start = 0;
        self.end = tail;
        let w = std::mem::replace(&mut self.work, next);
        self.disk
            .stats
            .pipelined_batches
            .fetch_add(1, Ordering::Relaxed);
        match ex.to.send(w) {
            Ok(()) => ex.busy = true,
            // The executor is gone (it panicked): so does this connection.
            Err(_) => panic!("the connection's executor thread ended"),
        }
    }
}

impl Work {
    fn new() -> Work {
        Work {
            buf: vec![0u8; BUF_CAP],
            batch: Batch::with_capacity(256),
            read_bytes: 0,
            reply: Vec::with_capacity(REPLY_KEEP),
            sync_cookies: Vec::new(),
        }
    }

    /// Journal and apply the batch, answer what can be answered now, and
    /// hand FLUSH and FUA requests to the sync thread.
    fn execute<W: Sink + Send + 'static>(
        &mut self,
        vm: &Vm,
        disk: &Disk,
        replier: &Arc<Replier<W>>,
        sync: &Sender<SyncJob>,
    ) {
        let n = self.batch.reqs.len() as u64;
        disk.stats.in_flight.fetch_add(n, Ordering::Relaxed);
        if disk.image_failed.load(Ordering::Acquire) {
            self.batch.fail_all(errno::EIO);
        }
        // Plain WRITEs where the image takes writes in place are answered
        // once journaled, before their image writes (docs/DESIGN.md, "Write
        // path", step 5). The reply buffer is free until `answer`. Counted
        // before they are sent: a client that reads the counter after its
        // reply finds it counted.
        let early = &mut self.reply;
        let mut ack = |b: &Batch| {
            early.clear();
            for r in b.reqs.iter().filter(|r| r.early) {
                proto::put_simple_reply(early, 0, r.cookie);
            }
            let n = (early.len() / proto::SIMPLE_REPLY_LEN) as u64;
            if n == 0 {
                return false;
            }
            disk.stats.early_acks.fetch_add(n, Ordering::Relaxed);
            if !replier.send_now(early) {
                disk.stats.early_acks.fetch_sub(n, Ordering::Relaxed);
                return false;
            }
            true
        };
        vm.journal_and_apply_then(disk, &mut self.batch, &self.buf, &mut ack);
        if self.read_bytes > 0 {
            vm.budget.take(self.read_bytes);
        }
        let replied = self.answer(disk);
        disk.stats.in_flight.fetch_sub(replied, Ordering::Relaxed);
        replier.send(&self.reply);
        if self.reply.capacity() > REPLY_KEEP {
            self.reply = Vec::with_capacity(REPLY_KEEP);
        }
        if self.read_bytes > 0 {
            vm.budget.give(self.read_bytes);
        }
        self.defer_durable(disk, replier, sync);
    }

    /// Replies in request order into `self.reply`, except for the requests
    /// that wait for the sync thread (into `self.sync_cookies`). Returns how
    /// many requests are done.
    fn answer(&mut self, disk: &Disk) -> u64 {
        self.reply.clear();
        self.sync_cookies.clear();
        let (mut wbytes, mut wreqs, mut rbytes, mut rreqs) = (0u64, 0u64, 0u64, 0u64);
        let mut replied = 0u64;
        for r in &self.batch.reqs {
            match r.op {
                Op::Disconnect => {}
                Op::Reject => proto::put_simple_reply(&mut self.reply, r.result, r.cookie),
                Op::Read => {
                    if let Err(e) = read_reply(&disk.image, r, &mut self.reply) {
                        proto::put_simple_reply(&mut self.reply, proto::nbd_errno(&e), r.cookie);
                        disk.stats.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    rbytes += r.length;
                    rreqs += 1;
                }
                Op::Journal(kind) => {
                    if kind == cdp_core::journal::Kind::Write {
                        wbytes += r.length;
                        wreqs += 1;
                    }
                    if r.early {
                        // Answered already; a failed image write after it
                        // failed the disk (`Disk::image_failed`).
                    } else if r.result == 0 && r.durable() {
                        self.sync_cookies.push(r.cookie);
                        continue;
                    } else {
                        proto::put_simple_reply(&mut self.reply, r.result, r.cookie);
                    }
                }
            }
            replied += 1;
        }
        let st = &disk.stats;
        if wreqs > 0 {
            st.bytes_written.fetch_add(wbytes, Ordering::Relaxed);
            st.write_requests.fetch_add(wreqs, Ordering::Relaxed);
        }
        if rreqs > 0 {
            st.bytes_read.fetch_add(rbytes, Ordering::Relaxed);
            st.read_requests.fetch_add(rreqs, Ordering::Relaxed);
        }
        replied
    }

    /// Hand the requests waiting for durability to the sync thread; its
    /// result comes back to the [`Replier`].
    fn defer_durable<W: Sink + Send + 'static>(
        &mut self,
        disk: &Disk,
        replier: &Arc<Replier<W>>,
        sync: &Sender<SyncJob>,
    ) {
        if self.sync_cookies.is_empty() {
            return;
        }
        let job = SyncJob {
            waiter: replier.clone(),
            cookies: std::mem::take(&mut self.sync_cookies),
            full: false,
        };
        if let Err(e) = sync.send(job) {
            // The sync thread is gone (stopping): answer with an error
            // rather than leave the client waiting.
            let job = e.0;
            disk.stats
                .in_flight
                .fetch_sub(job.cookies.len() as u64, Ordering::Relaxed);
            job.waiter.synced(&job.cookies, Err(errno::ESHUTDOWN));
        }
    }
}

/// Append the reply of a READ, with its data read from the image. On error
/// nothing is appended.
///
/// The data is read straight into the reply buffer's spare capacity (the
/// buffer is reused from batch to batch), not zero-filled first
/// (docs/DESIGN.md, "Write path": READs).
fn read_reply(image: &std::fs::File, r: &Req, out: &mut Vec<u8>) -> io::Result<()> {
    let at = out.len();
    proto::put_simple_reply(out, 0, r.cookie);
    let read = read_uninit_at(image, out, r.length as usize, r.offset);
    if read.is_err() {
        out.truncate(at);
    }
    read
}

/// Append exactly `len` bytes of `file` at `offset` to `out`, read into its
/// spare capacity without initialising it first. On error `out` keeps its
/// length (whatever was read stays beyond it, uninitialised to Rust).
fn read_uninit_at(
    file: &std::fs::File,
    out: &mut Vec<u8>,
    len: usize,
    offset: u64,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    out.reserve(len);
    let mut done = 0usize;
    while done < len {
        let spare = &mut out.spare_capacity_mut()[done..len];
        let at = offset
            .checked_add(done as u64)
            .and_then(|o| nix::libc::off_t::try_from(o).ok())
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `spare` is the vector's own spare capacity, borrowed
        // mutably (nothing else refers to it), at least `spare.len()` bytes
        // long; pread(2) only writes into it, at most `spare.len()` bytes,
        // and `file` is an open descriptor for the whole call.
        let n = unsafe {
            nix::libc::pread(file.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len(), at)
        };
        match n {
            n if n > 0 => done += n as usize,
            0 => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    let new_len = out.len() + len;
    // SAFETY: the `len` bytes after the old length are within the capacity
    // reserved above, and every one of them was written by pread(2) (the
    // loop ends only once `done == len`, each pass adding what the kernel
    // reported as written, contiguously from the old length).
    unsafe { out.set_len(new_len) };
    Ok(())
}

/// Give the whole pages of `buf` back to the kernel: they are resident no
/// more, and read as zeros when next used. On failure they stay resident
/// (memory, not correctness).
fn drop_pages(buf: &mut [u8], page: usize) {
    let base = buf.as_ptr() as usize;
    let from = base.next_multiple_of(page) - base;
    let to = (base + buf.len()) / page * page;
    if to <= base + from {
        return;
    }
    let pages = &mut buf[from..to - base];
    // SAFETY: `pages` is a range of whole pages inside `buf`, borrowed
    // mutably, so nothing else refers to it; MADV_DONTNEED only replaces
    // its contents (with zeros, for the anonymous memory a buffer is), and
    // any contents are valid `u8`s; nothing past the range is touched.
    let r = unsafe {
        nix::libc::madvise(
            pages.as_mut_ptr().cast(),
            pages.len(),
            nix::libc::MADV_DONTNEED,
        )
    };
    debug_assert_eq!(r, 0, "madvise: {}", io::Error::last_os_error());
}

#[cfg(test)]
mod read_tests {
    use super::read_uninit_at;
    use std::io::Write;

    /// A READ's data lands after what the reply holds already, exactly; a
    /// read past the end of the file leaves the reply as it was.
    #[test]
    fn reads_into_spare_capacity_and_leaves_the_reply_on_error() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        f.write_all(&data).unwrap();
        let mut out = vec![0xAAu8; 16];
        read_uninit_at(&f, &mut out, 4096, 1000).unwrap();
        assert_eq!(out.len(), 16 + 4096);
        assert_eq!(&out[..16], &[0xAA; 16]);
        assert_eq!(&out[16..], &data[1000..5096]);
        let err = read_uninit_at(&f, &mut out, 4096, 8000).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        assert_eq!(out.len(), 16 + 4096);
    }
}
