//! `cdpctl status` and `cdpctl mark`: talk to running daemons over their
//! control sockets.

use anyhow::{bail, Context, Result};
use cdp_core::control::{self, Status};

use crate::Ctx;

#[derive(clap::Args)]
pub struct StatusArgs {
    /// VM name or UUID; all running VMs when omitted.
    pub vm: Option<String>,
    /// The VM's UUID (same as giving it as VM).
    #[arg(long)]
    pub vm_uuid: Option<String>,
}

#[derive(clap::Args)]
pub struct MarkArgs {
    /// VM name or UUID.
    pub vm: String,
    /// The label of the mark (restore with --at mark:LABEL).
    pub label: String,
    /// Freeze the guest's file systems through the QEMU guest agent (via
    /// libvirt: virsh domfsfreeze) while the mark is written, then thaw
    /// (always, also on a failure, a timeout or ^C). The mark says it is
    /// quiesced. Refused when the freeze fails: no mark is made.
    #[arg(long)]
    pub quiesce: bool,
    /// Like --quiesce, but when the freeze fails make a crash-consistent
    /// mark (saying so) instead of none.
    #[arg(long, conflicts_with = "quiesce")]
    pub quiesce_or_crash: bool,
    /// libvirt connection URI (with --quiesce).
    #[arg(long, default_value = "qemu:///system")]
    pub connect: String,
    /// Seconds the freeze may take (virsh domfsfreeze is killed after them,
    /// and a thaw is asked for anyway).
    #[arg(long, default_value_t = 20, value_name = "SECS")]
    pub freeze_timeout: u64,
    /// Seconds cdpd may take to write a quiesced mark while the guest is
    /// frozen; then the guest is thawed and no quiesced mark is claimed.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    pub mark_timeout: u64,
}

fn query(ctx: &Ctx, uuid: &str) -> Result<Status> {
    let sock = ctx.run().vm(uuid).control_socket();
    ctx.with_control(uuid, |c| c.status().map_err(|e| e.to_string()))
        .with_context(|| {
            format!(
                "VM {uuid} has no running cdpd that answers this user (control socket {}): is the VM running and protected (--run-dir)? cdpd serves only its own user and root: run cdpctl as root",
                sock.display()
            )
        })
}

/// A VM this host protects (it has a catalog), running or not: what its
/// catalog says it shipped, per target.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ProtectedVm {
    pub vm_uuid: String,
    pub vm_name: String,
    /// Its cdpd answers on its control socket.
    pub running: bool,
    /// The newest record captured (0: none yet).
    pub last_seq: u64,
    pub last_ts_ns: u64,
    pub targets: Vec<ProtectedTarget>,
}

/// A target of a [`ProtectedVm`]: its state as the shipper last saw it and
/// the newest point shipped to it, per disk.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ProtectedTarget {
    pub target: String,
    pub url: String,
    pub state: String,
    pub last_error: Option<String>,
    pub updated_ns: u64,
    pub disks: Vec<ShippedPoint>,
}

/// The newest record of a disk a target holds (its newest shipped segment's last).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ShippedPoint {
    pub disk: String,
    pub seq: u64,
    pub ts_ns: u64,
}

/// What the catalog of `uuid` says of the VM (run as the VM's user:
/// root never opens a VM's catalog, docs/DESIGN.md "Trust boundaries").
fn protected_vm(ctx: &Ctx, uuid: &str, running: bool) -> Result<ProtectedVm> {
    let vm = uuid.to_string();
    ctx.with_catalog(uuid, move |c| {
        let (last_seq, last_ts_ns) = c.last_seq(&vm)?;
        let segments = c.segments(&vm)?;
        let local: std::collections::BTreeSet<(String, u64)> = c
            .local_segments(&vm)?
            .into_iter()
            .map(|s| (s.disk, s.first_seq))
            .collect();
        let mut targets = Vec::new();
        for t in c.targets(&vm)? {
            let lacking: std::collections::BTreeSet<(String, u64)> = c
                .unshipped(&vm, &t.target)?
                .into_iter()
                .map(|s| (s.disk, s.first_seq))
                .collect();
            // A segment no longer local was trimmed: every target had it.
            let mut newest: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
            for s in segments.iter().filter(|s| s.sealed) {
                let key = (s.disk.clone(), s.first_seq);
                if local.contains(&key) && lacking.contains(&key) {
                    continue;
                }
                let e = newest.entry(s.disk.clone()).or_default();
                if s.last_seq >= e.0 {
                    *e = (s.last_seq, s.last_ts_ns);
                }
            }
            targets.push(ProtectedTarget {
                target: t.target,
                url: t.url,
                state: t.state,
                last_error: t.last_error,
                updated_ns: t.updated_ns,
                disks: newest
                    .into_iter()
                    .map(|(disk, (seq, ts_ns))| ShippedPoint { disk, seq, ts_ns })
                    .collect(),
            });
        }
        Ok(ProtectedVm {
            vm_name: c.vm_name(&vm)?.unwrap_or_default(),
            vm_uuid: vm,
            running,
            last_seq,
            last_ts_ns,
            targets,
        })
    })
}

