//! `cdpctl verify` (is every point restorable, is every object intact) and
//! `cdpctl restore-config` (the VM definition of a point, storage remapped).

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use cdp_core::time::{fmt_ns, now_ns};
use cdp_repo::format as rf;
use cdp_repo::restore::{self, Point};
use cdp_repo::store::Store;
use cdp_repo::verify::{Report, SeqRange};

use crate::restore_cmd::{candidate_repos, resolve_vm, with_fallback, RepoArgs};
use crate::Ctx;

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// VM name or UUID.
    pub vm: String,
    /// Also fetch every object and check its checksum.
    #[arg(long)]
    pub deep: bool,
    #[command(flatten)]
    pub repo: RepoArgs,
}

#[derive(clap::Args)]
pub struct RestoreConfigArgs {
    /// VM name or UUID.
    pub vm: String,
    /// The point: RFC 3339 time, "10 minutes ago", seq:N, mark:LABEL or latest.
    #[arg(long)]
    pub at: String,
    /// Rewrite storage paths: OLD=NEW (a path prefix). Repeatable.
    #[arg(long = "remap", value_name = "OLD=NEW")]
    pub remaps: Vec<String>,
    /// Where to write the domain XML (never overwritten).
    #[arg(long)]
    pub output: std::path::PathBuf,
    #[command(flatten)]
    pub repo: RepoArgs,
}

pub fn verify(ctx: &Ctx, a: &VerifyArgs) -> Result<()> {
    let candidates = candidate_repos(ctx, &a.repo)?;
    let rt = tokio::runtime::Runtime::new()?;
    let mode = crate::progress::Mode::of(ctx.json);
    // The first target of the policy that answers and holds the VM; one
    // that answers with problems is reported, not skipped. The progress:
    // bytes of the segment objects and chunks checked (one meter for every
    // target tried: its bytes never go back).
    let meter = crate::progress::Meter::new(mode, "verify", 0);
    let m = &meter;
    let r = rt.block_on(with_fallback(candidates, |store| async move {
        let vm = resolve_vm(ctx, &store, &a.vm).await?;
        anyhow::Ok(cdp_repo::verify::verify_with(&store, &vm, a.deep, Some(m.ticker())).await?)
    }));
    meter.clear();
    let (_, used, report) = r?;
    meter.finish();
    if ctx.json {
        let mut v = serde_json::to_value(&report)?;
        v["target"] = serde_json::to_value(&used.target)?;
        v["repository"] = used.repository.clone().into();
        crate::print_json(&v)?;
    } else {
        print_report(&report);
    }
    if !report.ok {
        bail!(
            "{} problem(s) in {}{}",
            report.problems.len(),
            report.repo,
            if ctx.json { "" } else { ": see above" }
        );
    }
    Ok(())
}

fn seq_range(r: &SeqRange) -> String {
    if r.from_seq == r.to_seq {
        format!("seq {} ({})", r.from_seq, r.from)
    } else {
        format!(
            "seq {} ({}) → seq {} ({})",
            r.from_seq, r.from, r.to_seq, r.to
        )
    }
}

