//! `cdpctl boot VM --at POINT --name NEW [--dir DIR] [--start]`: instant
//! boot of any point (issue 14, "Instant boot of any point"). Every disk of
//! the VM at one cut is served read-only over NBD by a detached `cdpctl
//! export` per disk; a qcow2 overlay per disk in DIR has that export as its
//! backing; the definition of the point, remapped to the overlays with a new
//! name, UUID and MACs, is defined in libvirt. Nothing is copied first: the
//! VM boots within seconds, its writes go to the overlays only, and the
//! repository and the original VM are never written.
//!
//! `cdpctl boot NEW --stop` destroys and undefines NEW, stops its exports and
//! removes (or keeps, `--keep-overlays`) its overlays. What a boot made is
//! listed in DIR/boot.json; the exports' process ids are in it.
//!
//! The definition comes from the repository: untrusted. It goes through
//! the same rewriter and rule as `cdpctl restore --all-disks --define`
//! ([`define::clone_definition`]; docs/SECURITY.md, "Defining a restored
//! VM"): anything that names a host file or device is refused before
//! anything is created.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cdp_core::time::now_ns;
use cdp_repo::restore::Point;
use serde::{Deserialize, Serialize};

use crate::define::{self, CloneSpec, DiskDest, Identity};
use crate::protect_cmd::virsh;
use crate::restore_cmd::{
    candidate_repos, prepare, resolve_vm, with_fallback, Prepared, RepoArgs, Used,
};
use crate::verify_cmd::{find_definition, write_new, RestoreConfigArgs};
use crate::Ctx;

/// Where a boot's files go without --dir: DIR/<name> (libvirt's default
/// image directory, which QEMU's user can already search).
const DEFAULT_PARENT: &str = "/var/lib/libvirt/images";
/// The record of a boot, in DIR.
const RECORD: &str = "boot.json";
/// How long the exports may take to load the point's history.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(clap::Args)]
pub struct BootArgs {
    /// The protected VM (name or UUID); with --stop, the booted VM's name.
    pub vm: String,
    /// The point: RFC 3339 time, "10 minutes ago", seq:N, mark:LABEL or latest.
    #[arg(long, required_unless_present_any = ["stop", "resume"])]
    pub at: Option<String>,
    /// The new VM's name in libvirt (must not exist).
    #[arg(long, required_unless_present_any = ["stop", "resume"])]
    pub name: Option<String>,
    /// Directory of the overlays, the NBD sockets and boot.json
    /// (default /var/lib/libvirt/images/NAME; created if missing).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Start the new VM once defined.
    #[arg(long, conflicts_with = "stop")]
    pub start: bool,
    /// Make the exports, overlays and DIR/NAME.xml, but do not define the VM
    /// (define it yourself: `virsh define DIR/NAME.xml`).
    #[arg(long, conflicts_with_all = ["start", "stop"])]
    pub no_define: bool,
    /// Undo a boot: destroy and undefine VM, stop its exports, remove its files.
    #[arg(long, conflicts_with_all = ["at", "name", "start"])]
    pub stop: bool,
    /// Serve a boot's exports again (after the host rebooted, or an export
    /// died): the same point, sockets and overlays, from the record in DIR;
    /// with --start, start the VM too.
    #[arg(long, conflicts_with_all = ["at", "name", "stop", "no_define"])]
    pub resume: bool,
    /// With --stop: keep the overlays (qcow2 files) and the definition in DIR.
    #[arg(long, requires = "stop")]
    pub keep_overlays: bool,
    /// libvirt connection URI.
    #[arg(long, default_value = "qemu:///system")]
    pub connect: String,
    /// Memory of each export for decompressed chunks and journal data, in MiB.
    #[arg(long, default_value_t = cdp_repo::export::DEFAULT_CACHE_BYTES >> 20)]
    pub cache_mib: u64,
    #[command(flatten)]
    pub repo: RepoArgs,
}

/// One disk of a boot.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct BootDisk {
    pub disk: String,
    pub size: u64,
    pub overlay: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    /// The detached `cdpctl export` serving it.
    pub pid: i32,
}

/// DIR/boot.json: what a boot made, read by `--stop`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct BootRecord {
    pub name: String,
    pub uuid: String,
    pub from_vm: String,
    pub point: String,
    pub seq: u64,
    pub dir: PathBuf,
    /// Whether the boot created DIR (then --stop removes it when empty).
    pub created_dir: bool,
    pub sockets: PathBuf,
    pub disks: Vec<BootDisk>,
    /// Where the exports read the point (for --resume).
    #[serde(default)]
    pub source: ExportSource,
}

/// The repository arguments the exports of a boot were started with.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ExportSource {
    pub repo: Option<String>,
    pub policy: String,
    pub no_local: bool,
    pub cache_mib: u64,
}

impl Default for ExportSource {
    fn default() -> Self {
        ExportSource {
            repo: None,
            policy: "default".into(),
            no_local: false,
            cache_mib: cdp_repo::export::DEFAULT_CACHE_BYTES >> 20,
        }
    }
}

impl ExportSource {
    fn of(a: &BootArgs) -> ExportSource {
        ExportSource {
            repo: a.repo.repo.clone(),
            policy: a.repo.policy.clone(),
            no_local: a.repo.no_local,
            cache_mib: a.cache_mib,
        }
    }
}

