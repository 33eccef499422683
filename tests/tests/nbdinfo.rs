//! libnbd's tools (nbdinfo, nbdsh) against cdpd: export name, size, block sizes, listing,
//! and a write/read round trip.

use std::process::Command;

use cdp_tests::*;
use serde_json::Value;

const SIZE: u64 = 64 << 20;

fn nbdinfo_json(args: &[&str]) -> Value {
    require_tool("nbdinfo");
    let out = run_ok(Command::new("nbdinfo").arg("--json").args(args));
    parse_json_lenient(&String::from_utf8_lossy(&out.stdout))
}

/// nbdsh is a shell script that runs `python3 -m nbd`; the libnbd module is only in the
/// system Python, so put /usr/bin first (a pyenv on PATH would not find it).
fn nbdsh() -> Command {
    require_tool("nbdsh");
    let path = std::env::var("PATH").unwrap_or_default();
    let mut c = Command::new("nbdsh");
    c.env("PATH", format!("/usr/bin:/bin:{path}"));
    c
}

#[test]
fn nbdinfo_shows_export_size_and_block_sizes() {
    let mut d = Daemon::builder()
        .disk("vda", SIZE)
        .disk("vdb", 8 << 20)
        .start();
    for (disk, size) in [("vda", SIZE), ("vdb", 8 << 20)] {
        let info = nbdinfo_json(&[&d.uri(disk)]);
        let exports = info["exports"].as_array().expect("no exports array");
        assert_eq!(exports.len(), 1, "{info:#}");
        let e = &exports[0];
        assert_eq!(e["export-name"], disk, "{info:#}");
        assert_eq!(e["export-size"], size, "{info:#}");
        assert_eq!(e["is_read_only"], false, "{info:#}");
        assert_eq!(e["block_size_minimum"], 1, "{info:#}");
        assert_eq!(e["block_size_preferred"], 4096, "{info:#}");
        assert_eq!(e["block_size_maximum"], 33554432, "{info:#}");
        for cap in ["can_flush", "can_fua", "can_trim", "can_zero"] {
            assert_eq!(e[cap], true, "{cap} not advertised: {info:#}");
        }
    }
    d.assert_alive("after nbdinfo");
}

#[test]
fn nbdinfo_list_shows_the_export() {
    let mut d = Daemon::builder().disk("vda", SIZE).start();
    let uri = format!("nbd+unix://?socket={}", d.socket("vda").display());
    let info = nbdinfo_json(&["--list", &uri]);
    let names: Vec<&str> = info["exports"]
        .as_array()
        .expect("no exports array")
        .iter()
        .filter_map(|e| e["export-name"].as_str())
        .collect();
    assert_eq!(names, ["vda"], "{info:#}");

    // The empty export name is accepted too (it is the default export).
    let info = nbdinfo_json(&[&uri]);
    assert_eq!(info["exports"][0]["export-size"], SIZE, "{info:#}");
    d.assert_alive("after nbdinfo --list");
}

#[test]
fn nbdsh_write_then_read() {
    let mut d = Daemon::builder().disk_random("vda", SIZE, 5).start();
    let out = run_ok(nbdsh().args([
        "-u",
        &d.uri("vda"),
        "-c",
        "h.pwrite(b'x' * 512, 0)",
        "-c",
        "assert h.pread(512, 0) == b'x' * 512",
        "-c",
        "h.pwrite(b'y' * 4096, 1048576 + 7, nbd.CMD_FLAG_FUA)",
        "-c",
        "h.zero(65536, 2097152)",
        "-c",
        "assert h.pread(65536, 2097152) == bytes(65536)",
        "-c",
        "h.flush()",
        "-c",
        "print(h.get_size())",
    ]));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        SIZE.to_string()
    );
    d.term();
    let img = d.image("vda");
    assert_eq!(read_at(&img, 0, 512), vec![b'x'; 512]);
    assert_eq!(read_at(&img, (1 << 20) + 7, 4096), vec![b'y'; 4096]);
    assert_eq!(read_at(&img, 2 << 20, 65536), vec![0; 65536]);
    d.check_replay_invariant("vda");
}
