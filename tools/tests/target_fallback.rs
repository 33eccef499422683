//! restore, points and verify without --repo read the policy's targets in
//! order (primary first): a target that is gone, or that does not hold the
//! point asked for, falls back to the next, and the output says which
//! target was read (issue 12, "Targets fail independently"). With --repo,
//! only that repository.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cdp_tests::fixture::{cdpctl_out, phase, qemu_io, shipper_once_cmd};
use cdp_tests::{assert_files_equal, run_ok, Daemon};

const MIB: u64 = 1 << 20;

/// Policy `default`: file:// targets `first` (primary) then `second`.
fn two_targets(d: &Daemon) -> (PathBuf, PathBuf, PathBuf) {
    let (a, b) = (d.work_dir().join("repo-a"), d.work_dir().join("repo-b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let cfg = d.work_dir().join("cdp.toml");
    std::fs::write(
        &cfg,
        format!(
            "[target.first]\nurl = \"file://{}\"\n[target.second]\nurl = \"file://{}\"\n\
             [policy.default]\ntargets = [\"first\", \"second\"]\n",
            a.display(),
            b.display()
        ),
    )
    .unwrap();
    (cfg, a, b)
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn restore(d: &Daemon, cfg: &Path, at: &str, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "--json",
        "restore",
        &d.vm_uuid,
        "--disk",
        "vda",
        "--at",
        at,
        "--no-local",
        "--output",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    cdpctl_out(d, cfg, &args)
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn restore_points_verify_fall_back_to_the_next_target_and_say_which() {
    let mut d = Daemon::builder()
        .disk_random("vda", 8 * MIB, 31)
        .args(["--segment-age", "30ms"])
        .start();
    let (cfg, a, b) = two_targets(&d);
    ok(&cdpctl_out(&d, &cfg, &["baseline", &d.vm_uuid]));
    qemu_io(&d, "vda", &phase(1));
    ok(&cdpctl_out(&d, &cfg, &["mark", &d.vm_uuid, "one"]));
    let ref1 = d.work_dir().join("ref-1.img");
    std::fs::copy(d.image("vda"), &ref1).unwrap();
    // Stopped, so the mark's segment is sealed (the 30 ms sealer may not
    // have run yet on a loaded machine) and shipped.
    d.term();
    run_ok(&mut shipper_once_cmd(&d, &cfg));
    // `first` as it was then: it will answer, without the later points.
    let a_old = d.work_dir().join("repo-a-old");
    run_ok(Command::new("cp").arg("-a").arg(&a).arg(&a_old));
    d.start();

    qemu_io(&d, "vda", &phase(2));
    ok(&cdpctl_out(&d, &cfg, &["mark", &d.vm_uuid, "two"]));
    let ref2 = d.work_dir().join("ref-2.img");
    std::fs::copy(d.image("vda"), &ref2).unwrap();
    d.term();
    // The VM's definition goes to both targets too (restore-config below).
    let xml = d.work_dir().join("domain.xml");
    std::fs::write(&xml, "<domain><name>fallback</name></domain>").unwrap();
    run_ok(shipper_once_cmd(&d, &cfg).arg("--vm-config").arg(&xml));

    // Both answer: the primary serves.
    let out1 = d.work_dir().join("r1.img");
    let o = restore(&d, &cfg, "mark:two", &out1, &[]);
    let err = ok(&o);
    assert_eq!(json(&o)["target"], "first", "{err}");
    assert!(err.contains("reading from target first"), "{err}");
    assert_files_equal(&out1, &ref2);

    // The primary is gone (its directory renamed away): the secondary
    // serves, and says so.
    let a_gone = d.work_dir().join("repo-a-gone");
    std::fs::rename(&a, &a_gone).unwrap();
    let out2 = d.work_dir().join("r2.img");
    let o = restore(&d, &cfg, "mark:two", &out2, &[]);
    let err = ok(&o);
    let v = json(&o);
    assert_eq!(v["target"], "second", "{v}");
    assert_eq!(v["repository"], format!("file://{}", b.display()), "{v}");
    assert!(
        err.contains("target first") && err.contains("trying the next target"),
        "{err}"
    );
    assert!(err.contains("reading from target second"), "{err}");
    assert_files_equal(&out2, &ref2);

    let o = cdpctl_out(&d, &cfg, &["--json", "points", &d.vm_uuid, "--no-local"]);
    ok(&o);
    assert_eq!(json(&o)["target"], "second");
    let o = cdpctl_out(&d, &cfg, &["--json", "verify", &d.vm_uuid]);
    ok(&o);
    assert_eq!(json(&o)["target"], "second");
    let def = d.work_dir().join("restored-domain.xml");
    let o = cdpctl_out(
        &d,
        &cfg,
        &[
            "--json",
            "restore-config",
            &d.vm_uuid,
            "--at",
            "latest",
            "--output",
            def.to_str().unwrap(),
        ],
    );
    ok(&o);
    assert_eq!(json(&o)["target"], "second");
    assert_eq!(
        std::fs::read_to_string(&def).unwrap(),
        "<domain><name>fallback</name></domain>"
    );

    // --repo: only that repository, no fallback.
    let out3 = d.work_dir().join("r3.img");
    let url = format!("file://{}", a.display());
    let o = restore(&d, &cfg, "mark:two", &out3, &["--repo", &url]);
    assert!(!o.status.success());
    assert!(!out3.exists());

    // The primary answers but lacks the point: the secondary serves it;
    // a point the primary holds is still read from the primary.
    std::fs::rename(&a_old, &a).unwrap();
    let out4 = d.work_dir().join("r4.img");
    let o = restore(&d, &cfg, "mark:two", &out4, &[]);
    let err = ok(&o);
    assert_eq!(json(&o)["target"], "second", "{err}");
    assert_files_equal(&out4, &ref2);
    let out5 = d.work_dir().join("r5.img");
    let o = restore(&d, &cfg, "mark:one", &out5, &[]);
    let err = ok(&o);
    assert_eq!(json(&o)["target"], "first", "{err}");
    assert_files_equal(&out5, &ref1);

    // Neither holds the VM any more: one error naming both.
    std::fs::rename(&a, d.work_dir().join("repo-a-old2")).unwrap();
    std::fs::rename(&b, d.work_dir().join("repo-b-gone")).unwrap();
    let o = restore(&d, &cfg, "latest", &d.work_dir().join("r6.img"), &[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("target first") && err.contains("target second"),
        "{err}"
    );
}
