//! `cdpctl install` / `cdpctl uninstall` into a temporary `--root`, the files of
//! `packaging/` (hook script, AppArmor rules) and the Debian package.
//!
//! cdpctl copies the programs from the directory it runs from, so each test runs a
//! hard link of the built cdpctl from a directory of its own, beside small stand-ins
//! for the other programs (the Debian package test uses the real ones).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use cdp_tests::*;
use serde_json::Value;

const PROGRAMS: [&str; 5] = ["cdpd", "cdp-shipper", "cdp-qemu", "cdpctl", "cdp-agent"];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn link_or_copy(from: &Path, to: &Path) {
    if fs::hard_link(from, to).is_err() {
        fs::copy(from, to).unwrap_or_else(|e| panic!("copy {from:?} -> {to:?}: {e}"));
    }
}

/// A directory holding cdpctl (the real one) and stand-ins for the other programs.
fn programs(dir: &Path) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    link_or_copy(&bin("cdpctl"), &dir.join("cdpctl"));
    for p in PROGRAMS.iter().filter(|p| **p != "cdpctl") {
        let f = dir.join(p);
        fs::write(&f, format!("#!/bin/sh\necho {p} stand-in\n")).unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir.join("cdpctl")
}

struct Setup {
    _tmp: tempfile::TempDir,
    cdpctl: PathBuf,
    root: PathBuf,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let cdpctl = programs(&tmp.path().join("build"));
    let root = tmp.path().join("root");
    // A system with AppArmor configured.
    fs::create_dir_all(root.join("etc/apparmor.d")).unwrap();
    Setup {
        cdpctl,
        root,
        _tmp: tmp,
    }
}

impl Setup {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.cdpctl);
        c.args(args).arg("--root").arg(&self.root);
        c
    }
    fn json(&self, args: &[&str]) -> Value {
        let out = run_ok(self.cmd(args).arg("--json"));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{e}: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }
    fn at(&self, p: &str) -> PathBuf {
        self.root.join(p.trim_start_matches('/'))
    }
}

fn items(v: &Value) -> Vec<&Value> {
    v["items"].as_array().expect("items").iter().collect()
}

fn item<'a>(v: &'a Value, path: &str) -> &'a Value {
    items(v)
        .into_iter()
        .find(|i| i["path"] == path)
        .unwrap_or_else(|| panic!("no item {path} in {v:#}"))
}

