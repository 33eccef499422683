//! qemu-io and qemu-img, QEMU's own block layer, against cdpd's NBD export.

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::process::Command;

use cdp_tests::*;
use serde_json::Value;

const SIZE: u64 = 64 << 20;

/// The qemu-io script: patterned writes (plain, FUA, vectored, asynchronous), write
/// zeroes (with and without unmap), discard and flushes. Asynchronous writes do not
/// overlap each other, so the result does not depend on completion order.
const SCRIPT: &[&str] = &[
    "write -P 0xab 0 64k",
    "write -P 0xcd 65536 512",
    "write -P 0x01 100000 3000",
    "write -z 1M 256k",
    "discard 2M 128k",
    "write -f -P 0x22 3M 4k",
    "flush",
    "aio_write -P 0x11 4M 1M",
    "aio_write -P 0x12 6M 64k",
    "aio_write -P 0x13 7M 4k",
    "aio_flush",
    "write -z -u 8M 1M",
    "writev -P 0x33 10M 4k 8k 512",
    "write -P 0x44 1048576 4k",
    "write -P 0x55 63M 1M",
    "flush",
];

fn qemu_io(target: &OsStr) {
    let mut cmd = Command::new("qemu-io");
    // writeback: FUA only where the script asks for it (writethrough adds it everywhere).
    cmd.args(["-f", "raw", "-t", "writeback", "-d", "unmap"])
        .arg(target);
    for c in SCRIPT {
        cmd.arg("-c").arg(c);
    }
    let out = run_ok(&mut cmd);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // qemu-io reports a failed command as "<cmd> failed: <reason>" (exit status is not
    // reliable across versions), so check the text as well.
    assert!(
        !text.contains("failed") && !text.to_lowercase().contains("error"),
        "qemu-io {target:?} reported an error:\n{text}"
    );
}

fn find<'a>(records: &'a [Value], kind: &str, offset: u64, length: u64) -> Option<&'a Value> {
    records
        .iter()
        .find(|r| r["kind"] == kind && r["offset"] == offset && r["length"] == length)
}

#[test]
fn qemu_io_script_matches_reference_file() {
    require_tool("qemu-io");
    require_tool("qemu-img");
    let mut d = Daemon::builder().disk_random("vda", SIZE, 1).start();
    let reference = d.work_dir().join("reference.img");
    copy_sparse(&d.disk("vda").initial, &reference);

    qemu_io(OsStr::new(&d.uri("vda")));
    qemu_io(reference.as_os_str());

    // While cdpd runs: the export reads back like the reference file.
    qemu_img_compare(reference.as_os_str(), OsStr::new(&d.uri("vda")));
    d.assert_alive("after qemu-io");

    d.term();
    // After a clean stop: the image file itself equals the reference.
    qemu_img_compare(reference.as_os_str(), d.image("vda").as_os_str());
    d.check_replay_invariant("vda");

    // The journal holds each kind of request the script sent.
    let records = d.journal_records();
    let vda: Vec<Value> = records_of(&records, "vda").into_iter().cloned().collect();
    assert!(
        find(&vda, "WRITE", 0, 65536).is_some(),
        "no WRITE 0+64k record: {vda:#?}"
    );
    assert!(
        find(&vda, "ZERO", 1 << 20, 256 << 10).is_some(),
        "no ZERO 1M+256k record (write -z): {vda:#?}"
    );
    assert!(
        find(&vda, "TRIM", 2 << 20, 128 << 10).is_some(),
        "no TRIM 2M+128k record (discard): {vda:#?}"
    );
    assert!(
        !records_of_kind(&vda, "FLUSH").is_empty(),
        "no FLUSH record: {vda:#?}"
    );
    let fua = find(&vda, "WRITE", 3 << 20, 4096).expect("no WRITE 3M+4k record (write -f)");
    assert!(
        fua["flags"]
            .as_array()
            .is_some_and(|f| f.iter().any(|x| x == "FUA")),
        "write -f (FUA) journaled without the FUA flag: {fua}"
    );
    let plain = find(&vda, "WRITE", 0, 65536).unwrap();
    assert!(
        !plain["flags"]
            .as_array()
            .is_some_and(|f| f.iter().any(|x| x == "FUA")),
        "a write without FUA was journaled with FUA: {plain}"
    );
    // Sequence numbers are strictly increasing in the listing of one disk.
    let seqs: Vec<u64> = vda.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "sequence numbers not increasing: {seqs:?}"
    );
}

#[test]
fn qemu_img_convert_into_export() {
    require_tool("qemu-img");
    let mut d = Daemon::builder().disk_random("vda", SIZE, 2).start();

    // A source with data, zero runs and holes, so convert sends writes and zeroes.
    let source = d.work_dir().join("random.img");
    let f = File::create(&source).unwrap();
    f.set_len(SIZE).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for mib in 0..(SIZE >> 20) {
        match mib % 4 {
            0 | 1 => {
                fill_pseudo_random(1000 + mib, &mut buf);
                f.write_all_at(&buf, mib << 20).unwrap();
            }
            2 => {
                // half data, half explicit zeros
                fill_pseudo_random(2000 + mib, &mut buf[..512 << 10]);
                buf[512 << 10..].fill(0);
                f.write_all_at(&buf, mib << 20).unwrap();
            }
            _ => {} // hole
        }
    }
    drop(f);

    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&source)
            .arg(d.uri("vda")),
    );
    qemu_img_compare(source.as_os_str(), OsStr::new(&d.uri("vda")));
    d.term();
    assert_files_equal(&source, &d.image("vda"));
    d.check_replay_invariant("vda");
}
