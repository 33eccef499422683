//! `cdpctl journal inspect` and `cdpctl journal replay`: read a VM's local
//! journal directly from the state directory (no daemon needed).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use cdp_core::journal::{self, Kind, LoadedSegment, Upto};
use serde::Serialize;

use crate::Ctx;

#[derive(clap::Subcommand)]
pub enum JournalCmd {
    /// List the records of a VM's local journal.
    Inspect {
        /// The VM's UUID (or name, looked up in the catalog).
        #[arg(long)]
        vm_uuid: String,
        /// Only this disk.
        #[arg(long)]
        disk: Option<String>,
    },
    /// Apply one disk's local journal, in order, onto a copy of its initial image.
    Replay {
        /// The VM's UUID (or name, looked up in the catalog).
        #[arg(long)]
        vm_uuid: String,
        /// The disk (target name, e.g. vda).
        #[arg(long)]
        disk: String,
        /// The copy to write onto: the disk as it was when the journal began.
        #[arg(long)]
        onto: PathBuf,
        /// Stop after this point: seq:N, or a time (RFC 3339 or "10 minutes ago").
        #[arg(long)]
        upto: Option<String>,
    },
}

#[derive(Serialize)]
pub struct RecordOut {
    pub disk: String,
    pub segment: String,
    pub seq: u64,
    pub kind: &'static str,
    pub ts_ns: u64,
    pub flags: Vec<&'static str>,
    pub offset: u64,
    pub length: u64,
    pub info: Option<serde_json::Value>,
}

#[derive(Serialize)]
pub struct SegmentOut {
    pub disk: String,
    pub segment: String,
    pub first_seq: u64,
    pub record_base: u64,
    pub records: usize,
    pub sealed: bool,
    pub bytes: u64,
    /// Set when the segment ends in bytes that are not a valid record.
    pub problem: Option<String>,
}

#[derive(Serialize)]
pub struct InspectOut {
    pub vm_uuid: String,
    pub segments: Vec<SegmentOut>,
    pub records: Vec<RecordOut>,
}

fn flag_names(f: u8) -> Vec<&'static str> {
    let mut v = Vec::new();
    if f & journal::format::FLAG_FUA != 0 {
        v.push("FUA");
    }
    if f & journal::format::FLAG_NO_HOLE != 0 {
        v.push("NO_HOLE");
    }
    if f & journal::format::FLAG_RESYNC != 0 {
        v.push("RESYNC");
    }
    v
}

pub fn parse_upto(s: &str) -> Result<Upto> {
    if let Some(n) = s.strip_prefix("seq:") {
        return Ok(Upto::Seq(
            n.trim()
                .parse()
                .with_context(|| format!("--upto {s:?}: seq:N needs a number"))?,
        ));
    }
    cdp_core::time::parse_time(s, cdp_core::time::now_ns())
        .map(Upto::TimeNs)
        .map_err(anyhow::Error::msg)
}

