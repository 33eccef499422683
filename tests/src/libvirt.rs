//! The harness of the libvirt tests (tests/tests/libvirt*.rs): a real
//! libvirtd started by the test with cdpd installed like a product, the host's
//! files saved and put back, the tiny guest as a libvirt domain, the agent's
//! metrics. The tests own host-wide things (/etc/cdp/cdp.toml, libvirtd):
//! nextest runs every binary whose name starts with `libvirt` one test at a
//! time (.config/nextest.toml, group `libvirt`), and scripts/test runs them
//! after every other test.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use cdp_core::config::CONFIG_ENV;

use crate::guest::wait_until;
use crate::{bin, require_tool, run, run_ok};

pub const MIB: usize = 1 << 20;
pub const CONFIG: &str = "/etc/cdp/cdp.toml";
/// The host's CONFIG while a test owns it; put back when the test ends, or
/// by the next test if this one was killed before it could.
pub const SAVED: &str = "/etc/cdp/cdp.toml.cdp-tests-saved";
/// Marks that the host had no CONFIG before a test wrote one.
pub const ABSENT: &str = "/etc/cdp/cdp.toml.cdp-tests-absent";
pub const BIN_DIR: &str = "/usr/local/bin";

pub fn sh(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&run_ok(cmd).stdout).into_owned()
}

pub fn virsh(args: &[&str]) -> String {
    sh(Command::new("virsh")
        .arg("-c")
        .arg("qemu:///system")
        .args(args))
}

pub fn virsh_try(args: &[&str]) -> std::process::Output {
    run(Command::new("virsh")
        .arg("-c")
        .arg("qemu:///system")
        .args(args))
}

/// The installed cdpctl, reading the host config as an operator's would (the
/// harness points every other program at an empty one).
pub fn host_cdpctl() -> Command {
    let mut c = Command::new(Path::new(BIN_DIR).join("cdpctl"));
    c.env(CONFIG_ENV, CONFIG);
    c
}

pub fn pid_of(pidfile: &str) -> Option<i32> {
    let p: i32 = std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()?;
    (!cdp_core::proc::is_gone(p)).then_some(p)
}

/// Save the host's CONFIG (or that there was none) before a test writes its own.
pub fn save_host_config() {
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
pub fn restore_host_config() {
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
pub struct Libvirt {
    pub agent: Option<Child>,
    /// Installed by the Debian package instead of `cdpctl install`: the
    /// host's files as they were before (purged and compared on drop).
    pub package: Option<Snapshot>,
    /// The host's files install touches, as they were before it; and the
    /// config install was given (uninstall reads the same).
    pub host: HostFiles,
    pub dir: std::path::PathBuf,
}

/// The files of the host that `cdpctl install --libvirt` writes, as they are
/// now: path → (mode, length, mtime, content for the small ones); `None`
/// when absent.
#[derive(Debug, PartialEq, Eq)]
pub struct HostFiles(pub Vec<(String, Option<FileState>)>);

/// mode, length, mtime, content (of a small file).
pub type FileState = (u32, u64, i64, Option<Vec<u8>>);

impl HostFiles {
    pub fn paths() -> Vec<String> {
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

    pub fn now() -> HostFiles {
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
    pub fn diff(&self, before: &HostFiles) -> Vec<String> {
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
    pub fn start(dir: &Path, config: &str) -> Libvirt {
        Self::start_with(dir, config, None)
    }

    /// `deb`: install this package (`dpkg -i`) instead of `cdpctl install`.
    pub fn start_with(dir: &Path, config: &str, deb: Option<&Path>) -> Libvirt {
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
    pub fn dpkg_install(&self, deb: &Path) {
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

    pub fn cdpctl_install(&self, install_cfg: &Path) {
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

    pub fn stop_libvirtd() {
        if let Some(p) = pid_of("/run/libvirtd.pid") {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGTERM,
            );
            wait_until("libvirtd to stop", 30, || cdp_core::proc::is_gone(p));
        }
    }

    /// cdp-agent, as its systemd unit would run it (minus systemd).
    pub fn start_agent(&mut self, log: &Path) {
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
    pub fn stop_agent(&mut self) {
        let a = self.agent.take().expect("cdp-agent is running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(a.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let st = crate::wait_child(a, crate::STOP_TIMEOUT).expect("cdp-agent ignored SIGTERM");
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
pub struct Snapshot(pub Vec<(String, Option<Entry>)>);

/// mode, and the bytes of a file (`None`: a directory).
pub type Entry = (u32, Option<Vec<u8>>);

impl Snapshot {
    /// The package's files, libvirt's and AppArmor's files it may touch,
    /// and the directories they are in.
    pub fn paths() -> Vec<String> {
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

    pub fn take() -> Snapshot {
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
    pub fn put_back(&self) -> Vec<String> {
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
    pub fn uninstall(&self) {
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
pub fn shared_tempdir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("cdp-libvirt-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

pub fn config_for(dir: &Path, metrics_port: u16) -> String {
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
pub fn domain_xml(name: &str, uuid: &str, dir: &Path, cmdline: &str) -> String {
    let (kernel, initrd) = crate::guest::build();
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

pub fn define(dir: &Path, xml: &str) {
    let f = dir.join("domain.xml");
    std::fs::write(&f, xml).unwrap();
    virsh(&["define", f.to_str().unwrap()]);
}

/// `cdp.wait` guest: iteration k writes 1 MiB at (k mod 8) MiB filled with
/// (k mod 250) + 1, flushes, prints marker k.
pub fn expected_wait(k: u64) -> Vec<u8> {
    let mut v = vec![0u8; 64 * MIB];
    for j in 1..=k {
        let o = (j % 8) as usize * MIB;
        v[o..o + MIB].fill((j % 250) as u8 + 1);
    }
    v
}

pub fn metrics(port: u16) -> Option<String> {
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
pub fn metric_sum(text: &str, name: &str, label: &str) -> Option<f64> {
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

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
