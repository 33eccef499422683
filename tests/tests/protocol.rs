//! The NBD handshake and transmission phases, byte for byte, from a raw-socket client:
//! NBD_OPT_INFO / LIST / ABORT / GO, block sizes, and many requests in flight at once.

use std::collections::HashMap;
use std::io::Read;

use cdp_tests::nbd::*;
use cdp_tests::*;

const SIZE: u64 = 16 << 20;

#[test]
fn greeting_is_fixed_newstyle() {
    let d = Daemon::builder().disk("vda", SIZE).start();
    let c = Client::connect(&d.socket("vda")).unwrap();
    assert_ne!(
        c.handshake_flags & FLAG_FIXED_NEWSTYLE,
        0,
        "server does not offer fixed newstyle"
    );
}

#[test]
fn opt_info_reports_size_and_block_sizes_then_go() {
    let d = Daemon::builder().disk("vda", SIZE).start();
    let mut c = Client::connect_newstyle(&d.socket("vda")).unwrap();
    let info = c.info_or_go(OPT_INFO, "vda").expect("NBD_OPT_INFO");
    assert_eq!(info.size, SIZE);
    assert_eq!(info.block_size, Some((1, 4096, 32 << 20)));
    // INFO leaves the session in option haggling: GO still works.
    let info = c.go("vda").expect("NBD_OPT_GO after NBD_OPT_INFO");
    assert_eq!(info.size, SIZE);
    let flags = info.transmission_flags;
    // HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES.
    for (bit, name) in [
        (0, "HAS_FLAGS"),
        (2, "SEND_FLUSH"),
        (3, "SEND_FUA"),
        (5, "SEND_TRIM"),
        (6, "SEND_WRITE_ZEROES"),
    ] {
        assert_ne!(
            flags & (1 << bit),
            0,
            "transmission flag {name} not set: {flags:#x}"
        );
    }
    assert_eq!(flags & (1 << 1), 0, "export is read-only: {flags:#x}");
}

#[test]
fn opt_list_and_abort() {
    let d = Daemon::builder()
        .disk("vda", SIZE)
        .disk("vdb", SIZE)
        .start();
    let mut c = Client::connect_newstyle(&d.socket("vdb")).unwrap();
    assert_eq!(c.list().unwrap(), ["vdb"]);
    c.send_option(OPT_ABORT, &[]).unwrap();
    // The server may acknowledge the abort; then it closes.
    match c.read_option_reply() {
        Ok(r) => {
            assert_eq!(r.option, OPT_ABORT);
            assert_eq!(r.kind, REP_ACK);
            assert!(
                c.expect_closed(),
                "connection still open after NBD_OPT_ABORT"
            );
        }
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}"),
    }
}

#[test]
fn empty_export_name_is_the_disk() {
    let d = Daemon::builder().disk("vda", SIZE).start();
    let (mut c, info) = Client::open(&d.socket("vda"), "").unwrap();
    assert_eq!(info.size, SIZE);
    assert_eq!(c.write(0, &[1; 512], 0).unwrap(), 0);
    assert_eq!(c.read(0, 512).unwrap().unwrap(), vec![1; 512]);
}

/// 256 requests in flight on one connection (writes, reads, zeroes, trims and flushes);
/// every handle gets exactly one reply, in whatever order, and data reads back.
#[test]
fn many_requests_in_flight() {
    let mut d = Daemon::builder().disk_random("vda", SIZE, 21).start();
    let (mut c, _) = Client::open(&d.socket("vda"), "vda").unwrap();
    let mut reader = c.sock.try_clone().unwrap();
    let mut expect: HashMap<u64, (u16, u32)> = HashMap::new();
    let n = 256u64;
    let writer = {
        let mut wsock = c.sock.try_clone().unwrap();
        let mut plan = Vec::new();
        for i in 0..n {
            let off = (i % 64) * 65536;
            let (kind, flags, len) = match i % 8 {
                0..=3 => (
                    CMD_WRITE,
                    if i % 16 == 1 { CMD_FLAG_FUA } else { 0 },
                    65536u32,
                ),
                4 | 5 => (CMD_READ, 0, 65536),
                6 => (CMD_WRITE_ZEROES, 0, 4096),
                _ => {
                    if i % 16 == 7 {
                        (CMD_FLUSH, 0, 0)
                    } else {
                        (CMD_TRIM, 0, 4096)
                    }
                }
            };
            let off = if kind == CMD_FLUSH { 0 } else { off };
            let handle = 1000 + i;
            expect.insert(handle, (kind, len));
            plan.push((flags, kind, handle, off, len));
        }
        std::thread::spawn(move || {
            use std::io::Write;
            for (flags, kind, handle, off, len) in plan {
                let mut m = request_header(flags, kind, handle, off, len).to_vec();
                if kind == CMD_WRITE {
                    m.extend(vec![(handle & 0xff) as u8; len as usize]);
                }
                wsock.write_all(&m).unwrap();
            }
        })
    };
    let mut seen = 0;
    while seen < n {
        let r = read_reply_from(&mut reader).expect("reply");
        let (kind, len) = expect
            .remove(&r.handle)
            .unwrap_or_else(|| panic!("reply for unknown or repeated handle {}", r.handle));
        assert_eq!(r.error, 0, "request {} (command {kind}) failed", r.handle);
        if kind == CMD_READ {
            let mut buf = vec![0u8; len as usize];
            reader.read_exact(&mut buf).unwrap();
        }
        seen += 1;
    }
    writer.join().unwrap();
    assert!(expect.is_empty());
    assert_eq!(c.flush().unwrap(), 0);
    c.disconnect();
    d.term();
    d.check_replay_invariant("vda");
}
