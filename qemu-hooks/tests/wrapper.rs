//! cdp-qemu with the real QEMU: probes pass through, bad configs and a cdpd
//! that cannot start keep QEMU from starting.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use cdp_tests::{bin, require_tool, run};

fn qemu() -> PathBuf {
    require_tool("qemu-system-x86_64")
}

/// A stand-in "QEMU" that records that it ran (for refusal tests, where the
/// point is that QEMU is never started).
fn fake_qemu(dir: &Path) -> (PathBuf, PathBuf) {
    let marker = dir.join("qemu-ran");
    let script = dir.join("fake-qemu");
    std::fs::write(
        &script,
        format!("#!/bin/sh\necho \"$@\" > '{}'\n", marker.display()),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    (script, marker)
}

#[test]
fn probes_pass_through_unchanged() {
    let out = run(Command::new(bin("cdp-qemu"))
        .env("CDP_QEMU_BINARY", qemu())
        .arg("-version"));
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("QEMU emulator version"));

    // libvirt's capability probe: -machine none with QMP on stdio.
    let mut child = Command::new(bin("cdp-qemu"))
        .env("CDP_QEMU_BINARY", qemu())
        .args([
            "-S",
            "-no-user-config",
            "-nodefaults",
            "-nographic",
            "-machine",
            "none,accel=tcg",
            "-qmp",
            "stdio",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let greeting = lines.next().unwrap().unwrap();
    assert!(greeting.contains("\"QMP\""), "{greeting}");
    writeln!(stdin, r#"{{"execute":"qmp_capabilities"}}"#).unwrap();
    assert!(lines.next().unwrap().unwrap().contains("return"));
    writeln!(stdin, r#"{{"execute":"query-version"}}"#).unwrap();
    assert!(lines.next().unwrap().unwrap().contains("qemu"));
    writeln!(stdin, r#"{{"execute":"quit"}}"#).unwrap();
    assert!(child.wait().unwrap().success());
}

fn domain(dir: &Path, disk: &Path, keys: &str, format: &str) -> PathBuf {
    let p = dir.join("domain.xml");
    std::fs::write(
        &p,
        format!(
            r#"<domain type='qemu'>
  <name>wrapped</name>
  <uuid>1b7e3f52-9a4c-4d2e-8f61-0a2b3c4d5e6f</uuid>
  <metadata>{keys}</metadata>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='{format}'/>
      <source file='{}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>"#,
            disk.display()
        ),
    )
    .unwrap();
    p
}

const KEYS: &str = r#"<cdp:protection xmlns:cdp="urn:cdpd:protection:1"><cdp:disk target="vda"/></cdp:protection>"#;

fn config(dir: &Path) -> PathBuf {
    let p = dir.join("cdp.toml");
    std::fs::write(
        &p,
        format!(
            "[paths]\nstate_dir = \"{0}/state\"\nrun_dir = \"{0}/run\"\n",
            dir.display()
        ),
    )
    .unwrap();
    p
}

fn wrap(dir: &Path, dom: &Path, fake: &Path, disk: &Path) -> std::process::Output {
    run(Command::new(bin("cdp-qemu"))
        .arg("--vm-config")
        .arg(dom)
        .arg("--qemu")
        .arg(fake)
        .arg("--config")
        .arg(config(dir))
        .args(["--", "-name", "guest=wrapped,debug-threads=on", "-blockdev"])
        .arg(format!(
            r#"{{"driver":"file","filename":"{}","node-name":"libvirt-1-storage","auto-read-only":true,"discard":"unmap"}}"#,
            disk.display()
        )))
}

#[test]
fn bad_configs_are_refused_and_qemu_never_starts() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("vda.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let (fake, marker) = fake_qemu(dir.path());
    let cases = [
        (
            KEYS.replace("target=\"vda\"", "tagret=\"vda\""),
            "raw",
            "unknown attribute",
        ),
        (
            KEYS.replace("target=\"vda\"", "target=\"vdz\""),
            "raw",
            "vdz",
        ),
        (KEYS.to_string(), "qcow2", "qemu-img convert -O raw"),
        (
            KEYS.replace("<cdp:protection ", "<cdp:protection policy=\"gold\" "),
            "raw",
            "[policy.gold]",
        ),
    ];
    for (keys, format, expect) in cases {
        let dom = domain(dir.path(), &disk, &keys, format);
        let out = wrap(dir.path(), &dom, &fake, &disk);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted: {keys}");
        assert!(err.contains(expect), "expected {expect:?} in: {err}");
        assert!(err.contains("cdp-qemu"), "{err}");
        assert!(!marker.exists(), "QEMU was started for {keys}");
    }
    // Without CDP keys the VM starts untouched.
    let dom = domain(dir.path(), &disk, "", "raw");
    let out = wrap(dir.path(), &dom, &fake, &disk);
    assert!(out.status.success(), "{out:?}");
    let argv = std::fs::read_to_string(&marker).unwrap();
    assert!(argv.contains("\"driver\":\"file\""), "{argv}");
}

#[test]
fn a_cdpd_that_cannot_start_fails_the_vm_start() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, marker) = fake_qemu(dir.path());
    // The image does not exist: cdpd refuses, so the VM must not boot unprotected.
    let missing = dir.path().join("missing.raw");
    let dom = domain(dir.path(), &missing, KEYS, "raw");
    let out = wrap(dir.path(), &dom, &fake, &missing);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("cdpd failed to start") && err.contains("missing.raw"),
        "{err}"
    );
    assert!(!marker.exists(), "QEMU started without protection");

    // With a real disk it starts, and QEMU's argv points at cdpd's socket.
    let disk = dir.path().join("vda.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let dom = domain(dir.path(), &disk, KEYS, "raw");
    let out = wrap(dir.path(), &dom, &fake, &disk);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let argv = std::fs::read_to_string(&marker).unwrap();
    assert!(
        argv.contains("\"driver\":\"nbd\"") && argv.contains("vda.sock"),
        "{argv}"
    );
    // The fake QEMU exited at once: cdpd (its child) stops with it.
    let sock = dir
        .path()
        .join("run/1b7e3f52-9a4c-4d2e-8f61-0a2b3c4d5e6f/vda.sock");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while sock.exists() {
        assert!(std::time::Instant::now() < deadline, "cdpd outlived QEMU");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The children keep nothing libvirt passed; QEMU keeps everything.
#[test]
fn children_do_not_inherit_qemus_descriptors() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("vda.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let dom = domain(dir.path(), &disk, KEYS, "raw");
    // A "QEMU" that lists its descriptors, then waits so cdpd stays up.
    let listing = dir.path().join("qemu-fds");
    let fake = dir.path().join("fake-qemu");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\nls /proc/$$/fd > '{}'\nexec sleep 30\n",
            listing.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // Descriptor 9, as libvirt passes -add-fd descriptors (not close-on-exec).
    let passed = std::fs::File::create(dir.path().join("passed")).unwrap();
    let pfd = std::os::fd::AsRawFd::as_raw_fd(&passed);
    let mut cmd = Command::new(bin("cdp-qemu"));
    cmd.arg("--vm-config")
        .arg(&dom)
        .arg("--qemu")
        .arg(&fake)
        .arg("--config")
        .arg(config(dir.path()))
        .args(["--", "-name", "guest=wrapped", "-blockdev"])
        .arg(format!(
            r#"{{"driver":"file","filename":"{}","node-name":"n"}}"#,
            disk.display()
        ));
    // SAFETY: between fork and exec the closure only calls dup2 (async-signal-safe) on a
    // descriptor this process owns, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(pfd, 9) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut qemu = cmd.spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !listing.exists() || std::fs::read_to_string(&listing).unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the fake QEMU never ran"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let qemu_fds: Vec<String> = std::fs::read_to_string(&listing)
        .unwrap()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert!(
        qemu_fds.contains(&"9".to_string()),
        "QEMU lost fd 9: {qemu_fds:?}"
    );
    // cdpd: find it among QEMU's children.
    let children =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", qemu.id())).unwrap();
    let cdpd: Vec<&str> = children.split_whitespace().collect();
    assert!(!cdpd.is_empty(), "no child under QEMU");
    for pid in cdpd {
        let fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let target = std::fs::read_link(format!("/proc/{pid}/fd/9")).ok();
        assert!(
            target.as_deref() != Some(dir.path().join("passed").as_path()),
            "child {pid} inherited QEMU's fd 9: {fds:?}"
        );
    }
    qemu.kill().unwrap();
    qemu.wait().unwrap();
}