/// What an export of a boot serves, and from where.
struct ExportJob<'a> {
    ctx: &'a Ctx,
    config: Option<&'a Path>,
    vm: &'a str,
    seq: u64,
    source: &'a ExportSource,
    /// The key flags of this command line, passed on.
    keys: &'a RepoArgs,
}

pub fn run(ctx: &Ctx, config: Option<&Path>, a: &BootArgs) -> Result<()> {
    if a.stop {
        return stop(ctx, a);
    }
    if a.resume {
        return resume(ctx, config, a);
    }
    boot(ctx, config, a)
}

// ---------------------------------------------------------------------------
// The definition

/// The booted VM's definition: the stored definition of the point, without
/// the CDP keys, rewritten by [`define::clone_definition`] under the rule of
/// `cdpctl restore --all-disks --define` (docs/SECURITY.md, "Defining a
/// restored VM"): `spec.disks` points each disk at its qcow2 overlay, and
/// character devices' files go into `spec.char_dir` (DIR). A disk of the
/// point that is not a file or block disk (network, volume) is refused: a
/// boot serves file and block disks only.
pub fn boot_definition(
    stored: &str,
    spec: &CloneSpec,
    new_mac: &mut dyn FnMut() -> Result<String>,
) -> Result<String> {
    let xml = unprotected(stored)?;
    for d in define::disks_of(xml.as_bytes())? {
        if spec.disks.contains_key(&d.target) && !matches!(d.kind.as_str(), "file" | "block") {
            bail!(
                "disk {} is a {:?} disk: a boot serves file and block disks only; not booted",
                d.target,
                d.kind
            );
        }
    }
    let (out, _) = define::clone_definition(xml.as_bytes(), spec, new_mac)
        .context("the stored definition cannot be booted as a new VM; not booted")?;
    String::from_utf8(out).context("internal error: the new definition is not UTF-8")
}

/// The host's QEMU, as libvirt reports it for the definition's type and
/// arch. With --no-define and libvirt unreachable: /usr/bin/qemu-system-ARCH
/// (a host path, never one the definition chose).
fn host_qemu(a: &BootArgs, xml: &str) -> Result<String> {
    let (kind, arch) = define::domain_kind(xml.as_bytes())?;
    let arch =
        arch.filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
    match define::host_emulator(&a.connect, &kind, arch.as_deref()) {
        Ok(q) => Ok(q),
        Err(_) if a.no_define => Ok(format!(
            "/usr/bin/qemu-system-{}",
            arch.as_deref().unwrap_or(std::env::consts::ARCH)
        )),
        Err(e) => Err(e.context("asking libvirt for the host's QEMU")),
    }
}

/// A name [`define::clone_definition`] gives a character device's file or
/// socket in DIR: `<kind><n>.log|sock`.
fn is_chardev_file(name: &str) -> bool {
    let Some((stem, ext)) = name.rsplit_once('.') else {
        return false;
    };
    let num = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    matches!(ext, "log" | "sock")
        && ["serial", "console", "parallel", "channel"]
            .iter()
            .any(|k| stem.strip_prefix(k).is_some_and(num))
}

// ---------------------------------------------------------------------------
// Boot

/// The point resolved at one cut, and the definition of that cut.
struct Planned {
    vm: String,
    seq: u64,
    /// (disk, size)
    disks: Vec<(String, u64)>,
    xml: String,
    used: Used,
}

/// Resolve `point` in every disk of the VM, take the newest seq as the cut
/// (as `restore --all-disks`: docs/DESIGN.md, "Write path", one sequence
/// per VM), check every disk rebuilds at it, and find the definition.
async fn plan_cut(ctx: &Ctx, a: &BootArgs, point: &Point) -> Result<Planned> {
    let candidates = candidate_repos(ctx, &a.repo)?;
    let (store, used, (vm, seq, disks)) = with_fallback(candidates, |store| async move {
        let vm = resolve_vm(ctx, &store, &a.vm).await?;
        let mut names = cdp_repo::read::list_disks(&store, &vm).await?;
        if !a.repo.no_local {
            names.extend(cdp_core::journal::list_disks(&ctx.state_dir, &vm).unwrap_or_default());
        }
        names.sort();
        names.dedup();
        let mut preps: Vec<(String, Prepared)> = Vec::new();
        for d in names {
            cdp_core::names::check_disk(&d).with_context(|| format!("disk name {d:?}"))?;
            let p = prepare(ctx, &a.repo, &d, &store, &vm, point)
                .await
                .with_context(|| format!("disk {d}"))?;
            preps.push((d, p));
        }
        if preps.is_empty() {
            bail!("VM {vm} has no disk in {}", store.url());
        }
        let seq = preps.iter().map(|(_, p)| p.seq).max().unwrap_or(0);
        let mut disks = Vec::new();
        for (d, p) in preps {
            let size = if p.seq == seq {
                p.plan.size
            } else {
                prepare(ctx, &a.repo, &d, &store, &vm, &Point::Seq(seq))
                    .await
                    .with_context(|| format!("disk {d} at the cut seq:{seq} of {point}"))?
                    .plan
                    .size
            };
            disks.push((d, size));
        }
        Ok((vm, seq, disks))
    })
    .await?;
    let args = RestoreConfigArgs {
        vm: vm.clone(),
        at: format!("seq:{seq}"),
        remaps: Vec::new(),
        output: PathBuf::new(),
        repo: a.repo.clone(),
    };
    let found = find_definition(ctx, &store, &args, &Point::Seq(seq)).await?;
    let xml = String::from_utf8(found.xml).context("the stored definition is not UTF-8")?;
    Ok(Planned {
        vm,
        seq,
        disks,
        xml,
        used,
    })
}

