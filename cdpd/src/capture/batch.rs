//! One batch: every complete NBD request a connection read in one go, each
//! parsed and validated once, then journaled, applied and answered together
//! (docs/DESIGN.md, "Write path").
//!
//! A request is described once, here: its NBD handle, what it does, where
//! its payload is in the connection's buffer, and the slot its result goes
//! to. The batch's requests keep the order they came in; a request's index
//! in [`Batch::reqs`] is its place in that order, and journaled requests get
//! their sequence numbers in it.

use cdp_core::journal::format::{Kind, FLAG_FUA, FLAG_NO_HOLE};
use cdp_core::journal::writer::Record;
use cdp_core::nbd::proto::{self, Verdict};

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// Read `length` bytes at `offset` from the image.
    Read,
    /// A change (WRITE, ZERO, TRIM) or a FLUSH: journaled, then applied.
    Journal(Kind),
    /// Refused by validation; `result` holds the NBD error.
    Reject,
    /// NBD_CMD_DISC: no reply; the connection closes after the batch.
    Disconnect,
}

/// One request of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Req {
    /// The NBD handle ("cookie"), echoed in the reply.
    pub cookie: u64,
    pub op: Op,
    /// Journal flags: [`FLAG_FUA`], [`FLAG_NO_HOLE`].
    pub flags: u8,
    pub offset: u64,
    pub length: u64,
    /// Where a WRITE's payload (`length` bytes) starts in the connection's
    /// buffer.
    pub payload_at: usize,
    /// The result slot: 0, or the NBD error the request is answered with.
    pub result: u32,
    /// Answered once journaled, before its image write (docs/DESIGN.md,
    /// "Write path", step 5): its reply is sent.
    pub early: bool,
}

impl Req {
    /// A request as read from the wire, with its validation verdict.
    pub fn new(req: &proto::Request, verdict: Verdict, payload_at: usize) -> Req {
        let (op, result) = match (verdict, req.kind) {
            (Verdict::Reject(e) | Verdict::RejectAndClose(e), _) => (Op::Reject, e),
            (Verdict::Disconnect, _) => (Op::Disconnect, 0),
            (Verdict::Ok, proto::CMD_READ) => (Op::Read, 0),
            (Verdict::Ok, proto::CMD_WRITE) => (Op::Journal(Kind::Write), 0),
            (Verdict::Ok, proto::CMD_WRITE_ZEROES) => (Op::Journal(Kind::Zero), 0),
            (Verdict::Ok, proto::CMD_TRIM) => (Op::Journal(Kind::Trim), 0),
            (Verdict::Ok, proto::CMD_FLUSH) => (Op::Journal(Kind::Flush), 0),
            // validate() lets no other command through.
            (Verdict::Ok, _) => (Op::Reject, proto::errno::EINVAL),
        };
        let mut flags = 0;
        if req.flags & proto::CMD_FLAG_FUA != 0 {
            flags |= FLAG_FUA;
        }
        if req.flags & proto::CMD_FLAG_NO_HOLE != 0 {
            flags |= FLAG_NO_HOLE;
        }
        Req {
            cookie: req.cookie,
            op,
            flags,
            offset: req.offset,
            length: req.len as u64,
            payload_at,
            result,
            early: false,
        }
    }

    /// May it be answered once journaled, before its image write? A plain
    /// WRITE (no FUA), journaled without error.
    pub fn acks_early(&self) -> bool {
        self.op == Op::Journal(Kind::Write) && self.flags & FLAG_FUA == 0 && self.result == 0
    }

    /// Is the reply due only once journal and image are durable (FLUSH, or
    /// a change with FUA)?
    pub fn durable(&self) -> bool {
        matches!(self.op, Op::Journal(Kind::Flush))
            || (matches!(self.op, Op::Journal(_)) && self.flags & FLAG_FUA != 0)
    }

    /// The payload of a WRITE in `buf`; empty for every other request.
    pub fn payload<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        match self.op {
            Op::Journal(Kind::Write) => {
                &buf[self.payload_at..self.payload_at + self.length as usize]
            }
            _ => &[],
        }
    }

    /// The journal record of a journaled request.
    pub fn record<'b>(&self, buf: &'b [u8]) -> Option<Record<'b>> {
        let Op::Journal(kind) = self.op else {
            return None;
        };
        let (offset, length) = if kind == Kind::Flush {
            (0, 0)
        } else {
            (self.offset, self.length)
        };
        Some(Record {
            kind,
            flags: self.flags,
            offset,
            length,
            payload: self.payload(buf),
        })
    }
}

/// The requests of one batch, reused from batch to batch (no allocation per
/// request once it has grown).
#[derive(Debug, Default)]
pub(crate) struct Batch {
    pub reqs: Vec<Req>,
}

