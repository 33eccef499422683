//! A generic NBD server: the handshake ([`super::handshake`]), then the
//! transmission phase over any [`Connection`], against a small [`Backend`]
//! (a byte range that can be read, and written unless it is read-only).
//! cdpctl's read-only export of a restore point is one such backend
//! (`cdp_repo::export::Exporter`).
//!
//! Every request goes validate → handle → reply ([`proto::validate`]
//! first), so a backend never sees a request outside its size. A backend
//! error becomes the NBD error of the reply in one place, [`reply_errno`]
//! (through [`proto::nbd_errno`]).
//!
//! Threads: per connection, one reads requests (and handles WRITE, FLUSH and
//! the rest in order); a few workers answer READs, so replies may go out of
//! order, as NBD allows. Limits ([`Limits`]): connections served at once,
//! the time a client has to finish its handshake, the time it may take to
//! accept its replies, and the bytes of READ replies being built at once
//! across all connections.
//!
//! Binding the socket and stopping on a signal belong to the program that
//! serves (cdpctl export), not here.

use std::io::{self, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use thiserror::Error;

use super::handshake::{handshake, HandshakeError};
use super::proto::{self, ExportInfo, Request, Verdict};

/// What a server exports: `size()` bytes, read (and written) at any offset
/// inside them. Errors are plain `io::Error`s; the server maps them to NBD
/// errors in [`reply_errno`] (an error without an OS code is EIO).
pub trait Backend: Send + Sync {
    /// The export's size in bytes.
    fn size(&self) -> u64;
    /// True if every write is refused (NBD_FLAG_READ_ONLY).
    fn read_only(&self) -> bool;
    /// Fill `buf` with the bytes at `offset`. The server only asks for
    /// ranges inside the size. On error `buf` is discarded.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Write `buf` at `offset`. Never called when [`Backend::read_only`].
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let _ = (buf, offset);
        Err(io::Error::from_raw_os_error(libc::EROFS))
    }
    /// Make every acknowledged write durable.
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

/// The bounds of a server.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections served at once; more are closed at once.
    pub max_conns: usize,
    /// Workers answering READs, per connection.
    pub workers_per_conn: usize,
    /// Requests queued per connection before its reader waits.
    pub queue_per_conn: usize,
    /// A client must finish its handshake within this time.
    pub handshake_timeout: Duration,
    /// A client that takes its replies slower than this is dropped.
    pub write_timeout: Duration,
    /// READ reply bytes being built at once, all connections together (at
    /// least [`proto::MAX_PAYLOAD`], the largest READ).
    pub reply_budget: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_conns: 64,
            workers_per_conn: 4,
            queue_per_conn: 32,
            handshake_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(120),
            reply_budget: 128 << 20,
        }
    }
}

/// Counters of a server, all connections together.
#[derive(Debug, Default)]
pub struct Stats {
    pub connections: AtomicU64,
    pub reads: AtomicU64,
    pub bytes_read: AtomicU64,
    pub writes: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Requests the backend failed (answered with an NBD error).
    pub errors: AtomicU64,
    /// Invalid requests refused before reaching the backend.
    pub rejected: AtomicU64,
}

#[derive(Debug, Error)]
pub enum ServeError {
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
}

/// A byte stream a client speaks NBD on. A second handle on it
/// ([`Connection::try_clone`]) writes replies while the first reads requests.
pub trait Connection: Read + Write + Send + Sized {
    fn try_clone(&self) -> io::Result<Self>;
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    /// End the connection both ways (wakes a reader blocked on it).
    fn shutdown(&self);
}

impl Connection for UnixStream {
    fn try_clone(&self) -> io::Result<Self> {
        UnixStream::try_clone(self)
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        UnixStream::set_write_timeout(self, t)
    }
    fn shutdown(&self) {
        let _ = UnixStream::shutdown(self, std::net::Shutdown::Both);
    }
}

