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

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use cdp_core::config::CONFIG_ENV;
use cdp_tests::guest::{follow_markers, wait_until};
use cdp_tests::{bin, require_tool, run, run_ok};

const MIB: usize = 1 << 20;
const CONFIG: &str = "/etc/cdp/cdp.toml";
/// The host's CONFIG while a test owns it; put back when the test ends, or
/// by the next test if this one was killed before it could.
const SAVED: &str = "/etc/cdp/cdp.toml.cdp-tests-saved";
/// Marks that the host had no CONFIG before a test wrote one.
const ABSENT: &str = "/etc/cdp/cdp.toml.cdp-tests-absent";
const BIN_DIR: &str = "/usr/local/bin";

fn sh(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&run_ok(cmd).stdout).into_owned()
}

fn virsh(args: &[&str]) -> String {
    sh(Command::new("virsh")
        .arg("-c")
        .arg("qemu:///system")
        .args(args))
}

fn virsh_try(args: &[&str]) -> std::process::Output {
    run(Command::new("virsh")
        .arg("-c")
        .arg("qemu:///system")
        .args(args))
}

/// The installed cdpctl, reading the host config as an operator's would (the
/// harness points every other program at an empty one).
fn host_cdpctl() -> Command {
    let mut c = Command::new(Path::new(BIN_DIR).join("cdpctl"));
    c.env(CONFIG_ENV, CONFIG);
    c
}

fn pid_of(pidfile: &str) -> Option<i32> {
    let p: i32 = std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()?;
    (!cdp_core::proc::is_gone(p)).then_some(p)
}

/// Save the host's CONFIG (or that there was none) before a test writes its own.
fn save_host_config() {
    restore_host_config();
    let had_dir = Path::new("/etc/cdp").exists();
    std::fs::create_dir_all("/etc/cdp").unwrap();
    if Path::new(CONFIG).exists() {
        std::fs::copy(CONFIG, SAVED).unwrap();
    } else {
        // "dir": /etc/cdp was there; "": it was not either.
        std::fs::write(ABSENT, if had_dir { "dir" } else { "" }).unwrap();
    }
}

/// Put the host's CONFIG back as [`save_host_config`] found it (a no-op when
/// nothing is saved).
fn restore_host_config() {
    if Path::new(SAVED).exists() {
        std::fs::rename(SAVED, CONFIG).unwrap();
    } else if Path::new(ABSENT).exists() {
        let had_dir = std::fs::read_to_string(ABSENT).unwrap() == "dir";
        let _ = std::fs::remove_file(CONFIG);
        std::fs::remove_file(ABSENT).unwrap();
        if !had_dir {
            // Only if empty: anything else in it is not the test's to remove.
            let _ = std::fs::remove_dir("/etc/cdp");
        }
    }
}

/// libvirtd started by the test (after the hook is installed: libvirt scans
/// hooks only when it starts), stopped when dropped. /etc/cdp/cdp.toml is
/// the test's while it lives and restored after (by the next test if this
/// one is killed).
struct Libvirt {
    agent: Option<Child>,
    /// Installed by the Debian package instead of `cdpctl install`: the
    /// host's files as they were before (purged and compared on drop).
    package: Option<Snapshot>,
    /// The host's files install touches, as they were before it; and the
    /// config install was given (uninstall reads the same).
    host: HostFiles,
    dir: std::path::PathBuf,
}

/// The files of the host that `cdpctl install --libvirt` writes, as they are
/// now: path → (mode, length, mtime, content for the small ones); `None`
/// when absent.
#[derive(Debug, PartialEq, Eq)]
struct HostFiles(Vec<(String, Option<FileState>)>);

/// mode, length, mtime, content (of a small file).
type FileState = (u32, u64, i64, Option<Vec<u8>>);

