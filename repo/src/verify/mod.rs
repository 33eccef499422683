//! `cdpctl verify`: can every point of a VM be rebuilt from the repository,
//! and is every object intact?
//!
//! The quick check reads what a restore plans from: LISTs of each disk's
//! `journal/` and `baselines/` (sizes come with them), every `.idx` object
//! and baseline, and one LIST of `cdp/v1/chunks/` (no HEAD per object). It
//! finds segments without their index and the reverse, indexes that do not
//! decode or do not match their name, segment objects whose size is not the
//! one their index gives (a truncated object), breaks in the record chain,
//! baselines that do not decode, chunks a baseline names that are not
//! there, GAP records.
//!
//! `--deep` also fetches every segment object (size and BLAKE3 against its
//! index, every zstd frame decompressed, every record's CRC checked by
//! scanning the raw segment, every record against its index entry) and
//! every chunk a baseline names (decompressed and checked against its name).
//!
//! Each problem names the object, what is wrong with it, and which points it
//! makes unrestorable. Those follow restore's own rules (the newest baseline
//! whose chain reaches the point is the one used, see
//! [`crate::restore::plan()`]): the points restore would refuse or fail on,
//! which an intact repository would have rebuilt. A corrupt record makes
//! every later point of the baselines that need it count as unrestorable,
//! although a restore whose every byte from that record was overwritten
//! later would still succeed.

//!
//! Three parts: `collect` lists and loads what the repository holds of a
//! VM (the history restore would see), `check` checks each object's
//! integrity, `reach` works out which points can be rebuilt and which
//! an intact repository would have rebuilt but this one cannot.

mod check;
mod collect;
mod reach;

use std::collections::BTreeSet;

use serde::Serialize;

use crate::format as rf;
use crate::restore::{self, History, Ticker};
use crate::store::{with_retry, ObjectMeta, RetryPolicy, Store, StoreError};

use collect::DiskScanner;

/// What is wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// An object that should be there is not.
    Missing,
    /// An object is there but its content is wrong.
    Corrupt,
    /// An object is shorter (or longer) than its index says.
    Truncated,
    /// Records are missing from a disk's journal.
    Chain,
    /// Points are not restorable for a reason that is no damaged object
    /// (a GAP with no baseline after it, no baseline at all).
    Unrestorable,
}

