//! fio's nbd engine against cdpd, then the central invariant: the initial image with the
//! journal replayed in order equals the final image, byte for byte.

use std::process::Command;

use cdp_tests::*;
use serde_json::Value;

const SIZE: u64 = 16 << 20;

/// Runs fio with the nbd engine on `uri`; `jobs` are job option groups, each starting with
/// `--name=`. Returns the parsed JSON report after checking that every job succeeded.
fn fio(uri: &str, global: &[&str], jobs: &[&[&str]]) -> Value {
    require_tool("fio");
    // fio writes its verify state files into its working directory: never the source tree.
    let cwd = tempfile::tempdir().expect("temp dir for fio");
    let mut cmd = Command::new("fio");
    cmd.current_dir(cwd.path())
        .arg("--output-format=json")
        .arg("--ioengine=nbd")
        .arg(format!("--uri={uri}"))
        .args(global);
    for j in jobs {
        cmd.args(*j);
    }
    let out = run(&mut cmd);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "fio failed ({}): {cmd:?}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        out.status
    );
    let report = parse_json_lenient(&stdout);
    for job in report["jobs"].as_array().expect("fio JSON has no jobs") {
        assert_eq!(
            job["error"], 0,
            "fio job {} reported error {}:\n{stdout}\n{stderr}",
            job["jobname"], job["error"]
        );
    }
    report
}

fn total_ios(report: &Value, job: &str, dir: &str) -> u64 {
    report["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["jobname"] == job)
        .unwrap_or_else(|| panic!("no fio job {job}"))[dir]["total_ios"]
        .as_u64()
        .unwrap()
}

/// Three concurrent connections hammer the same 1 MiB: 4 KiB random writes at iodepth 16
/// with no random map (so in-flight requests overlap), unaligned mixed-size writes, and
/// trims. Whatever order the daemon picks, the image must be the journal replayed in order.
#[test]
fn overlapping_writes_replay_equals_image() {
    let mut d = Daemon::builder()
        .disk_random("vda", SIZE, 3)
        // Small segments, so that the replay crosses many sealed segments.
        .args(["--segment-size", "1048576"])
        .start();
    let report = fio(
        &d.uri("vda"),
        &["--offset=0", "--size=1m", "--norandommap", "--randrepeat=0"],
        &[
            &[
                "--name=over4k",
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                "--io_size=16m",
                "--fsync=64",
            ],
            &[
                "--name=mixed",
                "--rw=randwrite",
                "--bsrange=512-128k",
                "--bs_unaligned",
                "--iodepth=16",
                "--io_size=16m",
            ],
            &[
                "--name=trims",
                "--rw=randtrim",
                "--bs=64k",
                "--iodepth=4",
                "--io_size=4m",
            ],
        ],
    );
    assert_eq!(total_ios(&report, "over4k", "write"), 4096);
    assert!(total_ios(&report, "trims", "trim") > 0);
    d.assert_alive("after fio");
    d.term();
    d.check_replay_invariant("vda");

    let records = d.journal_records();
    let writes = records_of_kind(&records, "WRITE").len();
    assert!(
        writes >= 4096,
        "only {writes} WRITE records for at least 4096 acknowledged writes"
    );
    assert!(
        !records_of_kind(&records, "TRIM").is_empty(),
        "no TRIM records"
    );
    let segments: std::collections::BTreeSet<&str> = records
        .iter()
        .filter_map(|r| r["segment"].as_str())
        .collect();
    assert!(
        segments.len() > 1,
        "with --segment-size 1048576 and >16 MiB written, expected several segments, got {segments:?}"
    );
}

/// fio writes, reads back and checks crc32c: 4 KiB random writes at iodepth 16 and a run of
/// mixed sizes, four passes each; then replay equals the image.
#[test]
fn verified_writes_replay_equals_image() {
    let mut d = Daemon::builder().disk_random("vda", SIZE, 4).start();
    let report = fio(
        &d.uri("vda"),
        &[
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--loops=4",
            "--iodepth=16",
        ],
        &[
            &[
                "--name=v4k",
                "--rw=randwrite",
                "--bs=4k",
                "--offset=1m",
                "--size=1m",
            ],
            &[
                "--name=vmixed",
                "--rw=randwrite",
                "--bsrange=4k-256k",
                "--offset=4m",
                "--size=4m",
            ],
            &[
                "--name=vseq",
                "--rw=write",
                "--bs=1m",
                "--offset=8m",
                "--size=8m",
            ],
        ],
    );
    assert_eq!(total_ios(&report, "v4k", "write"), 1024);
    assert_eq!(total_ios(&report, "v4k", "read"), 1024);
    d.term();
    d.check_replay_invariant("vda");
}
