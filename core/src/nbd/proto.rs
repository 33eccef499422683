//! NBD wire protocol: constants and pure encoders/decoders (no sockets).
//!
//! Only the fixed-newstyle handshake and simple replies are spoken. Every
//! length read from the wire is bounded here, before anything is allocated.
//!
//! ```text
//! handshake (server → client)   "NBDMAGIC" | IHAVEOPT | u16 handshake flags
//! client flags                  u32
//! option (client → server)      IHAVEOPT u64 | option u32 | length u32 | data
//! option reply                  REPLY_MAGIC u64 | option u32 | type u32 | length u32 | data
//! request (28 bytes)            0x25609513 u32 | flags u16 | type u16 | cookie u64 | offset u64 | length u32
//! simple reply (16 bytes)       0x67446698 u32 | error u32 | cookie u64 | [data]
//! ```

use thiserror::Error;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FLAG_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_FLAG_NO_ZEROES: u32 = 1 << 1;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) | 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) | 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) | 9;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

pub const REQUEST_LEN: usize = 28;
pub const SIMPLE_REPLY_LEN: usize = 16;

/// Largest READ or WRITE payload we accept (and advertise as the maximum block size).
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Preferred block size advertised to clients.
pub const PREFERRED_BLOCK: u32 = 4096;
/// Longest option payload we read; longer ones close the connection unread.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Longest export name (the NBD spec caps strings at 4096 bytes).
pub const MAX_NAME_LEN: usize = 4096;

/// NBD error numbers (the protocol's own values, not the host's errno).
pub mod errno {
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;
}

/// Map a host I/O error to the NBD error sent to the client. The one place
/// where this mapping lives.
pub fn nbd_errno(err: &std::io::Error) -> u32 {
    match err.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => errno::ENOSPC,
        Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => errno::EPERM,
        Some(libc::ENOMEM) => errno::ENOMEM,
        Some(libc::EINVAL) => errno::EINVAL,
        Some(libc::EOPNOTSUPP) => errno::ENOTSUP,
        Some(libc::EOVERFLOW) => errno::EOVERFLOW,
        Some(libc::ESHUTDOWN) => errno::ESHUTDOWN,
        _ => errno::EIO,
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("bad request magic {0:#010x}")]
    BadRequestMagic(u32),
    #[error("bad option magic {0:#018x}")]
    BadOptionMagic(u64),
    #[error("option length {0} exceeds the limit of {MAX_OPTION_LEN} bytes")]
    OptionTooLong(u32),
    #[error("client flags {0:#x} do not include fixed newstyle or have unknown bits")]
    BadClientFlags(u32),
}

/// Header of an option sent by the client during the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

/// Parse the 16-byte option header. The length is bounded before the caller
/// allocates for the data.
pub fn parse_option_header(b: &[u8; 16]) -> Result<OptionHeader, ProtoError> {
    let magic = u64::from_be_bytes(b[0..8].try_into().unwrap());
    if magic != IHAVEOPT {
        return Err(ProtoError::BadOptionMagic(magic));
    }
    let option = u32::from_be_bytes(b[8..12].try_into().unwrap());
    let len = u32::from_be_bytes(b[12..16].try_into().unwrap());
    if len > MAX_OPTION_LEN {
        return Err(ProtoError::OptionTooLong(len));
    }
    Ok(OptionHeader { option, len })
}

/// Validate the client flags that follow the server greeting.
pub fn parse_client_flags(flags: u32) -> Result<bool, ProtoError> {
    let known = CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES;
    if flags & CLIENT_FLAG_FIXED_NEWSTYLE == 0 || flags & !known != 0 {
        return Err(ProtoError::BadClientFlags(flags));
    }
    Ok(flags & CLIENT_FLAG_NO_ZEROES != 0)
}

/// The server greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// Append an option reply to `out`.
pub fn put_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// A parsed NBD_OPT_INFO / NBD_OPT_GO payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    pub name: &'a [u8],
    pub requests: Vec<u16>,
}

/// Parse the data of NBD_OPT_INFO or NBD_OPT_GO:
/// `u32 name length | name | u16 count | count × u16`.
pub fn parse_info_request(data: &[u8]) -> Option<InfoRequest<'_>> {
    let name_len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    if name_len > MAX_NAME_LEN {
        return None;
    }
    let name = data.get(4..4 + name_len)?;
    let rest = &data[4 + name_len..];
    let count = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
    let list = &rest[2..];
    if list.len() != count * 2 {
        return None;
    }
    let requests = list
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Some(InfoRequest { name, requests })
}

/// What an export tells clients about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
}

