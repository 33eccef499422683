//! One NBD connection: handshake, then the transmission loop.
//!
//! The loop reads as many bytes as the socket has into one buffer, parses
//! every complete request in it, validates each once, and executes them as a
//! batch: one journal append, the image writes, the reads, one reply write.
//! No allocation or lock per request; counters are updated per batch.

use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use thiserror::Error;

use super::{Disk, JOp, OpResults, SyncJob, Vm};
use cdp_core::journal::format::{Kind, FLAG_FUA, FLAG_NO_HOLE};
use cdp_core::nbd::handshake as server;
use cdp_core::nbd::proto::{self, errno, ExportInfo, Request, Verdict};

/// Room for the largest request (header + 32 MiB payload) plus slack.
const BUF_CAP: usize = proto::MAX_PAYLOAD as usize + 256 * 1024;

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
pub struct Replier {
    stream: Mutex<UnixStream>,
}

impl Replier {
    /// Send replies; a client that went away is not an error worth more
    /// than dropping the bytes.
    pub fn send(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut s = self.stream.lock().unwrap();
        let _ = s.write_all(bytes);
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
pub fn serve(vm: &Vm, disk: &Disk, mut stream: UnixStream) -> Result<(), ConnError> {
    if !handshake(disk, &mut stream)? {
        return Ok(());
    }
    let Some(sync) = disk.sync_sender() else {
        return Ok(());
    };
    let replier = Arc::new(Replier {
        stream: Mutex::new(stream.try_clone()?),
    });
    let mut t = Transmission {
        vm,
        disk,
        rd: stream,
        replier,
        sync,
        buf: vec![0u8; BUF_CAP],
        start: 0,
        end: 0,
        batch: Vec::with_capacity(256),
        ops: Vec::with_capacity(256),
        op_of: Vec::with_capacity(256),
        results: Vec::with_capacity(256),
        hdrs: Vec::with_capacity(256 * 48),
        reply: Vec::with_capacity(1 << 20),
        sync_cookies: Vec::new(),
    };
    t.run()
}

/// Negotiate options. Returns true when the client entered transmission.
fn handshake(disk: &Disk, s: &mut UnixStream) -> Result<bool, ConnError> {
    let info = ExportInfo {
        size: disk.size,
        flags: export_flags(),
    };
    Ok(server::handshake(s, &disk.name, &info)?)
}

#[derive(Clone, Copy)]
struct Pending {
    req: Request,
    verdict: Verdict,
    payload_at: usize,
}

struct Transmission<'a> {
    vm: &'a Vm,
    disk: &'a Disk,
    rd: UnixStream,
    replier: Arc<Replier>,
    sync: Sender<SyncJob>,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    batch: Vec<Pending>,
    /// Kind and journal flags of each journaled op of the batch.
    ops: Vec<(Kind, u8)>,
    /// For each request of the batch, the index of its journaled op, if any.
    op_of: Vec<Option<usize>>,
    results: OpResults,
    hdrs: Vec<u8>,
    reply: Vec<u8>,
    sync_cookies: Vec<u64>,
}

impl Transmission<'_> {
    fn run(&mut self) -> Result<(), ConnError> {
        loop {
            let close = self.parse_batch();
            if !self.batch.is_empty() {
                self.execute();
            }
            if close {
                return Ok(());
            }
            self.make_room();
            let n = match self.rd.read(&mut self.buf[self.end..]) {
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
        self.batch.clear();
        let mut pos = self.start;
        let mut close = false;
        while self.end - pos >= proto::REQUEST_LEN {
            let req = match proto::parse_request(&self.buf[pos..pos + proto::REQUEST_LEN]) {
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
            self.batch.push(Pending {
                req,
                verdict,
                payload_at: pos + proto::REQUEST_LEN,
            });
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
        close
    }

    /// Keep room in the buffer for the request that is partly read.
    fn make_room(&mut self) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            return;
        }
        let have = self.end - self.start;
        let need = if have >= proto::REQUEST_LEN {
            // Validated lengths: a write payload is at most MAX_PAYLOAD here
            // (a longer one closes the connection before we get here).
            let r = proto::parse_request(&self.buf[self.start..self.start + proto::REQUEST_LEN])
                .map(|r| r.payload_len())
                .unwrap_or(0);
            proto::REQUEST_LEN + r
        } else {
            proto::REQUEST_LEN
        };
        if self.start + need > self.buf.len() || self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end = have;
            self.start = 0;
        }
    }

    fn execute(&mut self) {
        let disk = self.disk;
        let n = self.batch.len() as u64;
        disk.stats.in_flight.fetch_add(n, Ordering::Relaxed);

        // 1. Journal and apply every change, in order, in one go.
        self.ops.clear();
        self.op_of.clear();
        for p in &self.batch {
            let op = match (p.verdict, p.req.kind) {
                (Verdict::Ok, proto::CMD_WRITE) => Some(Kind::Write),
                (Verdict::Ok, proto::CMD_WRITE_ZEROES) => Some(Kind::Zero),
                (Verdict::Ok, proto::CMD_TRIM) => Some(Kind::Trim),
                (Verdict::Ok, proto::CMD_FLUSH) => Some(Kind::Flush),
                _ => None,
            };
            self.op_of.push(op.map(|kind| {
                let mut flags = 0;
                if p.req.flags & proto::CMD_FLAG_FUA != 0 {
                    flags |= FLAG_FUA;
                }
                if p.req.flags & proto::CMD_FLAG_NO_HOLE != 0 {
                    flags |= FLAG_NO_HOLE;
                }
                self.ops.push((kind, flags));
                self.ops.len() - 1
            }));
        }
        if !self.ops.is_empty() {
            let buf = &self.buf;
            let jops: Vec<JOp<'_>> = self
                .batch
                .iter()
                .zip(&self.op_of)
                .filter_map(|(p, o)| {
                    o.map(|i| {
                        let (kind, flags) = self.ops[i];
                        let payload = if kind == Kind::Write {
                            &buf[p.payload_at..p.payload_at + p.req.len as usize]
                        } else {
                            &[][..]
                        };
                        JOp {
                            kind,
                            flags,
                            offset: if kind == Kind::Flush { 0 } else { p.req.offset },
                            length: if kind == Kind::Flush {
                                0
                            } else {
                                p.req.len as u64
                            },
                            payload,
                        }
                    })
                })
                .collect();
            self.vm
                .journal_and_apply(disk, &jops, &mut self.hdrs, &mut self.results);
        }

        // 2. Replies, in request order; FLUSH and FUA wait for the sync thread.
        self.reply.clear();
        self.sync_cookies.clear();
        let (mut wbytes, mut wreqs, mut rbytes, mut rreqs) = (0u64, 0u64, 0u64, 0u64);
        let mut replied = 0u64;
        for (p, o) in self.batch.iter().zip(&self.op_of) {
            let cookie = p.req.cookie;
            match p.verdict {
                Verdict::Reject(e) | Verdict::RejectAndClose(e) => {
                    proto::put_simple_reply(&mut self.reply, e, cookie);
                    replied += 1;
                }
                Verdict::Disconnect => replied += 1,
                Verdict::Ok if p.req.kind == proto::CMD_READ => {
                    let at = self.reply.len();
                    proto::put_simple_reply(&mut self.reply, 0, cookie);
                    let len = p.req.len as usize;
                    let data_at = self.reply.len();
                    self.reply.resize(data_at + len, 0);
                    if let Err(e) = disk
                        .image
                        .read_exact_at(&mut self.reply[data_at..], p.req.offset)
                    {
                        self.reply.truncate(at);
                        proto::put_simple_reply(&mut self.reply, proto::nbd_errno(&e), cookie);
                        disk.stats.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    rbytes += len as u64;
                    rreqs += 1;
                    replied += 1;
                }
                Verdict::Ok => {
                    let err = o.map(|i| self.results[i]).unwrap_or(errno::EINVAL);
                    if p.req.kind == proto::CMD_WRITE {
                        wbytes += p.req.len as u64;
                        wreqs += 1;
                    }
                    let durable =
                        p.req.kind == proto::CMD_FLUSH || p.req.flags & proto::CMD_FLAG_FUA != 0;
                    if err == 0 && durable {
                        self.sync_cookies.push(cookie);
                    } else {
                        proto::put_simple_reply(&mut self.reply, err, cookie);
                        replied += 1;
                    }
                }
            }
        }
        self.replier.send(&self.reply);
        let st = &disk.stats;
        st.in_flight.fetch_sub(replied, Ordering::Relaxed);
        if wreqs > 0 {
            st.bytes_written.fetch_add(wbytes, Ordering::Relaxed);
            st.write_requests.fetch_add(wreqs, Ordering::Relaxed);
        }
        if rreqs > 0 {
            st.bytes_read.fetch_add(rbytes, Ordering::Relaxed);
            st.read_requests.fetch_add(rreqs, Ordering::Relaxed);
        }
        if !self.sync_cookies.is_empty() {
            let job = SyncJob {
                replier: self.replier.clone(),
                cookies: std::mem::take(&mut self.sync_cookies),
            };
            if let Err(e) = self.sync.send(job) {
                // The sync thread is gone (stopping): answer with an error
                // rather than leave the client waiting.
                let mut b = Vec::new();
                for c in &e.0.cookies {
                    proto::put_simple_reply(&mut b, errno::ESHUTDOWN, *c);
                }
                self.replier.send(&b);
                st.in_flight
                    .fetch_sub(e.0.cookies.len() as u64, Ordering::Relaxed);
            }
        }
    }
}
