//! Malformed and hostile NBD traffic from a raw-socket client. Each case gets the
//! protocol's error or a closed connection, and cdpd keeps serving other clients and disks.

use std::io::Write;

use cdp_tests::nbd::*;
use cdp_tests::*;

const SIZE: u64 = 16 << 20;

fn two_disks() -> Daemon {
    Daemon::builder()
        .disk_random("vda", SIZE, 11)
        .disk_random("vdb", SIZE, 12)
        .start()
}

/// The daemon is alive and a fresh client on every disk can negotiate, read and flush.
fn assert_serving(d: &mut Daemon, context: &str) {
    d.assert_alive(context);
    for disk in d.disks.clone() {
        let (mut c, info) = Client::open(&d.socket(&disk.name), &disk.name)
            .unwrap_or_else(|e| panic!("{context}: fresh client on {}: {e}", disk.name));
        assert_eq!(info.size, disk.size, "{context}");
        let data = c
            .read(0, 4096)
            .unwrap_or_else(|e| panic!("{context}: read on {}: {e}", disk.name))
            .unwrap_or_else(|e| panic!("{context}: read on {} failed: errno {e}", disk.name));
        assert_eq!(data.len(), 4096);
        assert_eq!(c.flush().unwrap(), 0, "{context}: flush on {}", disk.name);
        c.disconnect();
    }
    d.assert_alive(context);
}

/// After an error reply, the same connection must still work.
fn assert_usable(c: &mut Client, context: &str) {
    let r = c
        .read(4096, 512)
        .unwrap_or_else(|e| panic!("{context}: connection unusable: {e}"));
    assert!(r.is_ok(), "{context}: read after the error failed: {r:?}");
}

#[test]
fn bad_option_magic_closes_connection() {
    let mut d = two_disks();
    let mut c = Client::connect_newstyle(&d.socket("vda")).unwrap();
    c.send_option_raw(0x1234_5678_9abc_def0, OPT_GO, b"\0\0\0\x03vda\0\0")
        .unwrap();
    assert!(
        c.expect_closed(),
        "cdpd did not close the connection after a bad option magic"
    );
    assert_serving(&mut d, "after bad option magic");
}

#[test]
fn unknown_client_flags_close_connection() {
    let mut d = two_disks();
    let mut c = Client::connect(&d.socket("vda")).unwrap();
    c.sock.write_all(&0xffff_fff0u32.to_be_bytes()).unwrap();
    assert!(
        c.expect_closed(),
        "cdpd did not close the connection after unknown client flags"
    );
    assert_serving(&mut d, "after unknown client flags");
}

#[test]
fn garbage_greeting_reply_closes_connection() {
    let mut d = two_disks();
    let mut c = Client::connect(&d.socket("vdb")).unwrap();
    // An HTTP request is not an NBD client.
    let _ = c
        .sock
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0");
    assert!(c.expect_closed(), "cdpd did not close a garbage connection");
    assert_serving(&mut d, "after garbage");
}

#[test]
fn unknown_option_is_unsupported_then_go_works() {
    let mut d = two_disks();
    let mut c = Client::connect_newstyle(&d.socket("vda")).unwrap();
    c.send_option(999, b"some data").unwrap();
    let r = c.read_option_reply().unwrap();
    assert_eq!(r.option, 999);
    assert_eq!(
        r.kind, REP_ERR_UNSUP,
        "unknown option: reply type {:#x}, want NBD_REP_ERR_UNSUP",
        r.kind
    );
    // An unknown export name is an error reply too, and the session survives it.
    let err = c.go("no-such-disk").unwrap_err();
    assert!(err.to_string().contains("reply type"), "{err}");
    let info = c.go("vda").expect("NBD_OPT_GO after an unknown option");
    assert_eq!(info.size, SIZE);
    assert_usable(&mut c, "after unknown option");
    c.disconnect();
    assert_serving(&mut d, "after unknown option");
}

#[test]
fn read_out_of_range_is_einval() {
    let mut d = two_disks();
    let (mut c, _) = Client::open(&d.socket("vda"), "vda").unwrap();
    for (off, len) in [(SIZE, 4096u32), (SIZE - 512, 4096), (u64::MAX - 100, 512)] {
        let r = c.read(off, len).unwrap();
        assert_eq!(
            r.err(),
            Some(EINVAL),
            "read {len} bytes at {off}: want EINVAL (22)"
        );
        assert_usable(&mut c, "after out-of-range read");
    }
    assert_serving(&mut d, "after out-of-range reads");
}

#[test]
fn write_out_of_range_is_enospc_and_payload_consumed() {
    let mut d = two_disks();
    let (mut c, _) = Client::open(&d.socket("vda"), "vda").unwrap();
    // The payload follows the header; cdpd must read past it before the next request.
    let payload = vec![0x77u8; 8192];
    for off in [SIZE, SIZE - 4096, SIZE + (1 << 30)] {
        let e = c.write(off, &payload, 0).unwrap();
        assert_eq!(e, ENOSPC, "write 8192 bytes at {off}: want ENOSPC (28)");
        assert_usable(&mut c, "after out-of-range write");
    }
    // Zeroes and trims out of range are errors too (ENOSPC or EINVAL).
    for kind in [CMD_WRITE_ZEROES, CMD_TRIM] {
        let r = c.request(0, kind, SIZE - 4096, 8192, &[]).unwrap();
        assert!(
            r.error == ENOSPC || r.error == EINVAL,
            "command {kind} out of range: error {}, want ENOSPC or EINVAL",
            r.error
        );
        assert_usable(&mut c, "after out-of-range zero/trim");
    }
    c.disconnect();
    d.term();
    let records = d.journal_records();
    let beyond: Vec<_> = records
        .iter()
        .filter(|r| r["offset"].as_u64().unwrap_or(0) + r["length"].as_u64().unwrap_or(0) > SIZE)
        .collect();
    assert!(
        beyond.is_empty(),
        "rejected requests were journaled: {beyond:#?}"
    );
    d.check_replay_invariant("vda");
}

