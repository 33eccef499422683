//! Helpers for tests that build a real repository: a daemon, a file://
//! target, qemu-io phases of writes, cdpctl with the daemon's directories.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::{bin, require_tool, run, run_ok, Daemon};

/// A config with one file:// target `primary` at `repo`, used by policy `default`.
pub fn config(d: &Daemon, repo: &Path) -> PathBuf {
    let p = d.work_dir().join("cdp.toml");
    std::fs::write(
        &p,
        format!(
            "[target.primary]\nurl = \"file://{}\"\n[policy.default]\ntargets = [\"primary\"]\n",
            repo.display()
        ),
    )
    .unwrap();
    p
}

/// [`config`] with the journal's free-space floor off (`journal_min_free =
/// "0%"` in policy `default`), made the config of every program the test
/// starts from now on (cdpd included, through `CDP_CONFIG`): for tests about
/// something else than a full journal, on a machine whose filesystem may be
/// fuller than the default floor (every write would be degraded).
pub fn config_without_space_floor(d: &Daemon, repo: &Path) -> PathBuf {
    let p = config(d, repo);
    let mut text = std::fs::read_to_string(&p).unwrap();
    text.push_str("journal_min_free = \"0%\"\n");
    std::fs::write(&p, text).unwrap();
    // After the harness's own setting (a Once), never overwritten by it.
    crate::isolate_from_host_config();
    std::env::set_var(cdp_core::config::CONFIG_ENV, &p);
    p
}

/// Run qemu-io commands against a disk's export (writeback: FUA only where asked).
pub fn qemu_io(d: &Daemon, disk: &str, cmds: &[String]) {
    let mut c = Command::new(require_tool("qemu-io"));
    c.args(["-f", "raw", "-t", "writeback"]).arg(d.uri(disk));
    for x in cmds {
        c.arg("-c").arg(x);
    }
    run_ok(&mut c);
}

/// The command: cdpctl with this daemon's directories and `cfg`.
pub fn cdpctl_cmd(d: &Daemon, cfg: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(bin("cdpctl"));
    c.args(args)
        .arg("--state-dir")
        .arg(&d.state_dir)
        .arg("--run-dir")
        .arg(&d.run_dir)
        .arg("--config")
        .arg(cfg);
    c
}

/// cdpctl with this daemon's directories and `cfg`; the output, whatever the status.
pub fn cdpctl_out(d: &Daemon, cfg: &Path, args: &[&str]) -> Output {
    run(&mut cdpctl_cmd(d, cfg, args))
}

/// The command: `cdp-shipper run --once` with this daemon's directories and `cfg`.
pub fn shipper_once_cmd(d: &Daemon, cfg: &Path) -> Command {
    let mut c = Command::new(bin("cdp-shipper"));
    c.args(["run", "--once", "--vm-uuid", &d.vm_uuid])
        .arg("--state-dir")
        .arg(&d.state_dir)
        .arg("--run-dir")
        .arg(&d.run_dir)
        .arg("--config")
        .arg(cfg);
    c
}