pub fn info_export(e: &ExportInfo) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    b[2..10].copy_from_slice(&e.size.to_be_bytes());
    b[10..12].copy_from_slice(&e.flags.to_be_bytes());
    b
}

pub fn info_block_size(min: u32, preferred: u32, max: u32) -> [u8; 14] {
    let mut b = [0u8; 14];
    b[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b[2..6].copy_from_slice(&min.to_be_bytes());
    b[6..10].copy_from_slice(&preferred.to_be_bytes());
    b[10..14].copy_from_slice(&max.to_be_bytes());
    b
}

/// Reply to the legacy NBD_OPT_EXPORT_NAME: size, flags, and 124 zero bytes
/// unless the client negotiated NO_ZEROES.
pub fn put_export_name_reply(out: &mut Vec<u8>, e: &ExportInfo, no_zeroes: bool) {
    out.extend_from_slice(&e.size.to_be_bytes());
    out.extend_from_slice(&e.flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
}

/// NBD_REP_SERVER payload for NBD_OPT_LIST.
pub fn put_list_entry(out: &mut Vec<u8>, name: &str) {
    let mut data = Vec::with_capacity(4 + name.len());
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    put_option_reply(out, OPT_LIST, REP_SERVER, &data);
}

/// A transmission-phase request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    /// Bytes of payload that follow this header on the wire.
    pub fn payload_len(&self) -> usize {
        if self.kind == CMD_WRITE {
            self.len as usize
        } else {
            0
        }
    }
}

/// Parse a 28-byte request header. Only the magic is checked here; the
/// semantics are checked by [`validate`].
pub fn parse_request(b: &[u8]) -> Result<Request, ProtoError> {
    let magic = u32::from_be_bytes(b[0..4].try_into().unwrap());
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadRequestMagic(magic));
    }
    Ok(Request {
        flags: u16::from_be_bytes([b[4], b[5]]),
        kind: u16::from_be_bytes([b[6], b[7]]),
        cookie: u64::from_be_bytes(b[8..16].try_into().unwrap()),
        offset: u64::from_be_bytes(b[16..24].try_into().unwrap()),
        len: u32::from_be_bytes(b[24..28].try_into().unwrap()),
    })
}

pub fn encode_request(r: &Request) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&r.flags.to_be_bytes());
    b[6..8].copy_from_slice(&r.kind.to_be_bytes());
    b[8..16].copy_from_slice(&r.cookie.to_be_bytes());
    b[16..24].copy_from_slice(&r.offset.to_be_bytes());
    b[24..28].copy_from_slice(&r.len.to_be_bytes());
    b
}

/// A simple reply header.
#[inline]
pub fn simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Append a simple reply header.
#[inline]
pub fn put_simple_reply(out: &mut Vec<u8>, error: u32, cookie: u64) {
    out.extend_from_slice(&simple_reply(error, cookie));
}

/// What the server should do with a request after validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Valid: dispatch it.
    Ok,
    /// Invalid: consume its payload (if any), reply with this NBD error, go on.
    Reject(u32),
    /// The stream can no longer be trusted (e.g. a payload over the maximum):
    /// reply with this error and close the connection.
    RejectAndClose(u32),
    /// NBD_CMD_DISC.
    Disconnect,
}

