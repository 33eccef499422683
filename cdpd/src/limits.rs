//! The bounds of cdpd's sockets (issue 11, "Bounded everything"): who may
//! connect (`SO_PEERCRED`), how many at once, how long a client may stay
//! silent in the handshake or leave its replies unread, and how every open
//! connection is ended at stop whatever its client does.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

/// The limits of one cdpd's sockets.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// NBD connections served at once per disk socket; more are closed at
    /// once (QEMU opens one, or a few with multi-conn).
    pub max_conns: usize,
    /// A client must send each part of its handshake within this time.
    pub handshake_timeout: Duration,
    /// A client that leaves a reply unread this long is dropped.
    pub write_timeout: Duration,
    /// Control clients served at once.
    pub max_control_clients: usize,
    /// A control client must send a request, and take its reply, within
    /// this time (one deadline for both, however the bytes trickle).
    pub control_timeout: Duration,
    /// A client that holds part of the shared budget for a WRITE larger
    /// than its connection's window must send the rest of that WRITE
    /// within this time, or it is dropped (and the budget given back); one
    /// trickling it is dropped within twice this time.
    pub payload_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_conns: 16,
            handshake_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(60),
            max_control_clients: 8,
            control_timeout: Duration::from_secs(10),
            payload_timeout: Duration::from_secs(30),
        }
    }
}

/// Memory sized by clients, held at once by every connection of every disk
/// together: the READ data of the batches being answered, and the part of
/// each WRITE larger than its connection's window that is being read or
/// applied (at least one request, of up to 32 MiB, always proceeds).
pub const BUDGET: u64 = 64 << 20;

/// A bound on bytes held at once by many threads: taken before a batch's
/// READ replies are built (given back once they are written), and before a
/// WRITE larger than a connection's window is read (given back once it is
/// applied). A holder never takes again before giving back, and gives back
/// within a bounded time (a reply within the write timeout, a WRITE's
/// payload within the payload timeout), so every taker gets its turn.
/// Lock-free; a taker waits (sleeping) while the bytes do not fit.
pub struct Budget {
    max: u64,
    used: AtomicU64,
}

impl Budget {
    pub const fn new(max: u64) -> Budget {
        Budget {
            max,
            used: AtomicU64::new(0),
        }
    }