/// [`cdpctl_out`] that must succeed; its stdout.
pub fn cdpctl(d: &Daemon, cfg: &Path, args: &[&str]) -> String {
    let out = cdpctl_out(d, cfg, args);
    assert!(
        out.status.success(),
        "cdpctl {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A phase of writes in the first 8 MiB: overlapping, with zeroes and
/// discards, then a flush.
pub fn phase(i: u64) -> Vec<String> {
    let mut v = Vec::new();
    for k in 0..12u64 {
        let off = ((i * 13 + k * 7) % 120) * 64 * 1024;
        v.push(format!(
            "write -P {} {off} {}",
            (i * 16 + k) % 255 + 1,
            4096 * (1 + (k % 5))
        ));
    }
    v.push(format!("write -z {} 64k", ((i * 5) % 100) * 64 * 1024));
    v.push(format!("discard {} 128k", ((i * 11) % 90) * 64 * 1024));
    v.push("flush".into());
    v
}

/// A small tmpfs mounted over a directory; lazily unmounted on drop.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts it, or fails the test saying why it cannot (never a skip: a
    /// full disk is only testable on a small filesystem of its own).
    pub fn mount(at: &std::path::Path, size: &str) -> Tmpfs {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test mounts a small tmpfs to fill the journal's disk: it needs root \
             (run the suite as root, as scripts/test does in CI)"
        );
        let out = crate::run(
            Command::new(crate::require_tool("mount"))
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={size},mode=0755"),
                    "cdp-test",
                ])
                .arg(at),
        );
        assert!(
            out.status.success(),
            "cannot mount a {size} tmpfs at {} (needs root and the right to mount in \
             this mount namespace; in a container, CAP_SYS_ADMIN): {}",
            at.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_path_buf())
    }

    pub fn resize(&self, size: &str) {
        crate::run_ok(
            Command::new("mount")
                .args(["-o", &format!("remount,size={size}")])
                .arg(&self.0),
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// `cdpctl restore VM --disk DISK --at latest --no-local` from the `file://`
/// repository `repo` alone, then the result must equal the disk's image.
pub fn assert_repo_restores_image(d: &Daemon, cfg: &Path, repo: &Path, disk: &str) {
    let out = d.work_dir().join(format!("restored-{disk}.img"));
    restore_from_repo_ok(d, cfg, repo, disk, "latest", &out);
    crate::assert_files_equal(&out, &d.image(disk));
}

/// A shell script run as `uid:gid` (an attacker in the attack tests); it
/// must succeed (the attack is real).
pub fn as_user(uid: u32, gid: u32, script: &str) {
    use std::os::unix::process::CommandExt;
    let out = Command::new("sh")
        .arg("-ec")
        .arg(script)
        .uid(uid)
        .gid(gid)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the attacker (uid {uid}) failed: {script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `cdpctl restore VM --disk DISK --at AT --no-local --output OUT --repo
/// file://REPO` (OUT removed first); the output, whatever the status.
pub fn restore_from_repo(
    d: &Daemon,
    cfg: &Path,
    repo: &Path,
    disk: &str,
    at: &str,
    out: &Path,
) -> Output {
    let _ = std::fs::remove_file(out);
    let url = format!("file://{}", repo.display());
    let args = [
        "restore",
        &d.vm_uuid,
        "--disk",
        disk,
        "--at",
        at,
        "--no-local",
        "--output",
        out.to_str().unwrap(),
        "--repo",
        &url,
    ];
    cdpctl_out(d, cfg, &args)
}

/// [`restore_from_repo`] that must succeed.
pub fn restore_from_repo_ok(d: &Daemon, cfg: &Path, repo: &Path, disk: &str, at: &str, out: &Path) {
    let o = restore_from_repo(d, cfg, repo, disk, at, out);
    assert!(
        o.status.success(),
        "cdpctl restore --at {at}: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// qemu-io commands against a disk's export (writeback); every one must
/// succeed, and the guest must see no error: the output.
pub fn qemu_io_ok(d: &Daemon, disk: &str, cmds: &[String]) -> String {
    let mut c = Command::new(require_tool("qemu-io"));
    c.args(["-f", "raw", "-t", "writeback"]).arg(d.uri(disk));
    for x in cmds {
        c.arg("-c").arg(x);
    }
    let out = run(&mut c);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let lower = text.to_lowercase();
    assert!(
        out.status.success() && !lower.contains("error") && !lower.contains("failed"),
        "the guest saw an I/O error:\n{text}"
    );
    text
}

/// A new boot id in the file `name` of the work directory (for
/// `--boot-id-file`: another boot id fakes a reboot).
pub fn write_boot_id(d: &Daemon, name: &str) -> PathBuf {
    let p = d.work_dir().join(name);
    std::fs::write(&p, format!("{}\n", uuid::Uuid::new_v4())).unwrap();
    p
}

/// A number of the first disk's status in `cdpctl status --json`.
pub fn disk_status_u64(d: &Daemon, key: &str) -> u64 {
    let s = d.status_json()["disks"][0].clone();
    s[key]
        .as_u64()
        .unwrap_or_else(|| panic!("status has no {key}: {s}"))
}

/// A child killed (and reaped) when dropped, so a failing test leaves no
/// QEMU, shipper or agent running.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Write at `path` a libvirt domain definition named `name` with `uuid`,
/// protecting its one raw disk `vda` backed by the file `disk`.
pub fn write_protected_domain_xml(path: &Path, name: &str, uuid: &str, disk: &Path) {
    std::fs::write(
        path,
        format!(
            r#"<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <metadata>
    <cdp:protection xmlns:cdp="urn:cdpd:protection:1"><cdp:disk target="vda"/></cdp:protection>
  </metadata>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>"#,
            disk.display()
        ),
    )
    .unwrap();
}

/// `cdp-shipper run --poll 50ms` for this daemon's VM as `uid:uid`, with
/// `cfg` and the VM definition `xml`; its stderr to `log`.
pub fn spawn_shipper_as(d: &Daemon, cfg: &Path, xml: &Path, uid: u32, log: &Path) -> KillOnDrop {
    use std::os::unix::process::CommandExt;
    let log = std::fs::File::create(log).unwrap();
    KillOnDrop(
        Command::new(bin("cdp-shipper"))
            .args(["run", "--vm-uuid", &d.vm_uuid, "--poll", "50ms"])
            .arg("--state-dir")
            .arg(&d.state_dir)
            .arg("--run-dir")
            .arg(&d.run_dir)
            .arg("--config")
            .arg(cfg)
            .arg("--vm-config")
            .arg(xml)
            .uid(uid)
            .gid(uid)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

/// QEMU's monitor, over QMP.
pub struct Qmp {
    w: std::os::unix::net::UnixStream,
    r: std::io::BufReader<std::os::unix::net::UnixStream>,
}

impl Qmp {
    /// Connect once QEMU's monitor socket `path` accepts (at most 60 s),
    /// read the greeting and negotiate capabilities.
    pub fn connect(path: &Path) -> Qmp {
        use std::os::unix::net::UnixStream;
        crate::guest::wait_until("QEMU's monitor socket", 60, || {
            UnixStream::connect(path).is_ok()
        });
        let w = UnixStream::connect(path).unwrap();
        // Long enough for QEMU's NBD client to reconnect (it waits up to 60 s).
        w.set_read_timeout(Some(std::time::Duration::from_secs(90)))
            .unwrap();
        let mut q = Qmp {
            r: std::io::BufReader::new(w.try_clone().unwrap()),
            w,
        };
        let greeting = q.line();
        assert!(greeting.contains("\"QMP\""), "{greeting}");
        q.call(r#"{"execute":"qmp_capabilities"}"#);
        q
    }

    fn line(&mut self) -> String {
        use std::io::BufRead;
        let mut s = String::new();
        self.r.read_line(&mut s).unwrap();
        s
    }

    /// Send one command; its reply (events skipped).
    pub fn call(&mut self, cmd: &str) -> serde_json::Value {
        use std::io::Write;
        writeln!(self.w, "{cmd}").unwrap();
        loop {
            let v: serde_json::Value = serde_json::from_str(&self.line()).unwrap();
            if v.get("return").is_some() || v.get("error").is_some() {
                return v;
            }
        }
    }

    /// Run a qemu-io command on node `d0`; panics on a monitor error (what
    /// qemu-io itself prints goes to QEMU's stdout).
    pub fn qemu_io(&mut self, cmd: &str) {
        let hmp = format!("qemu-io d0 \"{cmd}\"");
        let v = self.call(
            &serde_json::json!({"execute":"human-monitor-command",
                                "arguments":{"command-line": hmp}})
            .to_string(),
        );
        assert!(v.get("error").is_none(), "qemu-io {cmd:?}: {v}");
    }
}