impl Batch {
    pub fn with_capacity(n: usize) -> Batch {
        Batch {
            reqs: Vec::with_capacity(n),
        }
    }

    pub fn clear(&mut self) {
        self.reqs.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.reqs.is_empty()
    }

    /// Requests that go into the journal.
    pub fn journaled(&self) -> usize {
        self.reqs
            .iter()
            .filter(|r| matches!(r.op, Op::Journal(_)))
            .count()
    }

    /// Mark [`Req::early`] the plain WRITEs ([`Req::acks_early`]) for
    /// which `in_place` holds; true when there is one.
    pub fn mark_early(&mut self, in_place: impl Fn(&Req) -> bool) -> bool {
        let mut any = false;
        for r in self.reqs.iter_mut() {
            r.early = r.acks_early() && in_place(r);
            any |= r.early;
        }
        any
    }

    /// Unmark them: they are answered with the others.
    pub fn clear_early(&mut self) {
        for r in self.reqs.iter_mut() {
            r.early = false;
        }
    }

    /// Fail every request with `errno` (a disk that failed,
    /// [`super::Disk::image_failed`]): nothing is journaled, applied or read.
    pub fn fail_all(&mut self, errno: u32) {
        for r in &mut self.reqs {
            if r.op != Op::Disconnect {
                r.op = Op::Reject;
                r.result = errno;
            }
        }
    }

    /// WRITE payload bytes of the batch.
    pub fn write_bytes(&self) -> u64 {
        self.reqs
            .iter()
            .filter(|r| r.op == Op::Journal(Kind::Write))
            .map(|r| r.length)
            .sum()
    }

    /// The journal records of the batch, in order; their payloads are in `buf`.
    pub fn records<'b>(&'b self, buf: &'b [u8]) -> impl Iterator<Item = Record<'b>> + 'b {
        self.reqs.iter().filter_map(move |r| r.record(buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cdp_core::nbd::proto::{Request, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE};

    fn req(kind: u16, flags: u16, offset: u64, len: u32) -> Request {
        Request {
            flags,
            kind,
            cookie: 77,
            offset,
            len,
        }
    }

    #[test]
    fn requests_map_to_ops_flags_and_records() {
        let buf: Vec<u8> = (0..64).collect();
        let w = Req::new(
            &req(proto::CMD_WRITE, CMD_FLAG_FUA, 4096, 8),
            Verdict::Ok,
            10,
        );
        assert_eq!(
            (w.op, w.flags, w.cookie),
            (Op::Journal(Kind::Write), FLAG_FUA, 77)
        );
        assert!(w.durable());
        let rec = w.record(&buf).unwrap();
        assert_eq!(
            (rec.offset, rec.length, rec.payload),
            (4096, 8, &buf[10..18])
        );

        let z = Req::new(
            &req(proto::CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 512),
            Verdict::Ok,
            0,
        );
        assert_eq!((z.op, z.flags), (Op::Journal(Kind::Zero), FLAG_NO_HOLE));
        assert!(!z.durable());
        assert!(z.record(&buf).unwrap().payload.is_empty());

        let f = Req::new(&req(proto::CMD_FLUSH, 0, 0, 0), Verdict::Ok, 0);
        assert!(f.durable());
        assert_eq!(f.record(&buf).unwrap().kind, Kind::Flush);

        let r = Req::new(&req(proto::CMD_READ, 0, 0, 512), Verdict::Ok, 0);
        assert_eq!(r.op, Op::Read);
        assert!(r.record(&buf).is_none() && !r.durable());

        let bad = Req::new(
            &req(proto::CMD_WRITE, CMD_FLAG_FUA, 0, 8),
            Verdict::Reject(proto::errno::ENOSPC),
            0,
        );
        assert_eq!((bad.op, bad.result), (Op::Reject, proto::errno::ENOSPC));
        assert!(
            bad.record(&buf).is_none() && !bad.durable(),
            "a refused FUA write is answered at once"
        );
        assert!(bad.payload(&buf).is_empty());
    }

    #[test]
    fn only_changes_and_flushes_are_journaled() {
        let mut b = Batch::default();
        b.reqs
            .push(Req::new(&req(proto::CMD_WRITE, 0, 0, 4), Verdict::Ok, 0));
        b.reqs
            .push(Req::new(&req(proto::CMD_READ, 0, 0, 4), Verdict::Ok, 0));
        b.reqs
            .push(Req::new(&req(proto::CMD_FLUSH, 0, 0, 0), Verdict::Ok, 0));
        assert_eq!(b.journaled(), 2);
        let kinds: Vec<Kind> = b.records(&[0; 8]).map(|r| r.kind).collect();
        assert_eq!(kinds, [Kind::Write, Kind::Flush]);
    }
}
