//! Doing: carry out a [`Plan`], step by step. The report lists the steps
//! done, so a failure leaves a record of what changed before it.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use super::items::{Item, Op};
use super::plan::Plan;
use super::{io_err, InstallError, Report, Result};

/// Run the plan's operations in order (`op` names the command for errors:
/// install or uninstall). The report holds every step done; the result is the
/// first failure, or the plan's conflicts.
pub fn apply(plan: Plan, op: &'static str) -> (Report, Result<()>) {
    let mut items: Vec<Item> = Vec::new();
    let mut result = Ok(());
    for step in plan.steps {
        if let Err(e) = step.ops.iter().try_for_each(|o| run(o, op)) {
            result = Err(e);
            break;
        }
        items.push(step.item);
    }
    if result.is_ok() && !plan.conflicts.is_empty() {
        result = Err(InstallError::Modified {
            conflicts: plan.conflicts,
        });
    }
    let report = Report {
        root: plan.root,
        bin_dir: plan.bin_dir,
        items,
        next: plan.next,
        dry_run: false,
    };
    (report, result)
}

fn run(o: &Op, op: &'static str) -> Result<()> {
    match o {
        Op::Copy { from, to, mode } => {
            let mut f = fs::File::open(from).map_err(io_err(op, from))?;
            write_atomic(op, to, &mut f, *mode)
        }
        Op::Write { to, content, mode } => write_atomic(op, to, &mut content.as_bytes(), *mode),
        Op::Chmod { to, mode } => {
            fs::set_permissions(to, fs::Permissions::from_mode(*mode)).map_err(io_err(op, to))
        }
        Op::MkDir { to, mode } => {
            fs::create_dir_all(to).map_err(io_err(op, to))?;
            fs::set_permissions(to, fs::Permissions::from_mode(*mode)).map_err(io_err(op, to))
        }
        Op::Remove { to } => match fs::remove_file(to) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(op, to)(e)),
            _ => Ok(()),
        },
        Op::RemoveDir { to } => fs::remove_dir(to).map_err(io_err(op, to)),
        Op::RemoveTree { to } => fs::remove_dir_all(to).map_err(io_err(op, to)),
        Op::Systemctl { args, must } => match systemctl(args) {
            Err(e) if *must => Err(e),
            _ => Ok(()),
        },
    }
}

/// Write `data` to `path` with `mode` through a temporary file and a rename (a
/// running program can be replaced; a reader never sees half a file).
fn write_atomic(op: &'static str, path: &Path, data: &mut dyn Read, mode: u32) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(dir).map_err(io_err(op, dir))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.cdpctl-new"));
    let res = (|| -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        std::io::copy(data, &mut f)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.flush()?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(op, path)(e));
    }
    Ok(())
}

fn systemctl(args: &[&str]) -> Result<()> {
    let cmd = format!("systemctl {}", args.join(" "));
    let out =
        Command::new("systemctl")
            .args(args)
            .output()
            .map_err(|e| InstallError::Systemctl {
                cmd: cmd.clone(),
                why: e.to_string(),
            })?;
    if !out.status.success() {
        return Err(InstallError::Systemctl {
            cmd,
            why: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}
