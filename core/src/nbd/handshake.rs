//! The server side of the NBD handshake, shared by every NBD server of the
//! project: the capture daemon's disks (cdpd's `capture::conn`, read-write)
//! and the generic [`super::server`] (cdpctl's read-only exports).
//!
//! Fixed newstyle only. One export per socket, named after the disk; the
//! empty name is accepted as "the default export".

use std::io::{self, Read, Write};

use thiserror::Error;

use super::proto::{self, ExportInfo};

#[derive(Debug, Error)]
pub enum HandshakeError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("protocol: {0}")]
    Proto(#[from] proto::ProtoError),
    #[error("client asked for export {0:?}, which this socket does not serve")]
    UnknownExport(String),
}

/// Negotiate options with a client on `s` for the one export `name`.
/// Returns true when the client entered transmission, false when it
/// aborted. Every length read from the wire is bounded by the codec before
/// anything is allocated.
pub fn handshake<S: Read + Write>(
    s: &mut S,
    name: &str,
    info: &ExportInfo,
) -> Result<bool, HandshakeError> {
    s.write_all(&proto::greeting())?;
    let mut f = [0u8; 4];
    s.read_exact(&mut f)?;
    let no_zeroes = proto::parse_client_flags(u32::from_be_bytes(f))?;
    let mut out = Vec::with_capacity(256);
    let mut data = Vec::new();
    let name_ok = |n: &[u8]| n.is_empty() || n == name.as_bytes();
    loop {
        let mut hb = [0u8; 16];
        s.read_exact(&mut hb)?;
        let h = proto::parse_option_header(&hb)?;
        data.resize(h.len as usize, 0);
        s.read_exact(&mut data)?;
        out.clear();
        match h.option {
            proto::OPT_EXPORT_NAME => {
                if !name_ok(&data) {
                    return Err(HandshakeError::UnknownExport(
                        String::from_utf8_lossy(&data).into_owned(),
                    ));
                }
                proto::put_export_name_reply(&mut out, info, no_zeroes);
                s.write_all(&out)?;
                return Ok(true);
            }
            proto::OPT_ABORT => {
                proto::put_option_reply(&mut out, h.option, proto::REP_ACK, &[]);
                let _ = s.write_all(&out);
                return Ok(false);
            }
            proto::OPT_LIST => {
                if data.is_empty() {
                    proto::put_list_entry(&mut out, name);
                    proto::put_option_reply(&mut out, h.option, proto::REP_ACK, &[]);
                } else {
                    proto::put_option_reply(&mut out, h.option, proto::REP_ERR_INVALID, &[]);
                }
            }
            proto::OPT_INFO | proto::OPT_GO => match proto::parse_info_request(&data) {
                None => {
                    proto::put_option_reply(
                        &mut out,
                        h.option,
                        proto::REP_ERR_INVALID,
                        b"malformed NBD_OPT_INFO/GO payload",
                    );
                }
                Some(req) if !name_ok(req.name) => {
                    let msg = format!("unknown export; this socket serves {name:?}");
                    proto::put_option_reply(
                        &mut out,
                        h.option,
                        proto::REP_ERR_UNKNOWN,
                        msg.as_bytes(),
                    );
                }
                Some(req) => {
                    proto::put_option_reply(
                        &mut out,
                        h.option,
                        proto::REP_INFO,
                        &proto::info_export(info),
                    );
                    proto::put_option_reply(
                        &mut out,
                        h.option,
                        proto::REP_INFO,
                        &proto::info_block_size(1, proto::PREFERRED_BLOCK, proto::MAX_PAYLOAD),
                    );
                    if req.requests.contains(&proto::INFO_NAME) {
                        let mut d = proto::INFO_NAME.to_be_bytes().to_vec();
                        d.extend_from_slice(name.as_bytes());
                        proto::put_option_reply(&mut out, h.option, proto::REP_INFO, &d);
                    }
                    proto::put_option_reply(&mut out, h.option, proto::REP_ACK, &[]);
                    if h.option == proto::OPT_GO {
                        s.write_all(&out)?;
                        return Ok(true);
                    }
                }
            },
            _ => {
                proto::put_option_reply(&mut out, h.option, proto::REP_ERR_UNSUP, &[]);
            }
        }
        s.write_all(&out)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn opt(option: u32, data: &[u8]) -> Vec<u8> {
        let mut b = proto::IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        b
    }

    fn go(name: &str) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        opt(proto::OPT_GO, &d)
    }

    /// Run the server side on one end of a socket pair with `client` bytes
    /// already sent; return its result and everything it wrote.
    fn run(client: &[u8]) -> (Result<bool, HandshakeError>, Vec<u8>) {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        b.write_all(client).unwrap();
        b.shutdown(std::net::Shutdown::Write).unwrap();
        let info = ExportInfo {
            size: 1 << 20,
            flags: proto::TFLAG_HAS_FLAGS | proto::TFLAG_READ_ONLY,
        };
        let r = handshake(&mut a, "vda", &info);
        drop(a);
        let mut out = Vec::new();
        b.read_to_end(&mut out).unwrap();
        (r, out)
    }

    #[test]
    fn go_with_the_name_or_empty_enters_transmission() {
        for name in ["vda", ""] {
            let mut c = proto::CLIENT_FLAG_FIXED_NEWSTYLE.to_be_bytes().to_vec();
            c.extend(go(name));
            let (r, out) = run(&c);
            assert!(r.unwrap());
            assert_eq!(&out[..18], &proto::greeting());
            // First reply: NBD_INFO_EXPORT with the size and the read-only flag.
            let rep = &out[18..];
            assert_eq!(
                u32::from_be_bytes(rep[12..16].try_into().unwrap()),
                proto::REP_INFO
            );
            let info = &rep[20..32];
            assert_eq!(u64::from_be_bytes(info[2..10].try_into().unwrap()), 1 << 20);
            let flags = u16::from_be_bytes([info[10], info[11]]);
            assert_ne!(flags & proto::TFLAG_READ_ONLY, 0);
        }
    }

    #[test]
    fn unknown_export_is_refused_and_unknown_options_unsupported() {
        let mut c = proto::CLIENT_FLAG_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        c.extend(go("vdb"));
        c.extend(opt(proto::OPT_STRUCTURED_REPLY, &[]));
        c.extend(opt(proto::OPT_ABORT, &[]));
        let (r, out) = run(&c);
        assert!(!r.unwrap());
        let rep = &out[18..];
        assert_eq!(
            u32::from_be_bytes(rep[12..16].try_into().unwrap()),
            proto::REP_ERR_UNKNOWN
        );
        let len = u32::from_be_bytes(rep[16..20].try_into().unwrap()) as usize;
        let rep = &rep[20 + len..];
        assert_eq!(
            u32::from_be_bytes(rep[12..16].try_into().unwrap()),
            proto::REP_ERR_UNSUP
        );
    }

    #[test]
    fn bad_client_flags_and_truncated_streams_are_errors() {
        assert!(matches!(
            run(&0u32.to_be_bytes()).0,
            Err(HandshakeError::Proto(_))
        ));
        assert!(matches!(run(&[0, 0]).0, Err(HandshakeError::Io(_))));
        let mut c = proto::CLIENT_FLAG_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        c.extend(opt(proto::OPT_EXPORT_NAME, b"other"));
        assert!(matches!(
            run(&c).0,
            Err(HandshakeError::UnknownExport(n)) if n == "other"
        ));
    }
}
