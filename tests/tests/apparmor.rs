//! Per-VM AppArmor rules (issue 11, item 4), checked with the real
//! `apparmor_parser` on profiles put together the way libvirt does it
//! (docs/DESIGN.md, "libvirt integration"): a copy of this host's
//! `/etc/apparmor.d` (libvirt's abstraction and template included),
//! `cdpctl install --libvirt` into it, then the real hook (`cdpctl
//! libvirt-hook`, pointed at the copy by `CDP_APPARMOR_DIR`) starting two
//! VMs under libvirt's AppArmor driver, and the `libvirt-<uuid>.files`
//! virt-aa-helper would write. Each VM's profile parses (`-Q -K`: no
//! kernel, no cache; AppArmor need not be active), and no rule of VM A's
//! whole profile, libvirt's abstraction and ours included, grants any
//! access to VM B's sockets, catalog or journal, while A's own are
//! granted (the matcher is checked on both sides).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use cdp_tests::bin;

const A: &str = "6f1c2a8e-3b4d-4e5f-8a9b-0c1d2e3f4a5b";
const B: &str = "0b9e6a52-1c3d-4f5e-8a7b-9c0d1e2f3a4b";
const PARSER: &str = "/usr/sbin/apparmor_parser";

fn parser() -> PathBuf {
    let p = PathBuf::from(PARSER);
    assert!(
        p.is_file(),
        "{PARSER} is missing: apt-get install -y --no-install-recommends apparmor"
    );
    p
}

fn domain_xml(name: &str, uuid: &str) -> String {
    format!(
        r#"<domain type='kvm' id='1'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <metadata>
    <cdp:protection xmlns:cdp="urn:cdpd:protection:1"><cdp:disk target="vda"/></cdp:protection>
  </metadata>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/images/{name}.raw'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
  <seclabel type='dynamic' model='apparmor' relabel='yes'>
    <label>libvirt-{uuid}</label>
    <imagelabel>libvirt-{uuid}</imagelabel>
  </seclabel>
  <seclabel type='dynamic' model='dac' relabel='yes'>
    <label>+64055:+107</label>
    <imagelabel>+64055:+107</imagelabel>
  </seclabel>
</domain>"#
    )
}

struct Host {
    _tmp: tempfile::TempDir,
    tmp: PathBuf,
    /// The `--root` install writes into: `<root>/etc/apparmor.d` is a copy
    /// of this host's.
    root: PathBuf,
    cfg: PathBuf,
}

