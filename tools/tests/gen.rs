//! `cdpctl completions SHELL` and `cdpctl man DIR`, generated from the CLI
//! definition, without a config: the bash script, sourced in a real bash,
//! registers `complete -p cdpctl` and completes subcommands and options; the
//! zsh and fish scripts name the subcommands (and parse, where that shell is
//! installed); there is one man page per subcommand, each rendered by
//! `man -l` without a warning, and cdpctl(1) names every subcommand.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};

use cdp_tests::{bin, require_tool, run, run_ok, which};

/// cdpctl with no config anywhere it could find one.
fn cdpctl(args: &[&str]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let out = run(Command::new(bin("cdpctl"))
        .args(args)
        .env("CDP_CONFIG", dir.path().join("no-such-config.toml"))
        .current_dir(dir.path()));
    assert!(
        out.status.success(),
        "cdpctl {args:?} (no config):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The visible subcommands, as `cdpctl --help` lists them.
fn subcommands() -> BTreeSet<String> {
    let help = String::from_utf8(cdpctl(&["--help"]).stdout).unwrap();
    let subs: BTreeSet<String> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| *n != "help")
        .map(str::to_string)
        .collect();
    for s in [
        "restore",
        "export",
        "files",
        "points",
        "verify",
        "completions",
    ] {
        assert!(subs.contains(s), "{s} not in cdpctl --help: {help}");
    }
    subs
}

/// Run the bash completion function on `line` (completing its last word);
/// the candidates.
fn bash_complete(script: &Path, words: &[&str]) -> Vec<String> {
    let bash = require_tool("bash");
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let line = words.join(" ");
    let prog = format!(
        "source '{}'\n\
         complete -p cdpctl || exit 3\n\
         COMP_WORDS=({})\n\
         COMP_CWORD={}\n\
         COMP_LINE='{line}'\n\
         COMP_POINT={}\n\
         f=$(complete -p cdpctl | sed -n 's/.*-F \\([^ ]*\\).*/\\1/p')\n\
         \"$f\" cdpctl '{}' '{}'\n\
         printf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
        script.display(),
        quoted.join(" "),
        words.len() - 1,
        line.len(),
        words[words.len() - 1],
        words[words.len() - 2],
    );
    let out = run_ok(Command::new(bash).arg("--norc").arg("-c").arg(prog));
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    let registered = lines.next().unwrap_or_default();
    assert!(
        registered.starts_with("complete ") && registered.ends_with(" cdpctl"),
        "complete -p cdpctl: {registered:?}"
    );
    lines.map(|l| l.trim().to_string()).collect()
}

#[test]
fn bash_completion_completes_subcommands_and_options() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("cdpctl.bash");
    std::fs::write(&script, cdpctl(&["completions", "bash"]).stdout).unwrap();

    let all = bash_complete(&script, &["cdpctl", ""]);
    for s in subcommands() {
        assert!(all.contains(&s), "{s} not offered after `cdpctl `: {all:?}");
    }
    let re = bash_complete(&script, &["cdpctl", "re"]);
    assert!(re.contains(&"restore".to_string()), "{re:?}");
    assert!(re.contains(&"restore-config".to_string()), "{re:?}");
    assert!(
        re.iter().all(|c| c.starts_with("re")),
        "offered after `cdpctl re`: {re:?}"
    );
    let opts = bash_complete(&script, &["cdpctl", "restore", "--in"]);
    assert!(opts.contains(&"--in-place".to_string()), "{opts:?}");
    let files = bash_complete(&script, &["cdpctl", "files", "vm", "--at", "latest", ""]);
    for s in ["ls", "get"] {
        assert!(files.contains(&s.to_string()), "cdpctl files …: {files:?}");
    }
}

#[test]
fn zsh_and_fish_completions_name_every_subcommand() {
    for shell in ["zsh", "fish"] {
        let text = String::from_utf8(cdpctl(&["completions", shell]).stdout).unwrap();
        for s in subcommands() {
            assert!(text.contains(&s), "{shell}: {s} missing");
        }
        // Parsed by the shell itself where it is installed (neither is a
        // test dependency: bash is the one sourced above).
        if let Some(sh) = which(shell) {
            let dir = tempfile::tempdir().unwrap();
            let f = dir.path().join("cdpctl.completion");
            std::fs::write(&f, &text).unwrap();
            run_ok(Command::new(sh).arg("-n").arg(&f));
        } else {
            eprintln!("{shell} is not installed: its script is checked for names only");
        }
    }
}

#[test]
fn man_pages_for_every_subcommand_render() {
    let dir = tempfile::tempdir().unwrap();
    let man_dir = dir.path().join("man");
    cdpctl(&["man", man_dir.to_str().unwrap()]);
    let man = require_tool("man");
    let render = |page: &Path| -> String {
        let out = run_ok(
            Command::new(&man)
                .arg("-l")
                .arg(page)
                .env("MANPAGER", "cat")
                .env("MANWIDTH", "100")
                .env_remove("MAN_KEEP_FORMATTING")
                .env("LC_ALL", "C.UTF-8"),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.trim().is_empty(), "man -l {}: {err}", page.display());
        // Not a terminal: man-db strips bold and underline (col -b).
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(!text.contains('\u{8}'), "overstrikes left: {text}");
        assert!(text.contains("NAME"), "{}: {text}", page.display());
        text
    };
    let top = render(&man_dir.join("cdpctl.1"));
    for s in subcommands() {
        let page = man_dir.join(format!("cdpctl-{s}.1"));
        assert!(page.is_file(), "no man page for {s}");
        let text = render(&page);
        assert!(text.contains(&format!("cdpctl-{s}")), "{s}: {text}");
        assert!(top.contains(&s), "cdpctl(1) does not name {s}: {top}");
    }
    // The hidden libvirt hook and the generator itself get no page.
    assert!(!man_dir.join("cdpctl-libvirt-hook.1").exists());
    assert!(!man_dir.join("cdpctl-man.1").exists());
    // Nested subcommands have theirs.
    for p in [
        "cdpctl-files-get.1",
        "cdpctl-files-ls.1",
        "cdpctl-journal-replay.1",
    ] {
        assert!(man_dir.join(p).is_file(), "{p} missing");
    }
}