#[test]
fn oversized_read_is_refused() {
    let mut d = two_disks();
    let (mut c, _) = Client::open(&d.socket("vda"), "vda").unwrap();
    let handle = c.send_request(0, CMD_READ, 0, (32 << 20) + 1, &[]).unwrap();
    match c.read_reply() {
        Ok(r) => {
            assert_eq!(r.handle, handle);
            assert!(
                r.error == EINVAL || r.error == EOVERFLOW,
                "read of 32 MiB + 1: error {}, want EINVAL (22) or EOVERFLOW (75)",
                r.error
            );
            assert_usable(&mut c, "after oversized read");
        }
        Err(e) => {
            // A closed connection is an acceptable answer too.
            assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                ),
                "oversized read: neither an error reply nor a closed connection: {e}"
            );
        }
    }
    assert_serving(&mut d, "after oversized read");
}

#[test]
fn oversized_write_is_refused() {
    let mut d = two_disks();
    let (mut c, _) = Client::open(&d.socket("vda"), "vda").unwrap();
    let len: u32 = 40 << 20;
    let payload = vec![0x99u8; len as usize];
    // The daemon may close before reading the payload, so a failed send is fine.
    let sent = c.send_request(0, CMD_WRITE, 0, len, &payload);
    match c.read_reply() {
        Ok(r) => {
            assert_ne!(
                r.error, 0,
                "a 40 MiB write was accepted (maximum is 32 MiB)"
            );
            // The daemon may answer and then hang up (it cannot trust the framing any
            // more); if it keeps the connection, the next request must work.
            if let Ok(r) = c.read(4096, 512) {
                assert!(r.is_ok(), "read after the oversized write failed: {r:?}");
            }
        }
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
            ),
            "oversized write: neither an error reply nor a closed connection: {e} (send: {sent:?})"
        ),
    }
    d.assert_alive("after oversized write");
    assert_serving(&mut d, "after oversized write");
    d.term();
    let records = d.journal_records();
    assert!(
        records
            .iter()
            .all(|r| r["length"].as_u64().unwrap_or(0) <= 32 << 20),
        "an oversized write was journaled"
    );
    d.check_replay_invariant("vda");
}

#[test]
fn unknown_command_is_einval() {
    let mut d = two_disks();
    let (mut c, _) = Client::open(&d.socket("vdb"), "vdb").unwrap();
    let r = c.request(0, 99, 0, 4096, &[]).unwrap();
    assert_eq!(r.error, EINVAL, "command type 99: want EINVAL (22)");
    assert_usable(&mut c, "after unknown command");
    // An unknown command flag is invalid as well.
    let r = c.request(1 << 12, CMD_READ, 0, 512, &[]).unwrap();
    assert_eq!(r.error, EINVAL, "read with flag bit 12: want EINVAL (22)");
    assert_usable(&mut c, "after unknown command flag");
    assert_serving(&mut d, "after unknown command");
}

#[test]
fn bad_request_magic_closes_connection() {
    let mut d = two_disks();
    let (mut c, _) = Client::open(&d.socket("vda"), "vda").unwrap();
    let mut h = request_header(0, CMD_READ, 1, 0, 512);
    h[0..4].copy_from_slice(&0xdead_beefu32.to_be_bytes());
    c.sock.write_all(&h).unwrap();
    assert!(
        c.expect_closed(),
        "cdpd did not close the connection after a bad request magic"
    );
    assert_serving(&mut d, "after bad request magic");
}

#[test]
fn disconnect_mid_payload_is_not_journaled() {
    let mut d = two_disks();
    let off: u64 = 4 << 20;
    let len: u32 = 1 << 20;
    {
        let (mut c, _) = Client::open(&d.socket("vda"), "vda").unwrap();
        // A complete write first, so the connection is known to work.
        assert_eq!(c.write(0, &[0x42; 4096], 0).unwrap(), 0);
        c.sock
            .write_all(&request_header(0, CMD_WRITE, 77, off, len))
            .unwrap();
        c.sock.write_all(&vec![0x5au8; len as usize / 2]).unwrap();
        // Then vanish.
        c.sock.shutdown(std::net::Shutdown::Both).unwrap();
    }
    assert_serving(&mut d, "after a client vanished mid-payload");

    // The region still reads as it was, on the same disk.
    let initial = read_at(&d.disk("vda").initial, off, len as usize);
    let (mut c, _) = Client::open(&d.socket("vda"), "vda").unwrap();
    let now = c.read(off, len).unwrap().expect("read");
    assert!(now == initial, "a half-received write reached the disk");
    // And the other disk takes writes.
    let (mut c2, _) = Client::open(&d.socket("vdb"), "vdb").unwrap();
    assert_eq!(c2.write(8192, &[0x24; 8192], CMD_FLAG_FUA).unwrap(), 0);
    c.disconnect();
    c2.disconnect();

    d.term();
    let records = d.journal_records();
    let half: Vec<_> = records
        .iter()
        .filter(|r| r["disk"] == "vda" && r["kind"] == "WRITE" && r["offset"] == off)
        .collect();
    assert!(
        half.is_empty(),
        "the half-received write was journaled: {half:#?}"
    );
    assert!(
        records
            .iter()
            .any(|r| r["disk"] == "vdb" && r["kind"] == "WRITE" && r["offset"] == 8192),
        "the write on vdb is not in the journal"
    );
    d.check_replay_invariant("vda");
    d.check_replay_invariant("vdb");
}