impl HostFiles {
    fn paths() -> Vec<String> {
        let mut v: Vec<String> = ["cdpd", "cdp-shipper", "cdp-qemu", "cdpctl", "cdp-agent"]
            .iter()
            .map(|b| format!("{BIN_DIR}/{b}"))
            .collect();
        v.extend(
            [
                "/etc/libvirt/hooks/qemu.d/cdp",
                "/etc/apparmor.d/local/abstractions/libvirt-qemu",
                "/etc/apparmor.d/cdpd",
                "/var/lib/cdpctl/install.manifest",
                "/var/lib/cdpctl",
            ]
            .map(String::from),
        );
        v
    }

    fn now() -> HostFiles {
        use std::os::unix::fs::MetadataExt;
        HostFiles(
            Self::paths()
                .into_iter()
                .map(|p| {
                    let m = std::fs::symlink_metadata(&p).ok().map(|m| {
                        let small = m.is_file() && m.len() < MIB as u64;
                        let content = small.then(|| std::fs::read(&p).unwrap());
                        // A directory's mtime changes with what is in it; a
                        // small file's content is compared instead.
                        let mtime = if m.is_dir() || small { 0 } else { m.mtime() };
                        (m.mode(), m.len() * u64::from(!m.is_dir()), mtime, content)
                    });
                    (p, m)
                })
                .collect(),
        )
    }

    /// What differs from `before`, one line a path.
    fn diff(&self, before: &HostFiles) -> Vec<String> {
        let show = |e: &Option<FileState>| match e {
            None => "absent".to_string(),
            Some((mode, len, mtime, _)) => format!("mode {mode:o}, {len} bytes, mtime {mtime}"),
        };
        before
            .0
            .iter()
            .zip(&self.0)
            .filter(|(a, b)| a != b)
            .map(|((p, a), (_, b))| format!("{p}: before {}, after {}", show(a), show(b)))
            .collect()
    }
}

impl Libvirt {
    fn start(dir: &Path, config: &str) -> Libvirt {
        Self::start_with(dir, config, None)
    }

