//! How a run ends, and what the next run finds: SIGKILL mid-stream (nothing acknowledged is
//! lost, the journal recovers), a simulated power loss (a different boot id: a GAP), and
//! SIGTERM (a clean end, every segment sealed).

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use cdp_tests::nbd::*;
use cdp_tests::*;
use serde_json::Value;

const BLOCK: u64 = 4096;

/// The unique content of block `index` of disk number `disk`: every 8-byte word differs.
fn pattern(disk: u64, index: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(BLOCK as usize);
    for w in 0..BLOCK / 8 {
        v.extend_from_slice(&((disk << 56) | (index << 16) | w | 0x8000).to_le_bytes());
    }
    v
}

/// Acknowledged writes: (disk name, block index).
type Acked = Arc<Mutex<Vec<(String, u64)>>>;

/// One connection writing blocks `first..first+count` of `disk`, at most `depth` in flight.
/// Records every acknowledged block; when the shared counter reaches `kill_at`, SIGKILLs
/// `pid` from the reply thread (so the kill lands mid-stream, not after a poll interval).
#[allow(clippy::too_many_arguments)]
fn spawn_writer(
    socket: PathBuf,
    disk: String,
    disk_no: u64,
    first: u64,
    count: u64,
    depth: usize,
    acked: Acked,
    total: Arc<AtomicU64>,
    kill_at: u64,
    pid: u32,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let (c, _) = Client::open(&socket, &disk).expect("connect writer");
        let mut wsock = c.sock.try_clone().unwrap();
        let mut rsock = c.sock.try_clone().unwrap();
        // A counting semaphore: a slot per request in flight.
        let (slot_tx, slot_rx) = mpsc::sync_channel::<()>(depth);
        let sender = std::thread::spawn(move || {
            use std::io::Write;
            let mut sent = 0u64;
            for i in first..first + count {
                if slot_tx.send(()).is_err() {
                    break;
                }
                let mut m = request_header(0, CMD_WRITE, i, i * BLOCK, BLOCK as u32).to_vec();
                m.extend_from_slice(&pattern(disk_no, i));
                if wsock.write_all(&m).is_err() {
                    break;
                }
                sent += 1;
            }
            sent
        });
        // Until the daemon dies (or every write is answered).
        let mut replies = 0;
        while replies < count {
            let Ok(r) = read_reply_from(&mut rsock) else {
                break;
            };
            replies += 1;
            if r.error == 0 {
                acked.lock().unwrap().push((disk.clone(), r.handle));
                if total.fetch_add(1, Ordering::SeqCst) + 1 == kill_at {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            if slot_rx.recv().is_err() {
                break;
            }
        }
        drop(slot_rx);
        let _ = c.sock.shutdown(std::net::Shutdown::Both);
        sender.join().unwrap()
    })
}

fn session_starts(records: &[Value]) -> Vec<Value> {
    let mut v: Vec<Value> = records_of_kind(records, "SESSION_START")
        .into_iter()
        .cloned()
        .collect();
    v.sort_by_key(|r| r["seq"].as_u64().unwrap_or(0));
    v
}

fn previous_ends(records: &[Value]) -> Vec<String> {
    session_starts(records)
        .iter()
        .map(|r| {
            r["info"]["previous_end"]
                .as_str()
                .unwrap_or_else(|| panic!("SESSION_START without info.previous_end: {r}"))
                .to_string()
        })
        .collect()
}

fn write_boot_id(d: &Daemon, name: &str) -> PathBuf {
    let p = d.work_dir().join(name);
    std::fs::write(&p, format!("{}\n", uuid::Uuid::new_v4())).unwrap();
    p
}