fn print_report(r: &Report) {
    println!(
        "VM {} in {} ({})",
        r.vm_uuid,
        r.repo,
        if r.deep {
            "deep check: every object fetched and checked"
        } else {
            "quick check of listings, indexes and baselines; --deep fetches every object"
        }
    );
    let c = &r.checked;
    println!(
        "checked {} indexes, {} segments, {} baselines, {} chunks{}; {} VM definitions stored",
        c.indexes,
        c.segments,
        c.baselines,
        c.chunks,
        if r.deep {
            format!(
                " ({} objects, {} fetched)",
                c.fetched_objects,
                crate::status::human(c.fetched_bytes)
            )
        } else {
            String::new()
        },
        c.definitions
    );
    for d in &r.disks {
        println!(
            "disk {}: {} segments, {} records{}, {} baselines, {} marks, {} GAPs",
            d.disk,
            d.segments,
            d.records,
            match (d.first_seq, d.last_seq) {
                (Some(a), Some(b)) => format!(" (seq {a}–{b})"),
                _ => String::new(),
            },
            d.baselines.len(),
            d.marks.len(),
            d.gaps.len()
        );
        if d.restorable.is_empty() {
            println!("  no restorable point");
        }
        for x in &d.restorable {
            println!("  restorable    {}", seq_range(x));
        }
        for x in &d.unrestorable {
            println!("  UNRESTORABLE  {}", seq_range(x));
        }
        for g in &d.gaps {
            println!("  GAP           seq {} ({}): {}", g.seq, g.time, g.reason);
        }
        for n in &d.chain {
            println!("  chain         {n}");
        }
    }
    if r.problems.is_empty() {
        println!("OK: no problem found");
        return;
    }
    println!("{} PROBLEM(S):", r.problems.len());
    for p in &r.problems {
        let kind = serde_json::to_value(p.kind).unwrap_or_default();
        println!(
            "  {}{} [{}]: {}",
            p.disk
                .as_ref()
                .map(|d| format!("{d}: "))
                .unwrap_or_default(),
            p.key.as_deref().unwrap_or("(journal)"),
            kind.as_str().unwrap_or("?"),
            p.what
        );
        if p.unrestorable.is_empty() {
            println!("      no restorable point needs it");
        }
        for x in &p.unrestorable {
            println!("      makes unrestorable: {}", seq_range(x));
        }
        if !p.marks.is_empty() {
            println!("      marks affected: {}", p.marks.join(", "));
        }
    }
}

/// `OLD=NEW` pairs; OLD must not be empty.
pub(crate) fn parse_remaps(v: &[String]) -> Result<Vec<(String, String)>> {
    v.iter()
        .map(|s| match s.split_once('=') {
            Some((old, new)) if !old.is_empty() => Ok((old.to_string(), new.to_string())),
            _ => bail!("--remap {s:?}: give OLD=NEW, e.g. /var/lib/libvirt/images=/srv/images"),
        })
        .collect()
}

/// One storage path rewritten by [`remap_disk_sources`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Remapped {
    pub attribute: String,
    pub old: String,
    pub new: String,
}

/// What [`remap_disk_sources`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RemapResult {
    pub remapped: Vec<Remapped>,
    /// Storage paths of disks no remap applied to.
    pub kept: Vec<String>,
}

/// In a libvirt domain XML, rewrite the `file=` / `dev=` attribute of each
/// `<source>` inside a `<disk>` (its backing store included) whose value
/// begins with a remap's OLD: that prefix becomes NEW (the longest OLD that
/// matches wins). Only those attribute values change: every other byte of
/// the document stays as it was.
pub fn remap_disk_sources(
    xml: &[u8],
    remaps: &[(String, String)],
) -> Result<(Vec<u8>, RemapResult)> {
    let mut result = RemapResult::default();
    let out = edit_disk_sources(xml, &[b"file", b"dev"], &mut |key, value| {
        let best = remaps
            .iter()
            .filter(|(old, _)| value.starts_with(old.as_str()))
            .max_by_key(|(old, _)| old.len());
        match best {
            Some((old, new)) => {
                let nv = format!("{new}{}", &value[old.len()..]);
                result.remapped.push(Remapped {
                    attribute: String::from_utf8_lossy(key).into_owned(),
                    old: value.to_string(),
                    new: nv.clone(),
                });
                Some(nv)
            }
            None => {
                result.kept.push(value.to_string());
                None
            }
        }
    })?;
    Ok((out, result))
}

/// In a libvirt domain XML, rewrite the `pool=` attribute of each disk's
/// `<source>` equal to a remap's OLD into its NEW (`--remap-pool OLD=NEW`);
/// every other byte stays as it was.
pub fn remap_disk_pools(xml: &[u8], remaps: &[(String, String)]) -> Result<(Vec<u8>, RemapResult)> {
    let mut result = RemapResult::default();
    let out = edit_disk_sources(xml, &[b"pool"], &mut |_, value| match remaps
        .iter()
        .find(|(old, _)| old == value)
    {
        Some((old, new)) => {
            result.remapped.push(Remapped {
                attribute: "pool".into(),
                old: old.clone(),
                new: new.clone(),
            });
            Some(new.clone())
        }
        None => {
            result.kept.push(value.to_string());
            None
        }
    })?;
    Ok((out, result))
}

