//! `cdpctl repo init URL [--encrypt (--passphrase-file F | --key-file F)]`:
//! create a repository: its format marker and, with `--encrypt`, its key
//! wrapped by a passphrase or a key file (docs/REPOSITORY_FORMAT.md,
//! "Encryption"). Needs no config: it works on a URL.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use cdp_repo::crypto::KeySource;
use cdp_repo::format as rf;
use cdp_repo::store::Store;

#[derive(clap::Subcommand)]
pub enum RepoCmd {
    /// Create a repository (its format marker; with --encrypt, its key).
    Init(InitArgs),
}

#[derive(clap::Args)]
pub struct InitArgs {
    /// The repository: file:///path or s3://bucket/prefix?endpoint=…&region=….
    pub url: String,
    /// Encrypt and authenticate every object, with a new random repository
    /// key wrapped by the passphrase or key file given.
    #[arg(long)]
    pub encrypt: bool,
    /// A file holding the passphrase (argon2id); mode 0600 (or root-owned 0640).
    #[arg(long, requires = "encrypt", conflicts_with = "key_file")]
    pub passphrase_file: Option<PathBuf>,
    /// A key file of at least 32 random bytes; created (32 random bytes,
    /// mode 0600) if it does not exist.
    #[arg(long, requires = "encrypt")]
    pub key_file: Option<PathBuf>,
    /// S3 credentials file (AWS format); default: the AWS_* environment.
    #[arg(long)]
    pub credentials_file: Option<PathBuf>,
}

pub fn run(json: bool, c: &RepoCmd) -> Result<()> {
    match c {
        RepoCmd::Init(a) => init(json, a),
    }
}

/// Create `path` holding 32 random bytes, mode 0600; never replaces a file.
fn create_key_file(path: &Path) -> Result<()> {
    let mut key = [0u8; 32];
    getrandom::getrandom(&mut key).context("the system's random number generator")?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("creating the key file {}", path.display()))?;
    f.write_all(&key)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing the key file {}", path.display()))?;
    Ok(())
}

fn init(json: bool, a: &InitArgs) -> Result<()> {
    let source = match (a.encrypt, &a.passphrase_file, &a.key_file) {
        (false, _, _) => None,
        (true, Some(p), None) => Some(KeySource::PassphraseFile(p.clone())),
        (true, None, Some(k)) => {
            if std::fs::symlink_metadata(k).is_err() {
                create_key_file(k)?;
                eprintln!(
                    "created the key file {}: keep a copy somewhere else; without it the repository cannot be read",
                    k.display()
                );
            }
            Some(KeySource::KeyFile(k.clone()))
        }
        (true, _, _) => bail!("--encrypt needs --passphrase-file FILE or --key-file FILE"),
    };
    let store = Store::open(&a.url, a.credentials_file.as_deref())
        .with_context(|| format!("repository {}", a.url))?
        .with_key_source(None);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        store.check().await?;
        if let Some(s) = &source {
            store.init_encryption(s).await?;
        }
        store
            .put(rf::FORMAT_KEY, bytes::Bytes::from(rf::format_marker()))
            .await?;
        // Read it back as a reader would: the key unwraps, the repository is
        // (or is not) encrypted.
        let back = store.clone().with_key_source(source.clone());
        let encrypted = back.is_encrypted().await?;
        anyhow::ensure!(
            encrypted == source.is_some(),
            "{}: the repository reads back as {}",
            a.url,
            if encrypted { "encrypted" } else { "clear" }
        );
        anyhow::Ok(())
    })
    .with_context(|| format!("repository {}", a.url))?;
    if json {
        crate::print_json(&serde_json::json!({"url": a.url, "encrypted": source.is_some()}))?;
    } else if source.is_some() {
        println!(
            "{}: encrypted repository created; name its key in [target.NAME] key_file or passphrase_file",
            a.url
        );
    } else {
        println!("{}: repository created (not encrypted)", a.url);
    }
    Ok(())
}
