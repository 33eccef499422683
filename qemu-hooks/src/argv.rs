//! QEMU's command line: is this a capability probe, which VM is it, and the
//! rewrite of the tagged disks' protocol nodes to NBD. Pure code.
//!
//! libvirt 9 passes disks as JSON `-blockdev` nodes:
//! ```text
//! {"driver":"file","filename":"/…/vm.raw","node-name":"libvirt-1-storage","auto-read-only":true,"discard":"unmap"}
//! ```
//! which becomes
//! ```text
//! {"driver":"nbd","server":{"type":"unix","path":"<run-dir>/<uuid>/vda.sock"},"export":"vda",
//!  "reconnect-delay":60,"node-name":"libvirt-1-storage","auto-read-only":true,"discard":"unmap"}
//! ```
//! keeping the node name and the options every block driver accepts, and
//! dropping the file driver's own (`filename`, `aio`, `locking`, …). Plain
//! command lines with `-drive file=…` are rewritten the same way.

use std::path::Path;

use thiserror::Error;

/// Seconds QEMU holds guest I/O while it reconnects to a restarted cdpd.
pub const RECONNECT_DELAY: u64 = 60;

/// Options of a file/host_device node that are valid on any block node.
const GENERIC_KEYS: &[&str] = &[
    "node-name",
    "auto-read-only",
    "read-only",
    "discard",
    "detect-zeroes",
    "cache",
    "force-share",
];

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ArgvError {
    #[error("disk {target} ({path}) is not among QEMU's -blockdev/-drive arguments")]
    NotFound { target: String, path: String },
    #[error("disk {target} ({path}) appears in QEMU's arguments more than once")]
    Twice { target: String, path: String },
    #[error("cannot read QEMU's {opt} argument {arg:?}: {why}")]
    Bad {
        opt: &'static str,
        arg: String,
        why: String,
    },
}

/// A disk to redirect: its image path and the socket cdpd serves it on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    pub target: String,
    pub path: String,
    pub socket: String,
}

fn opt_name(a: &str) -> Option<&str> {
    a.strip_prefix("--").or_else(|| a.strip_prefix('-'))
}

/// Is this a capability probe or a query rather than a VM start? Those
/// (and anything without `-name`) are passed through untouched.
pub fn is_probe(args: &[String]) -> bool {
    let mut has_name = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match opt_name(a) {
            Some("version" | "help" | "h") => return true,
            Some("machine" | "M") => {
                if let Some(v) = it.next() {
                    if v == "none" || v.starts_with("none,") || v == "help" || v == "?" {
                        return true;
                    }
                }
            }
            Some("cpu" | "device" | "accel")
                if it.next().is_some_and(|v| v == "help" || v == "?") =>
            {
                return true;
            }
            Some("name") => has_name = true,
            _ => {}
        }
    }
    !has_name
}

/// The VM name from `-name guest=NAME,…` or `-name NAME`.
pub fn vm_name(args: &[String]) -> Option<String> {
    let i = args.iter().position(|a| opt_name(a) == Some("name"))?;
    let v = args.get(i + 1)?;
    let opts = split_opts(v);
    opts.iter()
        .find_map(|(k, v)| (k == "guest").then(|| v.clone()))
        .or_else(|| {
            opts.first()
                .filter(|(k, v)| v.is_empty() && !k.is_empty())
                .map(|(k, _)| k.clone())
        })
}

/// The VM's UUID (`-uuid U`, which libvirt always passes).
pub fn vm_uuid(args: &[String]) -> Option<String> {
    let i = args.iter().position(|a| opt_name(a) == Some("uuid"))?;
    args.get(i + 1).cloned()
}

/// Split QEMU's `k=v,k2=v2` syntax (`,,` is a literal comma). A bare word
/// is returned as (word, "").
pub fn split_opts(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    let mut parts = Vec::new();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    for p in parts {
        match p.split_once('=') {
            Some((k, v)) => out.push((k.to_string(), v.to_string())),
            None => out.push((p, String::new())),
        }
    }
    out
}