/// Rewrite the attributes named `keys` of each `<source>` inside a `<disk>`
/// to what `edit(key, value)` returns (`None`: unchanged), splicing the
/// document at the parser's byte ranges.
fn edit_disk_sources(
    xml: &[u8],
    keys: &[&[u8]],
    edit: &mut dyn FnMut(&[u8], &str) -> Option<String>,
) -> Result<Vec<u8>> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_reader(xml);
    let base = xml.as_ptr() as usize;
    // (start, end) of each attribute value to replace, and its new text.
    let mut edits: Vec<(usize, usize, String)> = Vec::new();
    let mut stack: Vec<Vec<u8>> = Vec::new();
    loop {
        let pos = reader.buffer_position();
        let ev = reader.read_event().with_context(|| {
            format!("the stored definition is not well-formed XML (near byte {pos})")
        })?;
        let (e, empty) = match ev {
            Event::Eof => break,
            Event::Start(e) => (e, false),
            Event::Empty(e) => (e, true),
            Event::End(_) => {
                stack.pop();
                continue;
            }
            _ => continue,
        };
        let name = e.name().as_ref().to_vec();
        let in_disk = stack.iter().any(|n| n == b"disk");
        if in_disk && name == b"source" {
            for attr in e.attributes() {
                let attr = attr.context("bad attribute in the stored definition")?;
                let key = attr.key.as_ref();
                if !keys.contains(&key) {
                    continue;
                }
                let raw: &[u8] = &attr.value;
                let start = (raw.as_ptr() as usize).wrapping_sub(base);
                if start > xml.len() || start + raw.len() > xml.len() {
                    bail!("internal error: attribute value not found in the document");
                }
                let value = attr
                    .unescape_value()
                    .context("bad attribute value in the stored definition")?;
                if let Some(nv) = edit(key, &value) {
                    edits.push((
                        start,
                        start + raw.len(),
                        quick_xml::escape::escape(nv.as_str()).into_owned(),
                    ));
                }
            }
        }
        if !empty {
            stack.push(name);
        }
    }
    let mut out = Vec::with_capacity(xml.len());
    let mut at = 0;
    for (s, e, text) in edits {
        out.extend_from_slice(&xml[at..s]);
        out.extend_from_slice(text.as_bytes());
        at = e;
    }
    out.extend_from_slice(&xml[at..]);
    Ok(out)
}

/// The time of a point: a time is itself; a seq or mark is the time of that
/// record in the VM's disk journals; latest is now.
async fn point_time(
    ctx: &Ctx,
    store: &Store,
    a: &RepoArgs,
    vm: &str,
    point: &Point,
) -> Result<(u64, String)> {
    match point {
        Point::TimeNs(t) => return Ok((*t, fmt_ns(*t))),
        Point::Latest => return Ok((u64::MAX, "latest".into())),
        _ => {}
    }
    let mut disks = cdp_repo::read::list_disks(store, vm).await?;
    if !a.no_local {
        disks.extend(cdp_core::journal::list_disks(&ctx.state_dir, vm).unwrap_or_default());
    }
    disks.sort();
    disks.dedup();
    if disks.is_empty() {
        bail!(
            "VM {vm} has no journal in {} nor on this host: give the point as a time",
            store.url()
        );
    }
    let mut newest_before: Option<(u64, u64)> = None;
    let mut errors = Vec::new();
    for disk in &disks {
        let local = (!a.no_local
            && cdp_core::journal::journal_dir(&ctx.state_dir, vm, disk).is_dir())
        .then_some(ctx.state_dir.as_path());
        let h = restore::load_history(Some(store), local, vm, disk).await?;
        let seq = match point {
            Point::Seq(n) => *n,
            _ => match restore::resolve(&h, Some(store), point).await {
                Ok(s) => s,
                Err(e) => {
                    errors.push(e.to_string());
                    continue;
                }
            },
        };
        // The record itself, or (a seq of another disk) the newest before it.
        for (_, e) in h.entries() {
            if e.seq == seq {
                return Ok((e.ts_ns, format!("{point} ({})", fmt_ns(e.ts_ns))));
            }
            if e.seq < seq && newest_before.is_none_or(|(s, _)| e.seq > s) {
                newest_before = Some((e.seq, e.ts_ns));
            }
        }
    }
    match (point, newest_before) {
        (Point::Seq(_), Some((_, ts))) => Ok((ts, format!("{point} ({})", fmt_ns(ts)))),
        (Point::Seq(n), None) => bail!("seq {n} is before every record of VM {vm}'s journals"),
        _ => bail!("{}", errors.join("; ")),
    }
}