/// Every VM with a catalog under the state directory, running or not.
fn protected_vms(ctx: &Ctx, running: &[String]) -> Result<Vec<ProtectedVm>> {
    let uuids = ctx
        .state()
        .vms_with_catalog()
        .with_context(|| format!("listing {}", ctx.state().vms().display()))?;
    let mut out = Vec::new();
    for u in uuids {
        let is_running = running.contains(&u);
        match protected_vm(ctx, &u, is_running) {
            Ok(v) => out.push(v),
            Err(e) => eprintln!("cdpctl: VM {u}: its catalog cannot be read: {e:#}"),
        }
    }
    Ok(out)
}

fn print_protected(vms: &[ProtectedVm]) {
    println!("Protected VMs ({}):", vms.len());
    for v in vms {
        println!(
            "VM {} ({})  {}  last seq {}{}",
            v.vm_name,
            v.vm_uuid,
            if v.running { "running" } else { "not running" },
            v.last_seq,
            if v.last_seq > 0 {
                format!(" ({})", cdp_core::time::fmt_ns(v.last_ts_ns))
            } else {
                String::new()
            }
        );
        if v.targets.is_empty() {
            println!("  no target has been shipped to yet");
        }
        for t in &v.targets {
            let newest = if t.disks.is_empty() {
                "nothing shipped yet".to_string()
            } else {
                t.disks
                    .iter()
                    .map(|p| {
                        format!(
                            "{} seq:{} ({})",
                            p.disk,
                            p.seq,
                            cdp_core::time::fmt_ns(p.ts_ns)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            println!(
                "  target {:<10} {:<8} newest shipped: {newest}{}",
                t.target,
                t.state,
                t.last_error
                    .as_deref()
                    .filter(|_| t.state != "up")
                    .map(|e| format!("  last error: {e}"))
                    .unwrap_or_default()
            );
        }
    }
}

pub fn status(ctx: &Ctx, a: &StatusArgs) -> Result<()> {
    if let Some(vm) = a.vm_uuid.as_ref().or(a.vm.as_ref()) {
        return status_of_one(ctx, &ctx.resolve_vm(vm)?);
    }
    let uuids = ctx
        .run()
        .vms_with_control_socket()
        .with_context(|| format!("listing the run directory {}", ctx.run_dir.display()))?;
    let mut all = Vec::new();
    for u in &uuids {
        all.push(query(ctx, u)?);
    }
    // Every protected VM too, running or not (its catalog).
    let protected = protected_vms(ctx, &uuids)?;
    if ctx.json {
        return crate::print_json(&serde_json::json!({ "vms": all, "protected": protected }));
    }
    if all.is_empty() {
        println!(
            "no protected VM is running (run dir {})",
            ctx.run_dir.display()
        );
    }
    print_running(&all);
    print_policy_warnings(ctx, &all);
    print_protected(&protected);
    Ok(())
}

/// A running VM whose definition (the one cdp-qemu saved at start) names
/// per-disk policies: they are not honoured (docs/LIBVIRT.md, "Per-disk
/// policy"). The file is QEMU's user's: opened beneath the state dir, no
/// link followed, size bounded.
fn print_policy_warnings(ctx: &Ctx, all: &[Status]) {
    use std::io::Read;
    for s in all {
        let state = ctx.state();
        let def = state.vm(&s.vm_uuid).definition();
        let Ok(rel) = def.strip_prefix(state.path()) else {
            continue;
        };
        let mut text = String::new();
        let read = cdp_core::fsat::DirFd::open(state.path())
            .and_then(|d| d.open_beneath(rel))
            .map(|f| f.take(4 << 20).read_to_string(&mut text));
        if !matches!(read, Ok(Ok(_))) {
            continue;
        }
        let Ok(dom) = cdp_hooks::domain::parse(&text) else {
            continue;
        };
        for u in dom.protection.iter().flat_map(|p| p.unhonoured_policies()) {
            println!("warning: VM {} ({}): {u}", s.vm_name, s.vm_uuid);
        }
    }
}

/// One VM: its running cdpd's status, or, when none answers, what its
/// catalog says (a stopped VM this host protects); an error only for a VM
/// that is neither.
fn status_of_one(ctx: &Ctx, uuid: &str) -> Result<()> {
    let err = match query(ctx, uuid) {
        Ok(s) if ctx.json => return crate::print_json(&s),
        Ok(s) => {
            let s = [s];
            print_running(&s);
            print_policy_warnings(ctx, &s);
            return Ok(());
        }
        Err(e) => e,
    };
    if !ctx.has_catalog(uuid) {
        return Err(err);
    }
    let p = protected_vm(ctx, uuid, false)?;
    if ctx.json {
        return crate::print_json(&p);
    }
    println!("{uuid}: no cdpd answers (the VM is stopped, or its capture is down): what its catalog says:");
    print_protected(&[p]);
    Ok(())
}

fn print_running(all: &[Status]) {
    for s in all {
        println!(
            "VM {} ({})  cdpd pid {}  last seq {}",
            s.vm_name, s.vm_uuid, s.pid, s.last_seq
        );
        println!(
            "  {:<6} {:>10} {:>10} {:>12} {:>8} {:>6} {:>5} {:>12} {:>5} {:>9} {:>10} open segment",
            "DISK",
            "WRITES",
            "WRITTEN",
            "READ",
            "FLUSHES",
            "INFL",
            "CONN",
            "JOURNAL",
            "ERR",
            "RPO",
            "UNSHIPPED"
        );
        for d in &s.disks {
            println!(
                "  {:<6} {:>10} {:>10} {:>12} {:>8} {:>6} {:>5} {:>12} {:>5} {:>9} {:>10} {}",
                d.disk,
                d.write_requests,
                human(d.bytes_written),
                human(d.bytes_read),
                d.flushes,
                d.in_flight,
                d.connections,
                human(d.journal_bytes),
                d.errors + d.protocol_errors + d.seal_errors,
                format!("{:.1}s", d.rpo_ms as f64 / 1000.0),
                human(d.backlog_bytes),
                d.open_segment.as_deref().unwrap_or("-"),
            );
            println!("         journal {}", journal_mode(d));
            for t in &d.targets {
                println!(
                    "         target {:<10} {:<8} lag {:>7.1}s  {} segments ({}) behind{}",
                    t.target,
                    t.state,
                    t.lag_ms as f64 / 1000.0,
                    t.backlog_segments,
                    human(t.backlog_bytes),
                    t.last_error
                        .as_deref()
                        .filter(|_| t.state != "up")
                        .map(|e| format!("  last error: {e}"))
                        .unwrap_or_default()
                );
            }
        }
    }
}

/// A disk's journal mode for an operator (docs/RELIABILITY.md, "A full
/// journal"): degraded (since when, how much is not journaled yet),
/// resyncing (how much is left) or normal; a failed image first
/// (docs/RELIABILITY.md, "A failed image write").
fn journal_mode(d: &control::DiskStatus) -> String {
    let since = cdp_core::time::fmt_ns(d.degraded_since_ns);
    let failed = if d.image_failed {
        "FAILED: an image write failed after the guest was told it succeeded; every request fails with EIO until cdpd restarts (the journal holds the write; check the image's file system, then restart the VM); "
    } else {
        ""
    };
    let mut m = failed.to_string();
    m += &match d.journal_mode.as_str() {
        "degraded" => format!(
            "degraded since {since}, {} not journaled yet (points from then on cannot be restored until the resync)",
            human(d.dirty_bytes)
        ),
        "resyncing" => format!(
            "resyncing: {} left (read {} so far; points from {since} on cannot be restored until it ends)",
            human(d.dirty_bytes),
            human(d.resync_bytes_read)
        ),
        "normal" => "normal".to_string(),
        "" => "mode not reported (an older cdpd)".to_string(),
        other => other.to_string(),
    };
    if d.times_degraded > 0 {
        m.push_str(&format!(
            "  (degraded {} time{} since cdpd started, {} resync{} done)",
            d.times_degraded,
            if d.times_degraded == 1 { "" } else { "s" },
            d.resyncs_done,
            if d.resyncs_done == 1 { "" } else { "s" },
        ));
    }
    m
}

pub fn mark(ctx: &Ctx, a: &MarkArgs) -> Result<()> {
    let uuid = ctx.resolve_vm(&a.vm)?;
    let (marked, note) = if a.quiesce || a.quiesce_or_crash {
        quiesced_mark(ctx, a, &uuid)?
    } else {
        (send_mark(ctx, &uuid, &a.label, false, None)?, None)
    };
    if ctx.json {
        return crate::print_json(&control::Reply::marked(marked));
    }
    if let Some(n) = note {
        eprintln!("cdpctl: {n}");
    }
    println!(
        "mark {:?} at seq {} ({}), {}",
        a.label,
        marked.seq,
        cdp_core::time::fmt_ns(marked.ts_ns),
        if marked.quiesced {
            "quiesced"
        } else {
            "crash-consistent"
        }
    );
    Ok(())
}

/// Ask the VM's cdpd for a mark (as the VM's user: `Ctx::with_control`),
/// waiting at most `timeout` when given.
fn send_mark(
    ctx: &Ctx,
    uuid: &str,
    label: &str,
    quiesced: bool,
    timeout: Option<std::time::Duration>,
) -> Result<control::Marked> {
    let sock = ctx.run().vm(uuid).control_socket();
    let r: Result<control::Marked, String> = ctx
        .with_control(uuid, |c| {
            let c = match timeout {
                Some(t) => c.clone().with_timeout(t),
                None => c.clone(),
            };
            match c.mark_as(label, quiesced) {
                Ok(m) => Ok(Ok(m)),
                Err(e @ control::ControlError::Refused { .. }) => Ok(Err(e.to_string())),
                Err(e) => Err(e.to_string()),
            }
        })
        .with_context(|| {
            format!(
                "VM {uuid} has no running cdpd (control socket {})",
                sock.display()
            )
        })?;
    r.map_err(|e| anyhow::anyhow!("mark refused: {e}"))
}

/// `--quiesce`: cdpd answers, the guest is frozen, the quiesced mark is
/// written within `--mark-timeout`, the guest is thawed (always: see
/// [`crate::quiesce`]). A failed freeze refuses, or with
/// `--quiesce-or-crash` makes a crash-consistent mark and says why (the
/// note). A signal while the guest may be frozen ends cdpctl after the thaw.
fn quiesced_mark(ctx: &Ctx, a: &MarkArgs, uuid: &str) -> Result<(control::Marked, Option<String>)> {
    cdp_core::names::check_label(&a.label).map_err(|e| anyhow::anyhow!("mark refused: {e}"))?;
    // Never freeze a guest for a cdpd that is not there.
    ctx.with_control(uuid, |c| {
        c.clone()
            .with_timeout(std::time::Duration::from_secs(5))
            .status()
            .map_err(|e| e.to_string())
    })
    .with_context(|| format!("VM {uuid} has no running cdpd: not freezing its guest"))?;
    let q = crate::quiesce::Quiesce {
        connect: a.connect.clone(),
        domain: uuid.to_string(),
        freeze_timeout: std::time::Duration::from_secs(a.freeze_timeout),
        thaw_timeout: std::time::Duration::from_secs(10),
    };
    let mut signals = crate::quiesce::HeldSignals::hold()?;
    let mut frozen = match q.freeze() {
        Ok(f) => f,
        Err(e) if a.quiesce_or_crash && signals.arrived().is_none() => {
            drop(signals);
            let m = send_mark(ctx, uuid, &a.label, false, None)?;
            return Ok((m, Some(format!("{e:#}; made a crash-consistent mark"))));
        }
        Err(e) => return Err(e),
    };
    if let Some(sig) = signals.arrived() {
        frozen.thaw()?;
        bail!("interrupted by {sig} while the guest was frozen: thawed, no mark made");
    }
    let r = send_mark(
        ctx,
        uuid,
        &a.label,
        true,
        Some(std::time::Duration::from_secs(a.mark_timeout)),
    );
    let thawed = frozen.thaw();
    let sig = signals.arrived();
    drop(signals);
    let marked = r.context("the guest was frozen and is thawed again; no quiesced mark")?;
    if !marked.quiesced {
        bail!("cdpd wrote mark {:?} at seq {} but does not record quiesced marks (an older cdpd): it stands as crash-consistent", a.label, marked.seq);
    }
    // A failed thaw (or, on Windows, VSS's 10 s limit passed) is loud.
    thawed.with_context(|| {
        format!(
            "mark {:?} was written at seq {} while the guest was frozen",
            a.label, marked.seq
        )
    })?;
    if let Some(sig) = sig {
        bail!(
            "interrupted by {sig}: mark {:?} was written at seq {} (quiesced) and the guest is thawed",
            a.label,
            marked.seq
        );
    }
    Ok((marked, None))
}

pub fn human(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n}B")
    } else {
        format!("{v:.1}{}", U[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed image comes first, with what to do; the mode follows.
    #[test]
    fn a_failed_image_is_said_first() {
        let mut d = control::DiskStatus {
            journal_mode: "normal".into(),
            ..Default::default()
        };
        assert_eq!(journal_mode(&d), "normal");
        d.image_failed = true;
        let m = journal_mode(&d);
        assert!(m.starts_with("FAILED: an image write failed"), "{m}");
        assert!(
            m.contains("until cdpd restarts") && m.ends_with("; normal"),
            "{m}"
        );
    }
}
