//! The libvirt domain XML: name, UUID, disks, and the CDP keys (docs/DESIGN.md, "VM config keys").
//!
//! ```xml
//! <metadata>
//!   <cdp:protection xmlns:cdp="urn:cdpd:protection:1" policy="default">
//!     <cdp:disk target="vda"/>
//!     <cdp:disk target="vdb" policy="gold"/>
//!   </cdp:protection>
//! </metadata>
//! ```
//! Accepts a `<domain>` or libvirt's live `<domstatus>` that wraps one.

use thiserror::Error;

pub const NS: &str = "urn:cdpd:protection:1";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DomainError {
    #[error("the VM definition is not valid XML: {0}")]
    Xml(String),
    #[error("the VM definition has no <domain> element")]
    NoDomain,
    #[error("the VM definition has no {0}")]
    Missing(&'static str),
    #[error("malformed CDP key: {0}")]
    Key(String),
    #[error("disk {target} is tagged for CDP but the domain has no disk with <target dev='{target}'/>: fix or remove <cdp:disk target='{target}'/>")]
    UnknownDisk { target: String },
    #[error("disk {target} is tagged for CDP twice: keep one <cdp:disk target='{target}'/>")]
    Duplicate { target: String },
    #[error("disk {target} is {format}, but cdpd protects raw disks only: convert it with `qemu-img convert -O raw {path} {path}.raw`, point the disk at the raw file (<driver type='raw'/>), or remove <cdp:disk target='{target}'/>")]
    NotRaw {
        target: String,
        format: String,
        path: String,
    },
    #[error("disk {target} has no local source file or block device (network disks are not supported): remove <cdp:disk target='{target}'/>")]
    NoSource { target: String },
    #[error("disk {target} names policy {policy:?}, which is not in the config: add [policy.{policy}] to {config} or use one of {known:?}")]
    UnknownPolicy {
        target: String,
        policy: String,
        config: String,
        known: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomDisk {
    pub target: String,
    /// `<source file=…>` or `<source dev=…>`.
    pub source: Option<String>,
    /// `<driver type=…>`.
    pub format: Option<String>,
    /// `disk`, `cdrom`, …
    pub device: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Protection {
    pub policy: String,
    /// The emulator the domain had before `cdpctl protect` made it cdp-qemu
    /// (attribute `emulator`); cdp-qemu execs it, `cdpctl unprotect` puts it back.
    pub emulator: Option<String>,
    /// (target, per-disk policy override)
    pub disks: Vec<(String, Option<String>)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    pub name: String,
    pub uuid: String,
    /// `<devices><emulator>`.
    pub emulator: Option<String>,
    pub disks: Vec<DomDisk>,
    pub protection: Option<Protection>,
    /// The `<domain>` element's text (without a `<domstatus>` wrapper).
    pub xml: String,
}

/// A disk to protect, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tagged {
    pub target: String,
    pub path: String,
    /// The policy it is captured and shipped with: the VM's (a per-disk
    /// `policy=` is not honoured, see [`Protection::unhonoured_policies`]).
    pub policy: String,
}

/// A `<cdp:disk policy=…>` naming another policy than the VM's. Per-disk
/// policies are not honoured (docs/LIBVIRT.md, "Per-disk policy"): cdpd
/// captures every disk of a VM with one policy and the shipper ships them
/// to that policy's targets. `cdpctl protect` refuses such a definition;
/// a VM that has one still starts, with this message in its log and in
/// `cdpctl status`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("disk {target} names policy {policy:?}, but per-disk policies are not supported: it is captured and shipped with the VM's policy {vm_policy:?} (remove policy=\"{policy}\" from <cdp:disk target=\"{target}\"/>, or give the whole VM that policy with `cdpctl protect VM --policy {policy}`; docs/LIBVIRT.md, \"Per-disk policy\")")]
pub struct UnhonouredPolicy {
    pub target: String,
    pub policy: String,
    pub vm_policy: String,
}

impl Protection {
    /// The disks whose `policy=` differs from the VM's (those equal to it
    /// change nothing).
    pub fn unhonoured_policies(&self) -> Vec<UnhonouredPolicy> {
        self.disks
            .iter()
            .filter_map(|(target, p)| {
                let p = p.as_ref().filter(|p| **p != self.policy)?;
                Some(UnhonouredPolicy {
                    target: target.clone(),
                    policy: p.clone(),
                    vm_policy: self.policy.clone(),
                })
            })
            .collect()
    }
}

/// The `<domain>` element: the root, or inside libvirt's `<domstatus>`.
pub fn domain_element<'a, 'i>(
    doc: &'a roxmltree::Document<'i>,
) -> Result<roxmltree::Node<'a, 'i>, DomainError> {
    let root = doc.root_element();
    if root.has_tag_name("domain") {
        return Ok(root);
    }
    root.descendants()
        .find(|n| n.has_tag_name("domain"))
        .ok_or(DomainError::NoDomain)
}

pub fn parse(text: &str) -> Result<Domain, DomainError> {
    let doc = roxmltree::Document::parse(text).map_err(|e| DomainError::Xml(e.to_string()))?;
    let dom = domain_element(&doc)?;
    let child_text = |name: &'static str| -> Result<String, DomainError> {
        dom.children()
            .find(|n| n.has_tag_name(name))
            .and_then(|n| n.text())
            .map(|t| t.trim().to_string())
            .ok_or(DomainError::Missing(name))
    };
    let name = child_text("name")?;
    let uuid = child_text("uuid")?;
    let mut disks = Vec::new();
    if let Some(devices) = dom.children().find(|n| n.has_tag_name("devices")) {
        for d in devices.children().filter(|n| n.has_tag_name("disk")) {
            let Some(target) = d
                .children()
                .find(|n| n.has_tag_name("target"))
                .and_then(|t| t.attribute("dev"))
            else {
                continue;
            };
            let source = d
                .children()
                .find(|n| n.has_tag_name("source"))
                .and_then(|s| s.attribute("file").or_else(|| s.attribute("dev")))
                .map(str::to_string);
            let format = d
                .children()
                .find(|n| n.has_tag_name("driver"))
                .and_then(|s| s.attribute("type"))
                .map(str::to_string);
            disks.push(DomDisk {
                target: target.to_string(),
                source,
                format,
                device: d.attribute("device").unwrap_or("disk").to_string(),
            });
        }
    }
    let protection = match dom
        .children()
        .find(|n| n.has_tag_name("metadata"))
        .and_then(|m| m.children().find(|n| n.tag_name().namespace() == Some(NS)))
    {
        None => None,
        Some(p) => Some(parse_protection(p)?),
    };
    let emulator = dom
        .children()
        .find(|n| n.has_tag_name("devices"))
        .and_then(|d| d.children().find(|n| n.has_tag_name("emulator")))
        .and_then(|e| e.text())
        .map(|t| t.trim().to_string());
    let r = dom.range();
    Ok(Domain {
        name,
        uuid,
        emulator,
        disks,
        protection,
        xml: text[r].to_string(),
    })
}

fn parse_protection(p: roxmltree::Node) -> Result<Protection, DomainError> {
    let key = |m: String| DomainError::Key(m);
    if p.tag_name().name() != "protection" {
        return Err(key(format!(
            "<cdp:{}> is not a CDP key: use <cdp:protection>",
            p.tag_name().name()
        )));
    }
    for a in p.attributes() {
        if a.name() != "policy" && a.name() != "emulator" {
            return Err(key(format!(
                "<cdp:protection> has an unknown attribute {:?} (known: policy, emulator)",
                a.name()
            )));
        }
    }
    let policy = p.attribute("policy").unwrap_or("default").to_string();
    let mut disks = Vec::new();
    for c in p.children().filter(|n| n.is_element()) {
        if c.tag_name().namespace() != Some(NS) || c.tag_name().name() != "disk" {
            return Err(key(format!(
                "<{}> inside <cdp:protection>: only <cdp:disk target='…'/> belongs there",
                c.tag_name().name()
            )));
        }
        for a in c.attributes() {
            if a.name() != "target" && a.name() != "policy" {
                return Err(key(format!(
                    "<cdp:disk> has an unknown attribute {:?} (known: target, policy)",
                    a.name()
                )));
            }
        }
        let target = c.attribute("target").ok_or_else(|| {
            key("<cdp:disk> without target='…' (the disk's target dev, e.g. vda)".into())
        })?;
        cdp_core::names::check_disk(target).map_err(|e| key(e.to_string()))?;
        disks.push((
            target.to_string(),
            c.attribute("policy").map(str::to_string),
        ));
    }
    if disks.is_empty() {
        return Err(key(
            "<cdp:protection> names no disk: add <cdp:disk target='vda'/>".into(),
        ));
    }
    Ok(Protection {
        policy,
        emulator: p.attribute("emulator").map(str::to_string),
        disks,
    })
}

impl Domain {
    /// Check the CDP keys against the domain's disks and the config.
    pub fn tagged(&self, config: &cdp_core::config::Config) -> Result<Vec<Tagged>, DomainError> {
        let Some(p) = &self.protection else {
            return Ok(Vec::new());
        };
        let mut out: Vec<Tagged> = Vec::new();
        // Every disk gets the VM's policy; a per-disk one is not honoured
        // (Protection::unhonoured_policies says so).
        let policy = &p.policy;
        if policy != "default" && !config.policy.contains_key(policy) {
            return Err(DomainError::UnknownPolicy {
                target: p.disks.first().map(|d| d.0.clone()).unwrap_or_default(),
                policy: policy.clone(),
                config: config
                    .source
                    .as_ref()
                    .map(|s| s.display().to_string())
                    .unwrap_or_else(|| cdp_core::config::DEFAULT_CONFIG.into()),
                known: config.policy.keys().cloned().collect(),
            });
        }
        for (target, _) in &p.disks {
            if out.iter().any(|t| &t.target == target) {
                return Err(DomainError::Duplicate {
                    target: target.clone(),
                });
            }
            let d = self
                .disks
                .iter()
                .find(|d| &d.target == target && d.device == "disk")
                .ok_or_else(|| DomainError::UnknownDisk {
                    target: target.clone(),
                })?;
            let path = d.source.clone().ok_or_else(|| DomainError::NoSource {
                target: target.clone(),
            })?;
            let format = d.format.clone().unwrap_or_else(|| "raw".into());
            if format != "raw" {
                return Err(DomainError::NotRaw {
                    target: target.clone(),
                    format,
                    path,
                });
            }
            out.push(Tagged {
                target: target.clone(),
                path,
                policy: policy.clone(),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOM: &str = r#"<domain type='kvm'>
  <name>web</name>
  <uuid>6f1c2a8e-3b4d-4e5f-8a9b-0c1d2e3f4a5b</uuid>
  <metadata>
    <cdp:protection xmlns:cdp="urn:cdpd:protection:1" policy="default">
      <cdp:disk target="vda"/>
    </cdp:protection>
  </metadata>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/var/lib/libvirt/images/web.raw'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/data.qcow2'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
  </devices>
</domain>"#;

    #[test]
    fn parses_domain_and_keys() {
        let d = parse(DOM).unwrap();
        assert_eq!(d.name, "web");
        assert_eq!(d.disks.len(), 2);
        let t = d.tagged(&Default::default()).unwrap();
        assert_eq!(t[0].path, "/var/lib/libvirt/images/web.raw");
        // Inside libvirt's live status wrapper too.
        let live = format!("<domstatus state='running'><taint/>{DOM}</domstatus>");
        assert_eq!(parse(&live).unwrap().uuid, d.uuid);
        assert!(parse(&live).unwrap().xml.starts_with("<domain"));
    }

    #[test]
    fn refusals() {
        let c = Default::default();
        let qcow = DOM.replace("target=\"vda\"", "target=\"vdb\"");
        assert!(matches!(
            parse(&qcow).unwrap().tagged(&c),
            Err(DomainError::NotRaw { .. })
        ));
        let unknown = DOM.replace("target=\"vda\"", "target=\"vdz\"");
        assert!(matches!(
            parse(&unknown).unwrap().tagged(&c),
            Err(DomainError::UnknownDisk { .. })
        ));
        let policy = DOM.replace("policy=\"default\"", "policy=\"gold\"");
        let e = parse(&policy).unwrap().tagged(&c).unwrap_err();
        assert!(e.to_string().contains("[policy.gold]"), "{e}");
        for bad in [
            DOM.replace("<cdp:disk target=\"vda\"/>", "<cdp:disk targte=\"vda\"/>"),
            DOM.replace("<cdp:disk target=\"vda\"/>", "<cdp:dsk target=\"vda\"/>"),
            DOM.replace("<cdp:disk target=\"vda\"/>", "<cdp:disk target=\"../x\"/>"),
            DOM.replace("<cdp:disk target=\"vda\"/>", ""),
            DOM.replace("policy=\"default\"", "polcy=\"default\""),
        ] {
            assert!(matches!(parse(&bad), Err(DomainError::Key(_))), "{bad}");
        }
        let twice = DOM.replace(
            "<cdp:disk target=\"vda\"/>",
            "<cdp:disk target=\"vda\"/><cdp:disk target=\"vda\"/>",
        );
        assert!(matches!(
            parse(&twice).unwrap().tagged(&c),
            Err(DomainError::Duplicate { .. })
        ));
        assert!(matches!(
            parse("<domain><name>x</name>"),
            Err(DomainError::Xml(_))
        ));
    }

    #[test]
    fn per_disk_policy_is_reported_not_honoured() {
        let mut c = cdp_core::config::Config::default();
        c.policy.insert("gold".into(), Default::default());
        let same = DOM.replace(
            "<cdp:disk target=\"vda\"/>",
            "<cdp:disk target=\"vda\" policy=\"default\"/>",
        );
        let d = parse(&same).unwrap();
        assert!(d
            .protection
            .as_ref()
            .unwrap()
            .unhonoured_policies()
            .is_empty());
        let gold = DOM.replace(
            "<cdp:disk target=\"vda\"/>",
            "<cdp:disk target=\"vda\" policy=\"gold\"/>",
        );
        let d = parse(&gold).unwrap();
        let u = d.protection.as_ref().unwrap().unhonoured_policies();
        assert_eq!(u.len(), 1, "{u:?}");
        let m = u[0].to_string();
        assert!(
            m.contains("disk vda names policy \"gold\"") && m.contains("VM's policy \"default\""),
            "{m}"
        );
        // The disk is captured and shipped with the VM's policy.
        assert_eq!(d.tagged(&c).unwrap()[0].policy, "default");
        // An unknown per-disk policy does not stop the VM (it is reported).
        let typo = gold.replace("policy=\"gold\"/>", "policy=\"gld\"/>");
        assert_eq!(
            parse(&typo).unwrap().tagged(&c).unwrap()[0].policy,
            "default"
        );
    }

    #[test]
    fn unprotected_domain() {
        let d = parse("<domain><name>a</name><uuid>u</uuid></domain>").unwrap();
        assert!(d.protection.is_none());
        assert!(d.tagged(&Default::default()).unwrap().is_empty());
    }
}