/// The definition of a VM in force at a point, found in one repository.
pub(crate) struct FoundDefinition {
    pub vm: String,
    pub at_desc: String,
    pub key: String,
    pub stored_ns: u64,
    pub xml: Vec<u8>,
}

/// Find the stored definition of `vm_arg` in force at `point` in `store`.
pub(crate) async fn find_definition(
    ctx: &Ctx,
    store: &Store,
    a: &RestoreConfigArgs,
    point: &Point,
) -> Result<FoundDefinition> {
    let vm = resolve_vm(ctx, store, &a.vm).await?;
    let mut defs: Vec<(u64, String)> = store
        .list(&rf::config_prefix(&vm))
        .await?
        .into_iter()
        .filter_map(|o| {
            let name = o.key.rsplit('/').next()?;
            let ts = name
                .strip_suffix(".xml")
                .filter(|t| t.len() == 20)?
                .parse()
                .ok()?;
            Some((ts, o.key))
        })
        .collect();
    defs.sort();
    let Some(first) = defs.first() else {
        bail!(
            "no VM definition of {vm} is stored in {}: the shipper stores it when given the domain XML (cdp-shipper run --vm-config FILE; cdp-qemu --vm-config)",
            store.url()
        );
    };
    let (at_ns, at_desc) = point_time(ctx, store, &a.repo, &vm, point).await?;
    let Some((ts, key)) = defs.iter().rev().find(|(ts, _)| *ts <= at_ns) else {
        bail!(
            "{at_desc} is before the first stored definition of VM {vm} ({}): choose a later point",
            fmt_ns(first.0)
        );
    };
    let xml = store.get(key).await?.to_vec();
    Ok(FoundDefinition {
        at_desc,
        key: key.clone(),
        stored_ns: *ts,
        xml,
        vm,
    })
}

/// `cdpctl restore-config`: the definition in force at a point, from the
/// policy's targets in order (primary first, falling back as restore does)
/// or from `--repo`.
pub fn restore_config(ctx: &Ctx, a: &RestoreConfigArgs) -> Result<()> {
    let point = Point::parse(&a.at, now_ns())?;
    let remaps = parse_remaps(&a.remaps)?;
    if a.output.exists() {
        bail!(
            "{} exists: restore-config never overwrites a file; remove it or choose another --output",
            a.output.display()
        );
    }
    let candidates = candidate_repos(ctx, &a.repo)?;
    let rt = tokio::runtime::Runtime::new()?;
    let (_, used, found) = rt.block_on(with_fallback(candidates, |store| {
        let point = &point;
        async move { find_definition(ctx, &store, a, point).await }
    }))?;
    let FoundDefinition {
        vm,
        at_desc,
        key,
        stored_ns,
        xml,
    } = found;
    let (out, what) = remap_disk_sources(&xml, &remaps)?;
    write_new(&a.output, &out)?;
    let unused: Vec<&str> = remaps
        .iter()
        .filter(|(old, _)| {
            !what
                .remapped
                .iter()
                .any(|r| r.old.starts_with(old.as_str()))
        })
        .map(|(old, _)| old.as_str())
        .collect();
    if ctx.json {
        return crate::print_json(&serde_json::json!({
            "vm_uuid": vm,
            "point": at_desc,
            "definition": key,
            "stored": fmt_ns(stored_ns),
            "output": a.output,
            "remapped": what.remapped,
            "kept": what.kept,
            "unused_remaps": unused,
            "target": used.target,
            "repository": used.repository,
        }));
    }
    println!(
        "wrote {}: the definition of VM {vm} stored {} (in force at {at_desc})",
        a.output.display(),
        fmt_ns(stored_ns)
    );
    for r in &what.remapped {
        println!("  {}: {} → {}", r.attribute, r.old, r.new);
    }
    for k in &what.kept {
        println!("  kept: {k}");
    }
    for u in unused {
        eprintln!("cdpctl: warning: --remap {u}=…: no disk path begins with {u}");
    }
    Ok(())
}

