//! A restored VM defined in libvirt as a NEW VM (issue 14, "Whole-VM
//! restore"; `cdpctl restore --all-disks --define NAME`, and `cdpctl boot`,
//! whose disks are qcow2 overlays: [`DiskDest::Qcow2`]). Both commands go
//! through [`clone_definition`]: one rule, one implementation.
//!
//! The definition comes from the repository: the shipper of the VM uploaded
//! it, and the VM's QEMU user (so whoever broke out of the guest) could have
//! shaped it. Root hands it to libvirt, which runs what it names, so it is
//! untrusted input (docs/DESIGN.md, "Trust boundaries"; docs/SECURITY.md,
//! "Defining a restored VM"). [`clone_definition`] rewrites it through the
//! XML parser into a new VM and refuses, rather than passes on, whatever
//! could make libvirt or QEMU touch the host:
//! - only the elements libvirt documents for a kvm/qemu domain, and of the
//!   devices only those that name no host resource (no `<hostdev>`,
//!   `<filesystem>`, `<shmem>`, `<smartcard>`, nvdimm `<memory>`, `<lease>`,
//!   `<qemu:commandline>` or any other namespaced element, `<os><acpi>`,
//!   `<bootloader>`, interface `<script>`/`<backend>`/`<ip>`, passthrough TPM
//!   or input, file audio, `<rom file>`, fw_cfg `<entry file>`, ...);
//! - every disk of the new VM is one this restore wrote (a disk or lun it
//!   did not restore is refused; a cdrom or floppy's medium is ejected);
//! - `<emulator>` must be the host's QEMU (as libvirt reports it) or cdp-qemu,
//!   and becomes the host's QEMU; kernel, initrd, dtb and loader must be
//!   files libvirt's own definition of the original VM on this host names,
//!   or firmware under /usr/share;
//! - any other attribute or text that is an absolute path, or an attribute
//!   named file/path/socket/template/xauth/evdev, is refused;
//! - `<seclabel>` is dropped (the host's defaults apply: a definition must
//!   not choose to run QEMU as root or unconfined), and so is `<metadata>`
//!   (the CDP keys: the new VM is not protected until `cdpctl protect`).
//!
//! And so that the new VM clashes with nothing of the original: a new name
//! and UUID, `<genid/>` regenerated, a new MAC per interface and no tap
//! name, file and unix character devices (serial, console) moved to the
//! restore's directory, graphics on automatic ports, vsock on an automatic
//! CID, no `<nvram>` (libvirt makes a fresh one from its template), no
//! sysinfo UUID entry.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use quick_xml::events::{BytesStart, BytesText, Event};

/// Where a restored disk of the new VM is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskDest {
    /// A raw image file.
    File(PathBuf),
    /// A raw volume of a libvirt storage pool.
    Volume { pool: String, volume: String },
    /// A qcow2 file (an instant boot's overlay, which names its own
    /// backing): the disk's driver type becomes qcow2.
    Qcow2(PathBuf),
}

/// The new VM's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub uuid: String,
}

impl Identity {
    /// `name` (checked) with a random UUID (version 4).
    pub fn random(name: &str) -> Result<Identity> {
        check_name(name)?;
        let b = random_bytes::<16>()?;
        let mut b = b;
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
        let uuid = format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        );
        Ok(Identity {
            name: name.to_string(),
            uuid,
        })
    }
}

/// A libvirt domain name we accept for a new VM: letters, digits, `._+-`,
/// not starting with `-` or `.`, at most 64 bytes.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['-', '.'])
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"._+-".contains(&c));
    if !ok {
        bail!("VM name {name:?}: use letters, digits and . _ + - (not first), at most 64");
    }
    Ok(())
}

fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("reading /dev/urandom")?;
    Ok(b)
}

/// A random MAC address in QEMU/libvirt's range, 52:54:00:xx:xx:xx.
pub fn random_mac() -> Result<String> {
    let b = random_bytes::<3>()?;
    Ok(format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2]))
}

/// What the new VM is made of, besides the definition.
pub struct CloneSpec<'a> {
    pub identity: &'a Identity,
    /// Each restored disk by its target (`vda`): where its bytes are.
    pub disks: &'a BTreeMap<String, DiskDest>,
    /// The host's QEMU: the new VM's `<emulator>`.
    pub emulator: &'a str,
    /// Kernel, initrd, dtb and loader files the new VM may name (those of
    /// libvirt's own definition of the original VM on this host).
    pub trusted_paths: &'a [String],
    /// Where file and unix character devices (serial, console) go.
    pub char_dir: &'a Path,
}

/// What [`clone_definition`] changed, for the operator.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CloneReport {
    /// (disk target, where it is now).
    pub disks: Vec<(String, String)>,
    /// (old MAC or "", new MAC), one per interface.
    pub macs: Vec<(String, String)>,
    /// (old path, new path) of file and unix character devices.
    pub chardevs: Vec<(String, String)>,
    /// Other changes, one sentence each.
    pub notes: Vec<String>,
}

/// The disks of a domain XML in order: (device, target dev, type, source pool, source volume).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskInfo {
    pub device: String,
    pub target: String,
    pub kind: String,
    pub pool: String,
    pub volume: String,
    /// Whether it has a `<driver>` element.
    pub driver: bool,
}

