//! The control protocol of cdpd's socket `<run>/<uuid>/control.sock`
//! (docs/DESIGN.md, "Control socket"): one JSON request per line, one JSON
//! reply per line. The types and the client live here; cdpd serves it.
//!
//! ```text
//! {"cmd":"status"}             → {"ok":true,"status":{…}}
//! {"cmd":"mark","label":"L"}   → {"ok":true,"seq":N,"ts_ns":T}
//! {"cmd":"mark","label":"L","quiesced":true}
//!                              → {"ok":true,"seq":N,"ts_ns":T,"quiesced":true}
//! anything else                → {"ok":false,"error":"…"}
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The longest request line a server reads.
pub const MAX_REQUEST: u64 = 64 * 1024;
/// The longest reply line a client reads (a status of many disks and targets).
pub const MAX_REPLY: u64 = 4 * 1024 * 1024;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DiskStatus {
    pub disk: String,
    pub path: String,
    pub size: u64,
    pub bytes_written: u64,
    pub write_requests: u64,
    pub bytes_read: u64,
    pub read_requests: u64,
    pub flushes: u64,
    pub last_seq: u64,
    pub open_segment: Option<String>,
    pub open_segment_records: u64,
    pub segments_waiting_seal: u64,
    pub in_flight: u64,
    pub journal_bytes: u64,
    pub journal_segments: u64,
    pub connections: u64,
    pub errors: u64,
    pub protocol_errors: u64,
    pub seal_errors: u64,
    /// Age of the oldest record no target has yet (0 when all is shipped).
    pub rpo_ms: u64,
    /// Sealed segments no target has yet.
    pub backlog_segments: u64,
    pub backlog_bytes: u64,
    /// Each target the shipper has reported on.
    pub targets: Vec<TargetStatus>,
    /// Degraded mode (docs/RELIABILITY.md, "A full journal"): "normal",
    /// "degraded" (writes go to the image and the dirty map only) or
    /// "resyncing" (journaling again, the dirty ranges being journaled).
    #[serde(default)]
    pub journal_mode: String,
    #[serde(default)]
    pub degraded: bool,
    /// When the first write the journal did not take was taken (0: none).
    #[serde(default)]
    pub degraded_since_ns: u64,
    /// Bytes of disk marked in the dirty map.
    #[serde(default)]
    pub dirty_bytes: u64,
    /// Times this disk entered degraded mode since cdpd started.
    #[serde(default)]
    pub times_degraded: u64,
    /// Bytes the resync read from the image, and journaled (as
    /// WRITE|RESYNC records; all-zero pieces are ZERO|RESYNC, no payload).
    #[serde(default)]
    pub resync_bytes_read: u64,
    #[serde(default)]
    pub resync_bytes_journaled: u64,
    /// Resyncs finished (a RESYNCED journaled).
    #[serde(default)]
    pub resyncs_done: u64,
    /// Checkpoints made since cdpd started (syncs of the image; a FLUSH
    /// syncs the journal only), and the last one's seq: every record up to
    /// it is durable in the image (docs/DESIGN.md, "Write path").
    #[serde(default)]
    pub checkpoints: u64,
    #[serde(default)]
    pub checkpoint_seq: u64,
    /// The image takes writes in place (a block device, or a file on ext4
    /// where its blocks are allocated): a WRITE there is answered once
    /// journaled, before its image write (docs/DESIGN.md, "Write path",
    /// step 5); and how many were.
    #[serde(default)]
    pub writes_in_place: bool,
    #[serde(default)]
    pub early_acks: u64,
    /// Journal writebacks cdpd started as it appended, while the guest
    /// flushes (docs/DESIGN.md, "Write path", step 6).
    #[serde(default)]
    pub journal_writebacks: u64,
    /// An image write failed after its WRITE was answered: every request
    /// fails with EIO until cdpd restarts (docs/RELIABILITY.md, "A failed
    /// image write").
    #[serde(default)]
    pub image_failed: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TargetStatus {
    pub target: String,
    pub url: String,
    /// "up" or "failing", as the shipper last saw it.
    pub state: String,
    pub last_error: Option<String>,
    pub backlog_segments: u64,
    pub backlog_bytes: u64,
    /// Age of the oldest record this target does not have yet.
    pub lag_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub vm_uuid: String,
    pub vm_name: String,
    pub pid: u32,
    pub last_seq: u64,
    pub segment_size: u64,
    pub segment_age_ms: u64,
    pub disks: Vec<DiskStatus>,
}

/// A request, as sent on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    /// `quiesced`: the caller froze the guest's filesystems for this mark
    /// (`cdpctl mark --quiesce`). Absent on the wire when false, so an
    /// ordinary mark is the same line as before; a cdpd older than the
    /// field refuses a quiesced one (unknown field) instead of recording
    /// it as crash-consistent.
    Mark {
        label: String,
        #[serde(default, skip_serializing_if = "is_false")]
        quiesced: bool,
    },
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// What a MARK recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marked {
    pub seq: u64,
    pub ts_ns: u64,
    /// The mark says the guest was quiesced (false from an older cdpd).
    #[serde(default)]
    pub quiesced: bool,
}