/// The NBD error of a reply: 0 for success, else the backend's error mapped
/// by [`proto::nbd_errno`]. The one place the server turns an error into
/// what the client sees.
pub fn reply_errno(r: &io::Result<()>) -> u32 {
    match r {
        Ok(()) => 0,
        Err(e) => proto::nbd_errno(e),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One export served to any number of connections.
pub struct Server<B> {
    name: String,
    backend: Arc<B>,
    limits: Limits,
    active: AtomicUsize,
    budget: Budget,
    stats: Stats,
}

impl<B: Backend + 'static> Server<B> {
    /// Serve `backend` under the export name `name` (the empty name is
    /// accepted too, as "the default export").
    pub fn new(name: &str, backend: Arc<B>, limits: Limits) -> Arc<Server<B>> {
        let budget = Budget::new(limits.reply_budget.max(proto::MAX_PAYLOAD as u64));
        Arc::new(Server {
            name: name.to_string(),
            backend,
            limits,
            active: AtomicUsize::new(0),
            budget,
            stats: Stats::default(),
        })
    }

    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The transmission flags: FLUSH accepted; read-only exports are also
    /// safe to use over several connections at once, writable ones take FUA.
    pub fn flags(&self) -> u16 {
        let base = proto::TFLAG_HAS_FLAGS | proto::TFLAG_SEND_FLUSH;
        if self.backend.read_only() {
            base | proto::TFLAG_READ_ONLY | proto::TFLAG_CAN_MULTI_CONN
        } else {
            base | proto::TFLAG_SEND_FUA
        }
    }

    /// Accept clients on `listener` until `stop` is set and the listener is
    /// woken ([`wake`]), each connection on its own threads. Connections
    /// still open when it returns are left to end with the process.
    pub fn accept_until(self: &Arc<Self>, listener: &UnixListener, stop: &AtomicBool) {
        loop {
            let accepted = listener.accept();
            if stop.load(Ordering::Acquire) {
                return;
            }
            match accepted {
                Ok((stream, _)) => {
                    self.spawn(stream);
                }
                // Out of descriptors or memory: do not spin.
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Serve `conn` on a thread of its own, unless [`Limits::max_conns`]
    /// connections are being served (then it is closed at once). Returns
    /// whether it is served.
    pub fn spawn<C: Connection + 'static>(self: &Arc<Self>, conn: C) -> bool {
        if self.active.fetch_add(1, Ordering::AcqRel) >= self.limits.max_conns {
            self.active.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("nbd-conn".into())
            .spawn(move || {
                // A misbehaving client ends its own connection, nothing else.
                let _ = me.serve(conn);
                me.active.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            self.active.fetch_sub(1, Ordering::AcqRel);
        }
        spawned.is_ok()
    }

    /// Serve one connection on this thread (and its READ workers) until the
    /// client disconnects, aborts or errs. Reads already queued are answered
    /// before it returns.
    pub fn serve<C: Connection>(&self, mut conn: C) -> Result<(), ServeError> {
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        conn.set_read_timeout(Some(self.limits.handshake_timeout))?;
        conn.set_write_timeout(Some(self.limits.write_timeout))?;
        let info = ExportInfo {
            size: self.backend.size(),
            flags: self.flags(),
        };
        if !handshake(&mut conn, &self.name, &info)? {
            return Ok(());
        }
        conn.set_read_timeout(None)?;
        let replier = Replier {
            conn: Mutex::new(conn.try_clone()?),
            dead: AtomicBool::new(false),
        };
        let (tx, rx) = sync_channel::<Request>(self.limits.queue_per_conn.max(1));
        let rx = Mutex::new(rx);
        std::thread::scope(|s| {
            let workers = (0..self.limits.workers_per_conn.max(1))
                .filter_map(|_| {
                    std::thread::Builder::new()
                        .name("nbd-read".into())
                        .spawn_scoped(s, || self.worker(&rx, &replier))
                        .ok()
                })
                .count();
            if workers == 0 {
                return Err(io::Error::other("cannot start a worker thread").into());
            }
            let rd = BufReader::with_capacity(64 * 1024, conn);
            // Dropping tx when the reader ends lets the workers finish.
            self.transmission(rd, &replier, tx)
        })
    }

    /// Read requests until the client disconnects or errs; READs go to the
    /// workers through `tx`, the rest are handled here, in order.
    fn transmission<C: Connection>(
        &self,
        mut rd: impl Read,
        replier: &Replier<C>,
        tx: SyncSender<Request>,
    ) -> Result<(), ServeError> {
        let mut hdr = [0u8; proto::REQUEST_LEN];
        let mut payload = Vec::new();
        let (size, read_only) = (self.backend.size(), self.backend.read_only());
        loop {
            if let Err(e) = rd.read_exact(&mut hdr) {
                return match e.kind() {
                    io::ErrorKind::UnexpectedEof => Ok(()),
                    _ => Err(e.into()),
                };
            }
            let Ok(req) = proto::parse_request(&hdr) else {
                // Out of step: nothing after this can be trusted.
                return Ok(());
            };
            match proto::validate(&req, size, read_only) {
                Verdict::Disconnect => return Ok(()),
                Verdict::RejectAndClose(e) => {
                    self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                    replier.reply(e, req.cookie);
                    return Ok(());
                }
                Verdict::Reject(e) => {
                    // Its payload (a refused WRITE's) is read and dropped.
                    payload.resize(req.payload_len(), 0);
                    rd.read_exact(&mut payload)?;
                    self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                    replier.reply(e, req.cookie);
                }
                Verdict::Ok if req.kind == proto::CMD_READ => {
                    if tx.send(req).is_err() {
                        return Ok(());
                    }
                }
                Verdict::Ok => {
                    payload.resize(req.payload_len(), 0);
                    rd.read_exact(&mut payload)?;
                    let r = self.handle(&req, &payload);
                    replier.reply(reply_errno(&r), req.cookie);
                }
            }
            if replier.dead.load(Ordering::Relaxed) {
                return Ok(());
            }
        }
    }

    /// A valid request other than READ. `payload` is a WRITE's data.
    fn handle(&self, req: &Request, payload: &[u8]) -> io::Result<()> {
        let b = &*self.backend;
        let fua = req.flags & proto::CMD_FLAG_FUA != 0;
        let r = match req.kind {
            proto::CMD_WRITE => b.write_at(payload, req.offset),
            proto::CMD_WRITE_ZEROES => {
                let zeros = vec![0u8; (req.len as usize).min(1 << 20)];
                let end = req.offset + req.len as u64;
                let mut at = req.offset;
                let mut r = Ok(());
                while at < end && r.is_ok() {
                    let n = (end - at).min(zeros.len() as u64) as usize;
                    r = b.write_at(&zeros[..n], at);
                    at += n as u64;
                }
                r
            }
            proto::CMD_FLUSH => b.flush(),
            // Advisory: the bytes may stay.
            proto::CMD_TRIM => Ok(()),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        };
        let r = r.and_then(|()| if fua { b.flush() } else { Ok(()) });
        match &r {
            Ok(()) if matches!(req.kind, proto::CMD_WRITE | proto::CMD_WRITE_ZEROES) => {
                self.stats.writes.fetch_add(1, Ordering::Relaxed);
                let n = req.len as u64;
                self.stats.bytes_written.fetch_add(n, Ordering::Relaxed);
            }
            Ok(()) => {}
            Err(_) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
    }

    fn worker<C: Connection>(&self, rx: &Mutex<Receiver<Request>>, replier: &Replier<C>) {
        let mut buf: Vec<u8> = Vec::new();
        loop {
            let req = match lock(rx).recv() {
                Ok(r) => r,
                Err(_) => return,
            };
            if replier.dead.load(Ordering::Relaxed) {
                continue;
            }
            let len = req.len as usize;
            self.budget.acquire(len as u64);
            buf.clear();
            proto::put_simple_reply(&mut buf, 0, req.cookie);
            buf.resize(proto::SIMPLE_REPLY_LEN + len, 0);
            let r = self
                .backend
                .read_at(&mut buf[proto::SIMPLE_REPLY_LEN..], req.offset);
            if r.is_ok() {
                self.stats.reads.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .bytes_read
                    .fetch_add(len as u64, Ordering::Relaxed);
                replier.send(&buf);
            } else {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                replier.reply(reply_errno(&r), req.cookie);
            }
            if buf.capacity() > 8 << 20 {
                buf = Vec::new();
            }
            self.budget.release(len as u64);
        }
    }
}

/// Wake a thread blocked in [`Server::accept_until`] on `listener` (its
/// accept fails), without needing the socket's path.
pub fn wake(listener: &UnixListener) -> io::Result<()> {
    nix::sys::socket::shutdown(listener.as_raw_fd(), nix::sys::socket::Shutdown::Both)
        .map_err(io::Error::from)
}

/// The writing half of a connection, shared by its reader and workers.
struct Replier<C> {
    conn: Mutex<C>,
    dead: AtomicBool,
}

impl<C: Connection> Replier<C> {
    fn send(&self, bytes: &[u8]) {
        if self.dead.load(Ordering::Relaxed) {
            return;
        }
        let mut c = lock(&self.conn);
        if c.write_all(bytes).and_then(|()| c.flush()).is_err() {
            // Gone, or not taking its replies: end the connection (this
            // also wakes the reader).
            self.dead.store(true, Ordering::Relaxed);
            c.shutdown();
        }
    }

    /// A reply without data: `err` 0 for success.
    fn reply(&self, err: u32, cookie: u64) {
        let mut b = Vec::with_capacity(proto::SIMPLE_REPLY_LEN);
        proto::put_simple_reply(&mut b, err, cookie);
        self.send(&b);
    }
}

/// Bytes of READ replies being built at once, across all connections: the
/// memory a crowd of clients asking for 32 MiB each can take.
struct Budget {
    avail: Mutex<u64>,
    cv: Condvar,
}

impl Budget {
    fn new(n: u64) -> Budget {
        Budget {
            avail: Mutex::new(n),
            cv: Condvar::new(),
        }
    }

    fn acquire(&self, n: u64) {
        let mut a = lock(&self.avail);
        while *a < n {
            a = self.cv.wait(a).unwrap_or_else(|e| e.into_inner());
        }
        *a -= n;
    }

    fn release(&self, n: u64) {
        *lock(&self.avail) += n;
        self.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread::JoinHandle;

    /// A disk in memory; reads at `fail_at` fail.
    struct Mem {
        data: Mutex<Vec<u8>>,
        ro: bool,
        fail_at: Option<u64>,
        flushes: AtomicU64,
    }

    impl Backend for Mem {
        fn size(&self) -> u64 {
            lock(&self.data).len() as u64
        }
        fn read_only(&self) -> bool {
            self.ro
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            if self.fail_at == Some(offset) {
                return Err(io::Error::other("cannot check these bytes"));
            }
            let d = lock(&self.data);
            buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            lock(&self.data)[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            self.flushes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn mem(ro: bool) -> Arc<Mem> {
        Arc::new(Mem {
            data: Mutex::new((0..1 << 16).map(|i| (i % 251) as u8).collect()),
            ro,
            fail_at: Some(8192),
            flushes: AtomicU64::new(0),
        })
    }

    struct Client {
        s: UnixStream,
        size: u64,
        flags: u16,
    }

    fn be32(b: &[u8]) -> u32 {
        u32::from_be_bytes(b[..4].try_into().unwrap())
    }

    /// Serve one end of a socket pair on a thread; negotiate as a client
    /// (NBD_OPT_GO for "vda") on the other.
    fn connect(srv: &Arc<Server<Mem>>) -> (Client, JoinHandle<Result<(), ServeError>>) {
        let (a, mut s) = UnixStream::pair().unwrap();
        let srv = srv.clone();
        let h = std::thread::spawn(move || srv.serve(a));
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        assert_eq!(g, proto::greeting());
        let cf = proto::CLIENT_FLAG_FIXED_NEWSTYLE | proto::CLIENT_FLAG_NO_ZEROES;
        s.write_all(&cf.to_be_bytes()).unwrap();
        let mut d = 3u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"vda");
        d.extend_from_slice(&0u16.to_be_bytes());
        let mut o = proto::IHAVEOPT.to_be_bytes().to_vec();
        o.extend_from_slice(&proto::OPT_GO.to_be_bytes());
        o.extend_from_slice(&(d.len() as u32).to_be_bytes());
        o.extend_from_slice(&d);
        s.write_all(&o).unwrap();
        let (mut size, mut flags) = (0, 0);
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).unwrap();
            let mut data = vec![0u8; be32(&h[16..]) as usize];
            s.read_exact(&mut data).unwrap();
            match be32(&h[12..]) {
                proto::REP_ACK => break,
                proto::REP_INFO if data[..2] == proto::INFO_EXPORT.to_be_bytes() => {
                    size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                    flags = u16::from_be_bytes([data[10], data[11]]);
                }
                proto::REP_INFO => {}
                other => panic!("option reply {other:#x}"),
            }
        }
        (Client { s, size, flags }, h)
    }

    impl Client {
        fn send(&mut self, kind: u16, flags: u16, offset: u64, len: u32, payload: &[u8]) {
            let r = Request {
                flags,
                kind,
                cookie: 0x1234 + kind as u64,
                offset,
                len,
            };
            self.s.write_all(&proto::encode_request(&r)).unwrap();
            self.s.write_all(payload).unwrap();
        }

        /// The reply to the request just sent: (NBD error, data of a READ
        /// of `read_len` bytes when it succeeded).
        fn reply(&mut self, kind: u16, read_len: usize) -> (u32, Vec<u8>) {
            let mut h = [0u8; proto::SIMPLE_REPLY_LEN];
            self.s.read_exact(&mut h).unwrap();
            assert_eq!(be32(&h), proto::SIMPLE_REPLY_MAGIC);
            let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
            assert_eq!(cookie, 0x1234 + kind as u64);
            let err = be32(&h[4..]);
            let mut data = vec![0u8; if err == 0 { read_len } else { 0 }];
            self.s.read_exact(&mut data).unwrap();
            (err, data)
        }

        fn call(
            &mut self,
            kind: u16,
            flags: u16,
            offset: u64,
            len: u32,
            payload: &[u8],
        ) -> (u32, Vec<u8>) {
            self.send(kind, flags, offset, len, payload);
            let n = if kind == proto::CMD_READ {
                len as usize
            } else {
                0
            };
            self.reply(kind, n)
        }
    }

    #[test]
    fn read_only_export_reads_refuses_writes_and_disconnects() {
        let m = mem(true);
        let srv = Server::new("vda", m.clone(), Limits::default());
        let (mut c, h) = connect(&srv);
        assert_eq!(c.size, 1 << 16);
        assert_ne!(c.flags & proto::TFLAG_READ_ONLY, 0);
        assert_eq!(c.flags & proto::TFLAG_SEND_FUA, 0);

        let (err, data) = c.call(proto::CMD_READ, 0, 1000, 4096, &[]);
        assert_eq!(err, 0);
        assert_eq!(data, lock(&m.data)[1000..5096]);
        // Past the end: refused before the backend sees it.
        let (err, _) = c.call(proto::CMD_READ, 0, (1 << 16) - 10, 20, &[]);
        assert_eq!(err, proto::errno::EINVAL);
        // A WRITE is refused and its payload skipped: the next request is
        // read in step.
        let (err, _) = c.call(proto::CMD_WRITE, 0, 0, 512, &[7u8; 512]);
        assert_eq!(err, proto::errno::EPERM);
        assert_eq!(lock(&m.data)[0], 0, "nothing written");
        // A backend error is EIO, and the connection goes on.
        let (err, _) = c.call(proto::CMD_READ, 0, 8192, 512, &[]);
        assert_eq!(err, proto::errno::EIO);
        let (err, _) = c.call(proto::CMD_FLUSH, 0, 0, 0, &[]);
        assert_eq!(err, 0);
        let (err, data) = c.call(proto::CMD_READ, 0, 0, 16, &[]);
        assert_eq!((err, data), (0, lock(&m.data)[..16].to_vec()));

        c.send(proto::CMD_DISC, 0, 0, 0, &[]);
        h.join().unwrap().unwrap();
        let mut rest = Vec::new();
        c.s.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "no reply to DISC");
        let st = srv.stats();
        assert_eq!(st.reads.load(Ordering::SeqCst), 2);
        assert_eq!(st.bytes_read.load(Ordering::SeqCst), 4096 + 16);
        assert_eq!(st.rejected.load(Ordering::SeqCst), 2);
        assert_eq!(st.errors.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn writable_export_writes_flushes_on_fua_and_zeroes() {
        let m = mem(false);
        let srv = Server::new("vda", m.clone(), Limits::default());
        let (mut c, h) = connect(&srv);
        assert_eq!(c.flags & proto::TFLAG_READ_ONLY, 0);
        assert_ne!(c.flags & proto::TFLAG_SEND_FUA, 0);
        let (err, _) = c.call(proto::CMD_WRITE, 0, 100, 4, b"abcd");
        assert_eq!(err, 0);
        assert_eq!(m.flushes.load(Ordering::SeqCst), 0);
        let (err, _) = c.call(proto::CMD_WRITE, proto::CMD_FLAG_FUA, 200, 2, b"xy");
        assert_eq!(err, 0);
        assert_eq!(m.flushes.load(Ordering::SeqCst), 1, "FUA flushes");
        let (err, _) = c.call(proto::CMD_WRITE_ZEROES, 0, 300, 50, &[]);
        assert_eq!(err, 0);
        let (_, data) = c.call(proto::CMD_READ, 0, 100, 250, &[]);
        assert_eq!(&data[..4], b"abcd");
        assert_eq!(&data[100..102], b"xy");
        assert!(data[200..250].iter().all(|&b| b == 0));
        // A write past the end is refused, its payload skipped.
        let (err, _) = c.call(proto::CMD_WRITE, 0, (1 << 16) - 1, 2, b"zz");
        assert_eq!(err, proto::errno::ENOSPC);
        let (err, _) = c.call(proto::CMD_FLUSH, 0, 0, 0, &[]);
        assert_eq!(err, 0);
        assert_eq!(m.flushes.load(Ordering::SeqCst), 2);
        drop(c);
        h.join().unwrap().unwrap();
        assert_eq!(srv.stats().writes.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn connections_over_the_cap_are_closed_at_once() {
        let limits = Limits {
            max_conns: 1,
            handshake_timeout: Duration::from_secs(5),
            ..Limits::default()
        };
        let srv = Server::new("vda", mem(true), limits);
        let (a1, mut b1) = UnixStream::pair().unwrap();
        assert!(srv.spawn(a1));
        let mut g = [0u8; 18];
        b1.read_exact(&mut g).unwrap();
        let (a2, mut b2) = UnixStream::pair().unwrap();
        assert!(!srv.spawn(a2), "a second connection is over the cap");
        let mut rest = Vec::new();
        b2.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "closed without a greeting");
        // The first one ends (its client goes away): room again.
        drop(b1);
        let t = std::time::Instant::now();
        while srv.active.load(Ordering::SeqCst) > 0 {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "connection never ended"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let (a3, mut b3) = UnixStream::pair().unwrap();
        assert!(srv.spawn(a3));
        b3.read_exact(&mut g).unwrap();
        assert_eq!(g, proto::greeting());
    }

    #[test]
    fn a_client_silent_in_the_handshake_is_dropped_after_the_timeout() {
        let limits = Limits {
            handshake_timeout: Duration::from_millis(100),
            ..Limits::default()
        };
        let srv = Server::new("vda", mem(true), limits);
        let (a, mut b) = UnixStream::pair().unwrap();
        let t = std::time::Instant::now();
        let h = std::thread::spawn(move || srv.serve(a));
        let mut g = [0u8; 18];
        b.read_exact(&mut g).unwrap();
        let r = h.join().unwrap();
        assert!(
            matches!(r, Err(ServeError::Handshake(HandshakeError::Io(_)))),
            "{r:?}"
        );
        assert!(t.elapsed() < Duration::from_secs(10));
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "closed");
    }

    #[test]
    fn errors_map_through_nbd_errno() {
        assert_eq!(reply_errno(&Ok(())), 0);
        assert_eq!(reply_errno(&Err(io::Error::other("x"))), proto::errno::EIO);
        let nospc = io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(reply_errno(&Err(nospc)), proto::errno::ENOSPC);
    }
}