/// Every `<devices><disk>` of a domain XML, in document order.
pub fn disks_of(xml: &[u8]) -> Result<Vec<DiskInfo>> {
    let mut reader = quick_xml::Reader::from_reader(xml);
    let mut stack: Vec<Vec<u8>> = Vec::new();
    let mut out = Vec::new();
    loop {
        let ev = reader
            .read_event()
            .context("the definition is not well-formed XML")?;
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
        let path: Vec<&[u8]> = stack.iter().map(Vec::as_slice).collect();
        match (path.as_slice(), name.as_slice()) {
            ([b"domain", b"devices"], b"disk") => out.push(DiskInfo {
                device: attr(&e, "device")?.unwrap_or_else(|| "disk".into()),
                kind: attr(&e, "type")?.unwrap_or_else(|| "file".into()),
                ..DiskInfo::default()
            }),
            ([b"domain", b"devices", b"disk"], b"target") => {
                if let Some(d) = out.last_mut() {
                    d.target = attr(&e, "dev")?.unwrap_or_default();
                }
            }
            ([b"domain", b"devices", b"disk"], b"driver") => {
                if let Some(d) = out.last_mut() {
                    d.driver = true;
                }
            }
            ([b"domain", b"devices", b"disk"], b"source") => {
                if let Some(d) = out.last_mut() {
                    d.pool = attr(&e, "pool")?.unwrap_or_default();
                    d.volume = attr(&e, "volume")?.unwrap_or_default();
                }
            }
            _ => {}
        }
        if !empty {
            stack.push(name);
        }
    }
    Ok(out)
}

fn attr(e: &BytesStart, key: &str) -> Result<Option<String>> {
    for a in e.attributes() {
        let a = a.context("bad attribute in the definition")?;
        if a.key.as_ref() == key.as_bytes() {
            return Ok(Some(a.unescape_value()?.into_owned()));
        }
    }
    Ok(None)
}

fn attrs(e: &BytesStart) -> Result<Vec<(String, String)>> {
    e.attributes()
        .map(|a| {
            let a = a.context("bad attribute in the definition")?;
            Ok((
                String::from_utf8_lossy(a.key.as_ref()).into_owned(),
                a.unescape_value()?.into_owned(),
            ))
        })
        .collect()
}

fn element(name: &str, attrs: &[(String, String)]) -> BytesStart<'static> {
    let mut s = BytesStart::new(name.to_string());
    for (k, v) in attrs {
        s.push_attribute((k.as_str(), v.as_str()));
    }
    s
}

/// The children of `<domain>` a new VM may have (libvirt's domain format,
/// minus what runs or reads something of the host: `<bootloader>`, `<idmap>`
/// of containers, namespaced elements).
const DOMAIN_CHILDREN: &[&str] = &[
    "name",
    "uuid",
    "genid",
    "title",
    "description",
    "metadata",
    "memory",
    "currentMemory",
    "maxMemory",
    "vcpu",
    "vcpus",
    "iothreads",
    "iothreadids",
    "defaultiothread",
    "cputune",
    "memtune",
    "blkiotune",
    "numatune",
    "memoryBacking",
    "resource",
    "os",
    "features",
    "cpu",
    "clock",
    "on_poweroff",
    "on_reboot",
    "on_crash",
    "on_lockfailure",
    "pm",
    "perf",
    "devices",
    "seclabel",
    "sysinfo",
    "keywrap",
    "launchSecurity",
    "throttlegroups",
];

/// The children of `<os>` a new VM may have.
const OS_CHILDREN: &[&str] = &[
    "type", "boot", "bootmenu", "smbios", "bios", "cmdline", "firmware", "kernel", "initrd", "dtb",
    "loader", "nvram",
];

/// The devices a new VM may have: none of them names a host resource once
/// checked below.
const DEVICES: &[&str] = &[
    "emulator",
    "disk",
    "controller",
    "interface",
    "serial",
    "console",
    "parallel",
    "channel",
    "input",
    "graphics",
    "video",
    "sound",
    "audio",
    "memballoon",
    "rng",
    "watchdog",
    "panic",
    "tpm",
    "vsock",
    "iommu",
    "hub",
    "redirdev",
];

/// Attributes that name a host file wherever they are, unless rewritten here.
const PATH_ATTRS: &[&str] = &["file", "path", "socket", "template", "xauth", "evdev"];

