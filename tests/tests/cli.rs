//! The command line: help, and arguments cdpd must refuse before serving anything.

use std::process::Command;

use cdp_tests::*;

#[test]
fn help_works() {
    for (b, args) in [
        ("cdpd", vec!["--help"]),
        ("cdpd", vec!["run", "--help"]),
        ("cdpctl", vec!["--help"]),
        ("cdpctl", vec!["status", "--help"]),
        ("cdpctl", vec!["journal", "inspect", "--help"]),
        ("cdpctl", vec!["journal", "replay", "--help"]),
    ] {
        let out = run_ok(Command::new(bin(b)).args(&args));
        assert!(!out.stdout.is_empty(), "{b} {args:?} printed no help");
    }
}

/// cdpd with these disk arguments must exit non-zero, say why on stderr, and not leave a
/// socket behind.
fn refused(disk_arg: &str, what: &str) {
    let d = Daemon::builder().disk("vda", 1 << 20).prepare();
    let out = run(Command::new(bin("cdpd")).args([
        "run",
        "--vm-uuid",
        &d.vm_uuid,
        "--vm-name",
        "x",
        "--disk",
        disk_arg,
        "--state-dir",
        d.state_dir.to_str().unwrap(),
        "--run-dir",
        d.run_dir.to_str().unwrap(),
    ]));
    assert!(
        !out.status.success(),
        "cdpd accepted {what} ({disk_arg}):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.stderr.is_empty(),
        "cdpd refused {what} without a message on stderr"
    );
}

#[test]
fn bad_disk_arguments_are_refused() {
    let d = Daemon::builder().disk("vda", 1 << 20).prepare();
    let img = d.image("vda");
    let img = img.to_str().unwrap();
    refused(
        &format!("../evil={img}"),
        "a disk name with a path separator",
    );
    refused(&format!("={img}"), "an empty disk name");
    refused("vda=/nonexistent/disk.img", "a missing image");
    refused(img, "a disk argument without a name");
}

#[test]
fn status_of_unknown_vm_fails_with_a_message() {
    let d = Daemon::builder().disk("vda", 1 << 20).prepare();
    let out = d.cdpctl([
        "status",
        "--vm-uuid",
        "00000000-0000-4000-8000-000000000000",
        "--run-dir",
        d.run_dir.to_str().unwrap(),
    ]);
    assert!(
        !out.status.success(),
        "status of a VM that is not running succeeded"
    );
    assert!(!out.stderr.is_empty(), "no error message on stderr");
}

/// Every cdp program a test starts reads the harness's empty config, never
/// the host's /etc/cdp/cdp.toml: cdpd runs with CDP_CONFIG set, and a config
/// error names that file, not /etc/cdp/cdp.toml.
#[test]
fn programs_never_read_the_host_config() {
    let d = Daemon::with_disk(1 << 20);
    let environ = std::fs::read(format!("/proc/{}/environ", d.pid())).unwrap();
    let want = format!("{}={HARNESS_CONFIG}", cdp_core::config::CONFIG_ENV);
    assert!(
        environ.split(|b| *b == 0).any(|v| v == want.as_bytes()),
        "cdpd's environment lacks {want}"
    );
    // A policy no config defines: the error names the config actually read.
    let out = run(d.command(0).arg("--policy").arg("gold"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("gold") && err.contains(HARNESS_CONFIG),
        "{err}"
    );
}