    /// `deb`: install this package (`dpkg -i`) instead of `cdpctl install`.
    fn start_with(dir: &Path, config: &str, deb: Option<&Path>) -> Libvirt {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the libvirt tests need root (libvirtd, /etc/libvirt/hooks, chown to libvirt-qemu)"
        );
        require_tool("virsh");
        assert!(
            Path::new("/usr/sbin/libvirtd").exists(),
            "libvirtd is not installed: run `bash scripts/install-deps`"
        );
        // Otherwise libvirt re-probes QEMU on every call (TESTING.md).
        if Path::new("/dev/kvm").exists() {
            let _ = run(Command::new("chgrp").args(["kvm", "/dev/kvm"]));
            let _ = std::fs::set_permissions("/dev/kvm", std::fs::Permissions::from_mode(0o660));
        }
        // Before anything is written (save_host_config may create /etc/cdp).
        let snapshot = deb.map(|_| Snapshot::take());
        // From here on, Drop puts CONFIG back and stops libvirtd, even if a step fails.
        save_host_config();
        // The product as an operator installs it: programs and the hook
        // (with a config of the test's own paths: CONFIG may be broken below).
        // Drop uninstalls it and checks the host is as before.
        let install_cfg = dir.join("install.toml");
        std::fs::write(&install_cfg, config_for(dir, 0)).unwrap();
        let mut lv = Libvirt {
            agent: None,
            package: None,
            host: HostFiles::now(),
            dir: dir.to_path_buf(),
        };
        if let Some(deb) = deb {
            lv.package = snapshot;
            lv.dpkg_install(deb);
        } else {
            lv.cdpctl_install(&install_cfg);
        }
        std::fs::create_dir_all("/etc/cdp").unwrap();
        std::fs::write(CONFIG, config).unwrap();
        Self::stop_libvirtd();
        // libvirtd (and so the hook, cdp-qemu and cdpd it starts) runs as in
        // production: no CDP_CONFIG, the host's CONFIG.
        if pid_of("/run/virtlogd.pid").is_none() {
            run_ok(Command::new("virtlogd").arg("-d").env_remove(CONFIG_ENV));
        }
        run_ok(Command::new("libvirtd").arg("-d").env_remove(CONFIG_ENV));
        wait_until("libvirtd's socket", 30, || {
            virsh_try(&["version"]).status.success()
        });
        lv
    }

    /// The package route: `dpkg -i`, non-interactive (no conffile question).
    fn dpkg_install(&self, deb: &Path) {
        let out = run(Command::new("dpkg")
            .args(["--force-confdef", "--force-confold", "-i"])
            .arg(deb)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null()));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("dpkg -i:\n{text}");
        assert!(out.status.success(), "dpkg -i failed: {text}");
        assert!(Path::new("/etc/libvirt/hooks/qemu.d/cdp").exists());
    }

    fn cdpctl_install(&self, install_cfg: &Path) {
        let out = sh(Command::new(bin("cdpctl"))
            .args(["install", "--libvirt", "--bin-dir", BIN_DIR, "--config"])
            .arg(install_cfg));
        eprintln!("cdpctl install --libvirt:\n{out}");
        assert!(Path::new("/etc/libvirt/hooks/qemu.d/cdp").exists());
        // Without systemd, install says how to run the agent instead.
        if !Path::new("/run/systemd/system").exists() {
            let run = "systemd is not running here (no /run/systemd/system)";
            assert!(
                out.contains(run) && out.contains(&format!("{BIN_DIR}/cdp-agent run")),
                "{out}"
            );
        }
    }

    fn stop_libvirtd() {
        if let Some(p) = pid_of("/run/libvirtd.pid") {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGTERM,
            );
            wait_until("libvirtd to stop", 30, || cdp_core::proc::is_gone(p));
        }
    }

    /// cdp-agent, as its systemd unit would run it (minus systemd).
    fn start_agent(&mut self, log: &Path) {
        let child = Command::new(Path::new(BIN_DIR).join("cdp-agent"))
            .args(["run", "--config", CONFIG])
            .env(CONFIG_ENV, CONFIG)
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        self.agent = Some(child);
    }

    /// SIGTERM to cdp-agent; it must exit cleanly.
    fn stop_agent(&mut self) {
        let a = self.agent.take().expect("cdp-agent is running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(a.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let st =
            cdp_tests::wait_child(a, cdp_tests::STOP_TIMEOUT).expect("cdp-agent ignored SIGTERM");
        assert!(st.success(), "cdp-agent exited with {st}");
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
        for name in virsh_try(&["list", "--name"])
            .stdout
            .split(|b| *b == b'\n')
            .map(|l| String::from_utf8_lossy(l).trim().to_string())
            .filter(|l| l.starts_with("cdp-t-"))
        {
            let _ = virsh_try(&["destroy", &name]);
        }
        Self::stop_libvirtd();
        match self.package.take() {
            Some(before) => {
                for d in ["state", "run"] {
                    let _ = std::fs::remove_dir_all(self.dir.join(d));
                }
                let purge = run(Command::new("dpkg")
                    .args(["--purge", "cdpd"])
                    .env("DEBIAN_FRONTEND", "noninteractive")
                    .stdin(Stdio::null()));
                restore_host_config();
                let diff = before.put_back();
                let problem = if !purge.status.success() {
                    Some(format!(
                        "dpkg --purge cdpd failed: {}",
                        String::from_utf8_lossy(&purge.stderr)
                    ))
                } else if !diff.is_empty() {
                    Some(format!(
                        "the package route left the host changed (now put back):\n{}",
                        diff.join("\n")
                    ))
                } else {
                    None
                };
                if let Some(p) = problem {
                    if std::thread::panicking() {
                        eprintln!("{p}");
                    } else {
                        panic!("{p}");
                    }
                }
            }
            None => {
                restore_host_config();
                self.uninstall();
            }
        }
    }
}

