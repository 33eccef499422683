//! Installed like a product, driven through a real libvirtd that the test
//! starts: `cdpctl install --libvirt` (binaries + hook), `virsh define`,
//! `cdpctl protect`, `virsh start` (the hook prepares, cdp-qemu runs as
//! libvirt-qemu), the guest writes, `virsh destroy`, cdp-agent finishes the
//! shipping, restore at the guest's markers from the repository alone, and
//! `cdpctl unprotect` gives back the definition byte for byte. Also: a VM
//! without CDP keys starts untouched through the same hook even with a broken
//! cdp.toml, and a protected one is then refused with the reason. And the
//! package route: the Debian package of the debug build installed with
//! `dpkg -i`, the same journey, `dpkg --purge`, and every file of libvirt and
//! AppArmor it may touch byte-identical after (the host put back by Drop).
//!
//! These tests own host-wide things (/etc/cdp/cdp.toml, libvirtd), so nextest
//! runs them one at a time (.config/nextest.toml, group `libvirt`). They need
//! root and the packages `scripts/install-deps` installs.

use std::path::Path;
use std::process::{Command, Stdio};

use cdp_core::config::CONFIG_ENV;
use cdp_tests::guest::{follow_markers, wait_until};
use cdp_tests::libvirt::*;
use cdp_tests::{bin, require_tool, run, run_ok};

#[test]
fn protect_start_destroy_ship_restore_unprotect() {
    let dir = shared_tempdir();
    let d = dir.path();
    let port = free_port();
    let mut lv = Libvirt::start(d, &config_for(d, port));
    // No repository directory yet: the hook creates it for QEMU's user.
    let name = "cdp-t-protected";
    let uuid = "3f6c1d2e-9a8b-4c7d-8e6f-5a4b3c2d1e0f";
    let _ = virsh_try(&["destroy", name]);
    let _ = virsh_try(&["undefine", name]);
    define(d, &domain_xml(name, uuid, d, "cdp.wait"));
    let before = virsh(&["dumpxml", "--inactive", "--security-info", name]);

    // protect: says what happens next, and that a baseline is due.
    let out = sh(host_cdpctl().args(["protect", name, "--disk", "vda"]));
    assert!(out.contains("next start"), "{out}");
    assert!(out.contains("full baseline"), "{out}");
    // Shut off and never served: the baseline is taken now, offline, so the
    // first boot is restorable from its first write.
    assert!(out.contains("taken now, offline"), "{out}");
    let protected = virsh(&["dumpxml", "--inactive", name]);
    assert!(
        protected.contains("<emulator>/usr/local/bin/cdp-qemu</emulator>"),
        "{protected}"
    );
    assert!(protected.contains("urn:cdpd:protection:1"), "{protected}");
    // A qcow2 disk, an unknown disk: refused with the fix, definition untouched.
    let bad = run(host_cdpctl().args(["protect", name, "--disk", "vdq"]));
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("vdq"));

    lv.start_agent(&d.join("agent.log"));
    virsh(&["start", name]);
    let serial = d.join("serial.log");
    let mut markers = Vec::new();
    follow_markers(&serial, "CDP-MARKER 4", 120, &mut markers);
    // QEMU runs as libvirt-qemu, through cdp-qemu, its disk on cdpd's socket.
    let sock = d.join("run").join(uuid).join("vda.sock");
    assert!(sock.exists(), "no NBD socket at {}", sock.display());
    let qlog = std::fs::read_to_string(format!("/var/log/libvirt/qemu/{name}.log")).unwrap();
    assert!(!qlog.contains("cdp-qemu: error"), "{qlog}");
    // The agent's RPO gauge for the running VM.
    let mut text = String::new();
    wait_until("cdp_rpo_seconds for the running VM", 30, || {
        text = metrics(port).unwrap_or_default();
        metric_sum(&text, "cdp_rpo_seconds", uuid).is_some()
    });

    virsh(&["destroy", name]);
    let last_marker = markers.iter().map(|m| m.0).max().unwrap();
    // cdp-agent finishes what the VM's shipper left: nothing waits for any target.
    wait_until("an empty backlog after destroy", 90, || {
        text = metrics(port).unwrap_or_default();
        metric_sum(&text, "cdp_backlog_segments", uuid) == Some(0.0)
            && metric_sum(&text, "cdp_vm_running", uuid) == Some(0.0)
    });

    // Restore from the repository alone (state gone) at each marker seen (the
    // first too: protect took the offline baseline before the first boot), and
    // the latest. The agent goes first: it scans the state every second and
    // would write into it while it is removed.
    lv.stop_agent();
    let image_now = std::fs::read(d.join("disk.raw")).unwrap();
    std::fs::remove_dir_all(d.join("state")).unwrap();
    let url = format!("file://{}/repo", d.display());
    // restore POINT into OUT with cdpctl, from the repository alone.
    let restore = |point: &str, out: &Path| {
        sh(host_cdpctl()
            .args(["restore", uuid, "--disk", "vda", "--at", point, "--output"])
            .arg(out)
            .args(["--repo", &url, "--state-dir"])
            .arg(d.join("empty-state")))
    };
    // Every marker, the first included (the guest numbers them from 1).
    let mut seen: Vec<u64> = markers.iter().map(|m| m.0).collect();
    seen.sort_unstable();
    assert_eq!(seen, (1..=last_marker).collect::<Vec<_>>(), "{markers:?}");
    for (k, t) in &markers {
        let out = d.join(format!("at-{k}.raw"));
        restore(t, &out);
        assert!(
            std::fs::read(&out).unwrap() == expected_wait(*k),
            "restore at marker {k} ({t}) differs from what the guest wrote"
        );
    }
    let latest = d.join("latest.raw");
    restore("latest", &latest);
    assert!(
        std::fs::read(&latest).unwrap() == image_now,
        "the latest point differs from the disk after destroy"
    );
    assert!(last_marker >= 4);

    // unprotect: the definition is the one from before protect, byte for byte.
    let out = sh(host_cdpctl().args(["unprotect", name]));
    assert!(out.contains("no longer protected"), "{out}");
    let after = virsh(&["dumpxml", "--inactive", "--security-info", name]);
    assert_eq!(before, after, "unprotect did not restore the definition");
    virsh(&["undefine", name]);
}