#[test]
fn sigkill_mid_stream_loses_no_acknowledged_write() {
    let mut d = Daemon::builder()
        .disk_random("vda", 64 << 20, 31)
        .disk_random("vdb", 16 << 20, 32)
        .start();
    let acked: Acked = Arc::default();
    let total = Arc::new(AtomicU64::new(0));
    let kill_at = 3000;
    let pid = d.pid();
    let writers = vec![
        spawn_writer(
            d.socket("vda"),
            "vda".into(),
            1,
            0,
            8192,
            32,
            acked.clone(),
            total.clone(),
            kill_at,
            pid,
        ),
        spawn_writer(
            d.socket("vda"),
            "vda".into(),
            1,
            8192,
            8192,
            32,
            acked.clone(),
            total.clone(),
            kill_at,
            pid,
        ),
        spawn_writer(
            d.socket("vdb"),
            "vdb".into(),
            2,
            0,
            4096,
            32,
            acked.clone(),
            total.clone(),
            kill_at,
            pid,
        ),
    ];
    let sent: u64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() as u64 >= kill_at,
        "only {} writes acknowledged before the daemon went away (wanted {kill_at}):\n{}",
        acked.len(),
        d.log()
    );
    assert!(
        (acked.len() as u64) < 20480,
        "every write finished before the kill; the test did not cut a stream"
    );
    eprintln!(
        "sent {sent} writes, {} acknowledged before SIGKILL",
        acked.len()
    );
    // The connections closed as the process died; it exits (is reapable) just after.
    let status = d
        .wait_exit(cdp_tests::STOP_TIMEOUT)
        .expect("cdpd survived SIGKILL");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(9),
        "cdpd ended by {status}, not by SIGKILL"
    );

    d.start();
    // Through the daemon: every acknowledged block reads back.
    for disk in ["vda", "vdb"] {
        let (mut c, _) = Client::open(&d.socket(disk), disk).unwrap();
        let disk_no = if disk == "vda" { 1 } else { 2 };
        for (_, i) in acked.iter().filter(|(n, _)| n == disk) {
            let got = c.read(i * BLOCK, BLOCK as u32).unwrap().expect("read");
            assert!(
                got == pattern(disk_no, *i),
                "{disk} block {i} was acknowledged but reads back different after SIGKILL + restart"
            );
        }
        c.disconnect();
    }
    d.term();

    // In the image file, and in the journal.
    let records = d.journal_records();
    for disk in ["vda", "vdb"] {
        let disk_no = if disk == "vda" { 1 } else { 2 };
        let img = std::fs::File::open(d.image(disk)).unwrap();
        let journaled: BTreeSet<u64> = records
            .iter()
            .filter(|r| r["disk"] == disk && r["kind"] == "WRITE" && r["length"] == BLOCK)
            .filter_map(|r| r["offset"].as_u64())
            .collect();
        let mut buf = vec![0u8; BLOCK as usize];
        for (_, i) in acked.iter().filter(|(n, _)| n == disk) {
            img.read_exact_at(&mut buf, i * BLOCK).unwrap();
            assert!(
                buf == pattern(disk_no, *i),
                "{disk} block {i} (acknowledged) is not in the image"
            );
            assert!(
                journaled.contains(&(i * BLOCK)),
                "{disk} block {i} (acknowledged) has no WRITE record in the journal"
            );
        }
        let replayed = d.check_replay_invariant(disk);
        let rf = std::fs::File::open(&replayed).unwrap();
        for (_, i) in acked.iter().filter(|(n, _)| n == disk) {
            rf.read_exact_at(&mut buf, i * BLOCK).unwrap();
            assert!(
                buf == pattern(disk_no, *i),
                "{disk} block {i} is missing from the replay"
            );
        }
    }
    assert_eq!(
        previous_ends(&records).first().map(String::as_str),
        Some("first"),
        "the first SESSION_START should say previous_end=first"
    );
    assert_eq!(
        previous_ends(&records).last().map(String::as_str),
        Some("crash"),
        "after SIGKILL on the same boot, the new SESSION_START should say previous_end=crash"
    );
    // (A new VM's first session starts with a "new history" GAP.)
    let gaps: Vec<_> = records_of_kind(&records, "GAP")
        .into_iter()
        .filter(|g| !g.to_string().contains("new history"))
        .collect();
    assert!(
        gaps.is_empty(),
        "a process crash on the same boot is not a gap, but the journal has {gaps:#?}"
    );
}

#[test]
fn power_loss_records_a_gap() {
    let mut d = Daemon::builder().disk_random("vda", 16 << 20, 33).prepare();
    let boot1 = write_boot_id(&d, "boot-id-1");
    let boot2 = write_boot_id(&d, "boot-id-2");
    d.extra = vec!["--boot-id-file".into(), boot1.clone().into()];
    d.start();
    {
        let (mut c, _) = Client::open(&d.socket("vda"), "vda").unwrap();
        for i in 0..64u64 {
            assert_eq!(c.write(i * BLOCK, &pattern(1, i), 0).unwrap(), 0);
        }
        assert_eq!(c.flush().unwrap(), 0);
    }
    d.kill9();
    let before = d.journal_records();
    let last_seq_before = before
        .iter()
        .filter_map(|r| r["seq"].as_u64())
        .max()
        .unwrap_or(0);

    // The host "rebooted": a different boot id.
    d.extra = vec!["--boot-id-file".into(), boot2.into()];
    d.start();
    d.term();
    let records = d.journal_records();
    let gaps: Vec<&Value> = records_of_kind(&records, "GAP")
        .into_iter()
        .filter(|r| r["seq"].as_u64().unwrap_or(0) > last_seq_before)
        .collect();
    assert!(
        !gaps.is_empty(),
        "no GAP record after an unclean end on another boot id; records after seq {last_seq_before}: {:#?}",
        records
            .iter()
            .filter(|r| r["seq"].as_u64().unwrap_or(0) > last_seq_before)
            .collect::<Vec<_>>()
    );
    for g in &gaps {
        assert!(
            g["info"]["reason"].as_str().is_some_and(|s| !s.is_empty()),
            "GAP record without info.reason: {g}"
        );
    }
    assert_eq!(
        previous_ends(&records).last().map(String::as_str),
        Some("power-loss"),
        "after SIGKILL and a new boot id, SESSION_START should say previous_end=power-loss"
    );
    // The boot id of the new session is the one in the file.
    let starts = session_starts(&records);
    let boot2_id = std::fs::read_to_string(d.work_dir().join("boot-id-2")).unwrap();
    assert_eq!(
        starts.last().unwrap()["info"]["boot_id"].as_str(),
        Some(boot2_id.trim()),
        "SESSION_START info.boot_id is not the boot id from --boot-id-file"
    );
    // The writes themselves survived (the page cache did, here).
    for i in 0..64u64 {
        assert!(read_at(&d.image("vda"), i * BLOCK, BLOCK as usize) == pattern(1, i));
    }
    assert!(boot1.exists());
}

