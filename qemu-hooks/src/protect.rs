//! Editing a domain definition for `cdpctl protect` and `cdpctl unprotect`
//! (pure: text in, text out).
//!
//! Protecting a VM is two changes to its definition: the CDP metadata keys
//! (docs/DESIGN.md, "VM config keys") and the emulator, which becomes cdp-qemu. The emulator
//! the domain had is remembered in the keys (`emulator="…"`), so cdp-qemu
//! knows what to exec and `unprotect` can put it back.
//!
//! The text is spliced at the byte ranges the parser reports, never
//! re-serialised: everything the edit does not touch stays byte for byte,
//! so `unprotect(protect(x)) == x`.

use thiserror::Error;

use crate::domain::{self, DomainError, NS};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum EditError {
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error("the definition of {vm} has no <devices><emulator>: add the QEMU binary (<emulator>/usr/bin/qemu-system-x86_64</emulator>) and retry")]
    NoEmulator { vm: String },
    #[error("{vm} is not protected: its definition has no <cdp:protection> keys")]
    NotProtected { vm: String },
    #[error("{vm} already runs {emulator} as its emulator but has no CDP keys, so its real QEMU is unknown: set <emulator> back to the QEMU binary, then protect it")]
    WrapperWithoutKeys { vm: String, emulator: String },
    #[error("no disk to protect: name one with --disk (e.g. --disk vda)")]
    NoDisks,
}

/// What `cdpctl protect` asks for.
#[derive(Debug, Clone)]
pub struct Request {
    /// Disk targets (`vda`, …), in order.
    pub disks: Vec<String>,
    pub policy: String,
    /// The wrapper to set as emulator (absolute path of cdp-qemu).
    pub wrapper: String,
}

fn escape(v: &str) -> String {
    let mut o = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            c => o.push(c),
        }
    }
    o
}

/// Replace byte ranges (non-overlapping) with new text.
fn splice(text: &str, mut edits: Vec<(std::ops::Range<usize>, String)>) -> String {
    edits.sort_by_key(|(r, _)| std::cmp::Reverse(r.start));
    let mut out = text.to_string();
    for (r, s) in edits {
        out.replace_range(r, &s);
    }
    out
}

/// The start of the line `pos` is on, when only blanks precede it there
/// (so a removed element takes its indentation and line with it).
fn line_start(text: &str, pos: usize) -> usize {
    let before = &text[..pos];
    match before.rfind('\n') {
        Some(nl) if before[nl + 1..].chars().all(|c| c == ' ' || c == '\t') => nl,
        _ => pos,
    }
}

struct Located {
    name: String,
    emulator: Option<(std::ops::Range<usize>, String)>,
    metadata: Option<roxmltree::NodeId>,
    protection: Option<std::ops::Range<usize>>,
    /// Where a new `<metadata>` goes: after `<uuid>` (or `<name>`).
    after_ids: usize,
}

fn locate(doc: &roxmltree::Document) -> Result<Located, EditError> {
    let dom = domain::domain_element(doc)?;
    let name = dom
        .children()
        .find(|n| n.has_tag_name("name"))
        .and_then(|n| n.text())
        .unwrap_or("")
        .trim()
        .to_string();
    let emulator = dom
        .children()
        .find(|n| n.has_tag_name("devices"))
        .and_then(|d| d.children().find(|n| n.has_tag_name("emulator")))
        .map(|e| (e.range(), e.text().unwrap_or("").trim().to_string()));
    let metadata = dom.children().find(|n| n.has_tag_name("metadata"));
    let protection = metadata
        .and_then(|m| m.children().find(|n| n.tag_name().namespace() == Some(NS)))
        .map(|p| p.range());
    let after_ids = dom
        .children()
        .find(|n| n.has_tag_name("uuid"))
        .or_else(|| dom.children().find(|n| n.has_tag_name("name")))
        .map(|n| n.range().end)
        .ok_or(DomainError::Missing("name"))?;
    Ok(Located {
        name,
        emulator,
        metadata: metadata.map(|m| m.id()),
        protection,
        after_ids,
    })
}

/// Add (or replace) the CDP keys and make the emulator the wrapper.
pub fn protect(text: &str, req: &Request) -> Result<String, EditError> {
    if req.disks.is_empty() {
        return Err(EditError::NoDisks);
    }
    let dom = domain::parse(text)?;
    let doc = roxmltree::Document::parse(text).map_err(|e| DomainError::Xml(e.to_string()))?;
    let at = locate(&doc)?;
    let (emu_range, current) = at.emulator.clone().ok_or_else(|| EditError::NoEmulator {
        vm: at.name.clone(),
    })?;
    // The real QEMU: remembered from an earlier protect, else the current one.
    let original = match dom.protection.as_ref().and_then(|p| p.emulator.clone()) {
        Some(e) => e,
        None if current == req.wrapper || current.ends_with("/cdp-qemu") => {
            return Err(EditError::WrapperWithoutKeys {
                vm: at.name,
                emulator: current,
            })
        }
        None => current,
    };
    for d in &req.disks {
        cdp_core::names::check_disk(d).map_err(|e| DomainError::Key(e.to_string()))?;
    }
    let mut keys = format!(
        "<cdp:protection xmlns:cdp=\"{NS}\" policy=\"{}\" emulator=\"{}\">",
        escape(&req.policy),
        escape(&original)
    );
    for d in &req.disks {
        keys.push_str(&format!("\n      <cdp:disk target=\"{}\"/>", escape(d)));
    }
    keys.push_str("\n    </cdp:protection>");

    let mut edits = vec![(
        emu_range,
        format!("<emulator>{}</emulator>", escape(&req.wrapper)),
    )];
    match (
        at.protection,
        at.metadata.map(|id| doc.get_node(id).unwrap()),
    ) {
        (Some(r), _) => edits.push((r, keys)),
        (None, Some(m)) => {
            let r = m.range();
            let src = &text[r.clone()];
            if src.ends_with("/>") {
                edits.push((r, format!("<metadata>\n    {keys}\n  </metadata>")));
            } else {
                let close = r.end - "</metadata>".len();
                // Before the closing tag's own indentation.
                let at = line_start(text, close);
                edits.push((at..at, format!("\n    {keys}")));
            }
        }
        (None, None) => edits.push((
            at.after_ids..at.after_ids,
            format!("\n  <metadata>\n    {keys}\n  </metadata>"),
        )),
    }
    let out = splice(text, edits);
    // What we wrote must read back as we meant it.
    let check = domain::parse(&out)?;
    debug_assert!(check.protection.is_some());
    Ok(out)
}