/// Character device types that touch nothing of the host but a file or
/// socket moved into the restore's directory.
const CHARDEV_TYPES: &[&str] = &[
    "null",
    "vc",
    "pty",
    "file",
    "unix",
    "spicevmc",
    "spiceport",
    "qemu-vdagent",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Text {
    /// Refused when it looks like a path.
    Plain,
    /// Any text (kernel command line, title, description).
    Free,
    /// Replaced by this string.
    Replace(&'static str),
    /// A host file: trusted or firmware.
    HostFile,
    /// An rng backend's device.
    RngDevice,
    /// The emulator: checked, then the host's.
    Emulator,
}

enum Action {
    /// Write this start tag (its subtree follows), with this text rule.
    Keep(BytesStart<'static>, Text),
    /// Leave the element and its subtree out.
    Skip,
    /// Write these events instead of the element and its subtree.
    Replace(Vec<Event<'static>>),
}

struct Rewriter<'a, 'b> {
    spec: &'a CloneSpec<'b>,
    new_mac: &'a mut dyn FnMut() -> Result<String>,
    disks: Vec<DiskInfo>,
    /// Index into `disks` of the disk being written.
    disk_no: usize,
    /// Chardev paths already moved: the same old path, the same new one
    /// (a console on its serial's file).
    moved: HashMap<String, String>,
    report: CloneReport,
    stack: Vec<String>,
    text: Vec<Text>,
    named: bool,
    uuid_seen: bool,
    /// The type of the character device being written.
    chardev_type: String,
}

/// Rewrite the stored definition `xml` into a new VM's (see the module's
/// comment): each disk of `spec.disks` at its new place, the new identity,
/// a MAC from `new_mac` per interface, the host's emulator. Refuses
/// anything else that names a host resource.
pub fn clone_definition(
    xml: &[u8],
    spec: &CloneSpec,
    new_mac: &mut dyn FnMut() -> Result<String>,
) -> Result<(Vec<u8>, CloneReport)> {
    let mut rw = Rewriter {
        spec,
        new_mac,
        disks: disks_of(xml)?,
        disk_no: 0,
        moved: HashMap::new(),
        report: CloneReport::default(),
        stack: Vec::new(),
        text: Vec::new(),
        named: false,
        uuid_seen: false,
        chardev_type: String::new(),
    };
    for t in spec.disks.keys() {
        if !rw.disks.iter().any(|d| &d.target == t) {
            bail!("the definition has no disk {t}: it does not describe the restored VM");
        }
    }
    let out = rw.run(xml)?;
    if !rw.named || !rw.uuid_seen {
        bail!("the definition has no <name> or no <uuid>");
    }
    Ok((out, rw.report))
}

impl Rewriter<'_, '_> {
    fn run(&mut self, xml: &[u8]) -> Result<Vec<u8>> {
        let mut reader = quick_xml::Reader::from_reader(xml);
        let mut w = quick_xml::Writer::new(Vec::with_capacity(xml.len()));
        // > 0: inside a left-out subtree, its depth.
        let mut skip = 0usize;
        loop {
            let pos = reader.buffer_position();
            let ev = reader.read_event().with_context(|| {
                format!("the definition is not well-formed XML (near byte {pos})")
            })?;
            if skip > 0 {
                match ev {
                    Event::Start(_) => skip += 1,
                    Event::End(_) => skip -= 1,
                    Event::Eof => break,
                    _ => {}
                }
                continue;
            }
            match ev {
                Event::Eof => break,
                Event::Start(e) => match self.element(&e)? {
                    Action::Keep(s, t) => {
                        self.stack
                            .push(String::from_utf8_lossy(s.name().as_ref()).into_owned());
                        self.text.push(t);
                        w.write_event(Event::Start(s))?;
                    }
                    Action::Skip => skip = 1,
                    Action::Replace(evs) => {
                        for e in evs {
                            w.write_event(e)?;
                        }
                        skip = 1;
                    }
                },
                Event::Empty(e) => match self.element(&e)? {
                    Action::Keep(s, _) => w.write_event(Event::Empty(s))?,
                    Action::Skip => {}
                    Action::Replace(evs) => {
                        for e in evs {
                            w.write_event(e)?;
                        }
                    }
                },
                Event::End(e) => {
                    self.stack.pop();
                    self.text.pop();
                    w.write_event(Event::End(e))?;
                }
                Event::Text(t) => {
                    let t = self.text(&t)?;
                    w.write_event(Event::Text(t))?;
                }
                Event::Decl(d) => w.write_event(Event::Decl(d))?,
                Event::Comment(_) | Event::PI(_) => {}
                Event::CData(_) => bail!("CDATA in the definition (in <{}>)", self.here()),
                Event::DocType(_) => bail!("a DOCTYPE in the definition"),
            }
        }
        if !self.stack.is_empty() {
            bail!("the definition ends inside <{}>", self.here());
        }
        Ok(w.into_inner())
    }

    fn here(&self) -> String {
        self.stack.join("/")
    }

    fn text(&mut self, t: &BytesText) -> Result<BytesText<'static>> {
        let raw = t.unescape().context("bad text in the definition")?;
        let v = raw.trim();
        if v.is_empty() {
            return Ok(t.clone().into_owned());
        }
        let rule = self.text.last().copied().unwrap_or(Text::Plain);
        let here = self.here();
        match rule {
            Text::Free => {}
            Text::Plain => {
                if v.starts_with('/') {
                    bail!("<{here}> names the host path {v:?}: a restored definition may not");
                }
            }
            Text::Replace(which) => {
                let new = match which {
                    "name" => {
                        self.named = true;
                        self.spec.identity.name.clone()
                    }
                    _ => {
                        self.uuid_seen = true;
                        self.spec.identity.uuid.clone()
                    }
                };
                return Ok(BytesText::new(&new).into_owned());
            }
            Text::HostFile => self.host_file(&here, v)?,
            Text::RngDevice => {
                if !["/dev/urandom", "/dev/random", "/dev/hwrng"].contains(&v) {
                    bail!("<{here}> reads {v:?}: only /dev/urandom, /dev/random or /dev/hwrng");
                }
            }
            Text::Emulator => {
                let ok = v == self.spec.emulator
                    || Path::new(v).file_name() == Some("cdp-qemu".as_ref());
                if !ok {
                    bail!(
                        "the definition's emulator is {v:?}, not this host's QEMU ({}) nor cdp-qemu: refused (a definition may not choose the program libvirt runs)",
                        self.spec.emulator
                    );
                }
                if v != self.spec.emulator {
                    self.report
                        .notes
                        .push(format!("emulator {v} → {}", self.spec.emulator));
                }
                return Ok(BytesText::new(self.spec.emulator).into_owned());
            }
        }
        Ok(t.clone().into_owned())
    }

    /// A kernel, initrd, dtb or loader: one the original's definition on
    /// this host names, or firmware under /usr/share (no `..`, and still
    /// there once links are resolved).
    fn host_file(&self, here: &str, v: &str) -> Result<()> {
        if self.spec.trusted_paths.iter().any(|p| p == v) {
            return Ok(());
        }
        let p = Path::new(v);
        let firmware = p.is_absolute()
            && !p.components().any(|c| c == std::path::Component::ParentDir)
            && v.starts_with("/usr/share/")
            && std::fs::canonicalize(p).is_ok_and(|c| c.starts_with("/usr/share/"));
        if !firmware {
            bail!(
                "<{here}> names {v:?}: neither libvirt's definition of the original VM on this host nor firmware under /usr/share names it; refused (edit the written domain.xml and define it yourself if you trust it)"
            );
        }
        Ok(())
    }

    /// Attributes kept as they are: none may name a host file.
    fn checked(&self, e: &BytesStart, name: &str) -> Result<BytesStart<'static>> {
        let mut out = Vec::new();
        for (k, v) in attrs(e)? {
            if k == "rendernode" {
                continue;
            }
            if PATH_ATTRS.contains(&k.as_str()) || v.starts_with('/') {
                bail!(
                    "<{name} {k}={v:?}> in <{}> names a host path: a restored definition may not",
                    self.here()
                );
            }
            out.push((k, v));
        }
        Ok(element(name, &out))
    }

    fn element(&mut self, e: &BytesStart) -> Result<Action> {
        let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
        if name.contains(':') {
            bail!(
                "<{name}> in <{}>: a restored definition may not carry namespaced elements (qemu:commandline and the like)",
                self.here()
            );
        }
        if name == "seclabel" && !self.stack.is_empty() {
            return Ok(Action::Skip);
        }
        let path: Vec<&str> = self.stack.iter().map(String::as_str).collect();
        match path.as_slice() {
            [] => self.domain(e, &name),
            ["domain"] => self.domain_child(e, &name),
            ["domain", "os"] => self.os_child(e, &name),
            ["domain", "devices"] => self.device(e, &name),
            ["domain", "devices", dev, rest @ ..] => {
                let dev = dev.to_string();
                let depth = rest.len();
                self.device_child(e, &name, &dev, depth)
            }
            // A cgroup partition (libvirt writes /machine), not a file.
            ["domain", "resource"] if name == "partition" => {
                Ok(Action::Keep(self.checked(e, &name)?, Text::Free))
            }
            ["domain", "sysinfo", ..] if name == "entry" => {
                if attr(e, "name")?.as_deref() == Some("uuid") {
                    return Ok(Action::Skip);
                }
                Ok(Action::Keep(self.checked(e, &name)?, Text::Plain))
            }
            _ => Ok(Action::Keep(self.checked(e, &name)?, Text::Plain)),
        }
    }

    fn domain(&mut self, e: &BytesStart, name: &str) -> Result<Action> {
        if name != "domain" {
            bail!("the definition is a <{name}>, not a <domain>");
        }
        let t = attr(e, "type")?.unwrap_or_default();
        if t != "kvm" && t != "qemu" {
            bail!("<domain type={t:?}>: only kvm and qemu domains are defined");
        }
        // The namespace declarations stay (inert without their elements).
        let keep: Vec<(String, String)> = attrs(e)?;
        Ok(Action::Keep(element(name, &keep), Text::Plain))
    }

    fn domain_child(&mut self, e: &BytesStart, name: &str) -> Result<Action> {
        if !DOMAIN_CHILDREN.contains(&name) {
            bail!("<{name}> in <domain>: not something a restored VM may have");
        }
        match name {
            "name" => Ok(Action::Keep(element(name, &[]), Text::Replace("name"))),
            "uuid" => Ok(Action::Keep(element(name, &[]), Text::Replace("uuid"))),
            "genid" => {
                self.report
                    .notes
                    .push("VM generation ID: a new one (<genid/>)".into());
                Ok(Action::Replace(vec![Event::Empty(element("genid", &[]))]))
            }
            "metadata" => {
                self.report.notes.push(
                    "<metadata> left out (the CDP keys with it: the new VM is not protected)"
                        .into(),
                );
                Ok(Action::Skip)
            }
            "seclabel" => {
                self.report
                    .notes
                    .push("<seclabel> left out: the host's security defaults apply".into());
                Ok(Action::Skip)
            }
            "title" | "description" => Ok(Action::Keep(self.checked(e, name)?, Text::Free)),
            _ => Ok(Action::Keep(self.checked(e, name)?, Text::Plain)),
        }
    }

    fn os_child(&mut self, e: &BytesStart, name: &str) -> Result<Action> {
        if !OS_CHILDREN.contains(&name) {
            bail!("<{name}> in <os>: not something a restored VM may have");
        }
        match name {
            "nvram" => {
                self.report.notes.push(
                    "<nvram> left out: libvirt makes the new VM a fresh variable store from its template (boot entries are the firmware's defaults)"
                        .into(),
                );
                Ok(Action::Skip)
            }
            "kernel" | "initrd" | "dtb" | "loader" => {
                Ok(Action::Keep(self.checked(e, name)?, Text::HostFile))
            }
            "cmdline" => Ok(Action::Keep(self.checked(e, name)?, Text::Free)),
            _ => Ok(Action::Keep(self.checked(e, name)?, Text::Plain)),
        }
    }

    fn device(&mut self, e: &BytesStart, name: &str) -> Result<Action> {
        if !DEVICES.contains(&name) {
            bail!("a <{name}> device: a restored VM may not have one (it names a host resource); refused");
        }
        let kind = attr(e, "type")?.unwrap_or_default();
        let refuse = |what: &str| -> Result<Action> {
            bail!("a <{name} type={kind:?}> device ({what}): refused in a restored VM")
        };
        match name {
            "emulator" => return Ok(Action::Keep(element(name, &[]), Text::Emulator)),
            "disk" => return self.disk(e),
            "interface"
                if !["network", "bridge", "user", "direct", "ethernet"]
                    .contains(&kind.as_str()) =>
            {
                return refuse("it reaches a host device, socket or port")
            }
            "serial" | "console" | "parallel" | "channel" => {
                if !CHARDEV_TYPES.contains(&kind.as_str()) {
                    return refuse("a host device, pipe or network port");
                }
                self.chardev_type = kind.clone();
            }
            "graphics" => return self.graphics(e, &kind),
            "input" if ["passthrough", "evdev"].contains(&kind.as_str()) => {
                return refuse("a host input device")
            }
            "audio" if !["none", "spice"].contains(&kind.as_str()) => {
                return refuse("it plays to a host file or device")
            }
            "redirdev" if kind != "spicevmc" => return refuse("a host port or device"),
            _ => {}
        }
        Ok(Action::Keep(self.checked(e, name)?, Text::Plain))
    }

    fn graphics(&mut self, e: &BytesStart, kind: &str) -> Result<Action> {
        if !["vnc", "spice", "egl-headless"].contains(&kind) {
            bail!("a <graphics type={kind:?}> device: only vnc, spice and egl-headless in a restored VM");
        }
        let mut out = Vec::new();
        let mut ports = false;
        for (k, v) in attrs(e)? {
            match k.as_str() {
                "port" | "tlsPort" | "websocket" | "autoport" => ports = true,
                "socket" => {}
                _ if PATH_ATTRS.contains(&k.as_str()) || v.starts_with('/') => {
                    bail!("<graphics {k}={v:?}> names a host path: refused")
                }
                _ => out.push((k, v)),
            }
        }
        if ports || kind == "vnc" {
            out.push(("autoport".into(), "yes".into()));
            self.report
                .notes
                .push(format!("{kind} graphics on an automatic port"));
        }
        Ok(Action::Keep(element("graphics", &out), Text::Plain))
    }

    fn disk(&mut self, e: &BytesStart) -> Result<Action> {
        let no = self.disk_no;
        self.disk_no += 1;
        let info = self
            .disks
            .get(no)
            .cloned()
            .context("internal error: disk count")?;
        let dest = self.spec.disks.get(&info.target);
        let mut out: Vec<(String, String)> = Vec::new();
        for (k, v) in attrs(e)? {
            match k.as_str() {
                "type" => {}
                _ if PATH_ATTRS.contains(&k.as_str()) || v.starts_with('/') => {
                    bail!("<disk {k}={v:?}> names a host path: refused")
                }
                _ => out.push((k, v)),
            }
        }
        let kind = match dest {
            Some(DiskDest::File(p) | DiskDest::Qcow2(p)) => {
                self.report
                    .disks
                    .push((info.target.clone(), p.display().to_string()));
                "file"
            }
            Some(DiskDest::Volume { pool, volume }) => {
                self.report
                    .disks
                    .push((info.target.clone(), format!("pool {pool}, volume {volume}")));
                "volume"
            }
            None if info.device == "cdrom" || info.device == "floppy" => {
                if info.kind == "file" || info.kind == "block" || info.kind == "volume" {
                    self.report.notes.push(format!(
                        "{} {}: its medium is ejected (not part of the restore)",
                        info.device, info.target
                    ));
                }
                "file"
            }
            None => bail!(
                "the definition has disk {:?} (device {}), which this restore did not write: a restored VM's disks are only the restored ones; refused",
                info.target,
                info.device
            ),
        };
        out.insert(0, ("type".into(), kind.into()));
        Ok(Action::Keep(element("disk", &out), Text::Plain))
    }

    /// An element inside a device; `depth` 0 is the device's own child.
    fn device_child(
        &mut self,
        e: &BytesStart,
        name: &str,
        dev: &str,
        depth: usize,
    ) -> Result<Action> {
        if name == "rom" && attr(e, "file")?.is_some() {
            bail!(
                "<rom file=…> in <{}>: refused in a restored VM",
                self.here()
            );
        }
        match (dev, name, depth) {
            ("disk", _, 0) => return self.disk_child(e, name),
            ("interface", "mac", 0) => {
                let old = attr(e, "address")?.unwrap_or_default();
                let new = (self.new_mac)()?;
                self.report.macs.push((old, new.clone()));
                let mac = element("mac", &[("address".into(), new)]);
                return Ok(Action::Replace(vec![Event::Empty(mac)]));
            }
            ("interface", "target", 0) => return Ok(Action::Skip),
            ("interface", "script" | "downscript" | "backend" | "ip" | "route", 0) => {
                bail!("<interface><{name}>: it makes libvirt run or configure something on the host; refused")
            }
            ("serial" | "console" | "parallel" | "channel", "source", 0) => {
                return self.chardev_source(e, dev);
            }
            ("serial" | "console" | "parallel" | "channel", "log", 0) => {
                return Ok(Action::Skip);
            }
            ("graphics", "listen", 0) => {
                let keep: Vec<(String, String)> = attrs(e)?
                    .into_iter()
                    .filter(|(k, _)| k != "socket")
                    .collect();
                let e = element("listen", &keep);
                return Ok(Action::Keep(self.checked(&e, name)?, Text::Plain));
            }
            ("vsock", "cid", 0) => {
                let cid = element("cid", &[("auto".into(), "yes".into())]);
                return Ok(Action::Replace(vec![Event::Empty(cid)]));
            }
            ("rng", "backend", 0) => {
                let model = attr(e, "model")?.unwrap_or_default();
                if model != "random" && model != "builtin" {
                    bail!(
                        "<rng><backend model={model:?}>: only random or builtin in a restored VM"
                    );
                }
                return Ok(Action::Keep(self.checked(e, name)?, Text::RngDevice));
            }
            ("tpm", "backend", 0) => {
                let t = attr(e, "type")?.unwrap_or_default();
                if t != "emulator" {
                    bail!("<tpm><backend type={t:?}>: only an emulated TPM in a restored VM");
                }
                self.report.notes.push(
                    "the TPM is a new, empty emulated one (its state is not restored)".into(),
                );
            }
            _ => {}
        }
        Ok(Action::Keep(self.checked(e, name)?, Text::Plain))
    }

    fn disk_child(&mut self, e: &BytesStart, name: &str) -> Result<Action> {
        let info = self.disks[self.disk_no - 1].clone();
        let dest = self.spec.disks.get(&info.target);
        match (name, dest) {
            ("source", Some(DiskDest::File(p))) => {
                let s = element("source", &[("file".into(), p.display().to_string())]);
                Ok(Action::Replace(vec![Event::Empty(s)]))
            }
            ("source", Some(DiskDest::Qcow2(p))) => {
                let s = element("source", &[("file".into(), p.display().to_string())]);
                let mut evs = vec![Event::Empty(s)];
                if !info.driver {
                    // Without one libvirt would read the qcow2 file as raw.
                    let d = [("name", "qemu"), ("type", "qcow2")]
                        .map(|(k, v)| (k.to_string(), v.to_string()));
                    evs.insert(0, Event::Empty(element("driver", &d)));
                }
                Ok(Action::Replace(evs))
            }
            ("source", Some(DiskDest::Volume { pool, volume })) => {
                let s = element(
                    "source",
                    &[
                        ("pool".into(), pool.clone()),
                        ("volume".into(), volume.clone()),
                    ],
                );
                Ok(Action::Replace(vec![Event::Empty(s)]))
            }
            // An ejected medium.
            ("source", None) => Ok(Action::Skip),
            ("backingStore" | "mirror" | "auth", _) => Ok(Action::Skip),
            ("driver", Some(d)) => {
                let mut a: Vec<(String, String)> =
                    attrs(e)?.into_iter().filter(|(k, _)| k != "type").collect();
                let format = match d {
                    DiskDest::Qcow2(_) => "qcow2",
                    _ => "raw",
                };
                a.push(("type".into(), format.into()));
                let e = element("driver", &a);
                Ok(Action::Keep(self.checked(&e, name)?, Text::Plain))
            }
            _ => Ok(Action::Keep(self.checked(e, name)?, Text::Plain)),
        }
    }

    /// A character device's `<source>`: a file or a serial's unix socket
    /// moved into the restore's directory; a channel's unix socket and a
    /// pty without a path (libvirt chooses one).
    fn chardev_source(&mut self, e: &BytesStart, dev: &str) -> Result<Action> {
        let mut out = Vec::new();
        for (k, v) in attrs(e)? {
            if k != "path" {
                if PATH_ATTRS.contains(&k.as_str()) || v.starts_with('/') {
                    bail!("<{dev}><source {k}={v:?}> names a host path: refused");
                }
                out.push((k, v));
                continue;
            }
            // The device's type: is it a file, a socket, a pty?
            let kind = self.chardev_type.clone();
            match kind.as_str() {
                "file" | "unix" if !(kind == "unix" && dev == "channel") => {
                    let n = self.moved.len();
                    let ext = if kind == "file" { "log" } else { "sock" };
                    let new = self
                        .moved
                        .entry(v.clone())
                        .or_insert_with(|| {
                            self.spec
                                .char_dir
                                .join(format!("{dev}{n}.{ext}"))
                                .display()
                                .to_string()
                        })
                        .clone();
                    if !self.report.chardevs.iter().any(|(o, _)| *o == v) {
                        self.report.chardevs.push((v, new.clone()));
                    }
                    out.push((k, new));
                }
                _ => {}
            }
        }
        Ok(Action::Replace(vec![Event::Empty(element("source", &out))]))
    }
}

/// A domain's type (`kvm`, `qemu`) and `<os><type arch=…>`.
pub fn domain_kind(xml: &[u8]) -> Result<(String, Option<String>)> {
    let mut reader = quick_xml::Reader::from_reader(xml);
    let mut stack: Vec<Vec<u8>> = Vec::new();
    let (mut kind, mut arch) = (String::new(), None);
    loop {
        let ev = reader
            .read_event()
            .context("the definition is not well-formed XML")?;
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
        let path: Vec<&[u8]> = stack.iter().map(Vec::as_slice).collect();
        match (path.as_slice(), e.name().as_ref()) {
            ([], b"domain") => kind = attr(&e, "type")?.unwrap_or_default(),
            ([b"domain", b"os"], b"type") => arch = attr(&e, "arch")?,
            _ => {}
        }
        if !empty {
            stack.push(e.name().as_ref().to_vec());
        }
    }
    Ok((kind, arch))
}

/// The host's QEMU for a domain of this type and arch, as libvirt reports it
/// (`virsh domcapabilities`).
pub fn host_emulator(connect: &str, virttype: &str, arch: Option<&str>) -> Result<String> {
    let mut c = virsh(connect);
    c.args(["domcapabilities", "--virttype", virttype]);
    if let Some(a) = arch {
        c.args(["--arch", a]);
    }
    let xml = output(&mut c)?;
    let mut reader = quick_xml::Reader::from_str(&xml);
    let mut in_path = false;
    loop {
        match reader.read_event()? {
            Event::Start(e) if e.name().as_ref() == b"path" => in_path = true,
            Event::Text(t) if in_path => return Ok(t.unescape()?.trim().to_string()),
            Event::End(_) => in_path = false,
            Event::Eof => bail!("libvirt names no emulator for {virttype} domains here"),
            _ => {}
        }
    }
}

/// The kernel, initrd, dtb and loader files of libvirt's definition of
/// `uuid` on this host (none when libvirt has no such VM).
pub fn trusted_paths(connect: &str, uuid: &str) -> Result<Vec<String>> {
    let r = virsh(connect)
        .args(["dumpxml", "--inactive", uuid])
        .output()
        .context("running virsh")?;
    if !r.status.success() {
        return Ok(Vec::new());
    }
    let mut reader = quick_xml::Reader::from_reader(r.stdout.as_slice());
    let mut stack: Vec<Vec<u8>> = Vec::new();
    let mut out = Vec::new();
    loop {
        match reader.read_event()? {
            Event::Start(e) => stack.push(e.name().as_ref().to_vec()),
            Event::End(_) => {
                stack.pop();
            }
            Event::Text(t) => {
                let path: Vec<&[u8]> = stack.iter().map(Vec::as_slice).collect();
                if let [b"domain", b"os", b"kernel" | b"initrd" | b"dtb" | b"loader"] =
                    path.as_slice()
                {
                    out.push(t.unescape()?.trim().to_string());
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    Ok(out)
}

/// Does libvirt know a VM of this name (or UUID)?
pub fn exists(connect: &str, name: &str) -> Result<bool> {
    let r = virsh(connect)
        .args(["domuuid", name])
        .output()
        .context("running virsh")?;
    Ok(r.status.success())
}

/// `virsh define --validate FILE` (libvirt checks it against its schema too).
pub fn define(connect: &str, file: &Path) -> Result<()> {
    output(virsh(connect).arg("define").arg("--validate").arg(file)).map(|_| ())
}

pub fn virsh(connect: &str) -> Command {
    let mut c = Command::new("virsh");
    c.args(["-q", "-c", connect]);
    c
}

/// Run, and its stdout; its stderr in the error.
pub fn output(c: &mut Command) -> Result<String> {
    let r = c.output().with_context(|| format!("running {c:?}"))?;
    if !r.status.success() {
        bail!(
            "{c:?} failed: {}",
            String::from_utf8_lossy(&r.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&r.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const QEMU: &str = "/usr/bin/qemu-system-x86_64";

    const DOMAIN: &str = r#"<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>web</name>
  <uuid>3f6c1d2e-9a8b-4c7d-8e6f-5a4b3c2d1e0f</uuid>
  <genid>43dc0cf8-809b-4adb-9bea-a9abb5f3d90e</genid>
  <title>the /web server</title>
  <metadata>
    <cdp:protection xmlns:cdp="urn:cdpd:protection:1" policy="default" emulator="/usr/bin/qemu-system-x86_64"><cdp:disk target="vda"/></cdp:protection>
  </metadata>
  <memory unit='MiB'>256</memory>
  <resource><partition>/machine</partition></resource>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>/srv/vm/vmlinuz</kernel>
    <cmdline>console=ttyS0 root=/dev/vda</cmdline>
    <nvram template='/usr/share/OVMF/OVMF_VARS.fd'>/var/lib/libvirt/qemu/nvram/web_VARS.fd</nvram>
  </os>
  <features><acpi/></features>
  <seclabel type='dynamic' model='dac' relabel='yes'><label>+64055:+64055</label></seclabel>
  <devices>
    <emulator>/usr/local/bin/cdp-qemu</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source file='/var/lib/libvirt/images/web.img'><seclabel model='dac' relabel='no'/></source>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='volume' device='disk'>
      <source pool='default' volume='web-data'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/srv/iso/install.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:11:22:33'/>
      <source network='default'/>
      <target dev='vnet0'/>
      <model type='virtio'/>
    </interface>
    <interface type='bridge'>
      <source bridge='br0'/>
    </interface>
    <serial type='file'><source path='/srv/vm/serial.log'/><log file='/var/log/x.log'/></serial>
    <console type='file'><source path='/srv/vm/serial.log'/><target type='serial'/></console>
    <channel type='unix'><source mode='bind' path='/var/lib/libvirt/qemu/channel/target/web.org.qemu.guest_agent.0'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <graphics type='vnc' port='5901' autoport='no' listen='127.0.0.1'><listen type='address' address='127.0.0.1'/></graphics>
    <vsock model='virtio'><cid auto='no' address='7'/></vsock>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
  </devices>
</domain>
"#;

    fn clone(xml: &str, disks: &[(&str, DiskDest)]) -> Result<(String, CloneReport)> {
        let disks: BTreeMap<String, DiskDest> = disks
            .iter()
            .map(|(t, d)| (t.to_string(), d.clone()))
            .collect();
        let id = Identity {
            name: "web-clone".into(),
            uuid: "11111111-2222-4333-8444-555555555555".into(),
        };
        let trusted = vec!["/srv/vm/vmlinuz".to_string()];
        let spec = CloneSpec {
            identity: &id,
            disks: &disks,
            emulator: QEMU,
            trusted_paths: &trusted,
            char_dir: Path::new("/restore"),
        };
        let mut n = 0;
        let (out, r) = clone_definition(xml.as_bytes(), &spec, &mut || {
            n += 1;
            Ok(format!("52:54:00:00:00:0{n}"))
        })?;
        Ok((String::from_utf8(out).unwrap(), r))
    }

    fn both() -> Vec<(&'static str, DiskDest)> {
        vec![
            ("vda", DiskDest::File("/restore/vda.raw".into())),
            (
                "vdb",
                DiskDest::Volume {
                    pool: "restored".into(),
                    volume: "web-data".into(),
                },
            ),
        ]
    }

    #[test]
    fn a_new_vm_from_the_stored_definition() {
        let (out, r) = clone(DOMAIN, &both()).unwrap();
        for want in [
            "<name>web-clone</name>",
            "<uuid>11111111-2222-4333-8444-555555555555</uuid>",
            "<genid/>",
            "<emulator>/usr/bin/qemu-system-x86_64</emulator>",
            "<disk type=\"file\" device=\"disk\">",
            "<driver name=\"qemu\" cache=\"none\" type=\"raw\"/>",
            "<source file=\"/restore/vda.raw\"/>",
            "<disk type=\"volume\" device=\"disk\">",
            "<source pool=\"restored\" volume=\"web-data\"/>",
            "<mac address=\"52:54:00:00:00:01\"/>",
            "<serial type=\"file\"><source path=\"/restore/serial0.log\"/></serial>",
            "<console type=\"file\"><source path=\"/restore/serial0.log\"/>",
            "<channel type=\"unix\"><source mode=\"bind\"/>",
            "<graphics type=\"vnc\" listen=\"127.0.0.1\" autoport=\"yes\">",
            "<cid auto=\"yes\"/>",
            "<backend model=\"random\">/dev/urandom</backend>",
            "<kernel>/srv/vm/vmlinuz</kernel>",
            "<cmdline>console=ttyS0 root=/dev/vda</cmdline>",
            "<title>the /web server</title>",
            "<features><acpi/></features>",
            "<readonly/>",
        ] {
            assert!(out.contains(want), "no {want} in:\n{out}");
        }
        for gone in [
            "3f6c1d2e",
            "43dc0cf8",
            "urn:cdpd",
            "cdp-qemu",
            "seclabel",
            "nvram",
            "web.img",
            "install.iso",
            "52:54:00:11:22:33",
            "vnet0",
            "5901",
            "address='7'",
            "/var/log/x.log",
            "backingStore",
            "guest_agent.0'/>",
        ] {
            assert!(!out.contains(gone), "{gone} left in:\n{out}");
        }
        // The second interface had no MAC: libvirt gives it one.
        assert_eq!(
            r.macs,
            vec![("52:54:00:11:22:33".into(), "52:54:00:00:00:01".into())]
        );
        assert_eq!(r.disks.len(), 2);
        assert_eq!(
            r.chardevs,
            vec![("/srv/vm/serial.log".into(), "/restore/serial0.log".into())]
        );
        assert!(
            r.notes.iter().any(|n| n.contains("ejected")),
            "{:?}",
            r.notes
        );
        assert!(
            r.notes.iter().any(|n| n.contains("not protected")),
            "{:?}",
            r.notes
        );
        // Well-formed, and its disks are the restored ones.
        let d = disks_of(out.as_bytes()).unwrap();
        assert_eq!(
            d.iter().map(|d| d.target.as_str()).collect::<Vec<_>>(),
            ["vda", "vdb", "sda"]
        );
    }

    /// Each hostile change of the definition is refused, naming what.
    #[test]
    fn hostile_definitions_are_refused() {
        let devices = "<devices>";
        let cases: Vec<(String, &str)> = vec![
            (
                DOMAIN.replacen(devices, "<devices><disk type='file' device='disk'><source file='/etc/shadow'/><target dev='vdz'/></disk>", 1),
                "vdz",
            ),
            (DOMAIN.replace("/usr/local/bin/cdp-qemu", "/tmp/evil"), "/tmp/evil"),
            (
                DOMAIN.replacen("</devices>", "</devices><qemu:commandline><qemu:arg value='-drive'/></qemu:commandline>", 1),
                "qemu:commandline",
            ),
            (
                DOMAIN.replacen(devices, "<devices><filesystem type='mount'><source dir='/'/><target dir='root'/></filesystem>", 1),
                "filesystem",
            ),
            (
                DOMAIN.replacen(devices, "<devices><hostdev mode='subsystem' type='pci'/>", 1),
                "hostdev",
            ),
            (DOMAIN.replace("/srv/vm/vmlinuz", "/etc/shadow"), "/etc/shadow"),
            (DOMAIN.replace("<kernel>/srv/vm/vmlinuz", "<kernel>/usr/share/../../etc/shadow"), "/usr/share/../../etc/shadow"),
            (
                DOMAIN.replace("<source network='default'/>", "<source network='default'/><script path='/tmp/x'/>"),
                "script",
            ),
            (DOMAIN.replace("<serial type='file'>", "<serial type='dev'>"), "dev"),
            (
                DOMAIN.replacen("<memory", "<bootloader>/usr/bin/pygrub</bootloader><memory", 1),
                "bootloader",
            ),
            (
                DOMAIN.replace("</os>", "<acpi><table type='slic'>/etc/shadow</table></acpi></os>"),
                "acpi",
            ),
            (
                DOMAIN.replace("<model type='virtio'/>", "<model type='virtio'/><rom file='/etc/shadow'/>"),
                "rom",
            ),
            (
                DOMAIN.replace("</os>", "</os><sysinfo type='fwcfg'><entry name='opt/x' file='/etc/shadow'/></sysinfo>"),
                "/etc/shadow",
            ),
            (DOMAIN.replace("/dev/urandom", "/etc/shadow"), "/etc/shadow"),
            (DOMAIN.replace("<domain type='kvm'", "<domain type='lxc'"), "lxc"),
            (
                DOMAIN.replace("<memory unit='MiB'>256</memory>", "<memory unit='MiB'>256</memory><!DOCTYPE x>"),
                "",
            ),
            (
                DOMAIN.replace("<memory unit='MiB'>256</memory>", "<blkiotune><device><path>/dev/sda</path></device></blkiotune><memory unit='MiB'>256</memory>"),
                "/dev/sda",
            ),
        ];
        for (xml, what) in cases {
            let err = match clone(&xml, &both()) {
                Ok((out, _)) => panic!("accepted ({what}):\n{out}"),
                Err(e) => format!("{e:#}"),
            };
            assert!(err.contains(what), "{what}: {err}");
        }
        // A restored disk the definition does not have.
        let mut d = both();
        d.push(("vdq", DiskDest::File("/restore/vdq.raw".into())));
        assert!(clone(DOMAIN, &d).is_err());
        // A disk it has that was not restored.
        assert!(format!("{:#}", clone(DOMAIN, &both()[..1]).unwrap_err()).contains("vdb"));
    }

    /// `cdpctl boot`'s disks: qcow2 overlays, the driver type set (and a
    /// driver added where the definition had none: libvirt would read the
    /// overlay as raw).
    #[test]
    fn qcow2_overlays_get_a_qcow2_driver() {
        let q = |p: &str| DiskDest::Qcow2(PathBuf::from(p));
        let (out, r) = clone(
            DOMAIN,
            &[("vda", q("/b/a.qcow2")), ("vdb", q("/b/b.qcow2"))],
        )
        .unwrap();
        assert!(
            out.contains(r#"<driver name="qemu" cache="none" type="qcow2"/>"#),
            "{out}"
        );
        assert!(
            out.contains(r#"<driver name="qemu" type="qcow2"/><source file="/b/b.qcow2"/>"#),
            "{out}"
        );
        assert!(
            !out.contains("type=\"raw\"") && !out.contains("web-data"),
            "{out}"
        );
        assert_eq!(r.disks[0], ("vda".into(), "/b/a.qcow2".into()));
    }

    #[test]
    fn identities_and_names() {
        let a = Identity::random("x").unwrap();
        let b = Identity::random("x").unwrap();
        assert_ne!(a.uuid, b.uuid);
        assert_eq!(a.uuid.len(), 36);
        assert_eq!(&a.uuid[14..15], "4");
        let m = random_mac().unwrap();
        assert!(m.starts_with("52:54:00:") && m.len() == 17, "{m}");
        for bad in ["", "-x", ".x", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        check_name("web-clone_1.2").unwrap();
    }
}