impl Host {
    fn new() -> Host {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the hook runs as root: run these tests as root"
        );
        let _tmp = tempfile::tempdir().unwrap();
        let tmp = _tmp.path().to_path_buf();
        let root = tmp.join("root");
        fs::create_dir_all(root.join("etc")).unwrap();
        let cp = Command::new("cp")
            .args(["-a", "/etc/apparmor.d"])
            .arg(root.join("etc"))
            .output()
            .unwrap();
        assert!(cp.status.success(), "{cp:?}");
        let aa = root.join("etc/apparmor.d");
        for f in ["libvirt/TEMPLATE.qemu", "abstractions/libvirt-qemu"] {
            assert!(
                aa.join(f).is_file(),
                "{f} missing: these tests need libvirt's AppArmor files (libvirt-daemon-system)"
            );
        }
        // As libvirt ships it (this host's copy may hold another run's block).
        fs::write(aa.join("local/abstractions/libvirt-qemu"), "").unwrap();
        for e in fs::read_dir(aa.join("libvirt")).unwrap().flatten() {
            if e.file_name().to_string_lossy().starts_with("libvirt-") {
                fs::remove_file(e.path()).unwrap();
            }
        }
        // cdpctl (a hard link of the real one) and stand-ins for the rest.
        let build = tmp.join("build");
        fs::create_dir_all(&build).unwrap();
        if fs::hard_link(bin("cdpctl"), build.join("cdpctl")).is_err() {
            fs::copy(bin("cdpctl"), build.join("cdpctl")).unwrap();
        }
        for p in ["cdpd", "cdp-shipper", "cdp-qemu", "cdp-agent"] {
            fs::write(build.join(p), "#!/bin/sh\n").unwrap();
        }
        let cfg = tmp.join("cdp.toml");
        fs::write(
            &cfg,
            format!(
                "[paths]\nstate_dir = \"{0}/state\"\nrun_dir = \"{0}/run\"\n\
                 [target.s3]\nurl = \"s3://bucket/cdp\"\ncredentials_file = \"{0}/ship.cred\"\n\
                 prune_credentials_file = \"{0}/prune.cred\"\n\
                 [target.local]\nurl = \"file://{0}/repo\"\n\
                 [policy.default]\ntargets = [\"s3\", \"local\"]\n",
                tmp.display()
            ),
        )
        .unwrap();
        Host {
            _tmp,
            tmp,
            root,
            cfg,
        }
    }

    fn aa(&self) -> PathBuf {
        self.root.join("etc/apparmor.d")
    }

    fn cdpctl(&self, args: &[&str]) -> Output {
        let out = Command::new(self.tmp.join("build/cdpctl"))
            .args(args)
            .arg("--root")
            .arg(&self.root)
            .output()
            .unwrap();
        assert!(out.status.success(), "cdpctl {args:?}: {out:?}");
        out
    }

    /// The real hook as libvirt runs it, for VM `name`.
    fn hook(&self, name: &str, uuid: &str, op: &str, sub: &str) -> Output {
        let mut child = Command::new(bin("cdpctl"))
            .arg("--config")
            .arg(&self.cfg)
            .args(["libvirt-hook", name, op, sub, "-"])
            .env("CDP_APPARMOR_DIR", self.aa())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(domain_xml(name, uuid).as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "hook {op} {sub}: {out:?}");
        out
    }

    /// What virt-aa-helper writes on every start beside the profile.
    fn libvirt_files(&self, name: &str, uuid: &str) {
        fs::write(
            self.aa().join(format!("libvirt/libvirt-{uuid}.files")),
            format!(
                "# DO NOT EDIT THIS FILE DIRECTLY. IT IS MANAGED BY LIBVIRT.\n  \
                 \"/var/log/libvirt/**/{name}.log\" w,\n  \"/images/{name}.raw\" rwk,\n"
            ),
        )
        .unwrap();
    }

    fn profile(&self, uuid: &str) -> PathBuf {
        self.aa().join(format!("libvirt/libvirt-{uuid}"))
    }

    /// `apparmor_parser` on the VM's profile with the copy as its base.
    fn parse(&self, uuid: &str, flag: &str) -> Output {
        Command::new(parser())
            .args([flag, "-K", "-b"])
            .arg(self.aa())
            .arg(self.profile(uuid))
            .output()
            .unwrap()
    }

    fn parses(&self, uuid: &str) {
        let out = self.parse(uuid, "-Q");
        assert!(
            out.status.success(),
            "apparmor_parser rejects the profile of {uuid}:\n{}\n--- profile ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            fs::read_to_string(self.profile(uuid)).unwrap_or_default()
        );
    }

    /// The profile with every include expanded (`apparmor_parser -p`).
    fn preprocessed(&self, uuid: &str) -> String {
        let out = self.parse(uuid, "-p");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    /// Files a VM's cdpd, shipper and QEMU open.
    fn vm_files(&self, uuid: &str) -> Vec<PathBuf> {
        let (run, state) = (
            self.tmp.join("run").join(uuid),
            self.tmp.join("state/vms").join(uuid),
        );
        vec![
            run.join("vda.sock"),
            run.join("control.sock"),
            run.join("domain.xml"),
            state.join("catalog.sqlite"),
            state.join("catalog.sqlite-wal"),
            state.join("vda/journal/0000000000000001.seg"),
        ]
    }
}

// ------------------------------------------------ AppArmor globbing, enough
// for file rules: `*`, `**`, `?`, `[...]`, `{a,b}` (nested), `\` escapes.

#[derive(Debug, Clone)]
enum Tok {
    Lit(char),
    Star,
    DStar,
    Any,
    Class(Vec<char>, bool),
    Alt(Vec<Vec<Tok>>),
}