/// Reads `catalog.sqlite` and returns (segment name, sealed) for every segment of the VM.
fn catalog_segments(d: &Daemon) -> Vec<(String, bool)> {
    let db = d.catalog_path();
    assert!(db.exists(), "no catalog at {}", db.display());
    let conn = rusqlite::Connection::open_with_flags(
        &db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .unwrap();
    let mut stmt = conn
        .prepare("SELECT * FROM segments")
        .expect("catalog has no segments table");
    let names: Vec<String> = stmt.column_names().iter().map(|s| s.to_string()).collect();
    let sealed_col = names
        .iter()
        .position(|n| n == "sealed")
        .unwrap_or_else(|| panic!("segments table has no `sealed` column: {names:?}"));
    let name_col = names
        .iter()
        .position(|n| n == "name" || n == "file" || n == "path" || n == "first_seq")
        .unwrap_or(0);
    let rows = stmt
        .query_map([], |row| {
            let name: rusqlite::types::Value = row.get(name_col)?;
            let sealed: rusqlite::types::Value = row.get(sealed_col)?;
            Ok((format!("{name:?}"), sealed))
        })
        .unwrap();
    rows.map(|r| {
        let (name, sealed) = r.unwrap();
        let sealed = match sealed {
            rusqlite::types::Value::Integer(i) => i != 0,
            rusqlite::types::Value::Null => false,
            other => panic!("segments.sealed is {other:?}"),
        };
        (name, sealed)
    })
    .collect()
}

#[test]
fn sigterm_ends_the_session_cleanly() {
    let mut d = Daemon::builder()
        .disk_random("vda", 16 << 20, 34)
        .disk("vdb", 4 << 20)
        .prepare();
    let boot1 = write_boot_id(&d, "boot-id-1");
    d.extra = vec!["--boot-id-file".into(), boot1.into()];
    d.start();
    for disk in ["vda", "vdb"] {
        let (mut c, _) = Client::open(&d.socket(disk), disk).unwrap();
        for i in 0..16u64 {
            assert_eq!(c.write(i * BLOCK, &pattern(3, i), 0).unwrap(), 0);
        }
        // No flush: the clean stop makes it durable.
        c.disconnect();
    }
    d.term();

    let records = d.journal_records();
    for disk in ["vda", "vdb"] {
        let mut mine: Vec<&Value> = records_of(&records, disk);
        mine.sort_by_key(|r| r["seq"].as_u64().unwrap_or(0));
        assert_eq!(
            mine.last().map(|r| r["kind"].clone()),
            Some(Value::from("SESSION_END")),
            "{disk}: the journal does not end with SESSION_END after SIGTERM: last records {:#?}",
            &mine[mine.len().saturating_sub(3)..]
        );
        d.check_replay_invariant(disk);
    }
    let segments = catalog_segments(&d);
    assert!(!segments.is_empty(), "no segments in the catalog");
    let open: Vec<_> = segments.iter().filter(|(_, sealed)| !sealed).collect();
    assert!(
        open.is_empty(),
        "segments left unsealed after SIGTERM: {open:?}"
    );

    // A different boot id after a clean end is not a gap.
    let boot2 = write_boot_id(&d, "boot-id-2");
    d.extra = vec!["--boot-id-file".into(), boot2.into()];
    d.start();
    d.term();
    let records = d.journal_records();
    let ends = previous_ends(&records);
    assert_eq!(ends.first().map(String::as_str), Some("first"), "{ends:?}");
    assert_eq!(
        ends.last().map(String::as_str),
        Some("clean"),
        "after SIGTERM, the next SESSION_START should say previous_end=clean: {ends:?}"
    );
    assert!(
        ends.iter().all(|e| e == "first" || e == "clean"),
        "unexpected previous_end values after clean stops: {ends:?}"
    );
    // (A new VM's first session starts with a "new history" GAP.)
    let gaps: Vec<_> = records_of_kind(&records, "GAP")
        .into_iter()
        .filter(|g| !g.to_string().contains("new history"))
        .collect();
    assert!(gaps.is_empty(), "GAP after a clean stop: {gaps:#?}");
}