/// Every file of the host that the package route may touch, with its mode
/// and bytes (empty files included; `None`: absent), so that a test puts
/// the host back exactly as it found it.
struct Snapshot(Vec<(String, Option<Entry>)>);

/// mode, and the bytes of a file (`None`: a directory).
type Entry = (u32, Option<Vec<u8>>);

impl Snapshot {
    /// The package's files, libvirt's and AppArmor's files it may touch,
    /// and the directories they are in.
    fn paths() -> Vec<String> {
        let mut v: Vec<String> = ["cdpd", "cdp-shipper", "cdp-qemu", "cdpctl", "cdp-agent"]
            .iter()
            .map(|b| format!("/usr/bin/{b}"))
            .collect();
        v.extend(
            [
                "/etc/libvirt/hooks/qemu.d/cdp",
                "/etc/libvirt/hooks/qemu.d",
                "/etc/libvirt/hooks",
                "/etc/apparmor.d/local/abstractions/libvirt-qemu",
                "/etc/apparmor.d/abstractions/libvirt-qemu",
                "/etc/apparmor.d/libvirt/TEMPLATE.qemu",
                "/etc/apparmor.d/local/usr.sbin.libvirtd",
                "/etc/apparmor.d/usr.sbin.libvirtd",
                "/etc/apparmor.d/cdpd",
                "/etc/cdp/cdp.toml",
                "/etc/cdp",
                "/usr/lib/systemd/system/cdp-agent.service",
                "/etc/systemd/system/cdp-agent.service",
                "/etc/systemd/system/multi-user.target.wants/cdp-agent.service",
                "/usr/share/man/man1/cdpctl.1.gz",
                "/usr/share/man/man1/cdpctl-restore.1.gz",
                "/usr/share/bash-completion/completions/cdpctl",
                "/usr/share/zsh/vendor-completions/_cdpctl",
                "/usr/share/fish/vendor_completions.d/cdpctl.fish",
                "/usr/share/cdpd",
                "/usr/share/doc/cdpd",
                "/var/lib/cdp",
                "/var/lib/cdpctl",
                "/usr/local/bin/cdpctl",
            ]
            .map(String::from),
        );
        v
    }

    fn take() -> Snapshot {
        use std::os::unix::fs::MetadataExt;
        Snapshot(
            Self::paths()
                .into_iter()
                .map(|p| {
                    let m = std::fs::symlink_metadata(&p).ok().map(|m| {
                        let bytes = (!m.is_dir()).then(|| std::fs::read(&p).unwrap());
                        (m.mode(), bytes)
                    });
                    (p, m)
                })
                .collect(),
        )
    }

    /// What differs now, one line a path; then each path is put back as it
    /// was (a file written with its bytes and mode, what was absent removed).
    fn put_back(&self) -> Vec<String> {
        let now = Snapshot::take();
        let show = |e: &Option<Entry>| match e {
            None => "absent".to_string(),
            Some((mode, None)) => format!("directory, mode {mode:o}"),
            Some((mode, Some(b))) => format!("mode {mode:o}, {} bytes", b.len()),
        };
        let mut diff = Vec::new();
        // Files first, directories last (deepest first): in reverse order.
        for ((p, was), (_, is)) in self.0.iter().zip(&now.0).rev() {
            if was == is {
                continue;
            }
            // dpkg removes the empty directories of a purged package that no
            // other package owns: qemu.d (libvirt's package ships only
            // hooks/) is put back below but not counted.
            if p != "/etc/libvirt/hooks/qemu.d" {
                diff.push(format!("{p}: before {}, after {}", show(was), show(is)));
            }
            match was {
                None if is.as_ref().is_some_and(|(_, b)| b.is_none()) => {
                    let _ = std::fs::remove_dir_all(p);
                }
                None => {
                    let _ = std::fs::remove_file(p);
                }
                Some((_, None)) => {
                    let _ = std::fs::create_dir_all(p);
                }
                Some((mode, Some(bytes))) => {
                    let _ = std::fs::write(p, bytes);
                    let _ = std::fs::set_permissions(
                        p,
                        std::fs::Permissions::from_mode(*mode & 0o7777),
                    );
                }
            }
        }
        diff
    }
}

