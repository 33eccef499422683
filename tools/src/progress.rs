//! Progress of long commands (`restore`, `baseline`, `verify`, `prune`,
//! `export`): a bar (bytes, rate, ETA) on a terminal, JSON events with
//! `--json` (issue 15; the format is in README.md, "Progress and JSON
//! events").
//!
//! With `--json`, stdout keeps the command's one JSON document; the events
//! go to stderr, one JSON object per line:
//! `{"event":"progress","op":"restore","bytes":N,"total":T,"rate_bps":R,"eta_s":E}`
//! at most four a second, a last one when the work is done, then
//! `{"event":"done","op":…}`. Without `--json`, a bar when stderr is a
//! terminal, else nothing.
//!
//! The libraries report through callbacks that do no I/O of their own:
//! [`Meter::progress`] (bytes done, against a total known in advance) and
//! [`Meter::ticker`] (work found and done, for a total learnt on the way).

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cdp_repo::restore::{Progress, Tick, Ticker};
use serde_json::{json, Value};

/// At most this often an intermediate event (four a second).
const EVERY: Duration = Duration::from_millis(250);

/// How a command shows its progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// JSON lines on stderr (`--json`).
    Json,
    /// An indicatif bar on stderr (a terminal, no `--json`).
    Bar,
    /// Nothing (stderr is not a terminal, no `--json`).
    Quiet,
}

/// Set once a command chose [`Mode::Json`]: from then on this process's
/// stderr is JSON lines, and [`note`] writes message events.
static JSON_LINES: AtomicBool = AtomicBool::new(false);

impl Mode {
    /// `--json` → JSON (and [`note`] writes events from now on); else a bar
    /// when stderr is a terminal.
    pub fn of(json: bool) -> Mode {
        if json {
            JSON_LINES.store(true, Ordering::Relaxed);
            Mode::Json
        } else if std::io::stderr().is_terminal() {
            Mode::Bar
        } else {
            Mode::Quiet
        }
    }
}

struct State {
    bytes: u64,
    total: u64,
    last: Option<Instant>,
    finished: bool,
}

struct Inner {
    op: &'static str,
    mode: Mode,
    started: Instant,
    bar: Option<indicatif::ProgressBar>,
    state: Mutex<State>,
}

/// The progress of one operation. Cheap to clone (shared).
#[derive(Clone)]
pub struct Meter(Arc<Inner>);

impl Meter {
    /// A meter of `op` ("restore", "baseline", …) whose total is `total`
    /// bytes so far (more may be [`Meter::found`]). With `--json` the first
    /// event is written at once.
    pub fn new(mode: Mode, op: &'static str, total: u64) -> Meter {
        let bar = (mode == Mode::Bar).then(|| {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("a valid template"),
            );
            b.set_message(op);
            b
        });
        let m = Meter(Arc::new(Inner {
            op,
            mode,
            started: Instant::now(),
            bar,
            state: Mutex::new(State {
                bytes: 0,
                total,
                last: None,
                finished: false,
            }),
        }));
        m.emit(false);
        m
    }

    /// `n` more bytes of work are known.
    pub fn found(&self, n: u64) {
        self.0.state.lock().unwrap().total += n;
        if let Some(b) = &self.0.bar {
            b.inc_length(n);
        }
        self.emit(false);
    }

    /// `n` more bytes are done.
    pub fn done(&self, n: u64) {
        self.0.state.lock().unwrap().bytes += n;
        if let Some(b) = &self.0.bar {
            b.inc(n);
        }
        self.emit(false);
    }

    /// (bytes done, total) so far.
    pub fn counts(&self) -> (u64, u64) {
        let s = self.0.state.lock().unwrap();
        (s.bytes, s.total)
    }

    /// A callback of bytes done, for `cdp_repo::restore::execute` and
    /// `cdp_shipper::baseline::take_with_progress`.
    pub fn progress(&self) -> Progress {
        let m = self.clone();
        Arc::new(move |n| m.done(n))
    }

    /// A callback of work found and done, for the libraries that learn
    /// their total on the way.
    pub fn ticker(&self) -> Ticker {
        let m = self.clone();
        Arc::new(move |t| match t {
            Tick::Found(n) => m.found(n),
            Tick::Done(n) => m.done(n),
        })
    }

    /// Take the bar off the terminal (the work ended, or failed: no event).
    pub fn clear(&self) {
        if let Some(b) = &self.0.bar {
            b.finish_and_clear();
        }
    }

    /// The work is done: the last progress event (bytes == total when
    /// every byte found was done), then `{"event":"done"}`; the bar is
    /// cleared. Once; later calls do nothing.
    pub fn finish(&self) {
        {
            let mut s = self.0.state.lock().unwrap();
            if s.finished {
                return;
            }
            s.finished = true;
        }
        self.emit(true);
        if let Some(b) = &self.0.bar {
            b.finish_and_clear();
        }
        let (bytes, total) = self.counts();
        event(
            self.0.mode,
            json!({
                "event": "done",
                "op": self.0.op,
                "bytes": bytes,
                "total": total,
                "seconds": round1(self.0.started.elapsed().as_secs_f64()),
            }),
        );
    }

    /// A progress event, unless one was written less than [`EVERY`] ago
    /// (`last`: always).
    fn emit(&self, last: bool) {
        if self.0.mode != Mode::Json {
            return;
        }
        let now = Instant::now();
        let (bytes, total) = {
            let mut s = self.0.state.lock().unwrap();
            if s.finished && !last {
                return;
            }
            if !last && s.last.is_some_and(|t| now.duration_since(t) < EVERY) {
                return;
            }
            s.last = Some(now);
            (s.bytes, s.total)
        };
        let secs = now.duration_since(self.0.started).as_secs_f64();
        event(self.0.mode, progress_event(self.0.op, bytes, total, secs));
    }
}