/// A reply, as sent on the wire (`ok` plus the fields of one variant).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reply {
    Status {
        ok: bool,
        status: Box<Status>,
    },
    Marked {
        ok: bool,
        seq: u64,
        ts_ns: u64,
        #[serde(default, skip_serializing_if = "is_false")]
        quiesced: bool,
    },
    Error {
        ok: bool,
        error: String,
    },
}

impl Reply {
    pub fn status(s: Status) -> Reply {
        Reply::Status {
            ok: true,
            status: Box::new(s),
        }
    }

    pub fn marked(m: Marked) -> Reply {
        Reply::Marked {
            ok: true,
            seq: m.seq,
            ts_ns: m.ts_ns,
            quiesced: m.quiesced,
        }
    }

    pub fn error(message: impl Into<String>) -> Reply {
        Reply::Error {
            ok: false,
            error: message.into(),
        }
    }

    /// The reply as one line, newline included.
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self)
            .unwrap_or_else(|_| r#"{"ok":false,"error":"reply could not be encoded"}"#.to_string());
        s.push('\n');
        s
    }
}

/// Parse one request line (server side).
pub fn parse_request(line: &str) -> Result<Request, String> {
    serde_json::from_str(line.trim()).map_err(|e| format!("bad request: {e}"))
}

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ControlError {
    /// Nothing listens: cdpd is not running for this VM.
    #[error(
        "cdpd's control socket {path} does not answer ({source}): is the VM running with CDP?"
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket {path}: unreadable reply: {message}")]
    BadReply { path: PathBuf, message: String },
    /// cdpd understood and said no.
    #[error("cdpd refused: {message}")]
    Refused { path: PathBuf, message: String },
}

impl ControlError {
    /// May the same request succeed later (cdpd starting or busy)?
    pub fn is_transient(&self) -> bool {
        matches!(self, ControlError::Connect { .. } | ControlError::Io { .. })
    }
}

/// A client of one VM's control socket. Each call is one connection.
#[derive(Debug, Clone)]
pub struct Client {
    path: PathBuf,
    timeout: Duration,
}