pub fn inspect(ctx: &Ctx, vm: &str, only: Option<&str>) -> Result<InspectOut> {
    let uuid = ctx.resolve_vm(vm)?;
    // The journal is the VM's: read as its user (docs/DESIGN.md, "Trust
    // boundaries").
    ctx.enter_vm(&uuid)?;
    let disks = match only {
        Some(d) => vec![d.to_string()],
        None => journal::list_disks(&ctx.state_dir, &uuid)?,
    };
    if disks.is_empty() {
        bail!(
            "no journal for VM {uuid} under {}: check --vm-uuid and --state-dir",
            ctx.state_dir.display()
        );
    }
    let mut out = InspectOut {
        vm_uuid: uuid.clone(),
        segments: Vec::new(),
        records: Vec::new(),
    };
    for disk in disks {
        cdp_core::names::check_disk(&disk)?;
        let dir = journal::journal_dir(&ctx.state_dir, &uuid, &disk);
        if !dir.is_dir() {
            bail!(
                "disk {disk} of VM {uuid} has no journal at {}",
                dir.display()
            );
        }
        for (_, path) in journal::list_segments(&dir)? {
            let seg = LoadedSegment::load(&path)?;
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let (sealed, problem) = match &seg.scan.tail {
                journal::Tail::Sealed(_) => (true, None),
                journal::Tail::Open => (false, None),
                journal::Tail::Torn { valid_len, reason } => (
                    false,
                    Some(format!("invalid bytes from {valid_len} on: {reason}")),
                ),
            };
            out.segments.push(SegmentOut {
                disk: disk.clone(),
                segment: name.clone(),
                first_seq: seg.scan.header.first_seq,
                record_base: seg.scan.header.record_base,
                records: seg.scan.records.len(),
                sealed,
                bytes: seg.bytes.len() as u64,
                problem,
            });
            for r in &seg.scan.records {
                let h = &r.header;
                let info = match h.kind {
                    Kind::Write | Kind::Zero | Kind::Trim | Kind::Flush | Kind::Index => None,
                    _ => Some(
                        serde_json::from_slice(r.payload(&seg.bytes))
                            .unwrap_or(serde_json::Value::Null),
                    ),
                };
                out.records.push(RecordOut {
                    disk: disk.clone(),
                    segment: name.clone(),
                    seq: h.seq,
                    kind: h.kind.name(),
                    ts_ns: h.ts_ns,
                    flags: flag_names(h.flags),
                    offset: h.offset,
                    length: h.length,
                    info,
                });
            }
        }
    }
    Ok(out)
}

pub fn run(ctx: &Ctx, cmd: JournalCmd) -> Result<()> {
    match cmd {
        JournalCmd::Inspect { vm_uuid, disk } => {
            let out = inspect(ctx, &vm_uuid, disk.as_deref())?;
            if ctx.json {
                return crate::print_json(&out);
            }
            println!("VM {}", out.vm_uuid);
            for s in &out.segments {
                println!(
                    "segment {}/{}  first seq {}  {} records  {}  {} bytes{}",
                    s.disk,
                    s.segment,
                    s.first_seq,
                    s.records,
                    if s.sealed { "sealed" } else { "open" },
                    s.bytes,
                    s.problem
                        .as_deref()
                        .map(|p| format!("  PROBLEM: {p}"))
                        .unwrap_or_default()
                );
            }
            println!(
                "{:<5} {:>8} {:<30} {:<13} {:<8} {:>14} {:>10}  INFO",
                "DISK", "SEQ", "TIME", "KIND", "FLAGS", "OFFSET", "LENGTH"
            );
            for r in &out.records {
                println!(
                    "{:<5} {:>8} {:<30} {:<13} {:<8} {:>14} {:>10}  {}",
                    r.disk,
                    r.seq,
                    cdp_core::time::fmt_ns(r.ts_ns),
                    r.kind,
                    r.flags.join(","),
                    r.offset,
                    r.length,
                    r.info.as_ref().map(|v| v.to_string()).unwrap_or_default()
                );
            }
            Ok(())
        }
        JournalCmd::Replay {
            vm_uuid,
            disk,
            onto,
            upto,
        } => {
            let uuid = ctx.resolve_vm(&vm_uuid)?;
            cdp_core::names::check_disk(&disk)?;
            let upto = match upto {
                Some(u) => parse_upto(&u)?,
                None => Upto::All,
            };
            let f = std::fs::File::options()
                .read(true)
                .write(true)
                .open(&onto)
                .with_context(|| format!("opening --onto {}", onto.display()))?;
            // The operator's --onto is opened (as root, if cdpctl is); the
            // VM's journal is read as the VM's user.
            ctx.enter_vm(&uuid)?;
            let dir = journal::journal_dir(&ctx.state_dir, &uuid, &disk);
            if !dir.is_dir() {
                bail!(
                    "disk {disk} of VM {uuid} has no journal at {}",
                    dir.display()
                );
            }
            let stats = journal::replay_disk(&ctx.state_dir, &uuid, &disk, &f, &onto, upto)?;
            f.sync_all()?;
            if ctx.json {
                return crate::print_json(&stats);
            }
            println!(
                "replayed {} segments, {} records ({} bytes written) onto {}, up to seq {}",
                stats.segments,
                stats.records_applied,
                stats.bytes_written,
                onto.display(),
                stats.last_seq
            );
            Ok(())
        }
    }
}
