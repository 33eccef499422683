//! `cdpctl files`: single files of a point, read through libguestfs from a
//! read-only NBD export of the point, come back byte-exact. A disk holding a
//! real ext4 filesystem is written through real cdpd, a file of it is changed
//! later, the journal is shipped and the host's state deleted: at the first
//! point `get` returns the old bytes, at the later one the new ones, and `ls`
//! lists each point's directory. Without guestfish, the command says what
//! to install.
//!
//! libguestfs runs its appliance under TCG here (/dev/kvm is nested and does
//! not work, ../shared/TESTING.md); where the host has no kernel in /boot (a
//! container), the appliance is built from the test guest's kernel
//! (scripts/build-guest's download), unpacked once under target/guest.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use cdp_tests::fixture::{cdpctl, cdpctl_cmd, config, shipper_once_cmd};
use cdp_tests::{fill_pseudo_random, guest, require_tool, run, run_ok, which, Daemon};

const MIB: u64 = 1 << 20;
const DISK: u64 = 32 * MIB;

/// guestfish, or a failure saying how to install it (never a skip: it is
/// installable here, and scripts/install-deps installs it).
fn guestfish() -> PathBuf {
    which("guestfish").unwrap_or_else(|| {
        panic!(
            "guestfish (libguestfs) is not installed: run `bash scripts/install-deps` \
             (or: apt-get install -y --no-install-recommends --no-remove guestfish, \
             after guest/install-qemu-system)"
        )
    })
}

/// Does the host have a kernel libguestfs can build its appliance from?
fn host_kernel() -> bool {
    std::fs::read_dir("/boot")
        .map(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz"))
        })
        .unwrap_or(false)
}