/// `xml` with CDP keys whose disk vda names policy "gold", the VM's being
/// "default" (as `virsh edit` would leave it), and `emulator` as QEMU.
fn with_per_disk_policy(xml: &str, uuid: &str, emulator: &str) -> String {
    let qemu = require_tool("qemu-system-x86_64");
    let keys = format!(
        "<uuid>{uuid}</uuid>\n  <metadata><cdp:protection xmlns:cdp=\"urn:cdpd:protection:1\" policy=\"default\" emulator=\"{}\"><cdp:disk target=\"vda\" policy=\"gold\"/></cdp:protection></metadata>",
        qemu.display()
    );
    xml.replacen(&format!("<uuid>{uuid}</uuid>"), &keys, 1)
        .replacen(
            &format!("<emulator>{}</emulator>", qemu.display()),
            &format!("<emulator>{emulator}</emulator>"),
            1,
        )
}

/// Per-disk policy is refused, not silently dropped (docs/LIBVIRT.md,
/// "Per-disk policy"): `cdpctl protect` refuses a definition whose disk names
/// another policy than the VM's, naming the disk and both policies, and
/// leaves it byte-identical; a VM already defined so (emulator cdp-qemu)
/// still starts, and its log carries cdp-qemu's warning.
#[test]
fn per_disk_policy_refused_by_protect_and_warned_at_start() {
    let dir = shared_tempdir();
    let d = dir.path();
    let config = format!(
        "{}[policy.gold]\ntargets = [\"primary\"]\n",
        config_for(d, free_port())
    );
    let lv = Libvirt::start(d, &config);
    let name = "cdp-t-perdisk";
    let uuid = "5e4d3c2b-1a0f-4e9d-8c7b-6a5f4e3d2c1b";
    let _ = virsh_try(&["destroy", name]);
    let _ = virsh_try(&["undefine", name]);
    let plain = domain_xml(name, uuid, d, "cdp.wait");
    let qemu = require_tool("qemu-system-x86_64");
    define(
        d,
        &with_per_disk_policy(&plain, uuid, &qemu.display().to_string()),
    );
    let before = virsh(&["dumpxml", "--inactive", "--security-info", name]);
    assert!(before.contains("policy=\"gold\""), "{before}");
    let r = run(host_cdpctl().args(["protect", name, "--disk", "vda"]));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success(), "protect accepted a per-disk policy");
    assert!(
        err.contains("disk vda") && err.contains("\"gold\"") && err.contains("\"default\""),
        "{err}"
    );
    let after = virsh(&["dumpxml", "--inactive", "--security-info", name]);
    assert_eq!(before, after, "a refused protect changed the definition");

    // Already defined with the key and cdp-qemu: it starts, and says so.
    define(
        d,
        &with_per_disk_policy(&plain, uuid, &format!("{BIN_DIR}/cdp-qemu")),
    );
    let log = format!("/var/log/libvirt/qemu/{name}.log");
    let from = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    virsh(&["start", name]);
    let mut markers = Vec::new();
    follow_markers(&d.join("serial.log"), "CDP-MARKER 1", 120, &mut markers);
    // Captured by cdpd (with the VM's policy), not written around it.
    assert!(d.join("run").join(uuid).join("vda.sock").exists());
    let text = std::fs::read(&log).unwrap();
    let text = String::from_utf8_lossy(&text[from as usize..]);
    let warning = format!("cdp-qemu: warning: {name}: disk vda names policy \"gold\"");
    assert!(text.contains(&warning), "no {warning:?} in {log}:\n{text}");
    assert!(text.contains("VM's policy \"default\""), "{text}");
    virsh(&["destroy", name]);
    virsh(&["undefine", name]);
    drop(lv);
}

