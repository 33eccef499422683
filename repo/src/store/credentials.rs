//! S3 credentials: from the environment (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`) or from an AWS-style INI
//! file named by the target; never from the URL.

use std::path::Path;

pub(super) struct Credentials {
    pub key_id: String,
    pub secret: String,
    pub token: Option<String>,
}

pub(super) fn from_env() -> Result<Credentials, String> {
    let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    match (get("AWS_ACCESS_KEY_ID"), get("AWS_SECRET_ACCESS_KEY")) {
        (Some(key_id), Some(secret)) => Ok(Credentials {
            key_id,
            secret,
            token: get("AWS_SESSION_TOKEN"),
        }),
        (Some(_), None) => Err("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not".into()),
        (None, Some(_)) => Err("AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not".into()),
        (None, None) => Err(
            "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or name a credentials file in the target"
                .into(),
        ),
    }
}

/// Read an AWS-style INI credentials file: the section `$AWS_PROFILE` (or
/// `default`) with `aws_access_key_id`, `aws_secret_access_key` and
/// optionally `aws_session_token`.
pub(super) fn read_file(path: &Path) -> Result<Credentials, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the credentials file {}: {e}", path.display()))?;
    let profile = std::env::var("AWS_PROFILE")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "default".to_string());
    let mut section: Option<String> = None;
    let (mut key_id, mut secret, mut token) = (None, None, None);
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.trim();
            let name = name.strip_prefix("profile ").unwrap_or(name).trim();
            section = Some(name.to_string());
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(format!(
                "{}:{}: expected `key = value` or `[profile]`",
                path.display(),
                n + 1
            ));
        };
        if section.as_deref() != Some(profile.as_str()) {
            continue;
        }
        let v = v.trim().to_string();
        match k.trim().to_ascii_lowercase().as_str() {
            "aws_access_key_id" => key_id = Some(v),
            "aws_secret_access_key" => secret = Some(v),
            "aws_session_token" => token = Some(v),
            _ => {}
        }
    }
    match (key_id, secret) {
        (Some(key_id), Some(secret)) if !key_id.is_empty() && !secret.is_empty() => Ok(Credentials {
            key_id,
            secret,
            token: token.filter(|t| !t.is_empty()),
        }),
        _ => Err(format!(
            "the credentials file {} has no aws_access_key_id and aws_secret_access_key in [{profile}]",
            path.display()
        )),
    }
}

/// Refuse a prune credentials file another user could read: it must be a
/// regular file (not a symlink) owned by root or this user, with no group
/// or other permission bits (docs/CREDENTIALS.md).
pub(super) fn check_private(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path).map_err(|e| {
        format!(
            "cannot read the prune credentials file {}: {e}",
            path.display()
        )
    })?;
    if !m.file_type().is_file() {
        return Err(format!(
            "the prune credentials file {} is not a regular file (a symbolic link?): name the file itself",
            path.display()
        ));
    }
    let me = nix::unistd::geteuid().as_raw();
    if m.uid() != 0 && m.uid() != me {
        return Err(format!(
            "the prune credentials file {} is owned by uid {}, not by root or this user (uid {me}): \
             fix it with: chown root:root {0}; chmod 600 {0}",
            path.display(),
            m.uid()
        ));
    }
    if m.mode() & 0o077 != 0 {
        return Err(format!(
            "the prune credentials file {} is mode {:04o}: group or others may read it, and it can delete backups; \
             fix it with: chmod 600 {0}; chown root:root {0}",
            path.display(),
            m.mode() & 0o7777
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("creds");
        std::fs::write(
            &p,
            "# comment\n[other]\naws_access_key_id = X\n\n[default]\naws_access_key_id = AK\naws_secret_access_key=SK\n",
        )
        .unwrap();
        let c = read_file(&p).unwrap();
        assert_eq!(
            (c.key_id.as_str(), c.secret.as_str(), c.token),
            ("AK", "SK", None)
        );
        std::fs::write(&p, "[default]\naws_access_key_id = AK\n").unwrap();
        let e = read_file(&p).err().unwrap();
        assert!(e.contains("aws_secret_access_key"), "{e}");
        std::fs::write(&p, "garbage line\n").unwrap();
        assert!(read_file(&p).is_err());
        assert!(read_file(&d.path().join("missing")).is_err());
    }
}