/// The test guest's kernel unpacked with its modules (depmod run), for
/// SUPERMIN_KERNEL and SUPERMIN_MODULES: (vmlinuz, modules directory).
fn guest_kernel() -> (PathBuf, PathBuf) {
    let (vmlinuz, _) = guest::build();
    let cache = vmlinuz.parent().unwrap().join(".cache");
    let deb = std::fs::read_dir(&cache)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            n.starts_with("linux-image-") && n.ends_with(".deb")
        })
        .max()
        .unwrap_or_else(|| panic!("no linux-image-*.deb in {}", cache.display()));
    let stem = deb.file_stem().unwrap().to_string_lossy().into_owned();
    let root = vmlinuz.parent().unwrap().join("libguestfs").join(&stem);
    if !root.join(".done").exists() {
        let tmp = root.with_extension(format!("tmp{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).unwrap();
        run_ok(
            Command::new(require_tool("dpkg"))
                .arg("-x")
                .arg(&deb)
                .arg(&tmp),
        );
        let ver = only_entry(&tmp.join("lib/modules"));
        run_ok(
            Command::new(require_tool("depmod"))
                .arg("-b")
                .arg(&tmp)
                .arg(&ver),
        );
        std::fs::write(tmp.join(".done"), "").unwrap();
        let _ = std::fs::remove_dir_all(&root);
        std::fs::rename(&tmp, &root).unwrap();
    }
    let ver = only_entry(&root.join("lib/modules"));
    (
        root.join("boot").join(format!("vmlinuz-{ver}")),
        root.join("lib/modules").join(ver),
    )
}

fn only_entry(dir: &Path) -> String {
    let v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(v.len(), 1, "{}: {v:?}", dir.display());
    v[0].clone()
}

/// libguestfs's settings for this machine: TCG, and a kernel for the
/// appliance where /boot has none.
fn appliance_env(c: &mut Command) {
    c.env("LIBGUESTFS_BACKEND", "direct");
    if std::env::var_os("LIBGUESTFS_BACKEND_SETTINGS").is_none() {
        c.env("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg");
    }
    if std::env::var_os("SUPERMIN_KERNEL").is_none() && !host_kernel() {
        // supermin 5.2 lstat()s /lib/modules even when SUPERMIN_MODULES
        // names another directory; a container has none (an empty one is
        // what a kernel package would leave after its removal).
        std::fs::create_dir_all("/lib/modules").unwrap();
        let (k, m) = guest_kernel();
        c.env("SUPERMIN_KERNEL", k).env("SUPERMIN_MODULES", m);
    }
}

/// An ext4 image of DISK bytes holding `dir`.
fn mkfs(dir: &Path, img: &Path) {
    let f = std::fs::File::create(img).unwrap();
    f.set_len(DISK).unwrap();
    run_ok(
        Command::new(require_tool("mkfs.ext4"))
            .args(["-q", "-F", "-b", "4096", "-d"])
            .arg(dir)
            .arg(img),
    );
}

/// Write the whole of `img` onto the disk through cdpd (qemu-img flushes at the end).
fn write_through_cdpd(d: &Daemon, img: &Path) {
    run_ok(
        Command::new(require_tool("qemu-img"))
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(img)
            .arg(d.uri("vda")),
    );
}

fn random(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill_pseudo_random(seed, &mut v);
    v
}

/// `cdpctl files VM --at AT --no-local ARGS…` with the appliance's settings;
/// must succeed: its stdout.
fn files(d: &Daemon, cfg: &Path, at: &str, args: &[&str]) -> Vec<u8> {
    let mut full = vec!["files", d.vm_uuid.as_str(), "--at", at, "--no-local"];
    full.extend_from_slice(args);
    let mut c = cdpctl_cmd(d, cfg, &full);
    appliance_env(&mut c);
    let t = Instant::now();
    let out = run(&mut c);
    eprintln!(
        "cdpctl {full:?}: {:.1} s\n{}",
        t.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "cdpctl {full:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn names(json: &[u8]) -> Vec<String> {
    let v = cdp_tests::parse_json_lenient(&String::from_utf8_lossy(json));
    v["names"]
        .as_array()
        .unwrap_or_else(|| panic!("no names in {v}"))
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_file_comes_back_as_it_was_at_each_point() {
    guestfish();
    let mut d = Daemon::builder()
        .disk("vda", DISK)
        .args(["--segment-age", "30ms"])
        .start();
    let repo = d.work_dir().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let cfg = config(&d, &repo);
    cdpctl(&d, &cfg, &["baseline", &d.vm_uuid]);

    // Point "before": a filesystem with data.bin (old bytes).
    let tree = d.work_dir().join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    let old = random(1, 300 * 1024 + 17);
    std::fs::write(tree.join("data.bin"), &old).unwrap();
    std::fs::write(tree.join("hello.txt"), b"hello from the point before\n").unwrap();
    std::fs::write(tree.join("sub/nested.txt"), b"nested\n").unwrap();
    let img = d.work_dir().join("fs.img");
    mkfs(&tree, &img);
    write_through_cdpd(&d, &img);
    cdpctl(&d, &cfg, &["mark", &d.vm_uuid, "before"]);

    // Later, in the same filesystem: data.bin replaced (other bytes, other
    // length), a new file added (debugfs edits the image, cdpd gets all of it).
    let new = random(2, 200 * 1024 + 3);
    let new_file = d.work_dir().join("new.bin");
    std::fs::write(&new_file, &new).unwrap();
    let script = d.work_dir().join("debugfs.cmds");
    std::fs::write(
        &script,
        format!(
            "rm /data.bin\nwrite {} data.bin\nwrite {} added.txt\n",
            new_file.display(),
            new_file.display()
        ),
    )
    .unwrap();
    run_ok(
        Command::new(require_tool("debugfs"))
            .args(["-w", "-f"])
            .arg(&script)
            .arg(&img),
    );
    write_through_cdpd(&d, &img);
    cdpctl(&d, &cfg, &["mark", &d.vm_uuid, "after"]);

    d.term();
    run_ok(&mut shipper_once_cmd(&d, &cfg));
    // Only the repository is left.
    std::fs::remove_dir_all(&d.state_dir).unwrap();
    std::fs::create_dir_all(&d.state_dir).unwrap();

    // The old bytes at "before", into a new file.
    let got = d.work_dir().join("got-before.bin");
    files(
        &d,
        &cfg,
        "mark:before",
        &["get", "/data.bin", "--out", got.to_str().unwrap()],
    );
    let got = std::fs::read(&got).unwrap();
    assert_eq!(got.len(), old.len(), "data.bin at mark:before: length");
    assert!(got == old, "data.bin at mark:before: other bytes");

    // The new bytes at "after", on stdout.
    let got = files(&d, &cfg, "mark:after", &["get", "/data.bin"]);
    assert_eq!(got.len(), new.len(), "data.bin at mark:after: length");
    assert!(got == new, "data.bin at mark:after: other bytes");

    // Each point's directory.
    let before = names(&files(&d, &cfg, "mark:before", &["--json", "ls", "/"]));
    for n in ["data.bin", "hello.txt", "sub", "lost+found"] {
        assert!(
            before.contains(&n.to_string()),
            "ls / at before: {before:?}"
        );
    }
    assert!(
        !before.contains(&"added.txt".to_string()),
        "ls / at before lists a later file: {before:?}"
    );
}

#[test]
fn without_guestfish_it_says_what_to_install() {
    let d = Daemon::builder().disk("vda", MIB).prepare();
    let repo = d.work_dir().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let cfg = config(&d, &repo);
    let empty = d.work_dir().join("empty-path");
    std::fs::create_dir_all(&empty).unwrap();
    let mut c = cdpctl_cmd(
        &d,
        &cfg,
        &[
            "files",
            &d.vm_uuid,
            "--at",
            "latest",
            "get",
            "/etc/hostname",
        ],
    );
    c.env("PATH", &empty);
    let out = run(&mut c);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "succeeded without guestfish: {err}");
    assert!(
        err.contains("guestfish")
            && err.contains("apt-get install --no-install-recommends guestfish"),
        "no install hint: {err}"
    );
    assert!(out.stdout.is_empty());
}