#[test]
fn unprotected_vm_starts_untouched_through_the_hook() {
    let dir = shared_tempdir();
    let d = dir.path();
    // A broken config: the hook must not even read it for a VM without keys.
    let lv = Libvirt::start(d, "[paths]\nstate_dri = \"/nowhere\"\n");
    let name = "cdp-t-plain";
    let uuid = "8b7a6c5d-4e3f-4a1b-9c8d-7e6f5a4b3c2d";
    let _ = virsh_try(&["destroy", name]);
    let _ = virsh_try(&["undefine", name]);
    define(d, &domain_xml(name, uuid, d, "cdp.phases=1"));
    virsh(&["start", name]);
    let mut markers = Vec::new();
    follow_markers(&d.join("serial.log"), "CDP-DONE", 120, &mut markers);
    wait_until("the plain VM to power off", 60, || {
        virsh(&["domstate", name]).trim() == "shut off"
    });
    // The guest wrote its phase straight to the file: no cdpd, no run dir.
    let img = std::fs::read(d.join("disk.raw")).unwrap();
    assert!(img[MIB..2 * MIB].iter().all(|b| *b == 1));
    assert!(!Path::new("/run/cdp").join(uuid).exists());

    // The same broken config refuses a protected VM's start, saying why.
    let xml = virsh(&["dumpxml", "--inactive", "--security-info", name]);
    let keyed = xml.replacen(
        &format!("<uuid>{uuid}</uuid>"),
        &format!("<uuid>{uuid}</uuid>\n  <metadata><cdp:protection xmlns:cdp=\"urn:cdpd:protection:1\"><cdp:disk target=\"vda\"/></cdp:protection></metadata>"),
        1,
    );
    define(d, &keyed);
    let r = virsh_try(&["start", name]);
    assert!(
        !r.status.success(),
        "a protected VM started with a broken config"
    );
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("state_dri") || err.contains(CONFIG), "{err}");
    virsh(&["undefine", name]);
    drop(lv);
}

/// The Debian package of the debug build (the binaries the tests run),
/// packaged by `cargo deb --no-build` as tests/tests/install.rs does.
fn debug_deb(tmp: &Path) -> std::path::PathBuf {
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let target = tmp.join("target");
    std::fs::create_dir_all(target.join("release")).unwrap();
    for p in ["cdpd", "cdp-shipper", "cdp-qemu", "cdpctl", "cdp-agent"] {
        let to = target.join("release").join(p);
        if std::fs::hard_link(bin(p), &to).is_err() {
            std::fs::copy(bin(p), &to).unwrap();
        }
    }
    run_ok(
        Command::new("bash")
            .arg(ws.join("scripts/package"))
            .arg("--gen-only")
            .env("CARGO_TARGET_DIR", &target)
            .current_dir(ws),
    );
    let out = tmp.join("deb");
    run_ok(
        Command::new("cargo")
            .args(["deb", "-p", "cdp-tools", "--no-build", "--fast", "-o"])
            .arg(&out)
            .env("CARGO_TARGET_DIR", &target)
            .current_dir(ws),
    );
    std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("no .deb written")
}