/// Every file under `root` (not directories): path → (mode, size, mtime).
fn tree(root: &Path) -> BTreeMap<String, (u32, u64, i64, i64)> {
    fn walk(root: &Path, d: &Path, out: &mut BTreeMap<String, (u32, u64, i64, i64)>) {
        for e in fs::read_dir(d).unwrap().flatten() {
            let m = fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                walk(root, &e.path(), out);
            } else {
                let rel = e.path().strip_prefix(root).unwrap().display().to_string();
                out.insert(
                    format!("/{rel}"),
                    (m.mode() & 0o7777, m.len(), m.mtime(), m.mtime_nsec()),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn install_twice_changes_nothing_the_second_time() {
    let s = setup();
    let first = s.json(&["install", "--libvirt", "--systemd"]);
    for p in PROGRAMS {
        let i = item(&first, &format!("/usr/local/bin/{p}"));
        assert_eq!(i["changed"], true, "{i}");
    }
    for p in [
        "/etc/cdp/cdp.toml",
        "/var/lib/cdp",
        "/run/cdp",
        "/etc/libvirt/hooks/qemu.d/cdp",
        "/etc/apparmor.d/local/abstractions/libvirt-qemu",
        "/etc/systemd/system/cdp-agent.service",
    ] {
        assert_eq!(item(&first, p)["changed"], true, "{p}: {first:#}");
    }
    // --root: no systemctl, but the command to enable the unit in the image.
    assert_eq!(item(&first, "cdp-agent.service")["action"], "skipped");
    let next = first["next"].to_string();
    assert!(next.contains("restart libvirtd"), "{next}");
    assert!(next.contains("systemctl --root"), "{next}");

    let files = tree(&s.root);
    let mode = |p: &str| files.get(p).unwrap_or_else(|| panic!("{p} missing")).0;
    for p in PROGRAMS {
        assert_eq!(mode(&format!("/usr/local/bin/{p}")), 0o755, "{p}");
    }
    assert_eq!(mode("/etc/libvirt/hooks/qemu.d/cdp"), 0o755);
    assert_eq!(mode("/etc/cdp/cdp.toml"), 0o644);
    assert_eq!(mode("/etc/systemd/system/cdp-agent.service"), 0o644);
    assert!(fs::metadata(s.at("/var/lib/cdp")).unwrap().is_dir());
    assert!(fs::metadata(s.at("/run/cdp")).unwrap().is_dir());
    // The copies are the programs, byte for byte.
    assert_files_equal(&s.cdpctl, &s.at("/usr/local/bin/cdpctl"));
    // Paths point at the bin-dir.
    let hook = fs::read_to_string(s.at("/etc/libvirt/hooks/qemu.d/cdp")).unwrap();
    assert!(hook.contains("CDPCTL=/usr/local/bin/cdpctl\n"), "{hook}");
    let unit = fs::read_to_string(s.at("/etc/systemd/system/cdp-agent.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/usr/local/bin/cdp-agent run\n"),
        "{unit}"
    );
    // The installed config is the sample, which validates.
    assert_eq!(
        fs::read_to_string(s.at("/etc/cdp/cdp.toml")).unwrap(),
        fs::read_to_string(workspace().join("packaging/cdp.toml")).unwrap()
    );
    cdp_core::config::Config::load_file(&s.at("/etc/cdp/cdp.toml")).unwrap();

    let second = s.json(&["install", "--libvirt", "--systemd"]);
    let changed: Vec<_> = items(&second)
        .into_iter()
        .filter(|i| i["changed"] != false)
        .collect();
    assert!(changed.is_empty(), "second run changed: {changed:#?}");
    assert_eq!(tree(&s.root), files, "second run touched files");
    assert!(!second["next"].to_string().contains("restart libvirtd"));

    // The human form says so per item.
    let out = run_ok(&mut s.cmd(&["install", "--libvirt", "--systemd"]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("nothing changed"), "{text}");
    assert!(
        text.lines()
            .filter(|l| l.contains("/usr/local/bin/"))
            .all(|l| l.starts_with("unchanged")),
        "{text}"
    );
    assert_eq!(tree(&s.root), files);

    // A changed program is copied again, and only that one.
    fs::write(s.at("/usr/local/bin/cdpd"), "old\n").unwrap();
    let third = s.json(&["install"]);
    assert_eq!(item(&third, "/usr/local/bin/cdpd")["action"], "updated");
    assert_eq!(item(&third, "/usr/local/bin/cdpctl")["changed"], false);
    // A wrong mode is put right.
    fs::set_permissions(
        s.at("/etc/libvirt/hooks/qemu.d/cdp"),
        fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let fourth = s.json(&["install", "--libvirt"]);
    assert_eq!(
        item(&fourth, "/etc/libvirt/hooks/qemu.d/cdp")["changed"],
        true
    );
    assert_eq!(
        fs::metadata(s.at("/etc/libvirt/hooks/qemu.d/cdp"))
            .unwrap()
            .mode()
            & 0o777,
        0o755
    );
}

#[test]
fn uninstall_removes_ours_and_keeps_the_operators() {
    let s = setup();
    // The operator's own AppArmor rules, before us.
    let local = s.at("/etc/apparmor.d/local/abstractions/libvirt-qemu");
    fs::create_dir_all(local.parent().unwrap()).unwrap();
    fs::write(&local, "# mine\n/srv/isos/** r,\n").unwrap();
    s.json(&["install", "--libvirt", "--systemd"]);
    let with_block = fs::read_to_string(&local).unwrap();
    assert!(with_block.starts_with("# mine\n/srv/isos/** r,\n# BEGIN cdpd"));
    // What every VM gets; no state directory (per VM: the hook's rules).
    assert!(with_block.contains("/usr/bin/cdpd rmix,") && !with_block.contains("/var/lib/cdp/"));

    // The operator edits the config; a VM left state behind.
    let conf = s.at("/etc/cdp/cdp.toml");
    let edited = fs::read_to_string(&conf)
        .unwrap()
        .replace("#segment_age = \"250ms\"", "segment_age = \"2s\"");
    fs::write(&conf, &edited).unwrap();
    fs::write(s.at("/var/lib/cdp/catalog.sqlite"), "state").unwrap();

    let v = s.json(&["uninstall", "--libvirt", "--systemd"]);
    assert_eq!(item(&v, "/etc/cdp/cdp.toml")["action"], "kept");
    assert_eq!(item(&v, "/var/lib/cdp")["action"], "kept");
    assert_eq!(item(&v, "/run/cdp")["action"], "removed");
    let left: Vec<String> = tree(&s.root).into_keys().collect();
    assert_eq!(
        left,
        vec![
            "/etc/apparmor.d/local/abstractions/libvirt-qemu",
            "/etc/cdp/cdp.toml",
            "/var/lib/cdp/catalog.sqlite",
            // What is left of the install (the config and state it created).
            "/var/lib/cdpctl/install.manifest",
        ],
        "uninstall left files of ours"
    );
    assert_eq!(fs::read_to_string(&conf).unwrap(), edited);
    assert_eq!(
        fs::read_to_string(&local).unwrap(),
        "# mine\n/srv/isos/** r,\n"
    );

    // Again: nothing to do.
    let again = s.json(&["uninstall", "--libvirt", "--systemd"]);
    assert!(
        items(&again).iter().all(|i| i["changed"] == false),
        "{again:#}"
    );

    // --purge takes the config and the state too.
    s.json(&["uninstall", "--purge"]);
    let left: Vec<String> = tree(&s.root).into_keys().collect();
    assert_eq!(
        left,
        vec!["/etc/apparmor.d/local/abstractions/libvirt-qemu"],
        "purge left files"
    );
    assert!(!s.at("/var/lib/cdp").exists());
    assert!(!s.at("/etc/cdp").exists());
}

#[test]
fn unedited_sample_config_is_removed_and_apparmor_file_we_created_goes() {
    let s = setup();
    s.json(&["install", "--libvirt"]);
    s.json(&["uninstall", "--libvirt"]);
    assert!(tree(&s.root).is_empty(), "left: {:?}", tree(&s.root).keys());
}

#[test]
fn purge_refuses_while_a_vm_is_captured() {
    let s = setup();
    s.json(&["install"]);
    let vm = s.at("/run/cdp/0b2c2f6a-8c5e-4a53-9d6e-0d5a3b1b7c11");
    fs::create_dir_all(&vm).unwrap();
    fs::write(vm.join("control.sock"), "").unwrap();
    fs::write(s.at("/var/lib/cdp/catalog.sqlite"), "state").unwrap();
    let out = run(&mut s.cmd(&["uninstall", "--purge"]));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("stop the protected VMs first"),
        "{}",
        stderr(&out)
    );
    assert!(s.at("/var/lib/cdp/catalog.sqlite").exists());
}

#[test]
fn edited_hook_is_left_alone_with_an_error_until_forced() {
    let s = setup();
    s.json(&["install", "--libvirt", "--systemd"]);
    let hook = s.at("/etc/libvirt/hooks/qemu.d/cdp");
    let edited = format!(
        "{}logger cdp hook ran\n",
        fs::read_to_string(&hook).unwrap()
    );
    fs::write(&hook, &edited).unwrap();

    // Not overwritten: exit 1, the report says "modified", the error says what to do.
    let out = run(&mut s.cmd(&["install", "--libvirt", "--systemd", "--json"]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        item(&v, "/etc/libvirt/hooks/qemu.d/cdp")["action"],
        "modified"
    );
    // Everything else was still checked.
    assert_eq!(
        item(&v, "/etc/systemd/system/cdp-agent.service")["action"],
        "unchanged"
    );
    let err = stderr(&out);
    assert!(
        err.contains("/etc/libvirt/hooks/qemu.d/cdp") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(fs::read_to_string(&hook).unwrap(), edited);

    // Uninstall keeps it too: it is not ours any more.
    let v = s.json(&["uninstall", "--libvirt"]);
    assert_eq!(item(&v, "/etc/libvirt/hooks/qemu.d/cdp")["action"], "kept");
    assert_eq!(fs::read_to_string(&hook).unwrap(), edited);

    // --force replaces it.
    let v = s.json(&["install", "--libvirt", "--force"]);
    assert_eq!(
        item(&v, "/etc/libvirt/hooks/qemu.d/cdp")["action"],
        "updated"
    );
    assert!(!fs::read_to_string(&hook).unwrap().contains("logger"));

    // A hook of ours written for another bin-dir is simply updated.
    let v = s.json(&["install", "--libvirt", "--bin-dir", "/opt/cdp/bin"]);
    assert_eq!(
        item(&v, "/etc/libvirt/hooks/qemu.d/cdp")["action"],
        "updated"
    );
    assert!(fs::read_to_string(&hook)
        .unwrap()
        .contains("CDPCTL=/opt/cdp/bin/cdpctl\n"));
}

/// Runs the installed hook as libvirt does: arguments, the domain XML on stdin.
fn run_hook(hook: &Path, xml: &str) -> (Output, Duration) {
    let start = Instant::now();
    let mut child = Command::new(hook)
        .args(["guest", "prepare", "begin", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // libvirt ignores EPIPE when the hook does not read: so does this.
    let _ = child.stdin.take().unwrap().write_all(xml.as_bytes());
    let out = child.wait_with_output().unwrap();
    (out, start.elapsed())
}

const PLAIN_DOMAIN: &str = "<domain type='kvm'><name>guest</name>\
    <uuid>0b2c2f6a-8c5e-4a53-9d6e-0d5a3b1b7c11</uuid><devices/></domain>\n";

#[test]
fn installed_hook_exits_0_when_cdpctl_is_gone() {
    let s = setup();
    let gone = s.root.join("nowhere");
    s.json(&["install", "--libvirt", "--bin-dir", gone.to_str().unwrap()]);
    // The hook names the host path <root>/nowhere/cdpctl; the copy went under the
    // root (<root>/<root>/nowhere), so on this host cdpctl is absent.
    let hook = s.at("/etc/libvirt/hooks/qemu.d/cdp");
    let text = fs::read_to_string(&hook).unwrap();
    assert!(text.contains(&format!("CDPCTL={}/cdpctl", gone.display())));
    assert!(!gone.join("cdpctl").exists());
    let (out, took) = run_hook(&hook, PLAIN_DOMAIN);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{out:?}");
    // It does not wait for anything (libvirt waits for the hook): the bound
    // is for a hang, not a measure of speed on a loaded machine.
    assert!(took < Duration::from_secs(30), "{took:?}");

    // With cdpctl there, arguments and stdin reach it.
    fs::create_dir_all(&gone).unwrap();
    let rec = s.root.join("record");
    fs::write(
        gone.join("cdpctl"),
        format!("#!/bin/sh\necho \"$@\" > {0}\ncat >> {0}\n", rec.display()),
    )
    .unwrap();
    fs::set_permissions(gone.join("cdpctl"), fs::Permissions::from_mode(0o755)).unwrap();
    let (out, _) = run_hook(&hook, PLAIN_DOMAIN);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        fs::read_to_string(&rec).unwrap(),
        format!("libvirt-hook guest prepare begin -\n{PLAIN_DOMAIN}")
    );

    // The packaged hook is plain POSIX sh.
    run_ok(
        Command::new(require_tool("dash"))
            .arg("-n")
            .arg(workspace().join("packaging/libvirt/cdp")),
    );
}

#[test]
fn runs_from_the_bin_dir_copies_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let cdpctl = programs(&root.join("opt/cdp/bin"));
    let out = run_ok(
        Command::new(&cdpctl)
            .args(["install", "--json", "--bin-dir", "/opt/cdp/bin", "--root"])
            .arg(root),
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    for p in PROGRAMS {
        let i = item(&v, &format!("/opt/cdp/bin/{p}"));
        assert_eq!(i["changed"], false, "{i}");
    }
    assert!(!root.join("usr").exists());
}

#[test]
fn bad_input_says_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    // Programs missing next to cdpctl.
    let alone = tmp.path().join("alone");
    fs::create_dir_all(&alone).unwrap();
    link_or_copy(&bin("cdpctl"), &alone.join("cdpctl"));
    let root = tmp.path().join("root");
    fs::create_dir_all(&root).unwrap();
    let out = run(Command::new(alone.join("cdpctl"))
        .args(["install", "--root"])
        .arg(&root));
    assert!(!out.status.success());
    let err = stderr(&out);
    for needle in [
        "cdpd",
        "cdp-shipper",
        "cdp-qemu",
        "cdp-agent",
        "cargo build",
        &alone.display().to_string(),
    ] {
        assert!(err.contains(needle), "{needle:?} not in: {err}");
    }
    assert!(
        fs::read_dir(&root).unwrap().next().is_none(),
        "wrote something"
    );

    let cdpctl = programs(&tmp.path().join("build"));
    // A root that does not exist.
    let out = run(Command::new(&cdpctl)
        .args(["install", "--root"])
        .arg(tmp.path().join("nope")));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--root"), "{}", stderr(&out));

    // A root where nothing can be written (as root, permissions do not stop us: a
    // file where a directory must go does).
    let bad = tmp.path().join("bad");
    fs::create_dir_all(&bad).unwrap();
    fs::write(bad.join("usr"), "").unwrap();
    if !nix::unistd::geteuid().is_root() {
        fs::set_permissions(&bad, fs::Permissions::from_mode(0o555)).unwrap();
    }
    let out = run(Command::new(&cdpctl).args(["install", "--root"]).arg(&bad));
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&bad.join("usr").display().to_string()) && err.contains("writable --root"),
        "{err}"
    );
}

// ---------------------------------------------------------------- AppArmor

fn apparmor_parses(rules: &Path) {
    let parser = which("apparmor_parser")
        .or_else(|| Some(PathBuf::from("/usr/sbin/apparmor_parser")).filter(|p| p.is_file()))
        .unwrap_or_else(|| {
            panic!(
                "apparmor_parser is not installed: run `bash scripts/install-deps` \
                 (or: apt-get install -y --no-install-recommends apparmor)"
            )
        });
    let tmp = tempfile::tempdir().unwrap();
    let profile = tmp.path().join("profile");
    fs::write(
        &profile,
        format!(
            "include <tunables/global>\nprofile cdp-test /usr/bin/cdp-qemu {{\n  include \"{}\"\n}}\n",
            rules.display()
        ),
    )
    .unwrap();
    // -Q: no kernel load, -K: no cache.
    let out = run(Command::new(parser).arg("-Q").arg("-K").arg(&profile));
    assert!(
        out.status.success(),
        "apparmor_parser rejects {}:\n{}\n--- rules ---\n{}",
        rules.display(),
        stderr(&out),
        fs::read_to_string(rules).unwrap()
    );
}

#[test]
fn apparmor_rules_parse() {
    apparmor_parses(&workspace().join("packaging/apparmor/cdp"));

    // As installed, with this host's own paths added.
    let s = setup();
    fs::create_dir_all(s.at("/etc/cdp")).unwrap();
    fs::write(
        s.at("/etc/cdp/cdp.toml"),
        "[paths]\nstate_dir = \"/srv/cdp state\"\nrun_dir = \"/run/cdp-x\"\n\
         [target.nas]\nurl = \"file:///mnt/nas/cdp\"\n[policy.default]\ntargets = [\"nas\"]\n",
    )
    .unwrap();
    s.json(&["install", "--libvirt", "--bin-dir", "/opt/cdp/bin"]);
    let local = s.at("/etc/apparmor.d/local/abstractions/libvirt-qemu");
    let text = fs::read_to_string(&local).unwrap();
    assert!(text.contains("\"/opt/cdp/bin/cdpd\" rmix,"), "{text}");
    // The state, run and file:// directories are granted per VM (the
    // hook's rules, tests/tests/apparmor.rs), never to every VM here.
    for shared in ["/srv/cdp state", "/run/cdp-x", "/mnt/nas/cdp"] {
        assert!(!text.contains(shared), "{shared} in {text}");
    }
    assert!(s.at("/srv/cdp state").is_dir() && s.at("/run/cdp-x").is_dir());
    apparmor_parses(&local);
}

// ---------------------------------------------------------------- Debian package

/// `dpkg-deb -c` lines → path → (mode string, owner).
fn deb_listing(deb: &Path) -> BTreeMap<String, (String, String)> {
    let out = run_ok(Command::new(require_tool("dpkg-deb")).arg("-c").arg(deb));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let path = f.last().unwrap().trim_start_matches('.').to_string();
            (path, (f[0].to_string(), f[1].to_string()))
        })
        .collect()
}

#[test]
fn debian_package_from_the_debug_build() {
    let cargo_deb_ok = Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        cargo_deb_ok,
        "cargo-deb is not installed: run `bash scripts/install-deps` \
         (or: cargo install cargo-deb --locked)"
    );
    // A target directory whose "release" profile holds the binaries already built
    // (hard links), so that `cargo deb --no-build` packages them in seconds.
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("target");
    fs::create_dir_all(target.join("release")).unwrap();
    for p in PROGRAMS {
        link_or_copy(&bin(p), &target.join("release").join(p));
    }
    // cdpctl's man pages and completions, assets of the package too.
    run_ok(
        Command::new("bash")
            .arg(workspace().join("scripts/package"))
            .arg("--gen-only")
            .env("CARGO_TARGET_DIR", &target)
            .current_dir(workspace()),
    );
    let out_dir = tmp.path().join("out");
    run_ok(
        Command::new("cargo")
            .args([
                "deb",
                "-p",
                "cdp-tools",
                "--no-build",
                "--strip",
                "--fast",
                "-o",
            ])
            .arg(&out_dir)
            .env("CARGO_TARGET_DIR", &target)
            .current_dir(workspace()),
    );
    let deb = fs::read_dir(&out_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("no .deb written");

    let list = deb_listing(&deb);
    let expect = [
        ("/usr/bin/cdpd", "-rwxr-xr-x"),
        ("/usr/bin/cdp-shipper", "-rwxr-xr-x"),
        ("/usr/bin/cdp-qemu", "-rwxr-xr-x"),
        ("/usr/bin/cdpctl", "-rwxr-xr-x"),
        ("/usr/bin/cdp-agent", "-rwxr-xr-x"),
        ("/etc/libvirt/hooks/qemu.d/cdp", "-rwxr-xr-x"),
        ("/etc/cdp/cdp.toml", "-rw-r--r--"),
        ("/usr/lib/systemd/system/cdp-agent.service", "-rw-r--r--"),
        ("/usr/share/cdpd/apparmor/cdp", "-rw-r--r--"),
        ("/usr/share/doc/cdpd/README.md", "-rw-r--r--"),
        ("/usr/share/doc/cdpd/packaging.md", "-rw-r--r--"),
        ("/usr/share/doc/cdpd/copyright", "-rw-r--r--"),
        ("/usr/share/man/man1/cdpctl.1.gz", "-rw-r--r--"),
        (
            "/usr/share/bash-completion/completions/cdpctl",
            "-rw-r--r--",
        ),
        ("/usr/share/zsh/vendor-completions/_cdpctl", "-rw-r--r--"),
        (
            "/usr/share/fish/vendor_completions.d/cdpctl.fish",
            "-rw-r--r--",
        ),
    ];
    for (p, mode) in expect {
        let (m, owner) = list
            .get(p)
            .unwrap_or_else(|| panic!("{p} not in the package: {list:#?}"));
        assert_eq!(m, mode, "{p}");
        assert_eq!(owner, "0/0", "{p}: not owned by root");
    }
    // One man page per subcommand besides cdpctl.1 (tools/tests/gen.rs checks them).
    let files: Vec<_> = list
        .iter()
        .filter(|(p, (m, _))| !m.starts_with('d') && !p.starts_with("/usr/share/man/man1/cdpctl-"))
        .collect();
    assert_eq!(files.len(), expect.len(), "unexpected files: {files:#?}");

    // Control: name, dependencies, conffiles, maintainer scripts.
    let field = |f: &str| {
        let out = run_ok(Command::new("dpkg-deb").args(["-f"]).arg(&deb).arg(f));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(field("Package"), "cdpd");
    assert!(
        field("Depends").contains("qemu-utils"),
        "{}",
        field("Depends")
    );
    let control = tmp.path().join("control");
    run_ok(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
    let conffiles = fs::read_to_string(control.join("conffiles")).unwrap();
    for c in ["/etc/cdp/cdp.toml", "/etc/libvirt/hooks/qemu.d/cdp"] {
        assert!(
            conffiles.lines().any(|l| l == c),
            "{c} not a conffile: {conffiles}"
        );
    }
    for script in ["preinst", "postinst", "prerm", "postrm"] {
        let p = control.join(script);
        run_ok(Command::new("sh").arg("-n").arg(&p));
        let text = fs::read_to_string(&p).unwrap();
        // libvirtd is the operator's to restart: the scripts only say so.
        for l in text.lines().filter(|l| l.contains("libvirtd")) {
            assert!(
                l.trim_start().starts_with("echo") || l.trim_start().starts_with('#'),
                "{script}: {l}"
            );
        }
    }
    preinst_takes_over_cdpctl_install(&control, &tmp.path().join("tree"), &deb);
    dpkg_installs_over_cdpctl_install_without_a_question(&deb);
    let postinst = fs::read_to_string(control.join("postinst")).unwrap();
    assert!(
        postinst.contains("mkdir -p \"$root/var/lib/cdp\""),
        "{postinst}"
    );
    assert!(postinst.contains("restart libvirtd"), "{postinst}");

    // The tree: files as in packaging/, programs that run.
    let tree_dir = tmp.path().join("tree");
    run_ok(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree_dir));
    for (inside, source) in [
        ("etc/cdp/cdp.toml", "packaging/cdp.toml"),
        ("etc/libvirt/hooks/qemu.d/cdp", "packaging/libvirt/cdp"),
        (
            "usr/lib/systemd/system/cdp-agent.service",
            "packaging/systemd/cdp-agent.service",
        ),
        ("usr/share/cdpd/apparmor/cdp", "packaging/apparmor/cdp"),
    ] {
        assert_files_equal(&tree_dir.join(inside), &workspace().join(source));
    }
    let cdpctl = tree_dir.join("usr/bin/cdpctl");
    run_ok(Command::new(&cdpctl).arg("--version"));
    run_ok(Command::new(tree_dir.join("usr/bin/cdpd")).arg("--help"));

    // The package's tree is what `cdpctl install --libvirt` makes for /usr/bin: run
    // from there, it copies nothing, keeps the conffile and finds the hook unchanged.
    let out = run_ok(
        Command::new(&cdpctl)
            .args(["install", "--libvirt", "--json", "--root"])
            .arg(&tree_dir),
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["bin_dir"], "/usr/bin");
    for p in PROGRAMS {
        assert_eq!(item(&v, &format!("/usr/bin/{p}"))["changed"], false);
    }
    assert_eq!(item(&v, "/etc/cdp/cdp.toml")["action"], "kept");
    assert_eq!(
        item(&v, "/etc/libvirt/hooks/qemu.d/cdp")["action"],
        "unchanged"
    );

    // What dpkg owns, uninstall leaves to dpkg.
    let info = tree_dir.join("var/lib/dpkg/info");
    fs::create_dir_all(&info).unwrap();
    fs::write(
        info.join("cdpd.list"),
        list.keys().cloned().collect::<Vec<_>>().join("\n"),
    )
    .unwrap();
    let out = run_ok(
        Command::new(&cdpctl)
            .args(["uninstall", "--libvirt", "--json", "--root"])
            .arg(&tree_dir),
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(item(&v, "/etc/libvirt/hooks/qemu.d/cdp")["action"], "kept");
    assert_eq!(item(&v, "/usr/bin/cdpd")["action"], "kept");
    assert!(tree_dir.join("usr/bin/cdpd").exists());
}

// ---------------------------------------------------------------- systemd

#[test]
fn installed_unit_verifies() {
    let analyze = require_tool("systemd-analyze");
    let s = setup();
    // ExecStart must name a program that exists on this host: the built cdp-agent.
    let bins = bin_dir();
    s.json(&["install", "--systemd", "--bin-dir", bins.to_str().unwrap()]);
    let unit = s.at("/etc/systemd/system/cdp-agent.service");
    let text = fs::read_to_string(&unit).unwrap();
    assert!(
        text.contains(&format!("ExecStart={}/cdp-agent run\n", bins.display())),
        "{text}"
    );
    for key in [
        "Type=notify",
        "WatchdogSec=30s",
        "Restart=on-failure",
        "After=network-online.target libvirtd.service",
    ] {
        assert!(text.lines().any(|l| l == key), "{key} not in {text}");
    }
    let out = run(Command::new(analyze).arg("verify").arg(&unit));
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        stderr(&out)
    );
}

// ---------------------------------------------------------------- what install found

/// `root`'s /etc/apparmor.d as this host has it (libvirt's abstraction,
/// template and tunables), with libvirt's local abstraction as its package
/// creates it: empty.
fn host_apparmor_tree(root: &Path) -> bool {
    let host = Path::new("/etc/apparmor.d");
    if !host.join("abstractions/libvirt-qemu").is_file() {
        return false;
    }
    run_ok(Command::new("cp").arg("-a").arg(host).arg(root.join("etc")));
    fs::write(
        root.join("etc/apparmor.d/local/abstractions/libvirt-qemu"),
        "",
    )
    .unwrap();
    true
}

/// issue 15: libvirt's package creates `local/abstractions/libvirt-qemu`
/// empty and every VM's profile includes it without `if exists`: install and
/// uninstall leave it byte for byte (empty too), and the QEMU template still
/// parses afterwards. Also where libvirt's own abstraction is not there (the
/// case an empty file used to be taken for ours and removed).
#[test]
fn libvirts_empty_local_abstraction_survives_install_and_uninstall() {
    let local = "/etc/apparmor.d/local/abstractions/libvirt-qemu";
    // Without libvirt's abstraction: an empty file that was there stays.
    let s = setup();
    fs::create_dir_all(s.at(local).parent().unwrap()).unwrap();
    fs::write(s.at(local), "").unwrap();
    fs::set_permissions(s.at(local), fs::Permissions::from_mode(0o640)).unwrap();
    let v = s.json(&["install", "--libvirt"]);
    assert_eq!(item(&v, local)["action"], "updated", "{v:#}");
    let manifest = fs::read_to_string(s.at("/var/lib/cdpctl/install.manifest")).unwrap();
    assert!(
        manifest.contains(&format!("modified\t{local}\n")),
        "{manifest}"
    );
    s.json(&["uninstall", "--libvirt"]);
    let m = fs::metadata(s.at(local)).expect("uninstall removed libvirt's file");
    assert_eq!((m.len(), m.mode() & 0o7777), (0, 0o640));
    // Everything else install created is gone, the manifest too.
    let left: Vec<String> = tree(&s.root).into_keys().collect();
    assert_eq!(left, vec![local.to_string()]);
    assert!(!s.at("/var/lib/cdpctl").exists());

    // A file without a final newline comes back without it.
    let s = setup();
    fs::create_dir_all(s.at(local).parent().unwrap()).unwrap();
    fs::write(s.at(local), "/srv/isos/** r,").unwrap();
    s.json(&["install", "--libvirt"]);
    s.json(&["install", "--libvirt"]);
    s.json(&["uninstall", "--libvirt"]);
    assert_eq!(fs::read(s.at(local)).unwrap(), b"/srv/isos/** r,");

    // This host's AppArmor tree: the template parses before, and after.
    let s = setup();
    fs::remove_dir(s.at("/etc/apparmor.d")).unwrap();
    if !host_apparmor_tree(&s.root) {
        panic!("libvirt's AppArmor abstraction is not installed on this host: run `bash scripts/install-deps`");
    }
    let parse = |root: &Path| -> Option<Output> {
        let parser = which("apparmor_parser")
            .or_else(|| Some(PathBuf::from("/usr/sbin/apparmor_parser")).filter(|p| p.is_file()))?;
        let base = root.join("etc/apparmor.d");
        Some(run(Command::new(parser)
            .args(["-Q", "-K", "-b"])
            .arg(&base)
            .arg(base.join("libvirt/TEMPLATE.qemu"))))
    };
    s.json(&["install", "--libvirt"]);
    s.json(&["uninstall", "--libvirt"]);
    assert_eq!(fs::read(s.at(local)).expect("libvirt's file removed"), b"");
    match parse(&s.root) {
        None => eprintln!(
            "SKIPPED the parse step only: apparmor_parser is not installed here \
             (apt-get install apparmor); the file itself was checked above"
        ),
        Some(out) => {
            assert!(
                out.status.success(),
                "template no longer parses: {}",
                stderr(&out)
            );
            // The check can fail: without the file, the template does not parse.
            fs::remove_file(s.at(local)).unwrap();
            let out = parse(&s.root).unwrap();
            assert!(
                !out.status.success(),
                "parses without libvirt's local file?"
            );
        }
    }
}

/// Where the cdpd package is installed, `cdpctl install` from a build refuses
/// and names the package's command; uninstall leaves the package's state
/// directory and conffile alone, even with --purge.
#[test]
fn install_over_the_package_is_refused_and_uninstall_keeps_its_state() {
    let s = setup();
    let info = s.at("/var/lib/dpkg/info");
    fs::create_dir_all(&info).unwrap();
    fs::write(
        info.join("cdpd.list"),
        "/usr/bin/cdpctl\n/etc/cdp/cdp.toml\n/etc/libvirt/hooks/qemu.d/cdp\n",
    )
    .unwrap();
    let before = tree(&s.root);
    let out = run(&mut s.cmd(&["install", "--libvirt"]));
    assert!(!out.status.success());
    let err = stderr(&out);
    let want = format!(
        "{}/usr/bin/cdpctl install --libvirt --root {}",
        s.root.display(),
        s.root.display()
    );
    assert!(
        err.contains("the cdpd package is installed") && err.contains(&want),
        "{err}"
    );
    assert_eq!(tree(&s.root), before, "a refused install changed files");

    // The package's cdpctl may add the AppArmor rules; the package's files
    // never count as install's (after apt remove, the hook is still dpkg's).
    let pkg = programs(&s.at("/usr/bin"));
    fs::create_dir_all(s.at("/etc/libvirt/hooks/qemu.d")).unwrap();
    fs::copy(
        workspace().join("packaging/libvirt/cdp"),
        s.at("/etc/libvirt/hooks/qemu.d/cdp"),
    )
    .unwrap();
    run_ok(
        Command::new(&pkg)
            .args(["install", "--libvirt", "--root"])
            .arg(&s.root),
    );
    let manifest = fs::read_to_string(s.at("/var/lib/cdpctl/install.manifest")).unwrap();
    assert!(
        !manifest.contains("/usr/bin/") && !manifest.contains("hooks/qemu.d/cdp"),
        "{manifest}"
    );
    let list = fs::read(info.join("cdpd.list")).unwrap();
    fs::remove_file(info.join("cdpd.list")).unwrap();
    s.json(&["uninstall", "--libvirt"]);
    assert!(
        s.at("/etc/libvirt/hooks/qemu.d/cdp").exists(),
        "uninstall took the package's hook"
    );
    fs::write(info.join("cdpd.list"), list).unwrap();

    // The package's files and state, as its scripts leave them.
    fs::create_dir_all(s.at("/etc/cdp")).unwrap();
    fs::write(s.at("/etc/cdp/cdp.toml"), "# the package's\n").unwrap();
    fs::create_dir_all(s.at("/var/lib/cdp")).unwrap();
    fs::write(s.at("/var/lib/cdp/catalog.sqlite"), "state").unwrap();
    let v = s.json(&["uninstall", "--libvirt", "--purge"]);
    assert_eq!(item(&v, "/var/lib/cdp")["action"], "kept", "{v:#}");
    assert_eq!(item(&v, "/etc/cdp/cdp.toml")["action"], "kept", "{v:#}");
    assert!(s.at("/var/lib/cdp/catalog.sqlite").exists());
    assert!(s.at("/etc/cdp/cdp.toml").exists());
}

/// issue 15: the package over an earlier `cdpctl install` (with its manifest,
/// and from before manifests, with another bin-dir): preinst removes the copied
/// programs, the hook and the unit, sets the operator's config aside; dpkg
/// then finds nothing to ask about; postinst puts the config back. The scripts
/// run under DPKG_ROOT (as dpkg runs them for a root of its own), with the
/// systemd helpers of cargo-deb's fragments stubbed.
fn preinst_takes_over_cdpctl_install(control: &Path, tree_dir: &Path, deb: &Path) {
    run_ok(Command::new("dpkg-deb").arg("-x").arg(deb).arg(tree_dir));
    let stubs = tempfile::tempdir().unwrap();
    let path = systemd_stubs(stubs.path());
    for (bin_dir, manifest) in [("/usr/local/bin", true), ("/opt/cdp bin", false)] {
        let s = setup();
        s.json(&["install", "--libvirt", "--systemd", "--bin-dir", bin_dir]);
        if !manifest {
            fs::remove_file(s.at("/var/lib/cdpctl/install.manifest")).unwrap();
        }
        fs::write(s.at("/etc/cdp/cdp.toml"), "# mine\n").unwrap();
        let script = |name: &str, arg: &str| {
            run_ok(
                Command::new("sh")
                    .arg(control.join(name))
                    .arg(arg)
                    .env("DPKG_ROOT", &s.root)
                    .env("PATH", &path)
                    .stdin(Stdio::null()),
            )
        };
        let out = script("preinst", "install");
        let err = stderr(&out);
        assert!(
            err.contains("taking over an earlier 'cdpctl install'"),
            "{err}"
        );
        for p in PROGRAMS {
            let f = format!("{bin_dir}/{p}");
            assert!(!s.at(&f).exists(), "{f} left ({bin_dir}): {err}");
            assert!(err.contains(&format!("removed {f}")), "{err}");
        }
        for f in [
            "/etc/libvirt/hooks/qemu.d/cdp",
            "/etc/systemd/system/cdp-agent.service",
            "/var/lib/cdpctl/install.manifest",
            "/etc/cdp/cdp.toml",
        ] {
            assert!(!s.at(f).exists(), "{f} left ({bin_dir}): {err}");
        }
        // dpkg unpacks the package's conffiles where nothing is in the way.
        for f in ["etc/cdp/cdp.toml", "etc/libvirt/hooks/qemu.d/cdp"] {
            fs::copy(tree_dir.join(f), s.root.join(f)).unwrap();
        }
        let out = script("postinst", "configure");
        assert_eq!(
            fs::read_to_string(s.at("/etc/cdp/cdp.toml")).unwrap(),
            "# mine\n"
        );
        assert!(!s.at("/etc/cdp/cdp.toml.cdpd-preinst").exists());
        assert!(
            stderr(&out).contains("kept your /etc/cdp/cdp.toml"),
            "{}",
            stderr(&out)
        );
        // The package's hook, and the AppArmor block and local state kept.
        assert_files_equal(
            &s.at("/etc/libvirt/hooks/qemu.d/cdp"),
            &workspace().join("packaging/libvirt/cdp"),
        );
        assert!(s.at("/var/lib/cdp").is_dir());
        if !Path::new("/run/systemd/system").exists() {
            assert!(
                stderr(&out).contains("/usr/bin/cdp-agent run"),
                "{}",
                stderr(&out)
            );
        }
    }
}

/// Stand-ins for the systemd helpers cargo-deb's fragments call, first in PATH
/// (the scripts run outside a chroot: they must not enable anything on this host).
fn systemd_stubs(dir: &Path) -> String {
    fs::create_dir_all(dir).unwrap();
    for tool in ["systemctl", "deb-systemd-helper", "deb-systemd-invoke"] {
        let f = dir.join(tool);
        fs::write(&f, "#!/bin/sh\nexit 0\n").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o755)).unwrap();
    }
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// issue 15: a real `dpkg -i` (into a root of its own, no terminal) over an
/// earlier `cdpctl install --libvirt --systemd` with an operator's config:
/// it completes ("install ok installed") without a conffile question, the
/// copies in /usr/local/bin are gone, the operator's config is in force, the
/// hook is the package's. Then `cdpctl install` from a build refuses.
fn dpkg_installs_over_cdpctl_install_without_a_question(deb: &Path) {
    let dpkg = require_tool("dpkg");
    let s = setup();
    let db = s.at("/var/lib/dpkg");
    for d in ["info", "updates", "triggers"] {
        fs::create_dir_all(db.join(d)).unwrap();
    }
    fs::write(db.join("status"), "").unwrap();
    s.json(&["install", "--libvirt", "--systemd"]);
    fs::write(s.at("/etc/cdp/cdp.toml"), "# mine\n").unwrap();
    let path = systemd_stubs(&s._tmp.path().join("stubs"));
    let out = run(Command::new(&dpkg)
        .arg(format!("--root={}", s.root.display()))
        .args(["--force-script-chrootless", "--force-depends", "-i"])
        .arg(deb)
        .env("PATH", &path)
        .stdin(Stdio::null()));
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(
        out.status.success(),
        "dpkg -i over cdpctl install failed:\n{log}"
    );
    assert!(
        !log.contains("Configuration file"),
        "dpkg asked about a conffile:\n{log}"
    );
    let status = run_ok(
        Command::new(&dpkg)
            .arg(format!("--root={}", s.root.display()))
            .args(["-s", "cdpd"]),
    );
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("Status: install ok installed"),
        "{log}"
    );
    for p in PROGRAMS {
        assert!(!s.at(&format!("/usr/local/bin/{p}")).exists(), "{p}: {log}");
        assert!(s.at(&format!("/usr/bin/{p}")).exists(), "{p}: {log}");
    }
    assert_eq!(
        fs::read_to_string(s.at("/etc/cdp/cdp.toml")).unwrap(),
        "# mine\n"
    );
    assert_files_equal(
        &s.at("/etc/libvirt/hooks/qemu.d/cdp"),
        &workspace().join("packaging/libvirt/cdp"),
    );
    assert!(!s.at("/etc/systemd/system/cdp-agent.service").exists());
    assert!(!s.at("/var/lib/cdpctl").exists());
    // The reverse: a build's cdpctl names the package's command instead.
    let out = run(&mut s.cmd(&["install", "--libvirt"]));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("usr/bin/cdpctl install --libvirt"),
        "{}",
        stderr(&out)
    );
}