    /// Take `n` bytes, waiting until they fit; when nothing is taken, any
    /// `n` fits.
    pub fn take(&self, n: u64) {
        loop {
            let cur = self.used.load(Ordering::Acquire);
            if cur == 0 || cur + n <= self.max {
                if self
                    .used
                    .compare_exchange_weak(cur, cur + n, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    return;
                }
                continue;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Bytes taken now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// Give back `n` bytes taken before.
    pub fn give(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// One deadline for every read and write on a stream: a peer that trickles
/// its bytes, or takes ours a byte at a time, does not extend it (each call
/// waits at most what is left; once it has passed, calls fail `TimedOut`).
/// Costs a `setsockopt` per call: for handshakes and control requests, not
/// for the data path.
pub struct Deadline<'a> {
    stream: &'a UnixStream,
    pub at: Instant,
}

impl<'a> Deadline<'a> {
    pub fn new(stream: &'a UnixStream, at: Instant) -> Deadline<'a> {
        Deadline { stream, at }
    }

    fn left(&self) -> io::Result<Duration> {
        let left = self.at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        Ok(left)
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.set_read_timeout(Some(self.left()?))?;
        (&mut &*self.stream).read(buf)
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.set_write_timeout(Some(self.left()?))?;
        (&mut &*self.stream).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// How long connections get at stop to end on their own (their read side
/// shut down, their replies still written) before both sides are shut down.
pub const STOP_GRACE: Duration = Duration::from_secs(2);

/// Why a peer is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `SO_PEERCRED` could not be read.
    Unknown,
    /// Another uid than ours or root's.
    Uid(u32),
}

/// Only the uid cdpd runs as, or root, may talk to its sockets (the QEMU
/// it serves runs as that uid; cdpctl and the agent run as root).
pub fn check_peer(s: &UnixStream) -> Result<(), Refused> {
    let uid = getsockopt(s, PeerCredentials)
        .map_err(|_| Refused::Unknown)?
        .uid();
    if uid == 0 || uid == nix::unistd::geteuid().as_raw() {
        Ok(())
    } else {
        Err(Refused::Uid(uid))
    }
}

/// When each refused peer was last logged, per socket: once a minute per
/// uid and socket at most.
static LOGGED: Mutex<Vec<(String, Refused, Instant)>> = Mutex::new(Vec::new());
const LOG_EVERY: Duration = Duration::from_secs(60);

/// Log a refused peer of `socket` (a description), unless it was logged
/// within the last minute.
pub fn log_refused(socket: &str, who: Refused) {
    let now = Instant::now();
    {
        let mut logged = LOGGED.lock().unwrap_or_else(|e| e.into_inner());
        logged.retain(|(_, _, t)| now.duration_since(*t) < LOG_EVERY);
        if logged.iter().any(|(s, r, _)| *r == who && s == socket) {
            return;
        }
        logged.push((socket.to_string(), who, now));
    }
    match who {
        Refused::Uid(uid) => eprintln!(
            "cdpd: refused a connection to {socket} from uid {uid}: only cdpd's own uid ({}) and root may connect \
             (logged once a minute per uid and socket)",
            nix::unistd::geteuid()
        ),
        Refused::Unknown => {
            eprintln!("cdpd: refused a connection to {socket}: its peer credentials are unreadable")
        }
    }
}

/// The connections of one socket: capped, and ended at stop.
pub struct ConnSet {
    max: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    /// A handle on each open connection, to shut it down at stop.
    open: HashMap<u64, UnixStream>,
    threads: Vec<JoinHandle<()>>,
}

impl ConnSet {
    pub fn new(max: usize) -> ConnSet {
        ConnSet {
            max,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admit `s` unless `max` connections are open; its id, for [`leave`].
    ///
    /// [`leave`]: ConnSet::leave
    pub fn admit(&self, s: &UnixStream) -> Option<u64> {
        let handle = s.try_clone().ok()?;
        let mut inner = self.lock();
        if inner.open.len() >= self.max {
            return None;
        }
        inner.next_id += 1;
        let id = inner.next_id;
        inner.open.insert(id, handle);
        Some(id)
    }

    /// The connection `id` ended.
    pub fn leave(&self, id: u64) {
        self.lock().open.remove(&id);
    }

    /// Keep the thread serving a connection, to join it at stop.
    pub fn add_thread(&self, h: JoinHandle<()>) {
        let mut inner = self.lock();
        inner.threads.retain(|h| !h.is_finished());
        inner.threads.push(h);
    }

    fn shutdown_all(&self, how: Shutdown) {
        for s in self.lock().open.values() {
            let _ = s.shutdown(how);
        }
    }

    fn all_ended(&self) -> bool {
        self.lock().threads.iter().all(|h| h.is_finished())
    }

    /// End every connection of `sets`: no more requests are read; what was
    /// read is answered for up to `grace`; then both sides are shut down, so
    /// that a client that does not read its replies cannot hold the stop.
    /// Returns when every connection's thread has ended.
    pub fn close_all(sets: &[std::sync::Arc<ConnSet>], grace: Duration) {
        for set in sets {
            set.shutdown_all(Shutdown::Read);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && !sets.iter().all(|s| s.all_ended()) {
            std::thread::sleep(Duration::from_millis(10));
        }
        for set in sets {
            set.shutdown_all(Shutdown::Both);
            let threads = std::mem::take(&mut set.lock().threads);
            for h in threads {
                let _ = h.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_the_cap_and_again_after_a_leave() {
        let set = ConnSet::new(2);
        let (a, _a) = UnixStream::pair().unwrap();
        let (b, _b) = UnixStream::pair().unwrap();
        let (c, _c) = UnixStream::pair().unwrap();
        let ia = set.admit(&a).expect("first");
        assert!(set.admit(&b).is_some(), "second");
        assert!(set.admit(&c).is_none(), "third is over the cap");
        set.leave(ia);
        assert!(set.admit(&c).is_some(), "room again after a leave");
    }

    #[test]
    fn close_all_ends_a_thread_blocked_writing_to_a_client_that_does_not_read() {
        let set = std::sync::Arc::new(ConnSet::new(4));
        let (mut server, _client) = UnixStream::pair().unwrap();
        let id = set.admit(&server).unwrap();
        let h = std::thread::spawn(move || {
            use std::io::Write;
            let buf = vec![0u8; 1 << 20];
            // Blocks once the socket buffer is full; fails after shutdown.
            while server.write_all(&buf).is_ok() {}
        });
        set.add_thread(h);
        std::thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        ConnSet::close_all(std::slice::from_ref(&set), Duration::from_millis(100));
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        set.leave(id);
    }

    #[test]
    fn the_budget_lets_one_big_taker_through_and_bounds_the_rest() {
        let b = std::sync::Arc::new(Budget::new(10));
        b.take(25); // more than the budget, but nothing else is taken
        let b2 = b.clone();
        let waiter = std::thread::spawn(move || {
            b2.take(5);
            b2.give(5);
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "took bytes beyond the budget");
        b.give(25);
        waiter.join().unwrap();
        b.take(4);
        b.take(6);
        b.give(10);
    }

    #[test]
    fn our_own_uid_is_accepted() {
        let (a, _b) = UnixStream::pair().unwrap();
        assert_eq!(check_peer(&a), Ok(()));
    }
}