/// Remove the CDP keys and put the remembered emulator back.
pub fn unprotect(text: &str) -> Result<String, EditError> {
    let dom = domain::parse(text)?;
    let doc = roxmltree::Document::parse(text).map_err(|e| DomainError::Xml(e.to_string()))?;
    let at = locate(&doc)?;
    let (Some(prot), Some(p)) = (at.protection.clone(), dom.protection.as_ref()) else {
        return Err(EditError::NotProtected { vm: at.name });
    };
    let mut edits = Vec::new();
    if let (Some(orig), Some((r, _))) = (&p.emulator, &at.emulator) {
        edits.push((r.clone(), format!("<emulator>{}</emulator>", escape(orig))));
    }
    let m = doc.get_node(at.metadata.unwrap()).unwrap();
    let others = m
        .children()
        .any(|n| n.is_element() && n.tag_name().namespace() != Some(NS));
    if others {
        edits.push((line_start(text, prot.start)..prot.end, String::new()));
    } else {
        let r = m.range();
        edits.push((line_start(text, r.start)..r.end, String::new()));
    }
    Ok(splice(text, edits))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BARE: &str = "<domain type='kvm'>\n  <name>web</name>\n  <uuid>6f1c2a8e-3b4d-4e5f-8a9b-0c1d2e3f4a5b</uuid>\n  <memory unit='KiB'>262144</memory>\n  <devices>\n    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n    <disk type='file' device='disk'>\n      <driver name='qemu' type='raw'/>\n      <source file='/images/web&amp;co.raw'/>\n      <target dev='vda' bus='virtio'/>\n    </disk>\n  </devices>\n</domain>\n";

    fn req(disks: &[&str]) -> Request {
        Request {
            disks: disks.iter().map(|d| d.to_string()).collect(),
            policy: "gold".into(),
            wrapper: "/usr/bin/cdp-qemu".into(),
        }
    }

    #[test]
    fn round_trip_without_metadata() {
        let p = protect(BARE, &req(&["vda"])).unwrap();
        let d = domain::parse(&p).unwrap();
        assert_eq!(d.emulator.as_deref(), Some("/usr/bin/cdp-qemu"));
        let prot = d.protection.unwrap();
        assert_eq!(prot.policy, "gold");
        assert_eq!(
            prot.emulator.as_deref(),
            Some("/usr/bin/qemu-system-x86_64")
        );
        assert_eq!(prot.disks, vec![("vda".to_string(), None)]);
        assert_eq!(unprotect(&p).unwrap(), BARE);
    }

    #[test]
    fn round_trip_with_foreign_metadata() {
        let with = BARE.replace(
            "  <memory",
            "  <metadata>\n    <app:x xmlns:app=\"urn:app\">1</app:x>\n  </metadata>\n  <memory",
        );
        let p = protect(&with, &req(&["vda"])).unwrap();
        assert!(p.contains("<app:x"));
        assert!(domain::parse(&p).unwrap().protection.is_some());
        assert_eq!(unprotect(&p).unwrap(), with);
        let empty = BARE.replace("  <memory", "  <metadata/>\n  <memory");
        let p = protect(&empty, &req(&["vda"])).unwrap();
        assert!(domain::parse(&p).unwrap().protection.is_some());
    }

    #[test]
    fn protect_twice_keeps_the_real_emulator() {
        let p1 = protect(BARE, &req(&["vda"])).unwrap();
        let mut r = req(&["vda", "vdb"]);
        r.policy = "default".into();
        let p2 = protect(&p1, &r).unwrap();
        let prot = domain::parse(&p2).unwrap().protection.unwrap();
        assert_eq!(
            prot.emulator.as_deref(),
            Some("/usr/bin/qemu-system-x86_64")
        );
        assert_eq!(prot.disks.len(), 2);
        assert_eq!(unprotect(&p2).unwrap(), BARE);
    }

    #[test]
    fn refusals() {
        assert_eq!(protect(BARE, &req(&[])).unwrap_err(), EditError::NoDisks);
        assert!(matches!(
            unprotect(BARE).unwrap_err(),
            EditError::NotProtected { .. }
        ));
        let wrapped = BARE.replace("/usr/bin/qemu-system-x86_64", "/usr/bin/cdp-qemu");
        assert!(matches!(
            protect(&wrapped, &req(&["vda"])).unwrap_err(),
            EditError::WrapperWithoutKeys { .. }
        ));
        let no_emu = BARE.replace("    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n", "");
        assert!(matches!(
            protect(&no_emu, &req(&["vda"])).unwrap_err(),
            EditError::NoEmulator { .. }
        ));
        assert!(protect(BARE, &req(&["../x"])).is_err());
    }
}