/// The operator's journey by the package route: `dpkg -i` of the package,
/// `cdpctl install` refused over it, the package's own `cdpctl install
/// --libvirt` (as postinst suggests for AppArmor), protect, boot, write, ship, restore
/// byte-exact at each marker, export, verify, unprotect, `dpkg --purge`: every file
/// of libvirt and AppArmor the package may touch is byte-identical after
/// (empty ones included) and nothing of the package is left (Drop checks it
/// and puts the host back even when the test fails).
#[test]
fn package_route_install_protect_restore_export_verify_unprotect_purge() {
    let t = std::time::Instant::now();
    let dir = shared_tempdir();
    let d = dir.path();
    let deb = debug_deb(d);
    eprintln!("package built in {:?}", t.elapsed());
    let port = free_port();
    let mut lv = Libvirt::start_with(d, &config_for(d, port), Some(&deb));
    let cdpctl = || {
        let mut c = Command::new("/usr/bin/cdpctl");
        c.env(CONFIG_ENV, CONFIG);
        c
    };
    // The reverse of the package over `cdpctl install`: a build's cdpctl
    // copying its programs beside the package's is refused, explained.
    let r = run(Command::new(bin("cdpctl"))
        .args(["install", "--libvirt", "--bin-dir", BIN_DIR, "--config"])
        .arg(d.join("install.toml")));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success(),
        "cdpctl install over the package: {err}"
    );
    assert!(err.contains("the cdpd package is installed"), "{err}");
    // What postinst tells an AppArmor host to run: the package's cdpctl adds
    // its block to libvirt's files; purge (prerm) must take it back.
    sh(cdpctl().args(["install", "--libvirt"]));

    let name = "cdp-t-package";
    let uuid = "5a4b3c2d-1e0f-4a9b-8c7d-6e5f4a3b2c1d";
    let _ = virsh_try(&["destroy", name]);
    let _ = virsh_try(&["undefine", name]);
    define(d, &domain_xml(name, uuid, d, "cdp.wait"));
    let before = virsh(&["dumpxml", "--inactive", "--security-info", name]);
    sh(cdpctl().args(["protect", name, "--disk", "vda"]));
    let protected = virsh(&["dumpxml", "--inactive", name]);
    assert!(
        protected.contains("<emulator>/usr/bin/cdp-qemu</emulator>"),
        "{protected}"
    );

    // cdp-agent as the package's unit runs it.
    let agent = Command::new("/usr/bin/cdp-agent")
        .args(["run", "--config", CONFIG])
        .env(CONFIG_ENV, CONFIG)
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(d.join("agent.log")).unwrap())
        .spawn()
        .unwrap();
    lv.agent = Some(agent);
    virsh(&["start", name]);
    let mut markers = Vec::new();
    follow_markers(&d.join("serial.log"), "CDP-MARKER 3", 120, &mut markers);
    virsh(&["destroy", name]);
    wait_until("an empty backlog after destroy", 90, || {
        let text = metrics(port).unwrap_or_default();
        metric_sum(&text, "cdp_backlog_segments", uuid) == Some(0.0)
            && metric_sum(&text, "cdp_vm_running", uuid) == Some(0.0)
    });
    lv.stop_agent();

    // From the repository alone: each marker byte-exact, then verify.
    std::fs::remove_dir_all(d.join("state")).unwrap();
    let url = format!("file://{}/repo", d.display());
    for (k, at) in markers.iter().filter(|m| m.0 >= 1) {
        let out = d.join(format!("at-{k}.raw"));
        sh(cdpctl()
            .args(["restore", uuid, "--disk", "vda", "--at", at, "--output"])
            .arg(&out)
            .args(["--repo", &url, "--state-dir"])
            .arg(d.join("empty-state")));
        assert!(
            std::fs::read(&out).unwrap() == expected_wait(*k),
            "restore at marker {k} ({at}) differs from what the guest wrote"
        );
    }
    // export: the last marker's point over NBD, read back whole by qemu-img.
    let (k, at) = markers.iter().max_by_key(|m| m.0).unwrap().clone();
    let sock = d.join("export.sock");
    let mut export = cdpctl()
        .args(["export", uuid, "--disk", "vda", "--at", &at, "--socket"])
        .arg(&sock)
        .args(["--ready-fd", "1", "--repo", &url, "--state-dir"])
        .arg(d.join("empty-state"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(d.join("export.log")).unwrap())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(export.stdout.take().unwrap()),
        &mut ready,
    )
    .unwrap();
    assert!(
        ready.starts_with("READY"),
        "export: {ready:?} {}",
        std::fs::read_to_string(d.join("export.log")).unwrap_or_default()
    );
    let exported = d.join("exported.raw");
    sh(Command::new(require_tool("qemu-img"))
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(format!("nbd+unix:///vda?socket={}", sock.display()))
        .arg(&exported));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(export.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let st =
        cdp_tests::wait_child(export, cdp_tests::STOP_TIMEOUT).expect("export ignored SIGTERM");
    assert!(st.success(), "export exited with {st}");
    assert!(
        std::fs::read(&exported).unwrap() == expected_wait(k),
        "the export at marker {k} ({at}) differs from what the guest wrote"
    );
    sh(cdpctl()
        .args(["verify", uuid, "--deep", "--repo", &url, "--state-dir"])
        .arg(d.join("empty-state")));

    let out = sh(cdpctl().args(["unprotect", name]));
    assert!(out.contains("no longer protected"), "{out}");
    let after = virsh(&["dumpxml", "--inactive", "--security-info", name]);
    assert_eq!(before, after, "unprotect did not restore the definition");
    virsh(&["undefine", name]);
    // Drop: dpkg --purge, then every snapshotted file as before.
    drop(lv);
    assert!(
        !run(Command::new("dpkg").args(["-s", "cdpd"]))
            .status
            .success(),
        "the package is still installed"
    );
    eprintln!("package route: {:?}", t.elapsed());
}