/// `{"event":"progress",…}` of `bytes` of `total` done in `secs`: the rate
/// in bytes per second and the time left at that rate (null while unknown).
pub fn progress_event(op: &str, bytes: u64, total: u64, secs: f64) -> Value {
    let rate = if secs > 0.0 {
        (bytes as f64 / secs) as u64
    } else {
        0
    };
    let eta = (rate > 0).then(|| round1(total.saturating_sub(bytes) as f64 / rate as f64));
    json!({
        "event": "progress",
        "op": op,
        "bytes": bytes,
        "total": total,
        "rate_bps": rate,
        "eta_s": eta,
    })
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Write one event line to stderr (`--json` only).
pub fn event(mode: Mode, v: Value) {
    if mode != Mode::Json {
        return;
    }
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{v}");
}

/// A line for the operator on stderr: the text, or with `--json` an event
/// `{"event":"message","op":…,"text":…}` (stderr stays JSON lines).
pub fn say(mode: Mode, op: &str, text: &str) {
    if mode == Mode::Json {
        event(mode, json!({"event": "message", "op": op, "text": text}));
    } else {
        eprintln!("{text}");
    }
}

/// A line for the operator from code shared by several commands (which
/// target is read): an event when the command writes JSON lines on stderr
/// ([`Mode::of`] with `--json`), else the text.
pub fn note(text: &str) {
    if JSON_LINES.load(Ordering::Relaxed) {
        say(Mode::Json, "cdpctl", text);
    } else {
        eprintln!("{text}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_and_eta_follow_the_bytes_done() {
        let v = progress_event("restore", 50, 200, 2.0);
        assert_eq!(v["rate_bps"], 25);
        assert_eq!(v["eta_s"], 6.0);
        let v = progress_event("restore", 0, 200, 0.0);
        assert_eq!(v["rate_bps"], 0);
        assert!(v["eta_s"].is_null());
        let v = progress_event("verify", 300, 300, 1.0);
        assert_eq!(v["eta_s"], 0.0);
    }

    #[test]
    fn counts_add_up_and_finish_is_once() {
        let m = Meter::new(Mode::Quiet, "verify", 10);
        let t = m.ticker();
        t(Tick::Found(5));
        t(Tick::Done(7));
        m.progress()(8);
        assert_eq!(m.counts(), (15, 15));
        m.finish();
        m.finish();
        m.done(1);
        assert_eq!(m.counts(), (16, 15));
        // The bar's template parses; a bar counts the same.
        let b = Meter::new(Mode::Bar, "restore", 10);
        b.found(2);
        b.done(12);
        assert_eq!(b.counts(), (12, 12));
        b.finish();
    }
}
