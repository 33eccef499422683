//! A small raw-socket NBD client (fixed newstyle, simple replies) for tests that must send
//! exactly the bytes they choose: malformed traffic, pipelined writes cut off by a crash.
//!
//! Constants and layouts follow the NBD protocol document
//! (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Default I/O timeout of a [`Client`]: long enough for a loaded CI machine, short enough
/// that a hung daemon fails the test instead of hanging it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// One option reply.
#[derive(Debug, Clone)]
pub struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

/// One simple reply to a transmission request.
#[derive(Debug, Clone)]
pub struct Reply {
    pub error: u32,
    pub handle: u64,
}

/// What NBD_OPT_GO / NBD_OPT_INFO told us about an export.
#[derive(Debug, Clone, Default)]
pub struct ExportInfo {
    pub size: u64,
    pub transmission_flags: u16,
    /// (minimum, preferred, maximum) when the server sent NBD_INFO_BLOCK_SIZE.
    pub block_size: Option<(u32, u32, u32)>,
}

/// A raw NBD client over a unix socket.
pub struct Client {
    pub sock: UnixStream,
    pub handshake_flags: u16,
    next_handle: u64,
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}

/// Encodes a transmission request header.
pub fn request_header(flags: u16, kind: u16, handle: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut h = [0u8; 28];
    h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&kind.to_be_bytes());
    h[8..16].copy_from_slice(&handle.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&len.to_be_bytes());
    h
}

/// Reads a simple reply header from any reader.
pub fn read_reply_from(r: &mut impl Read) -> io::Result<Reply> {
    let mut h = [0u8; 16];
    r.read_exact(&mut h)?;
    let magic = be32(&h[0..4]);
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad reply magic {magic:#x}"),
        ));
    }
    Ok(Reply {
        error: be32(&h[4..8]),
        handle: be64(&h[8..16]),
    })
}