impl Libvirt {
    /// Take away what the test installed; the host's files as before (a
    /// failure to do so fails the test, unless it is failing already).
    fn uninstall(&self) {
        // The state and run directories of install.toml hold what the test's
        // VMs left (in the test's directory): gone first, so that uninstall
        // finds nothing of the install left.
        for d in ["state", "run"] {
            let _ = std::fs::remove_dir_all(self.dir.join(d));
        }
        let out = run(Command::new(bin("cdpctl"))
            .args(["uninstall", "--libvirt", "--bin-dir", BIN_DIR, "--config"])
            .arg(self.dir.join("install.toml")));
        eprintln!(
            "cdpctl uninstall --libvirt:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let diff = HostFiles::now().diff(&self.host);
        let problem = if !out.status.success() {
            Some(format!("cdpctl uninstall failed: {}", out.status))
        } else if !diff.is_empty() {
            Some(format!(
                "the test left the host changed:\n{}",
                diff.join("\n")
            ))
        } else {
            None
        };
        if let Some(p) = problem {
            if std::thread::panicking() {
                eprintln!("{p}");
            } else {
                panic!("{p}");
            }
        }
    }
}

/// A directory libvirt-qemu can traverse (tempdirs are 0700).
fn shared_tempdir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("cdp-libvirt-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

fn config_for(dir: &Path, metrics_port: u16) -> String {
    format!(
        r#"[paths]
state_dir = "{0}/state"
run_dir = "{0}/run"
[target.primary]
url = "file://{0}/repo"
[policy.default]
targets = ["primary"]
segment_age = "200ms"
[agent]
metrics_listen = "127.0.0.1:{metrics_port}"
scan_interval = "1s"
"#,
        dir.display()
    )
}

/// A domain booting the tiny guest with direct kernel boot, one raw disk.
fn domain_xml(name: &str, uuid: &str, dir: &Path, cmdline: &str) -> String {
    let (kernel, initrd) = cdp_tests::guest::build();
    for f in [&kernel, &initrd] {
        std::fs::copy(f, dir.join(f.file_name().unwrap())).unwrap();
    }
    let disk = dir.join("disk.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 * MIB as u64)
        .unwrap();
    let qemu = require_tool("qemu-system-x86_64");
    format!(
        r#"<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{d}/vmlinuz</kernel>
    <initrd>{d}/initramfs.gz</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 {cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <devices>
    <emulator>{qemu}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'><source path='{d}/serial.log'/></serial>
    <console type='file'><source path='{d}/serial.log'/><target type='serial'/></console>
  </devices>
</domain>
"#,
        d = dir.display(),
        qemu = qemu.display(),
        disk = disk.display()
    )
}

fn define(dir: &Path, xml: &str) {
    let f = dir.join("domain.xml");
    std::fs::write(&f, xml).unwrap();
    virsh(&["define", f.to_str().unwrap()]);
}

/// `cdp.wait` guest: iteration k writes 1 MiB at (k mod 8) MiB filled with
/// (k mod 250) + 1, flushes, prints marker k.
fn expected_wait(k: u64) -> Vec<u8> {
    let mut v = vec![0u8; 64 * MIB];
    for j in 1..=k {
        let o = (j % 8) as usize * MIB;
        v[o..o + MIB].fill((j % 250) as u8 + 1);
    }
    v
}

fn metrics(port: u16) -> Option<String> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

/// The sum of a metric's samples whose labels contain `label`.
fn metric_sum(text: &str, name: &str, label: &str) -> Option<f64> {
    let mut found = None;
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = l.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) || !rest.contains(label) {
            continue;
        }
        let v: f64 = rest.rsplit(' ').next()?.parse().ok()?;
        *found.get_or_insert(0.0) += v;
    }
    found
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

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