impl Client {
    /// A client with a 30 s timeout on every read and write.
    pub fn new(sock: impl Into<PathBuf>) -> Client {
        Client {
            path: sock.into(),
            timeout: Duration::from_secs(30),
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn status(&self) -> Result<Status, ControlError> {
        match self.call(&Request::Status)? {
            Reply::Status { status, .. } => Ok(*status),
            other => Err(self.unexpected(&other)),
        }
    }

    pub fn mark(&self, label: &str) -> Result<Marked, ControlError> {
        self.mark_as(label, false)
    }

    /// A mark that says whether the guest was quiesced for it.
    pub fn mark_as(&self, label: &str, quiesced: bool) -> Result<Marked, ControlError> {
        let req = Request::Mark {
            label: label.to_string(),
            quiesced,
        };
        match self.call(&req)? {
            Reply::Marked {
                seq,
                ts_ns,
                quiesced,
                ..
            } => Ok(Marked {
                seq,
                ts_ns,
                quiesced,
            }),
            other => Err(self.unexpected(&other)),
        }
    }

    fn unexpected(&self, r: &Reply) -> ControlError {
        ControlError::BadReply {
            path: self.path.clone(),
            message: format!("a reply of the wrong kind: {r:?}"),
        }
    }

    /// Send one request, read one reply; an `ok: false` reply is `Refused`.
    pub fn call(&self, req: &Request) -> Result<Reply, ControlError> {
        let io = |source| ControlError::Io {
            path: self.path.clone(),
            source,
        };
        let mut s = UnixStream::connect(&self.path).map_err(|source| ControlError::Connect {
            path: self.path.clone(),
            source,
        })?;
        s.set_read_timeout(Some(self.timeout)).map_err(io)?;
        s.set_write_timeout(Some(self.timeout)).map_err(io)?;
        let mut line = serde_json::to_string(req).map_err(|e| ControlError::BadReply {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        line.push('\n');
        s.write_all(line.as_bytes()).map_err(io)?;
        let mut reply = String::new();
        BufReader::new(s.take(MAX_REPLY))
            .read_line(&mut reply)
            .map_err(io)?;
        let r: Reply = serde_json::from_str(&reply).map_err(|e| ControlError::BadReply {
            path: self.path.clone(),
            message: format!("{e} in {:?}", truncate(&reply)),
        })?;
        match r {
            Reply::Error { error, .. } => Err(ControlError::Refused {
                path: self.path.clone(),
                message: error,
            }),
            r => Ok(r),
        }
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(200) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_keep_their_wire_form() {
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"cmd":"status"}"#
        );
        assert_eq!(
            parse_request(r#"{"cmd":"mark","label":"x"}"#).unwrap(),
            Request::Mark {
                label: "x".into(),
                quiesced: false
            }
        );
        assert!(parse_request(r#"{"cmd":"mark"}"#).is_err());
        assert_eq!(
            Reply::marked(Marked {
                seq: 3,
                ts_ns: 4,
                quiesced: false
            })
            .to_line(),
            "{\"ok\":true,\"seq\":3,\"ts_ns\":4}\n"
        );
        assert_eq!(
            Reply::error("no").to_line(),
            "{\"ok\":false,\"error\":\"no\"}\n"
        );
        let r: Reply = serde_json::from_str(r#"{"ok":false,"error":"e"}"#).unwrap();
        assert_eq!(r, Reply::error("e"));
    }

    /// A quiesced mark on the wire, and the forms of peers older than the
    /// flag: an ordinary mark's request and reply lines are unchanged, an
    /// old reply reads as not quiesced.
    #[test]
    fn quiesced_marks_on_the_wire_stay_compatible() {
        let q = Request::Mark {
            label: "db".into(),
            quiesced: true,
        };
        let line = serde_json::to_string(&q).unwrap();
        assert_eq!(line, r#"{"cmd":"mark","label":"db","quiesced":true}"#);
        assert_eq!(parse_request(&line).unwrap(), q);
        let plain = Request::Mark {
            label: "db".into(),
            quiesced: false,
        };
        assert_eq!(
            serde_json::to_string(&plain).unwrap(),
            r#"{"cmd":"mark","label":"db"}"#
        );
        assert!(parse_request(r#"{"cmd":"mark","label":"db","frozen":true}"#).is_err());
        let m = Marked {
            seq: 5,
            ts_ns: 6,
            quiesced: true,
        };
        assert_eq!(
            Reply::marked(m).to_line(),
            "{\"ok\":true,\"seq\":5,\"ts_ns\":6,\"quiesced\":true}\n"
        );
        let old: Reply = serde_json::from_str(r#"{"ok":true,"seq":5,"ts_ns":6}"#).unwrap();
        assert!(
            matches!(
                old,
                Reply::Marked {
                    quiesced: false,
                    ..
                }
            ),
            "{old:?}"
        );
        let old: Marked = serde_json::from_str(r#"{"seq":5,"ts_ns":6}"#).unwrap();
        assert!(!old.quiesced);
    }

    #[test]
    fn client_against_a_one_shot_server() {
        use std::os::unix::net::UnixListener;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("control.sock");
        let l = UnixListener::bind(&p).unwrap();
        let h = std::thread::spawn(move || {
            for reply in [
                Reply::marked(Marked {
                    seq: 7,
                    ts_ns: 9,
                    quiesced: false,
                }),
                Reply::error("bad label"),
            ] {
                let (s, _) = l.accept().unwrap();
                let mut line = String::new();
                BufReader::new(&s).read_line(&mut line).unwrap();
                assert_eq!(
                    parse_request(&line).unwrap(),
                    Request::Mark {
                        label: "m".into(),
                        quiesced: false
                    }
                );
                (&s).write_all(reply.to_line().as_bytes()).unwrap();
            }
        });
        let c = Client::new(&p);
        assert_eq!(
            c.mark("m").unwrap(),
            Marked {
                seq: 7,
                ts_ns: 9,
                quiesced: false
            }
        );
        let e = c.mark("m").unwrap_err();
        assert!(matches!(e, ControlError::Refused { ref message, .. } if message == "bad label"));
        assert!(!e.is_transient());
        h.join().unwrap();
        let gone = Client::new(d.path().join("none.sock"))
            .status()
            .unwrap_err();
        assert!(gone.is_transient(), "{gone}");
    }
}