impl Client {
    /// Connects and does the server-side greeting; options may follow.
    pub fn connect(path: &Path) -> io::Result<Client> {
        let sock = UnixStream::connect(path)?;
        sock.set_read_timeout(Some(IO_TIMEOUT))?;
        sock.set_write_timeout(Some(IO_TIMEOUT))?;
        let mut c = Client {
            sock,
            handshake_flags: 0,
            next_handle: 1,
        };
        let mut g = [0u8; 18];
        c.sock.read_exact(&mut g)?;
        if be64(&g[0..8]) != NBDMAGIC || be64(&g[8..16]) != IHAVEOPT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not a newstyle NBD greeting: {g:02x?}"),
            ));
        }
        c.handshake_flags = be16(&g[16..18]);
        Ok(c)
    }

    /// Connects and sends the client flags (fixed newstyle + no zeroes, as offered).
    pub fn connect_newstyle(path: &Path) -> io::Result<Client> {
        let mut c = Client::connect(path)?;
        let mut flags = 0;
        if c.handshake_flags & FLAG_FIXED_NEWSTYLE != 0 {
            flags |= CLIENT_FIXED_NEWSTYLE;
        }
        if c.handshake_flags & FLAG_NO_ZEROES != 0 {
            flags |= CLIENT_NO_ZEROES;
        }
        c.sock.write_all(&flags.to_be_bytes())?;
        Ok(c)
    }

    /// Connects, negotiates, and enters transmission on `export` with NBD_OPT_GO.
    pub fn open(path: &Path, export: &str) -> io::Result<(Client, ExportInfo)> {
        let mut c = Client::connect_newstyle(path)?;
        let info = c.go(export)?;
        Ok((c, info))
    }

    /// Sends an option with arbitrary magic, code and data.
    pub fn send_option_raw(&mut self, magic: u64, option: u32, data: &[u8]) -> io::Result<()> {
        let mut m = Vec::with_capacity(16 + data.len());
        m.extend_from_slice(&magic.to_be_bytes());
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.sock.write_all(&m)
    }

    /// Sends an option.
    pub fn send_option(&mut self, option: u32, data: &[u8]) -> io::Result<()> {
        self.send_option_raw(IHAVEOPT, option, data)
    }

    /// Reads one option reply.
    pub fn read_option_reply(&mut self) -> io::Result<OptReply> {
        let mut h = [0u8; 20];
        self.sock.read_exact(&mut h)?;
        let magic = be64(&h[0..8]);
        if magic != OPT_REPLY_MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad option reply magic {magic:#x}"),
            ));
        }
        let len = be32(&h[16..20]) as usize;
        if len > 1 << 20 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("option reply of {len} bytes"),
            ));
        }
        let mut data = vec![0u8; len];
        self.sock.read_exact(&mut data)?;
        Ok(OptReply {
            option: be32(&h[8..12]),
            kind: be32(&h[12..16]),
            data,
        })
    }

    fn info_request(export: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    /// Sends NBD_OPT_GO or NBD_OPT_INFO (asking for block sizes) and collects the replies
    /// up to the final ACK; an error reply becomes `Err` with the reply type in the message.
    pub fn info_or_go(&mut self, option: u32, export: &str) -> io::Result<ExportInfo> {
        let data = Client::info_request(export, &[INFO_BLOCK_SIZE]);
        self.send_option(option, &data)?;
        let mut info = ExportInfo::default();
        loop {
            let r = self.read_option_reply()?;
            if r.option != option {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("reply for option {} to option {option}", r.option),
                ));
            }
            match r.kind {
                REP_ACK => return Ok(info),
                REP_INFO if r.data.len() >= 2 => match be16(&r.data) {
                    INFO_EXPORT if r.data.len() == 12 => {
                        info.size = be64(&r.data[2..10]);
                        info.transmission_flags = be16(&r.data[10..12]);
                    }
                    INFO_BLOCK_SIZE if r.data.len() == 14 => {
                        info.block_size = Some((
                            be32(&r.data[2..6]),
                            be32(&r.data[6..10]),
                            be32(&r.data[10..14]),
                        ));
                    }
                    _ => {}
                },
                k if k & REP_FLAG_ERROR != 0 => {
                    return Err(io::Error::other(format!(
                        "option {option} failed: reply type {k:#x} {}",
                        String::from_utf8_lossy(&r.data)
                    )))
                }
                k => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("unexpected reply type {k:#x} to option {option}"),
                    ))
                }
            }
        }
    }

    /// NBD_OPT_GO: enter transmission.
    pub fn go(&mut self, export: &str) -> io::Result<ExportInfo> {
        self.info_or_go(OPT_GO, export)
    }

    /// NBD_OPT_LIST: export names.
    pub fn list(&mut self) -> io::Result<Vec<String>> {
        self.send_option(OPT_LIST, &[])?;
        let mut names = Vec::new();
        loop {
            let r = self.read_option_reply()?;
            match r.kind {
                REP_ACK => return Ok(names),
                REP_SERVER if r.data.len() >= 4 => {
                    let n = be32(&r.data) as usize;
                    names.push(String::from_utf8_lossy(&r.data[4..4 + n]).into_owned());
                }
                k => return Err(io::Error::other(format!("NBD_OPT_LIST: reply type {k:#x}"))),
            }
        }
    }

    /// A fresh request handle.
    pub fn handle(&mut self) -> u64 {
        let h = self.next_handle;
        self.next_handle += 1;
        h
    }

    /// Sends a request header (and payload, if any) without waiting for the reply.
    pub fn send_request(
        &mut self,
        flags: u16,
        kind: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<u64> {
        let handle = self.handle();
        let h = request_header(flags, kind, handle, offset, len);
        if payload.is_empty() {
            self.sock.write_all(&h)?;
        } else {
            let mut m = Vec::with_capacity(28 + payload.len());
            m.extend_from_slice(&h);
            m.extend_from_slice(payload);
            self.sock.write_all(&m)?;
        }
        Ok(handle)
    }

    /// Reads a simple reply header.
    pub fn read_reply(&mut self) -> io::Result<Reply> {
        read_reply_from(&mut self.sock)
    }

    /// Sends a request and waits for its reply; checks the handle.
    pub fn request(
        &mut self,
        flags: u16,
        kind: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<Reply> {
        let h = self.send_request(flags, kind, offset, len, payload)?;
        let r = self.read_reply()?;
        if r.handle != h {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("reply handle {} for request {h}", r.handle),
            ));
        }
        Ok(r)
    }

    /// NBD_CMD_READ: Ok(data) or Err(nbd errno) for an error reply.
    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Result<Vec<u8>, u32>> {
        let r = self.request(0, CMD_READ, offset, len, &[])?;
        if r.error != 0 {
            return Ok(Err(r.error));
        }
        let mut data = vec![0u8; len as usize];
        self.sock.read_exact(&mut data)?;
        Ok(Ok(data))
    }

    /// NBD_CMD_WRITE: the reply's error (0 = success).
    pub fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> io::Result<u32> {
        Ok(self
            .request(flags, CMD_WRITE, offset, data.len() as u32, data)?
            .error)
    }

    /// NBD_CMD_FLUSH: the reply's error.
    pub fn flush(&mut self) -> io::Result<u32> {
        Ok(self.request(0, CMD_FLUSH, 0, 0, &[])?.error)
    }

    /// NBD_CMD_DISC (no reply), then close.
    pub fn disconnect(mut self) {
        let _ = self.send_request(0, CMD_DISC, 0, 0, &[]);
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }

    /// Waits until the server closes the connection (EOF or reset) and returns true,
    /// or returns false if it sends data instead or the read times out.
    pub fn expect_closed(&mut self) -> bool {
        let mut b = [0u8; 64];
        match self.sock.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionAborted
            ),
        }
    }
}