/// The stored definition without the CDP keys (the booted copy is not
/// protected: its disks are overlays, its emulator the real QEMU).
fn unprotected(xml: &str) -> Result<String> {
    let dom = cdp_hooks::domain::parse(xml).context("the stored definition")?;
    if dom.protection.is_none() {
        return Ok(xml.to_string());
    }
    cdp_hooks::protect::unprotect(xml).context("removing the CDP keys")
}

/// A path QEMU's nbd+unix URI takes as is.
fn check_uri_path(p: &Path) -> Result<&str> {
    let s = p.to_str().context("a path that is not UTF-8")?;
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '-' | '_' | '.' | '+'))
    {
        bail!("{s}: use a --dir of letters, digits and / - _ . + only (it goes into an NBD URI)");
    }
    Ok(s)
}

fn boot(ctx: &Ctx, config: Option<&Path>, a: &BootArgs) -> Result<()> {
    let t0 = Instant::now();
    let name = a.name.as_deref().context("--name NEW")?;
    define::check_name(name)?;
    if !a.no_define && virsh(&a.connect, &["domstate", name]).is_ok() {
        bail!("a domain named {name} exists already: choose another --name");
    }
    let at = a.at.as_deref().context("--at POINT")?;
    let point = Point::parse(at, now_ns())?;
    let rt = tokio::runtime::Runtime::new()?;
    let planned = rt.block_on(plan_cut(ctx, a, &point))?;
    drop(rt);
    let dir = std::path::absolute(
        a.dir
            .clone()
            .unwrap_or_else(|| Path::new(DEFAULT_PARENT).join(name)),
    )?;
    check_uri_path(&dir)?;
    let sockets = dir.join(format!("{name}.nbd"));
    let overlays: BTreeMap<String, PathBuf> = planned
        .disks
        .iter()
        .map(|(d, _)| (d.clone(), dir.join(format!("{name}-{d}.qcow2"))))
        .collect();
    let identity = Identity::random(name)?;
    let uuid = identity.uuid.clone();
    // The definition first: what cannot be remapped creates nothing.
    let dests: BTreeMap<String, DiskDest> = overlays
        .iter()
        .map(|(d, o)| (d.clone(), DiskDest::Qcow2(o.clone())))
        .collect();
    let emulator = host_qemu(a, &planned.xml)?;
    // None when libvirt is unreachable (--no-define): the strict choice.
    let trusted = define::trusted_paths(&a.connect, &planned.vm).unwrap_or_default();
    let spec = CloneSpec {
        identity: &identity,
        disks: &dests,
        emulator: &emulator,
        trusted_paths: &trusted,
        char_dir: &dir,
    };
    let xml = boot_definition(&planned.xml, &spec, &mut define::random_mac)?;
    let owner = cdp_hooks::hook::vm_owner(&ctx.config, &xml)?;
    let mut made = Made::default();
    let source = ExportSource::of(a);
    let job = Job {
        ctx,
        config,
        a,
        planned: &planned,
        dir: &dir,
        sockets: &sockets,
        overlays: &overlays,
        owner,
        source: &source,
    };
    let r = make(&job, &mut made).and_then(|disks| {
        let record = BootRecord {
            name: name.to_string(),
            uuid: uuid.clone(),
            from_vm: planned.vm.clone(),
            point: point.to_string(),
            seq: planned.seq,
            dir: dir.clone(),
            created_dir: made.dir.is_some(),
            sockets: sockets.clone(),
            disks,
            source: source.clone(),
        };
        finish(a, &record, &xml, &mut made)?;
        Ok(record)
    });
    let record = match r {
        Ok(rec) => rec,
        Err(e) => {
            made.undo(&a.connect);
            return Err(e);
        }
    };
    report(ctx, a, &record, &planned.used, t0.elapsed())
}

/// Everything a boot makes, from the plan.
struct Job<'a> {
    ctx: &'a Ctx,
    config: Option<&'a Path>,
    a: &'a BootArgs,
    planned: &'a Planned,
    dir: &'a Path,
    sockets: &'a Path,
    overlays: &'a BTreeMap<String, PathBuf>,
    /// QEMU's user and group for the new VM.
    owner: (u32, u32),
    source: &'a ExportSource,
}

impl Job<'_> {
    fn export(&self) -> ExportJob<'_> {
        ExportJob {
            ctx: self.ctx,
            config: self.config,
            vm: &self.planned.vm,
            seq: self.planned.seq,
            source: self.source,
            keys: &self.a.repo,
        }
    }
}

/// What a boot has made so far: undone when a later step fails.
#[derive(Default)]
struct Made {
    /// DIR, when this boot created it (removed on undo if left empty).
    dir: Option<PathBuf>,
    sockets: Option<PathBuf>,
    files: Vec<PathBuf>,
    pids: Vec<i32>,
    defined: Option<String>,
}

