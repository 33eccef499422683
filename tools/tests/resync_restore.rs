//! A GAP that a resync heals, and a RESIZE, through the real programs: a
//! journal segment written with the real journal writer (what cdpd's
//! degraded mode leaves: GAP {"resync": true}, records flagged RESYNC that
//! carry what the image holds, RESYNCED; then a grow and a write past the
//! old size) is recorded by cdpd, shipped by the shipper, and restored by
//! cdpctl from the repository alone: byte-exact before and after the
//! window, refused inside it with the reason (docs/DESIGN.md, "Restore").

use std::os::unix::fs::FileExt;
use std::path::Path;

use cdp_core::journal::format::{Kind, FLAG_RESYNC};
use cdp_core::journal::writer::{OpenSegment, Record};
use cdp_tests::fixture::{cdpctl, cdpctl_out, config, qemu_io, shipper_once_cmd};
use cdp_tests::{assert_files_equal, run_ok, Daemon};

const MIB: u64 = 1 << 20;

fn restore(d: &Daemon, cfg: &Path, url: &str, at: &str, out: &Path) -> std::process::Output {
    cdpctl_out(
        d,
        cfg,
        &[
            "restore",
            &d.vm_uuid,
            "--disk",
            "vda",
            "--at",
            at,
            "--no-local",
            "--output",
            out.to_str().unwrap(),
            "--repo",
            url,
        ],
    )
}

#[test]
fn a_resynced_gap_restores_around_its_window_and_a_grown_disk_keeps_its_tail() {
    let mut d = Daemon::builder()
        .disk_random("vda", 4 * MIB, 7)
        .args(["--segment-age", "30ms"])
        .start();
    let repo = d.work_dir().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let cfg = config(&d, &repo);
    cdpctl(&d, &cfg, &["baseline", &d.vm_uuid]);
    qemu_io(&d, "vda", &["write -P 0x11 0 64k".into(), "flush".into()]);
    d.term();
    let before_copy = d.work_dir().join("before.img");
    std::fs::copy(d.image("vda"), &before_copy).unwrap();
    let recs = d.journal_records();
    let vda: Vec<_> = recs.iter().filter(|r| r["disk"] == "vda").collect();
    let before = vda
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .max()
        .unwrap();

    // What the degraded window leaves: the guest's writes reached the image
    // only; then the GAP, the resync of the changed range, RESYNCED.
    let img = std::fs::File::options()
        .read(true)
        .write(true)
        .open(d.image("vda"))
        .unwrap();
    img.write_all_at(&[0x22; 65536], MIB).unwrap();
    let mut resynced = vec![0u8; 65536];
    img.read_exact_at(&mut resynced, MIB).unwrap();
    let dir = cdp_core::journal::journal_dir(&d.state_dir, &d.vm_uuid, "vda");
    let uuid = *uuid::Uuid::parse_str(&d.vm_uuid).unwrap().as_bytes();
    let g = before + 1;
    let now = cdp_core::time::now_ns();
    let mut seg = OpenSegment::create(&dir, uuid, g, vda.len() as u64, now).unwrap();
    let gap = br#"{"reason": "journal full (test)", "resync": true}"#;
    let done = format!(r#"{{"gap_seq": {g}, "extents": 1, "bytes": 65536}}"#);
    let resize = format!(r#"{{"old_size": {}, "new_size": {}}}"#, 4 * MIB, 6 * MIB);
    let tail = [0x33u8; 4096];
    let records: [Record; 5] = [
        Record {
            kind: Kind::Gap,
            flags: 0,
            offset: 0,
            length: 0,
            payload: gap,
        },
        Record {
            kind: Kind::Write,
            flags: FLAG_RESYNC,
            offset: MIB,
            length: 65536,
            payload: &resynced,
        },
        Record {
            kind: Kind::Resynced,
            flags: 0,
            offset: 0,
            length: 0,
            payload: done.as_bytes(),
        },
        Record {
            kind: Kind::Resize,
            flags: 0,
            offset: 0,
            length: 6 * MIB,
            payload: resize.as_bytes(),
        },
        Record {
            kind: Kind::Write,
            flags: 0,
            offset: 5 * MIB,
            length: 4096,
            payload: &tail,
        },
    ];
    for (i, r) in records.into_iter().enumerate() {
        seg.append(g + i as u64, now + i as u64, [r]).unwrap();
    }
    seg.seal(now + 10).unwrap();
    let healed_copy = d.work_dir().join("healed.img");
    std::fs::copy(d.image("vda"), &healed_copy).unwrap();
    img.set_len(6 * MIB).unwrap();
    img.write_all_at(&tail, 5 * MIB).unwrap();
    drop(img);
    let grown_copy = d.work_dir().join("grown.img");
    std::fs::copy(d.image("vda"), &grown_copy).unwrap();

    // cdpd records the sealed segment at its start; the shipper ships it.
    d.start();
    d.term();
    // `cdpctl journal replay` applies the RESIZE (and the RESYNC records).
    d.check_replay_invariant("vda");
    run_ok(&mut shipper_once_cmd(&d, &cfg));
    let url = format!("file://{}", repo.display());

    let out = d.work_dir().join("r.img");
    for (at, want) in [
        (format!("seq:{before}"), &before_copy),
        (format!("seq:{}", g + 2), &healed_copy),
        (format!("seq:{}", g + 4), &grown_copy),
    ] {
        let _ = std::fs::remove_file(&out);
        let o = restore(&d, &cfg, &url, &at, &out);
        assert!(
            o.status.success(),
            "{at}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_files_equal(&out, want);
    }
    // Inside the window: refused, saying why and from where it can.
    for at in [format!("seq:{g}"), format!("seq:{}", g + 1)] {
        let _ = std::fs::remove_file(&out);
        let o = restore(&d, &cfg, &url, &at, &out);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{at} was restored");
        assert!(
            err.contains(&format!("seq {g} is a GAP"))
                && err.contains("tracked, not journaled")
                && err.contains(&format!("from seq {} on can", g + 2)),
            "{at}: {err}"
        );
    }
    // `points` shows the window as not restorable and the GAP as healed.
    let pts: serde_json::Value = serde_json::from_str(&cdpctl(
        &d,
        &cfg,
        &["points", &d.vm_uuid, "--repo", &url, "--no-local", "--json"],
    ))
    .unwrap();
    let disk = &pts["disks"].as_array().unwrap()[0];
    let ranges: Vec<(u64, u64)> = disk["restorable"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["from_seq"].as_u64().unwrap(),
                r["to_seq"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(ranges.iter().any(|r| r.1 == g - 1), "{ranges:?}");
    assert!(ranges.iter().any(|r| r.0 == g + 2), "{ranges:?}");
    assert!(
        !ranges.iter().any(|r| r.0 <= g + 1 && g <= r.1),
        "{ranges:?}"
    );
    let gap = disk["gaps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["seq"] == g)
        .unwrap();
    assert_eq!(gap["healed_by_seq"], g + 2, "{gap}");
    // And in plain text: the window, from the GAP's time to the RESYNCED's.
    let plain = cdpctl(
        &d,
        &cfg,
        &["points", &d.vm_uuid, "--repo", &url, "--no-local"],
    );
    let line = format!(
        "not restorable: journal full from {} to {} (resynced at seq {};",
        gap["time"].as_str().unwrap(),
        gap["healed_at"].as_str().unwrap(),
        g + 2
    );
    assert!(plain.contains(&line), "{line}\n{plain}");
}