/// Validate a request against an export of `size` bytes. Every request goes
/// through here exactly once before dispatch, so the storage layer never sees
/// an invalid one.
pub fn validate(r: &Request, size: u64, read_only: bool) -> Verdict {
    let known_flags = match r.kind {
        CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        _ => 0,
    };
    match r.kind {
        CMD_DISC => return Verdict::Disconnect,
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_WRITE_ZEROES => {}
        _ => return Verdict::Reject(errno::EINVAL),
    }
    if r.kind == CMD_WRITE && r.len > MAX_PAYLOAD {
        return Verdict::RejectAndClose(errno::EOVERFLOW);
    }
    if r.flags & !known_flags != 0 {
        return Verdict::Reject(errno::EINVAL);
    }
    if read_only && matches!(r.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES) {
        return Verdict::Reject(errno::EPERM);
    }
    match r.kind {
        CMD_FLUSH => {
            if r.offset != 0 || r.len != 0 {
                Verdict::Reject(errno::EINVAL)
            } else {
                Verdict::Ok
            }
        }
        CMD_READ if r.len > MAX_PAYLOAD => Verdict::Reject(errno::EOVERFLOW),
        _ => {
            let in_range = r
                .offset
                .checked_add(r.len as u64)
                .is_some_and(|end| end <= size);
            if !in_range {
                if matches!(r.kind, CMD_WRITE | CMD_WRITE_ZEROES) {
                    Verdict::Reject(errno::ENOSPC)
                } else {
                    Verdict::Reject(errno::EINVAL)
                }
            } else if r.len == 0 && r.kind != CMD_READ && r.kind != CMD_WRITE {
                Verdict::Reject(errno::EINVAL)
            } else {
                Verdict::Ok
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn req(kind: u16, flags: u16, offset: u64, len: u32) -> Request {
        Request {
            flags,
            kind,
            cookie: 7,
            offset,
            len,
        }
    }

    #[test]
    fn greeting_layout() {
        let g = greeting();
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(u16::from_be_bytes([g[16], g[17]]), 3);
    }

    #[test]
    fn validate_cases() {
        let size = 1 << 20;
        assert_eq!(
            validate(&req(CMD_READ, 0, 0, 4096), size, false),
            Verdict::Ok
        );
        assert_eq!(
            validate(&req(CMD_READ, 0, size, 1), size, false),
            Verdict::Reject(errno::EINVAL)
        );
        assert_eq!(
            validate(&req(CMD_WRITE, 0, size - 1, 2), size, false),
            Verdict::Reject(errno::ENOSPC)
        );
        assert_eq!(
            validate(&req(CMD_WRITE, 0, 0, MAX_PAYLOAD + 1), u64::MAX, false),
            Verdict::RejectAndClose(errno::EOVERFLOW)
        );
        assert_eq!(
            validate(&req(CMD_READ, 0, 0, MAX_PAYLOAD + 1), u64::MAX, false),
            Verdict::Reject(errno::EOVERFLOW)
        );
        assert_eq!(
            validate(&req(99, 0, 0, 0), size, false),
            Verdict::Reject(errno::EINVAL)
        );
        assert_eq!(
            validate(&req(CMD_READ, CMD_FLAG_FUA, 0, 1), size, false),
            Verdict::Reject(errno::EINVAL)
        );
        assert_eq!(
            validate(
                &req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE | CMD_FLAG_FUA, 0, 512),
                size,
                false
            ),
            Verdict::Ok
        );
        assert_eq!(
            validate(&req(CMD_FLUSH, 0, 1, 0), size, false),
            Verdict::Reject(errno::EINVAL)
        );
        assert_eq!(
            validate(&req(CMD_WRITE, 0, u64::MAX, 1), size, false),
            Verdict::Reject(errno::ENOSPC)
        );
        assert_eq!(
            validate(&req(CMD_WRITE, 0, 0, 1), size, true),
            Verdict::Reject(errno::EPERM)
        );
        assert_eq!(
            validate(&req(CMD_DISC, 0, 0, 0), size, false),
            Verdict::Disconnect
        );
    }

    #[test]
    fn info_request_parse() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"vda");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        let r = parse_info_request(&d).unwrap();
        assert_eq!(r.name, b"vda");
        assert_eq!(r.requests, vec![INFO_BLOCK_SIZE, INFO_NAME]);
        // Count that does not match the data.
        d[8] = 0;
        d[9] = 3;
        assert!(parse_info_request(&d).is_none());
        assert!(parse_info_request(&[0, 0, 0, 9, b'a']).is_none());
    }

    #[test]
    fn option_header_bounds() {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        b[12..16].copy_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
        assert_eq!(
            parse_option_header(&b),
            Err(ProtoError::OptionTooLong(MAX_OPTION_LEN + 1))
        );
        b[0] = 0;
        assert!(matches!(
            parse_option_header(&b),
            Err(ProtoError::BadOptionMagic(_))
        ));
    }

    proptest! {
        #[test]
        fn request_roundtrip(flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) {
            let r = Request { flags, kind, cookie, offset, len };
            prop_assert_eq!(parse_request(&encode_request(&r)).unwrap(), r);
        }

        #[test]
        fn parse_request_never_panics(bytes in proptest::collection::vec(any::<u8>(), REQUEST_LEN)) {
            let _ = parse_request(&bytes);
        }

        #[test]
        fn info_request_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_info_request(&bytes);
        }

        /// A validated request never touches bytes outside the export.
        #[test]
        fn valid_requests_are_in_range(kind in 0u16..10, flags in 0u16..8, offset: u64, len: u32, size in 0u64..(1 << 40)) {
            let r = Request { flags, kind, cookie: 0, offset, len };
            if validate(&r, size, false) == Verdict::Ok && kind != CMD_FLUSH {
                prop_assert!(offset.checked_add(len as u64).unwrap() <= size);
                prop_assert!(len <= MAX_PAYLOAD || kind == CMD_TRIM || kind == CMD_WRITE_ZEROES);
            }
        }
    }
}