impl Made {
    fn undo(&mut self, connect: &str) {
        if let Some(n) = self.defined.take() {
            let _ = virsh(connect, &["destroy", &n]);
            let _ = virsh(connect, &["undefine", &n]);
        }
        for pid in self.pids.drain(..) {
            stop_pid(pid);
        }
        for f in self.files.drain(..) {
            let _ = std::fs::remove_file(f);
        }
        if let Some(s) = self.sockets.take() {
            let _ = std::fs::remove_dir_all(s);
        }
        if let Some(d) = self.dir.take() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Make DIR, the socket directory, the exports and the overlays.
fn make(job: &Job, made: &mut Made) -> Result<Vec<BootDisk>> {
    let dir = job.dir;
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => check_only_we_write(dir, &m)?,
        Ok(_) => bail!("{} exists and is not a directory", dir.display()),
        Err(_) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            // QEMU's user needs to search it, nothing more.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))?;
            made.dir = Some(dir.to_path_buf());
        }
    }
    let name = job.a.name.as_deref().unwrap_or_default();
    let fixed = [
        dir.join(RECORD),
        dir.join(format!("{name}.xml")),
        job.sockets.to_path_buf(),
    ];
    let there: Vec<String> = fixed
        .iter()
        .chain(job.overlays.values())
        .filter(|p| p.symlink_metadata().is_ok())
        .map(|p| p.display().to_string())
        .collect();
    if !there.is_empty() {
        bail!(
            "{} already there: a boot never overwrites a file; `cdpctl boot {name} --stop` or choose another --dir",
            there.join(", ")
        );
    }
    let disks: Vec<BootDisk> = job
        .planned
        .disks
        .iter()
        .map(|(disk, size)| BootDisk {
            disk: disk.clone(),
            size: *size,
            overlay: job.overlays[disk].clone(),
            socket: job.sockets.join(format!("{disk}.sock")),
            log: dir.join(format!("{name}-{disk}.export.log")),
            pid: 0,
        })
        .collect();
    let disks = serve(&job.export(), job.sockets, disks, job.owner, made)?;
    for d in &disks {
        overlay(d, made, job.owner)?;
    }
    Ok(disks)
}

/// Make the socket directory `sockets` (root's alone while the exports
/// bind; QEMU's user's, 0700, after), start an export per disk there and
/// wait until each serves; the disks with their exports' pids.
fn serve(
    job: &ExportJob,
    sockets: &Path,
    mut disks: Vec<BootDisk>,
    (uid, gid): (u32, u32),
    made: &mut Made,
) -> Result<Vec<BootDisk>> {
    std::fs::create_dir(sockets).with_context(|| format!("creating {}", sockets.display()))?;
    made.sockets = Some(sockets.to_path_buf());
    std::fs::set_permissions(sockets, std::fs::Permissions::from_mode(0o700))?;
    let mut waits = Vec::new();
    for d in &mut disks {
        if d.log.symlink_metadata().is_err() {
            made.files.push(d.log.clone());
        }
        let (pid, ready) = spawn_export(job, &d.disk, &d.socket, &d.log)?;
        made.pids.push(pid);
        d.pid = pid;
        waits.push((d.disk.clone(), ready, d.log.clone()));
    }
    let deadline = Instant::now() + READY_TIMEOUT;
    for (disk, ready, log) in waits {
        wait_ready(&disk, ready, deadline, &log)?;
    }
    for d in &disks {
        std::os::unix::fs::lchown(&d.socket, Some(uid), Some(gid))
            .with_context(|| format!("giving {} to QEMU's user", d.socket.display()))?;
    }
    std::os::unix::fs::lchown(sockets, Some(uid), Some(gid))?;
    Ok(disks)
}

/// The NBD URI of a disk's export.
fn nbd_uri(d: &BootDisk) -> Result<String> {
    Ok(format!(
        "nbd+unix:///{}?socket={}",
        d.disk,
        check_uri_path(&d.socket)?
    ))
}

/// `qemu-img create` the disk's overlay on its export (not opened: `-u`
/// with the size known), QEMU's user's, mode 0600.
fn overlay(d: &BootDisk, made: &mut Made, (uid, gid): (u32, u32)) -> Result<()> {
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-u", "-b"])
        .arg(nbd_uri(d)?)
        .arg(&d.overlay)
        .arg(d.size.to_string())
        .stdin(Stdio::null())
        .output()
        .context("running qemu-img (install qemu-utils)")?;
    if d.overlay.symlink_metadata().is_ok() {
        made.files.push(d.overlay.clone());
    }
    if !out.status.success() {
        bail!(
            "qemu-img create {}: {}",
            d.overlay.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    std::os::unix::fs::lchown(&d.overlay, Some(uid), Some(gid))?;
    std::fs::set_permissions(&d.overlay, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// Start a detached `cdpctl export` of `disk` at the cut (its own process
/// group: it outlives this command and a ^C of it). Returns its pid and the
/// read end of its `--ready-fd` pipe.
fn spawn_export(job: &ExportJob, disk: &str, socket: &Path, log: &Path) -> Result<(i32, OwnedFd)> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    // Only the write end is inherited (at its number, named by --ready-fd).
    fcntl(w.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty()))?;
    // A resumed export appends to the log of the first (DIR is root's).
    let logf = std::fs::File::options()
        .create(true)
        .append(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(log)
        .with_context(|| format!("creating {}", log.display()))?;
    let mut c = Command::new(std::env::current_exe()?);
    if let Some(cfg) = job.config {
        c.arg("--config").arg(cfg);
    }
    c.arg("--state-dir")
        .arg(&job.ctx.state_dir)
        .arg("--run-dir")
        .arg(&job.ctx.run_dir)
        .args(["export", job.vm, "--disk", disk, "--at"])
        .arg(format!("seq:{}", job.seq))
        .arg("--socket")
        .arg(socket)
        .arg("--ready-fd")
        .arg(w.as_raw_fd().to_string())
        .arg("--cache-mib")
        .arg(job.source.cache_mib.to_string())
        .args(["--policy", &job.source.policy]);
    if let Some(r) = &job.source.repo {
        c.args(["--repo", r]);
    }
    if let Some(k) = &job.keys.key_file {
        c.arg("--key-file").arg(k);
    }
    if let Some(k) = &job.keys.passphrase_file {
        c.arg("--passphrase-file").arg(k);
    }
    if job.source.no_local {
        c.arg("--no-local");
    }
    let child = c
        .stdin(Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf)
        .process_group(0)
        .spawn()
        .context("starting cdpctl export")?;
    drop(w);
    Ok((child.id() as i32, r))
}

/// Wait for an export's READY (or its error, or its death) until `deadline`.
fn wait_ready(disk: &str, ready: OwnedFd, deadline: Instant, log: &Path) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::fs::File::from(ready).read_to_string(&mut s);
        let _ = tx.send(s);
    });
    let tail = || {
        let t = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    };
    match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        Ok(s) if s.starts_with("READY") => Ok(()),
        Ok(s) if s.starts_with("ERROR ") => bail!("export of {disk}: {}", s[6..].trim()),
        Ok(_) => bail!("export of {disk} ended before it was ready:\n{}", tail()),
        Err(_) => bail!(
            "export of {disk} not ready after {} s (see {})",
            READY_TIMEOUT.as_secs(),
            log.display()
        ),
    }
}

