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
}

fn query(ctx: &Ctx, uuid: &str) -> Result<Status> {
    let sock = ctx.run().vm(uuid).control_socket();
    control::Client::new(&sock).status().with_context(|| {
        format!(
            "VM {uuid} has no running cdpd that answers this user (control socket {}): is the VM running and protected (--run-dir)? cdpd serves only its own user and root: run cdpctl as root",
            sock.display()
        )
    })
}

pub fn status(ctx: &Ctx, a: &StatusArgs) -> Result<()> {
    let uuids = match a.vm_uuid.as_ref().or(a.vm.as_ref()) {
        Some(vm) => vec![ctx.resolve_vm(vm)?],
        None => ctx
            .run()
            .vms_with_control_socket()
            .with_context(|| format!("listing the run directory {}", ctx.run_dir.display()))?,
    };
    let mut all = Vec::new();
    for u in &uuids {
        all.push(query(ctx, u)?);
    }
    if ctx.json {
        if a.vm.is_some() || a.vm_uuid.is_some() {
            return crate::print_json(&all[0]);
        }
        return crate::print_json(&serde_json::json!({ "vms": all }));
    }
    if all.is_empty() {
        println!(
            "no protected VM is running (run dir {})",
            ctx.run_dir.display()
        );
    }
    for s in &all {
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
    Ok(())
}

/// A disk's journal mode for an operator (docs/RELIABILITY.md, "A full
/// journal"): degraded (since when, how much is not journaled yet),
/// resyncing (how much is left) or normal.
fn journal_mode(d: &control::DiskStatus) -> String {
    let since = cdp_core::time::fmt_ns(d.degraded_since_ns);
    let mut m = match d.journal_mode.as_str() {
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
    let sock = ctx.run().vm(&uuid).control_socket();
    let marked = match control::Client::new(&sock).mark(&a.label) {
        Ok(m) => m,
        Err(e @ control::ControlError::Refused { .. }) => bail!("mark refused: {e}"),
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "VM {uuid} has no running cdpd (control socket {})",
                    sock.display()
                )
            })
        }
    };
    if ctx.json {
        return crate::print_json(&control::Reply::marked(marked));
    }
    println!(
        "mark {:?} at seq {} ({})",
        a.label,
        marked.seq,
        cdp_core::time::fmt_ns(marked.ts_ns)
    );
    Ok(())
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
