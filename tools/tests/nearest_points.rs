//! A refused point names the nearest restorable ones (issue 15): a time
//! before the disk's first record names the EARLIEST restorable point (seq
//! and time) after it; a seq after the newest names the LATEST before it.
//! The expected points are what `cdpctl points --json` says is restorable.

use std::process::Command;

use cdp_tests::fixture::{cdpctl, config, phase, qemu_io};
use cdp_tests::{bin, run, run_ok, Daemon};

fn restore_err(d: &Daemon, url: &str, at: &str) -> String {
    let out_img = d.work_dir().join("never.img");
    let out = run(Command::new(bin("cdpctl")).args([
        "restore",
        &d.vm_uuid,
        "--disk",
        "vda",
        "--at",
        at,
        "--output",
        out_img.to_str().unwrap(),
        "--repo",
        url,
    ]));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{at}: restored: {err}");
    assert!(!out_img.exists(), "{at}: wrote {}", out_img.display());
    err
}

#[test]
fn refused_points_name_the_earliest_and_the_latest_restorable() {
    let mut d = Daemon::builder()
        .disk_random("vda", 8 << 20, 31)
        .args(["--segment-age", "30ms"])
        .start();
    let repo = d.work_dir().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let cfg = config(&d, &repo);
    cdpctl(&d, &cfg, &["baseline", &d.vm_uuid]);
    for i in 0..3 {
        qemu_io(&d, "vda", &phase(i));
    }
    d.term();
    run_ok(
        Command::new(bin("cdp-shipper"))
            .args(["run", "--once", "--vm-uuid", &d.vm_uuid])
            .arg("--state-dir")
            .arg(&d.state_dir)
            .arg("--run-dir")
            .arg(&d.run_dir)
            .arg("--config")
            .arg(&cfg),
    );
    let url = format!("file://{}", repo.display());
    let points =
        run_ok(Command::new(bin("cdpctl")).args(["points", &d.vm_uuid, "--json", "--repo", &url]));
    let v: serde_json::Value = serde_json::from_slice(&points.stdout).unwrap();
    let disk = v["disks"]
        .as_array()
        .and_then(|ds| ds.iter().find(|x| x["disk"] == "vda"))
        .unwrap_or_else(|| panic!("{v}"));
    let ranges = disk["restorable"].as_array().unwrap();
    let earliest = ranges.first().unwrap()["from_seq"].as_u64().unwrap();
    let latest = ranges.last().unwrap()["to_seq"].as_u64().unwrap();
    assert!(earliest < latest, "{disk}");

    let err = restore_err(&d, &url, "2001-01-01T00:00:00Z");
    assert!(
        err.contains(&format!("nearest restorable: seq:{earliest} (20"))
            && err.trim_end().ends_with(") after"),
        "a time before the first record names the earliest ({earliest}): {err}"
    );
    let err = restore_err(&d, &url, &format!("seq:{}", latest + 1000));
    assert!(
        err.contains(&format!("nearest restorable: seq:{latest} (20"))
            && err.trim_end().ends_with(") before"),
        "a seq after the newest names the latest ({latest}): {err}"
    );
}