fn tokens(p: &[char], i: &mut usize, in_alt: bool) -> Vec<Vec<Tok>> {
    let (mut alts, mut cur) = (Vec::new(), Vec::new());
    while *i < p.len() {
        let c = p[*i];
        *i += 1;
        match c {
            '\\' if *i < p.len() => {
                cur.push(Tok::Lit(p[*i]));
                *i += 1;
            }
            '*' if p.get(*i) == Some(&'*') => {
                *i += 1;
                cur.push(Tok::DStar);
            }
            '*' => cur.push(Tok::Star),
            '?' => cur.push(Tok::Any),
            '[' => {
                let neg = matches!(p.get(*i), Some('^') | Some('!'));
                if neg {
                    *i += 1;
                }
                let mut set = Vec::new();
                while *i < p.len() && p[*i] != ']' {
                    if p.get(*i + 1) == Some(&'-') && p.get(*i + 2).is_some_and(|c| *c != ']') {
                        set.extend(p[*i]..=p[*i + 2]);
                        *i += 3;
                    } else {
                        set.push(p[*i]);
                        *i += 1;
                    }
                }
                *i += 1;
                cur.push(Tok::Class(set, neg));
            }
            '{' => cur.push(Tok::Alt(tokens(p, i, true))),
            ',' if in_alt => alts.push(std::mem::take(&mut cur)),
            '}' if in_alt => {
                alts.push(cur);
                return alts;
            }
            c => cur.push(Tok::Lit(c)),
        }
    }
    alts.push(cur);
    alts
}

fn matches(pat: &[Tok], s: &[char]) -> bool {
    let Some((t, rest)) = pat.split_first() else {
        return s.is_empty();
    };
    match t {
        Tok::Lit(c) => s.first() == Some(c) && matches(rest, &s[1..]),
        Tok::Any => s.first().is_some_and(|c| *c != '/') && matches(rest, &s[1..]),
        Tok::Class(set, neg) => {
            s.first().is_some_and(|c| set.contains(c) != *neg) && matches(rest, &s[1..])
        }
        Tok::Star => (0..=s.len())
            .take_while(|n| *n == 0 || s[n - 1] != '/')
            .any(|n| matches(rest, &s[n..])),
        Tok::DStar => (0..=s.len()).any(|n| matches(rest, &s[n..])),
        Tok::Alt(alts) => alts.iter().any(|a| {
            let mut v = a.clone();
            v.extend_from_slice(rest);
            matches(&v, s)
        }),
    }
}

/// The allow file rules of a preprocessed profile: (path glob, perms, line).
/// Rules naming a variable (`@{PROC}`, `@{HOME}`, …) are left out: none of
/// them expands to the temporary directory the VMs' files are in.
fn allow_rules(profile: &str) -> Vec<(Vec<Tok>, String, String)> {
    let mut out = Vec::new();
    for line in profile.lines() {
        let mut words = line.trim().trim_end_matches(',').to_string();
        if words.starts_with('#') || words.contains("@{") {
            continue;
        }
        let mut deny = false;
        loop {
            let w = words.trim_start();
            let next = ["audit ", "owner ", "allow ", "deny ", "file "]
                .iter()
                .find(|q| w.starts_with(**q));
            match next {
                Some(q) => {
                    deny |= *q == "deny ";
                    words = w[q.len()..].to_string();
                }
                None => break,
            }
        }
        let w = words.trim_start();
        let (path, perms) = if let Some(q) = w.strip_prefix('"') {
            match q.find('"') {
                Some(e) => (q[..e].to_string(), q[e + 1..].trim().to_string()),
                None => continue,
            }
        } else if w.starts_with('/') {
            match w.split_once(char::is_whitespace) {
                Some((p, r)) => (p.to_string(), r.trim().to_string()),
                None => continue,
            }
        } else {
            continue;
        };
        if deny {
            continue;
        }
        let chars: Vec<char> = path.chars().collect();
        let mut i = 0;
        let alts = tokens(&chars, &mut i, false);
        out.push((vec![Tok::Alt(alts)], perms, line.trim().to_string()));
    }
    out
}

/// The rules of `profile` that give any access to `path`.
fn granting(profile: &str, path: &Path) -> Vec<String> {
    let s: Vec<char> = path.to_str().unwrap().chars().collect();
    allow_rules(profile)
        .into_iter()
        .filter(|(pat, _, _)| matches(pat, &s))
        .map(|(_, perms, line)| format!("{line}   [{perms}]"))
        .collect()
}