/// Create `path` (never replacing a file) with `data`; nothing is left on error.
pub(crate) fn write_new(path: &Path, data: &[u8]) -> Result<()> {
    let mut f = std::fs::File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    let r = f.write_all(data).and_then(|_| f.sync_all());
    if let Err(e) = r {
        drop(f);
        let _ = std::fs::remove_file(path);
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOMAIN: &str = r#"<domain type='kvm'>
  <name>web</name>
  <!-- <disk><source file='/var/lib/libvirt/images/commented.img'/></disk> -->
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/var/lib/libvirt/images/web&amp;co.img' index="2"/>
      <backingStore type='file'>
        <format type='qcow2'/>
        <source file="/var/lib/libvirt/images/base.qcow2"/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <source dev='/dev/vg0/web-data'></source>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/srv/iso/install.iso'/>
      <target dev='sda' bus='sata'/>
    </disk>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/images/not-a-disk.sock'/>
    </channel>
    <serial type='file'><source file='/var/lib/libvirt/images/console.log'/></serial>
  </devices>
</domain>
"#;

    fn remaps(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn remaps_disk_sources_only_and_keeps_every_other_byte() {
        let (out, r) = remap_disk_sources(
            DOMAIN.as_bytes(),
            &remaps(&[
                ("/var/lib/libvirt/images", "/srv/restored"),
                ("/var/lib/libvirt/images/base", "/srv/bases/base"),
                ("/dev/vg0/", "/dev/vg1/restored-"),
            ]),
        )
        .unwrap();
        let expect = DOMAIN
            .replace(
                "'/var/lib/libvirt/images/web&amp;co.img'",
                "'/srv/restored/web&amp;co.img'",
            )
            .replace(
                "\"/var/lib/libvirt/images/base.qcow2\"",
                "\"/srv/bases/base.qcow2\"",
            )
            .replace("'/dev/vg0/web-data'", "'/dev/vg1/restored-web-data'");
        assert_eq!(String::from_utf8(out).unwrap(), expect);
        assert_eq!(
            r.remapped,
            vec![
                Remapped {
                    attribute: "file".into(),
                    old: "/var/lib/libvirt/images/web&co.img".into(),
                    new: "/srv/restored/web&co.img".into()
                },
                Remapped {
                    attribute: "file".into(),
                    old: "/var/lib/libvirt/images/base.qcow2".into(),
                    new: "/srv/bases/base.qcow2".into()
                },
                Remapped {
                    attribute: "dev".into(),
                    old: "/dev/vg0/web-data".into(),
                    new: "/dev/vg1/restored-web-data".into()
                },
            ]
        );
        assert_eq!(r.kept, vec!["/srv/iso/install.iso".to_string()]);
    }

    #[test]
    fn no_remap_is_the_identity_and_bad_xml_is_refused() {
        let (out, r) = remap_disk_sources(DOMAIN.as_bytes(), &[]).unwrap();
        assert_eq!(out, DOMAIN.as_bytes());
        assert_eq!(r.kept.len(), 4);
        assert!(remap_disk_sources(b"<domain><devices></domain>", &[]).is_err());
        // Special characters in the new path are escaped.
        let (out, _) = remap_disk_sources(
            b"<domain><devices><disk><source file='/a/x.img'/></disk></devices></domain>",
            &remaps(&[("/a", "/b<'c'>")]),
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "<domain><devices><disk><source file='/b&lt;&apos;c&apos;&gt;/x.img'/></disk></devices></domain>"
        );
    }

    #[test]
    fn remaps_disk_pools_only() {
        let xml = "<domain><devices><disk type='volume'><source pool='default' volume='v'/></disk><pool name='default'/></devices></domain>";
        let (out, r) = remap_disk_pools(
            xml.as_bytes(),
            &remaps(&[("default", "restored"), ("defaul", "x")]),
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            xml.replacen("pool='default'", "pool='restored'", 1)
        );
        assert_eq!(r.remapped.len(), 1);
    }

    #[test]
    fn remap_arguments() {
        assert_eq!(
            parse_remaps(&["/a=/b".into(), "/c=".into()]).unwrap(),
            remaps(&[("/a", "/b"), ("/c", "")])
        );
        assert!(parse_remaps(&["=/b".into()]).is_err());
        assert!(parse_remaps(&["/a".into()]).is_err());
    }
}
