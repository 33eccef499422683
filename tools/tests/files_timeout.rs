//! `cdpctl files` never leaves libguestfs's appliance behind: when the run
//! outlives `--timeout`, or cdpctl gets SIGINT (^C) or SIGTERM, guestfish's
//! process group and the appliance (a process in a group and session of its
//! own, as libguestfs starts QEMU) are killed, libguestfs's temporary files
//! and socket directory are removed, and so is cdpctl's private directory.
//!
//! guestfish is a stand-in here (a script first on PATH) that behaves as a
//! hung appliance does: it starts a "QEMU" with setsid, whose command line
//! names libguestfs's directories, and never answers.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use cdp_tests::fixture::{cdpctl, cdpctl_cmd, config};
use cdp_tests::guest::wait_until;
use cdp_tests::Daemon;

const MIB: u64 = 1 << 20;

/// A hung guestfish: records its pid, its appliance's pid and the socket
/// directory it made in `marks`, then waits forever.
const FAKE_GUESTFISH: &str = r#"#!/bin/bash
marks="$CDP_TEST_MARKS"
echo $$ >"$marks/fish.pid"
sd=$(mktemp -d /tmp/libguestfsXXXXXX)
echo "$sd" >"$marks/sockdir"
touch "$LIBGUESTFS_TMPDIR/overlay.qcow2"
setsid bash -c 'exec -a "fake-qemu -drive file=$0/overlay.qcow2 -chardev socket,path=$1/guestfsd.sock" sleep 1000' \
    "$LIBGUESTFS_TMPDIR" "$sd" </dev/null >/dev/null 2>&1 &
echo $! >"$marks/appliance.pid"
exec sleep 1000
"#;

struct Setup {
    d: Daemon,
    cfg: PathBuf,
    marks: PathBuf,
    tmp: PathBuf,
    path: String,
}

fn setup() -> Setup {
    let d = Daemon::builder()
        .disk("vda", MIB)
        .args(["--segment-age", "30ms"])
        .start();
    let w = d.work_dir().to_path_buf();
    let repo = w.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let cfg = config(&d, &repo);
    cdpctl(&d, &cfg, &["baseline", &d.vm_uuid]);
    let bin = w.join("fake-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let fish = bin.join("guestfish");
    std::fs::write(&fish, FAKE_GUESTFISH).unwrap();
    std::fs::set_permissions(&fish, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (marks, tmp) = (w.join("marks"), w.join("tmp"));
    std::fs::create_dir_all(&marks).unwrap();
    std::fs::create_dir_all(&tmp).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Setup {
        d,
        cfg,
        marks,
        tmp,
        path,
    }
}

impl Setup {
    fn files(&self, timeout: &str) -> Command {
        let mut c = cdpctl_cmd(
            &self.d,
            &self.cfg,
            &[
                "files",
                &self.d.vm_uuid,
                "--at",
                "latest",
                "--timeout",
                timeout,
                "ls",
                "/",
            ],
        );
        c.env("PATH", &self.path)
            .env("TMPDIR", &self.tmp)
            .env("CDP_TEST_MARKS", &self.marks)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.marks.join("stderr")).unwrap());
        c
    }

    /// Wait for cdpctl at most `secs`: its status and stderr. A cdpctl that
    /// hangs (with what it started) is killed and the test fails.
    fn wait(&self, child: std::process::Child, secs: u64) -> String {
        let st = cdp_tests::wait_child(child, Duration::from_secs(secs));
        let err = std::fs::read_to_string(self.marks.join("stderr")).unwrap_or_default();
        let Some(st) = st else {
            for m in ["fish.pid", "appliance.pid"] {
                if let Some(p) = std::fs::read_to_string(self.marks.join(m))
                    .ok()
                    .and_then(|p| p.trim().parse().ok())
                {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(p),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            panic!("cdpctl files still runs after {secs} s (killed): {err}");
        };
        assert!(!st.success(), "succeeded: {err}");
        err
    }

    fn mark(&self, name: &str) -> String {
        std::fs::read_to_string(self.marks.join(name))
            .unwrap_or_else(|e| panic!("the stand-in guestfish did not record {name}: {e}"))
            .trim()
            .to_string()
    }

    /// Nothing of the run is left: no guestfish, no appliance, no private
    /// directory (libguestfs's temporary files were in it), no socket dir.
    fn assert_nothing_left(&self) {
        for m in ["fish.pid", "appliance.pid"] {
            let pid: i32 = self.mark(m).parse().unwrap();
            wait_until(&format!("{m} ({pid}) to be gone"), 30, || {
                cdp_core::proc::is_gone(pid)
            });
        }
        let sockdir = self.mark("sockdir");
        assert!(
            !Path::new(&sockdir).exists(),
            "libguestfs's socket directory {sockdir} is left"
        );
        let left: Vec<_> = std::fs::read_dir(&self.tmp)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(left.is_empty(), "left in TMPDIR: {left:?}");
    }
}

#[test]
fn a_guestfish_run_past_its_timeout_is_killed_and_cleaned_up() {
    let s = setup();
    let err = s.wait(s.files("3s").spawn().unwrap(), 60);
    assert!(err.contains("(--timeout)"), "no timeout named: {err}");
    s.assert_nothing_left();
}

#[test]
fn sigint_and_sigterm_kill_the_appliance_and_clean_up() {
    for sig in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
    ] {
        let s = setup();
        let child = s.files("10m").spawn().unwrap();
        wait_until("the stand-in appliance to start", 60, || {
            s.marks.join("appliance.pid").exists()
        });
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).unwrap();
        let err = s.wait(child, 30);
        assert!(
            err.contains(&format!("interrupted ({sig})")),
            "{sig}: {err}"
        );
        s.assert_nothing_left();
    }
}