#[test]
fn glob_matcher() {
    let p = "x\n  \"/a b/\\*x/**\" rwk,\n  owner /{,var/}tmp/[a-c]?/* r,\n  deny /z/** w,\n";
    assert_eq!(granting(p, Path::new("/a b/*x/q/r")).len(), 1);
    assert!(granting(p, Path::new("/a b/yx/q")).is_empty());
    assert_eq!(granting(p, Path::new("/var/tmp/b1/f")).len(), 1);
    assert!(granting(p, Path::new("/tmp/b1/f/g")).is_empty());
    assert!(granting(p, Path::new("/tmp/d1/f")).is_empty());
    assert!(granting(p, Path::new("/z/q")).is_empty());
}

#[test]
fn each_vm_profile_parses_and_grants_its_own_files_only() {
    let h = Host::new();
    h.cdpctl(&["install", "--libvirt", "--bin-dir", "/usr/bin"]);
    let local = fs::read_to_string(h.aa().join("local/abstractions/libvirt-qemu")).unwrap();
    assert!(local.contains("# BEGIN cdpd"), "{local}");
    for (name, uuid) in [("vm-a", A), ("vm-b", B)] {
        // libvirt: prepare begin, labels (start begin), the .files, then
        // it loads (`-r`: the profile file exists) the profile.
        h.hook(name, uuid, "prepare", "begin");
        h.hook(name, uuid, "start", "begin");
        h.libvirt_files(name, uuid);
        h.parses(uuid);
    }
    let text_a = fs::read_to_string(h.profile(A)).unwrap();
    assert_eq!(
        text_a.matches("cdpd/libvirt-").count(),
        1,
        "one include line, however often the hook runs:\n{text_a}"
    );
    let rules_a = fs::read_to_string(h.aa().join(format!("cdpd/libvirt-{A}"))).unwrap();
    assert!(rules_a.contains(A) && !rules_a.contains(B), "{rules_a}");

    let full_a = h.preprocessed(A);
    assert!(
        full_a.contains(&format!("profile libvirt-{A} ")),
        "{full_a}"
    );
    for f in h.vm_files(A) {
        assert!(
            granting(&full_a, &f).iter().any(|r| r.contains(A)),
            "VM A's own {} is not granted by its rules",
            f.display()
        );
    }
    for f in h.vm_files(B) {
        let g = granting(&full_a, &f);
        assert!(
            g.is_empty(),
            "VM A's profile reaches B's {}: {g:#?}",
            f.display()
        );
    }
    // Shipping credentials readable, prune credentials never.
    assert!(!granting(&full_a, &h.tmp.join("ship.cred")).is_empty());
    assert!(full_a.contains(&format!(
        "deny \"{}\" rwk,",
        h.tmp.join("prune.cred").display()
    )));
    // Nothing wholesale over cdpd's default directories either.
    for shared in [
        "/var/lib/cdp/x",
        "/run/cdp/x",
        "/var/lib/cdp-repo/x",
        "/etc/cdp/s3.cred",
    ] {
        let g = granting(&full_a, Path::new(shared));
        assert!(g.is_empty(), "{shared}: {g:#?}");
    }

    // The VM stops: its rules go, its profile still parses (`if exists`).
    h.hook("vm-a", A, "release", "end");
    assert!(!h.aa().join(format!("cdpd/libvirt-{A}")).exists());
    assert!(h.aa().join(format!("cdpd/libvirt-{B}")).exists());
    h.parses(A);
    assert!(granting(&h.preprocessed(A), &h.vm_files(A)[0]).is_empty());

    // Uninstall: libvirt's files as libvirt left them, ours gone.
    h.cdpctl(&["uninstall", "--libvirt", "--bin-dir", "/usr/bin"]);
    assert_eq!(
        fs::read_to_string(h.aa().join("local/abstractions/libvirt-qemu")).unwrap(),
        "",
        "libvirt's abstraction includes it: it stays, empty as libvirt ships it"
    );
    assert!(!h.aa().join("cdpd").exists());
    for uuid in [A, B] {
        assert!(!fs::read_to_string(h.profile(uuid))
            .unwrap()
            .contains("cdpd"));
        h.parses(uuid);
    }
}