/// Is `pid` an export this boot started (serving `socket`)? Guards against
/// a pid reused by another process since.
fn is_our_export(pid: i32, socket: Option<&Path>) -> bool {
    let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
    args.contains(&b"export".as_slice())
        && socket.is_none_or(|s| args.contains(&s.as_os_str().as_encoded_bytes()))
}

/// SIGTERM, then SIGKILL after 15 s; returns once it is gone.
fn stop_pid(pid: i32) {
    use nix::sys::signal::{kill, Signal};
    let p = nix::unistd::Pid::from_raw(pid);
    let _ = kill(p, Signal::SIGTERM);
    let until = Instant::now() + Duration::from_secs(15);
    while !cdp_core::proc::is_gone(pid) {
        if Instant::now() > until {
            let _ = kill(p, Signal::SIGKILL);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Reap it if it is still our child (the rollback of a failed boot).
    let _ = nix::sys::wait::waitpid(p, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
}

/// Write the definition and the record, define (and start) the VM.
fn finish(a: &BootArgs, rec: &BootRecord, xml: &str, made: &mut Made) -> Result<()> {
    let def = rec.dir.join(format!("{}.xml", rec.name));
    write_new(&def, xml.as_bytes())?;
    made.files.push(def.clone());
    let record = rec.dir.join(RECORD);
    write_new(&record, &serde_json::to_vec_pretty(rec)?)?;
    made.files.push(record);
    if a.no_define {
        *made = Made::default();
        return Ok(());
    }
    define::define(&a.connect, &def)?;
    made.defined = Some(rec.name.clone());
    if a.start {
        virsh(&a.connect, &["start", &rec.name])?;
    }
    // Done: nothing to undo.
    *made = Made::default();
    Ok(())
}

fn report(ctx: &Ctx, a: &BootArgs, rec: &BootRecord, used: &Used, took: Duration) -> Result<()> {
    let secs = took.as_secs_f64();
    if ctx.json {
        return crate::print_json(&serde_json::json!({
            "booted": rec, "started": a.start, "defined": !a.no_define, "seconds": secs,
            "target": used.target, "repository": used.repository,
        }));
    }
    println!(
        "booted {} (uuid {}) from VM {} at {} (seq {}) in {secs:.2} s: defined{}",
        rec.name,
        rec.uuid,
        rec.from_vm,
        rec.point,
        rec.seq,
        if a.start {
            " and started".to_string()
        } else if a.no_define {
            format!(
                " NOT defined (define it: virsh define {})",
                rec.dir.join(format!("{}.xml", rec.name)).display()
            )
        } else {
            format!(" (start it: virsh start {})", rec.name)
        }
    );
    for d in &rec.disks {
        println!(
            "  {}: {} on {} (export pid {}, log {})",
            d.disk,
            d.overlay.display(),
            nbd_uri(d)?,
            d.pid,
            d.log.display()
        );
    }
    println!(
        "Its writes go to the overlays only: the repository and VM {} are not touched.",
        rec.from_vm
    );
    println!("The exports serve until `cdpctl boot {0} --stop` (which destroys and undefines it, and removes the overlays unless --keep-overlays); after a reboot of the host, `cdpctl boot {0} --resume --dir {1}` serves them again.", rec.name, rec.dir.display());
    let d0 = rec.disks.first().map(|d| d.disk.as_str()).unwrap_or("vda");
    println!(
        "To keep it: while it runs, `virsh blockpull {} {d0} --wait` for each disk copies the point into its overlay (it then needs no export); then `cdpctl boot {} --stop --keep-overlays` and `virsh define {}`. Or copy the point itself: `cdpctl restore {} --all-disks --at seq:{} --to DIR`.",
        rec.name,
        rec.name,
        rec.dir.join(format!("{}.xml", rec.name)).display(),
        rec.from_vm,
        rec.seq
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Stop

/// DIR of the boot named `name`: --dir, else the directory of its overlays
/// (from libvirt's definition), else the default.
fn boot_dir(a: &BootArgs, name: &str) -> PathBuf {
    if let Some(d) = &a.dir {
        return d.clone();
    }
    if let Ok(xml) = virsh(&a.connect, &["dumpxml", "--inactive", name]) {
        if let Ok(doc) = roxmltree::Document::parse(&xml) {
            let found = doc
                .descendants()
                .filter(|n| {
                    n.has_tag_name("source") && n.parent().is_some_and(|p| p.has_tag_name("disk"))
                })
                .filter_map(|n| n.attribute("file"))
                .filter_map(|f| Path::new(f).parent())
                .find(|p| p.join(RECORD).is_file());
            if let Some(p) = found {
                return p.to_path_buf();
            }
        }
    }
    Path::new(DEFAULT_PARENT).join(name)
}

/// DIR (`meta`: its lstat) holds a boot's record, which `--stop` acts on
/// as root: only this user may write DIR, or another user (QEMU's, which
/// owns the overlays) could rewrite the record to name any file of the host.
fn check_only_we_write(dir: &Path, meta: &std::fs::Metadata) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me || meta.mode() & 0o022 != 0 {
        bail!(
            "{} is owned by uid {} with mode {:o}: a boot's directory must be writable by uid {me} alone \
             (its record names what `--stop` removes); choose another --dir or fix its owner and mode",
            dir.display(),
            meta.uid(),
            meta.mode() & 0o7777
        );
    }
    Ok(())
}

/// Read the record of the boot `name` in `dir`: DIR and the record writable by
/// this user alone (never through a symlink), and every path the record
/// names inside DIR, as a boot writes them. Anything else is refused.
fn read_record(dir: &Path, name: &str) -> Result<BootRecord> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let dir = std::path::absolute(dir)?;
    let meta = std::fs::symlink_metadata(&dir)
        .with_context(|| format!("{} (give --dir)", dir.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    check_only_we_write(&dir, &meta)?;
    let path = dir.join(RECORD);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(&path)
        .with_context(|| format!("reading {} (give --dir)", path.display()))?;
    let m = f.metadata()?;
    if !m.is_file() || m.uid() != meta.uid() || m.mode() & 0o022 != 0 {
        bail!(
            "{} is not a regular file written by uid {} alone: not a record of cdpctl boot",
            path.display(),
            meta.uid()
        );
    }
    let mut bytes = Vec::new();
    f.by_ref().take(1 << 20).read_to_end(&mut bytes)?;
    let rec: BootRecord =
        serde_json::from_slice(&bytes).with_context(|| format!("{}", path.display()))?;
    if rec.name != name {
        bail!(
            "{} records a boot of {}, not {name}",
            path.display(),
            rec.name
        );
    }
    check_record_paths(&rec, &dir).with_context(|| format!("{}", path.display()))?;
    Ok(rec)
}

/// Every path of `rec` is the one a boot of `rec.name` in `dir` writes.
fn check_record_paths(rec: &BootRecord, dir: &Path) -> Result<()> {
    let name = &rec.name;
    define::check_name(name)?;
    let expect = |p: &Path, file: String| -> Result<()> {
        if p != dir.join(&file) {
            bail!(
                "names {} where a boot writes {}: refused",
                p.display(),
                dir.join(file).display()
            );
        }
        Ok(())
    };
    if rec.dir != dir {
        bail!(
            "records the directory {}, not {}: refused",
            rec.dir.display(),
            dir.display()
        );
    }
    expect(&rec.sockets, format!("{name}.nbd"))?;
    for d in &rec.disks {
        if d.disk.is_empty()
            || !d
                .disk
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            bail!("names a disk {:?}: refused", d.disk);
        }
        expect(&d.overlay, format!("{name}-{}.qcow2", d.disk))?;
        expect(&d.log, format!("{name}-{}.export.log", d.disk))?;
        expect(&d.socket, format!("{name}.nbd/{}.sock", d.disk))?;
    }
    Ok(())
}

fn stop(ctx: &Ctx, a: &BootArgs) -> Result<()> {
    let name = a.vm.as_str();
    define::check_name(name)?;
    let dir = boot_dir(a, name);
    let rec = read_record(&dir, name)?;
    let path = rec.dir.join(RECORD);
    let mut vm = "not defined";
    if let Ok(state) = virsh(&a.connect, &["domstate", name]) {
        if state.trim() != "shut off" {
            virsh(&a.connect, &["destroy", name])?;
        }
        virsh(&a.connect, &["undefine", name])?;
        vm = "destroyed and undefined";
    }
    let mut stopped = Vec::new();
    for d in &rec.disks {
        if is_our_export(d.pid, Some(&d.socket)) {
            stop_pid(d.pid);
            stopped.push(d.pid);
        }
    }
    let _ = std::fs::remove_dir_all(&rec.sockets);
    if !a.keep_overlays {
        for d in &rec.disks {
            let _ = std::fs::remove_file(&d.overlay);
            let _ = std::fs::remove_file(&d.log);
        }
        let _ = std::fs::remove_file(rec.dir.join(format!("{name}.xml")));
        let _ = std::fs::remove_file(&path);
        // The character devices' files and sockets moved into DIR.
        for e in std::fs::read_dir(&rec.dir).into_iter().flatten().flatten() {
            if is_chardev_file(&e.file_name().to_string_lossy()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        if rec.created_dir {
            let _ = std::fs::remove_dir(&rec.dir);
        }
    }
    if ctx.json {
        return crate::print_json(&serde_json::json!({
            "name": name, "vm": vm, "exports_stopped": stopped,
            "overlays_kept": a.keep_overlays, "dir": rec.dir,
        }));
    }
    println!("{name}: {vm}; {} export(s) stopped", stopped.len());
    if a.keep_overlays {
        println!(
            "kept in {}: the overlays and {name}.xml (an overlay still backed by its export reads nothing now: `virsh blockpull` it before --stop)",
            rec.dir.display()
        );
    } else {
        println!(
            "removed the overlays and the files of the boot in {}",
            rec.dir.display()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Resume

/// `--resume`: serve a boot's exports again (the host rebooted, or an
/// export died). The record is read under `--stop`'s rule; exports of it
/// still running are stopped first, so a half-served boot comes back whole;
/// the socket directory is made anew; the record gets the new pids.
fn resume(ctx: &Ctx, config: Option<&Path>, a: &BootArgs) -> Result<()> {
    let name = a.vm.as_str();
    define::check_name(name)?;
    let rec = read_record(&boot_dir(a, name), name)?;
    let owner = overlay_owner(&rec)?;
    for d in &rec.disks {
        if is_our_export(d.pid, Some(&d.socket)) {
            stop_pid(d.pid);
        }
    }
    // In DIR, which is root's alone; its content is QEMU's user's (no link
    // in it is followed).
    match std::fs::remove_dir_all(&rec.sockets) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", rec.sockets.display()))
        }
        _ => {}
    }
    let job = ExportJob {
        ctx,
        config,
        vm: &rec.from_vm,
        seq: rec.seq,
        source: &rec.source,
        keys: &a.repo,
    };
    let mut made = Made::default();
    let disks = match serve(&job, &rec.sockets, rec.disks.clone(), owner, &mut made) {
        Ok(d) => d,
        Err(e) => {
            made.undo(&a.connect);
            return Err(e);
        }
    };
    let rec = BootRecord { disks, ..rec };
    replace_record(&rec)?;
    if a.start {
        virsh(&a.connect, &["start", name])?;
    }
    if ctx.json {
        return crate::print_json(&serde_json::json!({ "resumed": rec }));
    }
    println!(
        "{name}: {} export(s) of {} at seq {} serve again{}",
        rec.disks.len(),
        rec.from_vm,
        rec.seq,
        if a.start { "; started" } else { "" }
    );
    for d in &rec.disks {
        println!("  {}: {} (export pid {})", d.disk, nbd_uri(d)?, d.pid);
    }
    Ok(())
}

/// QEMU's user and group: the owner of the boot's overlays (in DIR, root's).
fn overlay_owner(rec: &BootRecord) -> Result<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let d = rec.disks.first().context("the record names no disk")?;
    let m = std::fs::symlink_metadata(&d.overlay).with_context(|| {
        format!(
            "{} (kept with --stop --keep-overlays?)",
            d.overlay.display()
        )
    })?;
    if !m.is_file() {
        bail!("{} is not a regular file", d.overlay.display());
    }
    Ok((m.uid(), m.gid()))
}

/// Replace DIR/boot.json (DIR is root's alone): a new file, synced, renamed.
fn replace_record(rec: &BootRecord) -> Result<()> {
    let path = rec.dir.join(RECORD);
    let tmp = rec.dir.join(format!(".{RECORD}.new"));
    let _ = std::fs::remove_file(&tmp);
    write_new(&tmp, &serde_json::to_vec_pretty(rec)?)?;
    std::fs::rename(&tmp, &path).with_context(|| format!("replacing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stored (live, protected) definition as the hook saves it.
    const STORED: &str = r#"<domain type='kvm' id='3'>
  <name>web</name>
  <uuid>3f6c1d2e-9a8b-4c7d-8e6f-5a4b3c2d1e0f</uuid>
  <metadata>
    <cdp:protection xmlns:cdp="urn:cdpd:protection:1" policy="default" emulator="/usr/bin/qemu-system-x86_64"><cdp:disk target="vda"/></cdp:protection>
  </metadata>
  <sysinfo type='smbios'><system><entry name='uuid'>3f6c1d2e-9a8b-4c7d-8e6f-5a4b3c2d1e0f</entry></system></sysinfo>
  <devices>
    <emulator>/usr/local/bin/cdp-qemu</emulator>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source dev='/dev/vg/web'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <source file='/img/web-b.raw'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/iso/x.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='network'><mac address='52:54:00:11:22:33'/><source network='default'/></interface>
    <serial type='file'><source path='/var/log/web&amp;serial.log'/></serial>
    <console type='file'><source path='/var/log/web&amp;serial.log'/><target type='serial'/></console>
    <channel type='unix'><source mode='bind'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
  </devices>
</domain>
"#;

    fn rewrite(xml: &str, disks: &[&str]) -> Result<String> {
        let dests: BTreeMap<String, DiskDest> = disks
            .iter()
            .map(|d| {
                let o = PathBuf::from(format!("/b/new-{d}.qcow2"));
                (d.to_string(), DiskDest::Qcow2(o))
            })
            .collect();
        let identity = Identity {
            name: "new".into(),
            uuid: "11111111-2222-4333-8444-555555555555".into(),
        };
        let spec = CloneSpec {
            identity: &identity,
            disks: &dests,
            emulator: "/usr/bin/qemu-system-x86_64",
            trusted_paths: &[],
            char_dir: Path::new("/b"),
        };
        let mut n = 0;
        boot_definition(xml, &spec, &mut || {
            n += 1;
            Ok(format!("52:54:00:aa:bb:{n:02x}"))
        })
    }

    /// Boot's part: the stored (protected) definition unprotected, every
    /// disk on its qcow2 overlay, char devices in DIR. The rule itself is
    /// define.rs's (its tests: `hostile_definitions_are_refused`).
    #[test]
    fn the_definition_is_remapped_to_the_overlays_with_a_new_identity() {
        let out = rewrite(STORED, &["vda", "vdb"]).unwrap();
        let doc = roxmltree::Document::parse(&out).unwrap();
        let text = |tag: &str| {
            doc.descendants()
                .find(|n| n.has_tag_name(tag))
                .and_then(|n| n.text())
                .map(str::to_string)
        };
        assert_eq!(text("name").as_deref(), Some("new"));
        assert_eq!(
            text("uuid").as_deref(),
            Some("11111111-2222-4333-8444-555555555555")
        );
        // No SMBIOS uuid entry of the original.
        assert!(!out.contains("3f6c1d2e"), "{out}");
        // Not protected: the host's QEMU, no keys.
        assert_eq!(
            text("emulator").as_deref(),
            Some("/usr/bin/qemu-system-x86_64")
        );
        assert!(!out.contains("urn:cdpd"), "{out}");
        let disks: Vec<_> = doc
            .descendants()
            .filter(|n| n.has_tag_name("disk"))
            .collect();
        for (d, dev) in disks.iter().take(2).zip(["vda", "vdb"]) {
            assert_eq!(d.attribute("type"), Some("file"), "{out}");
            let drv = d.children().find(|c| c.has_tag_name("driver")).unwrap();
            assert_eq!(drv.attribute("type"), Some("qcow2"), "{out}");
            let src = d.children().find(|c| c.has_tag_name("source")).unwrap();
            assert_eq!(
                src.attribute("file"),
                Some(format!("/b/new-{dev}.qcow2").as_str())
            );
            assert_eq!(src.attribute("dev"), None);
            assert!(!d.children().any(|c| c.has_tag_name("backingStore")));
        }
        // vda keeps its other driver attributes.
        assert!(
            out.contains(r#"<driver name="qemu" cache="none" type="qcow2"/>"#),
            "{out}"
        );
        // The cdrom's medium is ejected.
        assert!(!out.contains("/iso/x.iso"), "{out}");
        assert!(out.contains(r#"address="52:54:00:aa:bb:01""#), "{out}");
        assert!(!out.contains("11:22:33"));
        // Serial and console share one file, moved into DIR.
        let paths: Vec<_> = doc
            .descendants()
            .filter(|n| n.has_tag_name("source"))
            .filter_map(|n| n.attribute("path"))
            .collect();
        assert_eq!(paths, ["/b/serial0.log", "/b/serial0.log"], "{out}");
        assert!(paths.iter().all(|p| is_chardev_file(&p[3..])));
        assert!(!out.contains("/var/log/web"));
    }

    #[test]
    fn what_cannot_be_remapped_is_refused() {
        // A disk without history at the point would be shared.
        let e = format!("{:#}", rewrite(STORED, &["vda"]).unwrap_err());
        assert!(e.contains("\"vdb\"") && e.contains("not booted"), "{e}");
        // A disk of the point the definition lacks.
        let e = format!("{:#}", rewrite(STORED, &["vda", "vdb", "vdc"]).unwrap_err());
        assert!(e.contains("no disk vdc"), "{e}");
        // What a boot cannot serve, and (the define rule) host resources.
        for (what, bad) in [
            (
                "\"network\" disk",
                "<disk type='network'><source protocol='nbd' name='x'/><target dev='vda'/></disk>",
            ),
            (
                "\"volume\" disk",
                "<disk type='volume'><source pool='p' volume='v'/><target dev='vda'/></disk>",
            ),
            (
                "filesystem",
                "<filesystem type='mount'><source dir='/srv'/><target dir='s'/></filesystem>",
            ),
            ("hostdev", "<hostdev mode='subsystem' type='pci'/>"),
            (
                "host device",
                "<serial type='dev'><source path='/dev/ttyS0'/></serial>",
            ),
            ("emulator", "<emulator>/tmp/evil</emulator>"),
        ] {
            let vda = if bad.contains("'vda'") {
                ""
            } else {
                "<disk type='file'><source file='/x'/><target dev='vda'/></disk>"
            };
            let xml = format!("<domain type='kvm'><name>a</name><uuid>u</uuid><devices>{vda}{bad}</devices></domain>");
            let e = format!("{:#}", rewrite(&xml, &["vda"]).unwrap_err());
            assert!(e.contains(what), "{what}: {e}");
        }
        assert!(rewrite("<notadomain/>", &[]).is_err());
        assert!(rewrite("<domain type='kvm'><name>a</name", &[]).is_err());
    }

    #[test]
    fn names_and_paths_are_checked() {
        assert!(define::check_name("web-copy_1.2").is_ok());
        assert!(check_uri_path(Path::new("/var/lib/x-1/y.sock")).is_ok());
        assert!(check_uri_path(Path::new("/tmp/a?b")).is_err());
        assert!(check_uri_path(Path::new("/tmp/a b")).is_err());
        assert!(is_chardev_file("serial0.log") && is_chardev_file("channel13.sock"));
        for n in [
            "serial.log",
            "serial0.qcow2",
            "x0.log",
            "serial0-0.log",
            "new-vda.qcow2",
        ] {
            assert!(!is_chardev_file(n), "{n}");
        }
    }
}