fn join_opts(opts: &[(String, String)]) -> String {
    opts.iter()
        .map(|(k, v)| {
            let v = v.replace(',', ",,");
            if v.is_empty() && !k.contains('=') {
                k.clone()
            } else {
                format!("{k}={v}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn same_path(a: &str, b: &str) -> bool {
    a == b || Path::new(a) == Path::new(b)
}

fn nbd_node(r: &Redirect, old: &serde_json::Map<String, serde_json::Value>) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    m.insert("driver".into(), "nbd".into());
    m.insert(
        "server".into(),
        serde_json::json!({"type": "unix", "path": r.socket}),
    );
    m.insert("export".into(), r.target.clone().into());
    m.insert("reconnect-delay".into(), RECONNECT_DELAY.into());
    for k in GENERIC_KEYS {
        if let Some(v) = old.get(*k) {
            m.insert((*k).into(), v.clone());
        }
    }
    serde_json::Value::Object(m)
}

/// Rewrite the tagged disks. Every redirect must match exactly one
/// argument; everything else is left byte for byte.
pub fn rewrite(args: &[String], redirects: &[Redirect]) -> Result<Vec<String>, ArgvError> {
    let mut out = args.to_vec();
    let mut hits = vec![0usize; redirects.len()];
    let mut i = 0;
    while i < out.len() {
        let name = opt_name(&out[i]);
        if name == Some("blockdev") && i + 1 < out.len() {
            let v = &out[i + 1];
            if v.trim_start().starts_with('{') {
                let json: serde_json::Value =
                    serde_json::from_str(v).map_err(|e| ArgvError::Bad {
                        opt: "-blockdev",
                        arg: v.clone(),
                        why: e.to_string(),
                    })?;
                if let Some(obj) = json.as_object() {
                    let driver = obj.get("driver").and_then(|d| d.as_str());
                    let file = obj.get("filename").and_then(|f| f.as_str());
                    if let (Some("file" | "host_device"), Some(file)) = (driver, file) {
                        if let Some(k) = redirects.iter().position(|r| same_path(&r.path, file)) {
                            hits[k] += 1;
                            out[i + 1] = nbd_node(&redirects[k], obj).to_string();
                        }
                    }
                }
            } else {
                let opts = split_opts(v);
                let get = |k: &str| opts.iter().find(|(a, _)| a == k).map(|(_, b)| b.as_str());
                if let (Some("file" | "host_device"), Some(file)) = (get("driver"), get("filename"))
                {
                    if let Some(k) = redirects.iter().position(|r| same_path(&r.path, file)) {
                        hits[k] += 1;
                        let mut obj = serde_json::Map::new();
                        for (a, b) in &opts {
                            obj.insert(a.clone(), b.clone().into());
                        }
                        out[i + 1] = nbd_node(&redirects[k], &obj).to_string();
                    }
                }
            }
            i += 2;
            continue;
        }
        if name == Some("drive") && i + 1 < out.len() {
            let opts = split_opts(&out[i + 1]);
            if let Some(file) = opts
                .iter()
                .find(|(k, _)| k == "file")
                .map(|(_, v)| v.clone())
            {
                if let Some(k) = redirects.iter().position(|r| same_path(&r.path, &file)) {
                    hits[k] += 1;
                    let r = &redirects[k];
                    let mut new: Vec<(String, String)> = Vec::new();
                    for (a, b) in opts {
                        match a.as_str() {
                            "file" => {
                                new.push(("file.driver".into(), "nbd".into()));
                                new.push(("file.server.type".into(), "unix".into()));
                                new.push(("file.server.path".into(), r.socket.clone()));
                                new.push(("file.export".into(), r.target.clone()));
                                new.push((
                                    "file.reconnect-delay".into(),
                                    RECONNECT_DELAY.to_string(),
                                ));
                            }
                            // The file driver's own options.
                            "aio" | "locking" => {}
                            _ => new.push((a, b)),
                        }
                    }
                    out[i + 1] = join_opts(&new);
                }
            }
            i += 2;
            continue;
        }
        i += 1;
    }
    for (k, n) in hits.iter().enumerate() {
        let r = &redirects[k];
        match n {
            0 => {
                return Err(ArgvError::NotFound {
                    target: r.target.clone(),
                    path: r.path.clone(),
                })
            }
            1 => {}
            _ => {
                return Err(ArgvError::Twice {
                    target: r.target.clone(),
                    path: r.path.clone(),
                })
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn redirect(target: &str, path: &str) -> Redirect {
        Redirect {
            target: target.into(),
            path: path.into(),
            socket: format!("/run/cdp/u/{target}.sock"),
        }
    }

    #[test]
    fn probes() {
        assert!(is_probe(&s(&["-machine", "none", "-qmp", "stdio"])));
        assert!(is_probe(&s(&[
            "-S",
            "-no-user-config",
            "-machine",
            "none,accel=kvm:tcg",
            "-name",
            "x"
        ])));
        assert!(is_probe(&s(&["-version"])));
        assert!(is_probe(&s(&["--help"])));
        assert!(is_probe(&s(&["-M", "help"])));
        assert!(!is_probe(&s(&[
            "-name",
            "guest=web,debug-threads=on",
            "-machine",
            "q35"
        ])));
        assert_eq!(
            vm_name(&s(&["-name", "guest=web,debug-threads=on"])).as_deref(),
            Some("web")
        );
        assert_eq!(vm_name(&s(&["-name", "plain"])).as_deref(), Some("plain"));
        assert_eq!(
            vm_name(&s(&["-name", "guest=a,,b"])).as_deref(),
            Some("a,b")
        );
    }

    #[test]
    fn libvirt_blockdev() {
        let args = s(&[
            "-blockdev",
            r#"{"driver":"file","filename":"/img/vm.raw","node-name":"libvirt-1-storage","auto-read-only":true,"discard":"unmap","aio":"native","cache":{"direct":true,"no-flush":false}}"#,
            "-blockdev",
            r#"{"node-name":"libvirt-1-format","read-only":false,"driver":"raw","file":"libvirt-1-storage"}"#,
            "-device",
            r#"{"driver":"virtio-blk-pci","drive":"libvirt-1-format","id":"virtio-disk0"}"#,
        ]);
        let out = rewrite(&args, &[redirect("vda", "/img/vm.raw")]).unwrap();
        let node: serde_json::Value = serde_json::from_str(&out[1]).unwrap();
        assert_eq!(node["driver"], "nbd");
        assert_eq!(node["server"]["path"], "/run/cdp/u/vda.sock");
        assert_eq!(node["export"], "vda");
        assert_eq!(node["node-name"], "libvirt-1-storage");
        assert_eq!(node["cache"]["direct"], true);
        assert_eq!(node["reconnect-delay"], 60);
        assert!(node.get("filename").is_none() && node.get("aio").is_none());
        assert_eq!(out[2..], args[2..]);
        assert!(matches!(
            rewrite(&args, &[redirect("vdb", "/img/other.raw")]),
            Err(ArgvError::NotFound { .. })
        ));
    }

    #[test]
    fn legacy_drive() {
        let args = s(&[
            "-drive",
            "file=/img/a,,b.raw,format=raw,if=virtio,aio=native,cache=none",
        ]);
        let out = rewrite(&args, &[redirect("vda", "/img/a,b.raw")]).unwrap();
        assert_eq!(
            out[1],
            "file.driver=nbd,file.server.type=unix,file.server.path=/run/cdp/u/vda.sock,file.export=vda,file.reconnect-delay=60,format=raw,if=virtio,cache=none"
        );
    }

    fn arb_node() -> impl Strategy<Value = (String, String, bool)> {
        // (json, filename, is_file_driver)
        (
            prop::sample::select(vec!["file", "host_device", "raw", "qcow2", "nbd"]),
            "[a-z]{1,8}",
            any::<bool>(),
            0u32..100,
        )
            .prop_map(|(driver, name, ro, n)| {
                let path = format!("/img/{name}{n}.raw");
                let json = serde_json::json!({
                    "driver": driver, "filename": path, "node-name": format!("libvirt-{n}-storage"),
                    "auto-read-only": ro, "discard": "unmap"
                })
                .to_string();
                (json, path, driver == "file" || driver == "host_device")
            })
    }

    proptest! {
        /// Generated libvirt-style argv: only the tagged disks' nodes change,
        /// into NBD nodes with the same node name; everything else is intact.
        #[test]
        fn rewrites_only_tagged_nodes(
            nodes in prop::collection::vec(arb_node(), 1..8),
            pick in prop::collection::vec(any::<bool>(), 8),
            noise in prop::collection::vec("-[a-z]{1,6}", 0..4),
        ) {
            let mut args: Vec<String> = vec!["-name".into(), "guest=vm,debug-threads=on".into()];
            for (i, (json, _, _)) in nodes.iter().enumerate() {
                if let Some(n) = noise.get(i) { args.push(n.clone()); args.push("x".into()); }
                args.push("-blockdev".into());
                args.push(json.clone());
            }
            let mut seen = std::collections::HashSet::new();
            let redirects: Vec<Redirect> = nodes.iter().enumerate()
                .filter(|(i, (_, p, file))| *file && pick[*i] && seen.insert(p.clone()))
                .map(|(i, (_, p, _))| redirect(&format!("vd{i}"), p))
                .collect();
            let dup = |p: &str| nodes.iter().filter(|(_, q, f)| *f && q == p).count() > 1;
            match rewrite(&args, &redirects) {
                Ok(out) => {
                    prop_assert_eq!(out.len(), args.len());
                    for (a, b) in args.iter().zip(&out) {
                        if a == b { continue; }
                        let old: serde_json::Value = serde_json::from_str(a).unwrap();
                        let new: serde_json::Value = serde_json::from_str(b).unwrap();
                        prop_assert!(redirects.iter().any(|r| old["filename"] == r.path.as_str()));
                        prop_assert_eq!(&new["driver"], "nbd");
                        prop_assert_eq!(&new["node-name"], &old["node-name"]);
                    }
                    let changed = args.iter().zip(&out).filter(|(a, b)| a != b).count();
                    prop_assert_eq!(changed, redirects.len());
                }
                Err(ArgvError::Twice { path, .. }) => prop_assert!(dup(&path)),
                Err(e) => prop_assert!(false, "{e}"),
            }
        }
    }
}