/// A range of sequence numbers, with the times of the records there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SeqRange {
    pub from_seq: u64,
    pub to_seq: u64,
    pub from: String,
    pub to: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    pub disk: Option<String>,
    /// The object at fault (the missing one, for a missing object).
    pub key: Option<String>,
    pub kind: Kind,
    pub what: String,
    /// The points it makes unrestorable; empty when no restorable point
    /// needs it.
    pub unrestorable: Vec<SeqRange>,
    /// Labels of the marks among those points.
    pub marks: Vec<String>,
    /// Where the damage begins (for attributing unrestorable points).
    #[serde(skip)]
    from_seq: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BaselineInfo {
    pub key: String,
    pub s0: u64,
    pub s1: u64,
    pub chunks: u64,
    pub stored_chunks: u64,
    pub usable: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Mark {
    pub seq: u64,
    pub time: String,
    pub label: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Gap {
    pub seq: u64,
    pub time: String,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct DiskReport {
    pub disk: String,
    pub segments: u64,
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub baselines: Vec<BaselineInfo>,
    /// The seq ranges that can be restored.
    pub restorable: Vec<SeqRange>,
    /// Ranges an intact repository would restore but this one cannot.
    pub unrestorable: Vec<SeqRange>,
    pub marks: Vec<Mark>,
    pub gaps: Vec<Gap>,
    /// What the chain of indexes covers and cannot show
    /// (docs/REPOSITORY_FORMAT.md, "Chain of indexes"); not problems.
    pub chain: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Checked {
    pub indexes: u64,
    pub segments: u64,
    pub baselines: u64,
    pub chunks: u64,
    /// Objects fetched whole (`--deep`) and their bytes.
    pub fetched_objects: u64,
    pub fetched_bytes: u64,
    pub definitions: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub vm_uuid: String,
    pub repo: String,
    pub deep: bool,
    pub ok: bool,
    pub disks: Vec<DiskReport>,
    pub problems: Vec<Problem>,
    pub checked: Checked,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The repository cannot be read at all (unreachable, no credentials…):
    /// nothing can be said about its objects.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl VerifyError {
    /// True if verifying again may succeed (the repository was unreachable
    /// or failed on its side).
    pub fn is_transient(&self) -> bool {
        match self {
            VerifyError::Store(e) => e.is_transient(),
        }
    }
}

fn problem(disk: Option<&str>, key: Option<String>, kind: Kind, what: String) -> Problem {
    Problem {
        disk: disk.map(str::to_string),
        key,
        kind,
        what,
        unrestorable: Vec::new(),
        marks: Vec::new(),
        from_seq: None,
    }
}

fn last_component(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or(key)
}

/// GET with the default retry policy; a missing object is `Ok(None)`.
async fn get(store: &Store, key: &str) -> Result<Option<bytes::Bytes>, StoreError> {
    let retry = RetryPolicy::default();
    match with_retry(key, &retry, || store.get(key)).await {
        Ok(b) => Ok(Some(b)),
        Err(StoreError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

async fn list(store: &Store, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
    let retry = RetryPolicy::default();
    with_retry(prefix, &retry, || store.list(prefix)).await
}

/// Check a whole VM.
pub async fn verify(store: &Store, vm: &str, deep: bool) -> Result<Report, VerifyError> {
    verify_with(store, vm, deep, None).await
}

/// [`verify`], reporting to `tick` the bytes of the segment objects and
/// chunks it checks (their listed sizes; `--deep` fetches each): found
/// when listed, done when checked.
pub async fn verify_with(
    store: &Store,
    vm: &str,
    deep: bool,
    tick: Option<Ticker>,
) -> Result<Report, VerifyError> {
    let mut problems = Vec::new();
    let mut checked = Checked::default();
    collect::format_marker(store, &mut problems).await?;
    let mut disks = collect::vm_json_disks(store, vm, &mut problems).await?;
    disks.extend(collect::listed_disks(store, vm).await?);
    checked.definitions = list(store, &rf::config_prefix(vm))
        .await?
        .iter()
        .filter(|o| o.key.ends_with(".xml"))
        .count() as u64;
    // Every disk's journal and baselines first, then one LIST of the chunks
    // (a baseline is written after its chunks, so every chunk of a baseline
    // listed before is in the later listing).
    // What retention kept (a thinned journal is not damage).
    let retention = match restore::load_retention(store, vm).await {
        Ok(m) => m,
        Err(restore::RestoreError::Read(crate::read::ReadError::Store(e))) => return Err(e.into()),
        Err(_) => None,
    };
    let mut scans = Vec::new();
    for disk in &disks {
        let mut scanner = DiskScanner::new(store, vm, disk, deep, &mut checked, retention.as_ref());
        scanner.tick = tick.clone();
        scans.push(scanner.scan().await?);
    }
    check::chunks(store, deep, &mut scans, &mut checked, tick.as_ref()).await?;
    let mut out_disks = Vec::new();
    for s in scans {
        let (d, p) = reach::finish_disk(store, s).await;
        out_disks.push(d);
        problems.extend(p);
    }
    Ok(Report {
        vm_uuid: vm.to_string(),
        repo: store.url().to_string(),
        deep,
        ok: problems.is_empty(),
        disks: out_disks,
        problems,
        checked,
    })
}

/// Error texts of the format module begin with the key; the problem names
/// it already.
fn strip_key(msg: &str, key: &str) -> String {
    msg.strip_prefix(key)
        .and_then(|m| m.strip_prefix(": "))
        .unwrap_or(msg)
        .to_string()
}

/// What [`DiskScanner::scan`] found, before the chunks are checked.
struct DiskScan {
    history: History,
    problems: Vec<Problem>,
    /// Baselines (index into history.baselines) that cannot be used.
    bad_baselines: BTreeSet<usize>,
    /// Records whose bytes cannot be read back (first seq of each stretch).
    bad_records: Vec<u64>,
    /// The newest seq the repository's object names speak of.
    last_named: Option<u64>,
    /// What the chain of indexes covers (for [`DiskReport::chain`]).
    chain_notes: Vec<String>,
}
