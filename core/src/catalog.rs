//! A VM's catalog: `<state>/vms/<uuid>/catalog.sqlite` (SQLite, WAL mode).
//!
//! What the host knows about its protected VMs: VMs, disks, journal segments
//! (sequence and time ranges, size, sealed), capture sessions (how each one
//! started and ended), marks and gaps. cdpd writes it off the data path (at
//! start, when a segment is sealed, at stop); the shipper and cdpctl read it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use thiserror::Error;

use crate::journal::writer::SealedSegment;

/// 1: first version. 2: `vms.policy` (the policy cdpd ran with, for cdp-agent).
const SCHEMA_VERSION: i64 = 2;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS vms(
    uuid TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    last_seq INTEGER NOT NULL DEFAULT 0,
    last_ts_ns INTEGER NOT NULL DEFAULT 0,
    -- The policy cdpd last ran with (NULL: written by a version before 2).
    policy TEXT
);
CREATE TABLE IF NOT EXISTS disks(
    vm_uuid TEXT NOT NULL,
    disk TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    -- cdpd's checkpoint: every record up to this seq is durable in the
    -- image. Segments after it are not trimmed: a FLUSH made their records
    -- durable in the journal only (NULL: a cdpd that synced the image on
    -- every FLUSH, nothing to wait for).
    image_synced_seq INTEGER,
    PRIMARY KEY(vm_uuid, disk)
);
CREATE TABLE IF NOT EXISTS segments(
    vm_uuid TEXT NOT NULL,
    disk TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    first_ts_ns INTEGER NOT NULL,
    last_ts_ns INTEGER NOT NULL,
    records INTEGER NOT NULL,
    record_base INTEGER NOT NULL,
    size_bytes INTEGER NOT NULL,
    sealed INTEGER NOT NULL,
    path TEXT NOT NULL,
    -- 0 once the shipper trimmed the local file (every target has it).
    local INTEGER NOT NULL DEFAULT 1,
    -- BLAKE3 of the segment's repository index, once the shipper built it
    -- (the next segment's index names it: docs/REPOSITORY_FORMAT.md,
    -- 'Chain of indexes'). NULL: not built yet, or shipped before the chain.
    index_blake3 TEXT,
    PRIMARY KEY(vm_uuid, disk, first_seq)
);
CREATE TABLE IF NOT EXISTS sessions(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    vm_uuid TEXT NOT NULL,
    boot_id TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_ns INTEGER NOT NULL,
    start_seq INTEGER NOT NULL,
    previous_end TEXT NOT NULL,
    ended_ns INTEGER,
    end_kind TEXT
);
CREATE TABLE IF NOT EXISTS marks(
    vm_uuid TEXT NOT NULL,
    label TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts_ns INTEGER NOT NULL,
    PRIMARY KEY(vm_uuid, label)
);
CREATE TABLE IF NOT EXISTS shipments(
    vm_uuid TEXT NOT NULL,
    disk TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    target TEXT NOT NULL,
    key TEXT NOT NULL,
    shipped_ns INTEGER NOT NULL,
    object_bytes INTEGER NOT NULL,
    PRIMARY KEY(vm_uuid, disk, first_seq, target)
);
CREATE TABLE IF NOT EXISTS targets(
    vm_uuid TEXT NOT NULL,
    target TEXT NOT NULL,
    url TEXT NOT NULL,
    state TEXT NOT NULL,
    last_error TEXT,
    updated_ns INTEGER NOT NULL,
    PRIMARY KEY(vm_uuid, target)
);
CREATE TABLE IF NOT EXISTS baselines(
    vm_uuid TEXT NOT NULL,
    disk TEXT NOT NULL,
    target TEXT NOT NULL,
    s0 INTEGER NOT NULL,
    s1 INTEGER NOT NULL,
    key TEXT NOT NULL,
    created_ns INTEGER NOT NULL,
    chunks_total INTEGER NOT NULL,
    chunks_uploaded INTEGER NOT NULL,
    PRIMARY KEY(vm_uuid, disk, target, s1)
);
CREATE TABLE IF NOT EXISTS configs(
    vm_uuid TEXT NOT NULL,
    target TEXT NOT NULL,
    ts_ns INTEGER NOT NULL,
    blake3 TEXT NOT NULL,
    PRIMARY KEY(vm_uuid, target, ts_ns)
);
CREATE TABLE IF NOT EXISTS gaps(
    vm_uuid TEXT NOT NULL,
    disk TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts_ns INTEGER NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS uploads(
    vm_uuid TEXT NOT NULL,
    target TEXT NOT NULL,
    in_flight INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    PRIMARY KEY(vm_uuid, target)
);
";

#[derive(Debug, Error)]
pub enum CatalogError {
    #[error("catalog {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("catalog {path} has schema version {found}, this build knows version {SCHEMA_VERSION}; upgrade cdpd")]
    Version { path: PathBuf, found: i64 },
    #[error("{name:?} is not a VM UUID: {message}")]
    Name { name: String, message: String },
    #[error("{path} belongs to uid {uid}: root does not open a VM's catalog; it works on a VM's state as the VM's user (cdp_core::privsep)")]
    AsRoot { path: PathBuf, uid: u32 },
    #[error("creating {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, CatalogError>;

/// A protected VM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmRow {
    pub uuid: String,
    pub name: String,
    /// The policy its cdpd last ran with; `None` in catalogs from before
    /// schema version 2 (treat as "default").
    pub policy: Option<String>,
    pub last_seq: u64,
    pub last_ts_ns: u64,
}

/// The last capture session of a VM, as the catalog remembers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    pub id: i64,
    pub boot_id: String,
    pub pid: i64,
    pub started_ns: i64,
    pub end_kind: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SegmentRow {
    pub disk: String,
    pub first_seq: u64,
    pub last_seq: u64,
    pub first_ts_ns: u64,
    pub last_ts_ns: u64,
    pub records: u64,
    pub record_base: u64,
    pub size_bytes: u64,
    pub sealed: bool,
    pub path: String,
}

pub struct Catalog {
    conn: Connection,
    path: PathBuf,
}

impl Catalog {
    /// Open (creating if needed) the VM's catalog
    /// `<state>/vms/<uuid>/catalog.sqlite` (`vm_uuid` checked by
    /// `cdp_core::names`). Root never opens the catalog of a VM whose
    /// state belongs to another user: it drops to that user first
    /// (`cdp_core::privsep`, docs/DESIGN.md "Trust boundaries"). A VM whose
    /// rows are still in the host catalog of an older version
    /// (`<state>/catalog.sqlite`) gets them copied into its own catalog
    /// when that is created.
    pub fn open(state_dir: &Path, vm_uuid: &str) -> Result<Catalog> {
        let uuid = crate::names::check_uuid(vm_uuid)
            .map_err(|e| CatalogError::Name {
                name: vm_uuid.to_string(),
                message: e.to_string(),
            })?
            .hyphenated()
            .to_string();
        let state = crate::layout::StateDir::new(state_dir);
        let dir = state.vm(&uuid);
        std::fs::create_dir_all(dir.path()).map_err(|source| CatalogError::Io {
            path: dir.path().to_path_buf(),
            source,
        })?;
        // Root never opens a catalog in a directory another user owns.
        let foreign = crate::privsep::foreign_owner_as_root(dir.path()).map_err(|source| {
            CatalogError::Io {
                path: dir.path().to_path_buf(),
                source,
            }
        })?;
        if let Some(uid) = foreign {
            return Err(CatalogError::AsRoot {
                path: dir.path().to_path_buf(),
                uid,
            });
        }
        let path = dir.catalog();
        let fresh = !path.exists();
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NOFOLLOW
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| CatalogError::Sqlite {
            path: path.clone(),
            source,
        })?;
        let mut c = Catalog { conn, path };
        c.init()?;
        let legacy = state.legacy_catalog();
        if fresh && legacy.is_file() {
            c.import_legacy(&legacy, &uuid)?;
        }
        Ok(c)
    }

    /// Copy one VM's rows from the host catalog of versions before
    /// per-VM catalogs (same schema). That file was writable by every VM's
    /// QEMU user: its rows are no more trusted than the VM's own catalog.
    fn import_legacy(&mut self, legacy: &Path, uuid: &str) -> Result<()> {
        let tx = self
            .conn
            .transaction()
            .map_err(|source| CatalogError::Sqlite {
                path: legacy.to_path_buf(),
                source,
            })?;
        let run = || -> rusqlite::Result<()> {
            tx.execute(
                "ATTACH DATABASE ?1 AS old",
                params![legacy.to_string_lossy()],
            )?;
            tx.execute(
                "INSERT OR IGNORE INTO main.vms SELECT * FROM old.vms WHERE uuid = ?1",
                params![uuid],
            )?;
            // Marks by column: the legacy catalog has no `quiesced`.
            tx.execute(
                "INSERT OR IGNORE INTO main.marks(vm_uuid, label, seq, ts_ns)
                 SELECT vm_uuid, label, seq, ts_ns FROM old.marks WHERE vm_uuid = ?1",
                params![uuid],
            )?;
            // Segments by column: the legacy catalog has no `index_blake3`.
            tx.execute(
                "INSERT OR IGNORE INTO main.segments(vm_uuid, disk, first_seq, last_seq,
                     first_ts_ns, last_ts_ns, records, record_base, size_bytes, sealed, path, local)
                 SELECT vm_uuid, disk, first_seq, last_seq, first_ts_ns, last_ts_ns, records,
                     record_base, size_bytes, sealed, path, local FROM old.segments
                 WHERE vm_uuid = ?1",
                params![uuid],
            )?;
            for t in [
                "disks",
                "shipments",
                "targets",
                "baselines",
                "configs",
                "gaps",
            ] {
                tx.execute(
                    &format!(
                        "INSERT OR IGNORE INTO main.{t} SELECT * FROM old.{t} WHERE vm_uuid = ?1"
                    ),
                    params![uuid],
                )?;
            }
            tx.execute(
                "INSERT INTO main.sessions(vm_uuid, boot_id, pid, started_ns, start_seq,
                     previous_end, ended_ns, end_kind)
                 SELECT vm_uuid, boot_id, pid, started_ns, start_seq, previous_end, ended_ns,
                     end_kind FROM old.sessions WHERE vm_uuid = ?1 ORDER BY id",
                params![uuid],
            )?;
            Ok(())
        };
        let r = run();
        let r = r.and_then(|()| tx.commit());
        let _ = self.conn.execute("DETACH DATABASE old", []);
        r.map_err(|source| CatalogError::Sqlite {
            path: legacy.to_path_buf(),
            source,
        })
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> CatalogError + '_ {
        move |source| CatalogError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn init(&mut self) -> Result<()> {
        self.conn
            .busy_timeout(Duration::from_secs(10))
            .map_err(self.err())?;
        self.conn
            .pragma_update(None, "journal_mode", "WAL")
            .map_err(self.err())?;
        self.conn
            .pragma_update(None, "synchronous", "NORMAL")
            .map_err(self.err())?;
        let v: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(self.err())?;
        if v > SCHEMA_VERSION {
            return Err(CatalogError::Version {
                path: self.path.clone(),
                found: v,
            });
        }
        self.conn.execute_batch(SCHEMA).map_err(self.err())?;
        self.migrate()?;
        self.conn
            .pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(self.err())?;
        Ok(())
    }

    /// Bring a catalog of an older version up to this one. `CREATE TABLE IF
    /// NOT EXISTS` leaves existing tables alone, so new columns come here.
    fn migrate(&mut self) -> Result<()> {
        // The chain of indexes: a nullable column older builds never
        // select (they insert segments by column), so no version change.
        self.add_column("segments", "index_blake3", "TEXT")?;
        self.add_column("vms", "policy", "TEXT")?;
        // The image's checkpoint (issue 13): NULL for rows of older
        // versions (their cdpd synced the image on every FLUSH).
        self.add_column("disks", "image_synced_seq", "INTEGER")?;
        // Quiesced marks (issue 14): a column an older cdpd leaves at its
        // default (0, crash-consistent) when it inserts by column.
        self.add_column("marks", "quiesced", "INTEGER NOT NULL DEFAULT 0")
    }

    /// Add `column` (of type `ddl`) to `table` unless it has it.
    fn add_column(&self, table: &str, column: &str, ddl: &str) -> Result<()> {
        let has = self
            .conn
            .prepare("SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2")
            .and_then(|mut st| st.exists(params![table, column]))
            .map_err(self.err())?;
        if !has {
            self.conn
                .execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {ddl}"))
                .map_err(self.err())?;
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Remember the policy a VM's cdpd runs with (cdp-agent ships to its targets).
    pub fn set_vm_policy(&self, uuid: &str, policy: &str) -> Result<()> {
        self.conn
            .execute(
                "UPDATE vms SET policy = ?2 WHERE uuid = ?1",
                params![uuid, policy],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// Every VM the catalog knows, by UUID.
    pub fn vms(&self) -> Result<Vec<VmRow>> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT uuid, name, policy, last_seq, last_ts_ns FROM vms ORDER BY uuid",
            )
            .map_err(self.err())?;
        let rows = st
            .query_map([], |r| {
                Ok(VmRow {
                    uuid: r.get(0)?,
                    name: r.get(1)?,
                    policy: r.get(2)?,
                    last_seq: r.get::<_, i64>(3)? as u64,
                    last_ts_ns: r.get::<_, i64>(4)? as u64,
                })
            })
            .map_err(self.err())?;
        rows.collect::<std::result::Result<Vec<_>, _>>()
            .map_err(self.err())
    }

    pub fn upsert_vm(&self, uuid: &str, name: &str) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO vms(uuid, name) VALUES(?1, ?2)
                 ON CONFLICT(uuid) DO UPDATE SET name = excluded.name",
                params![uuid, name],
            )
            .map_err(self.err())?;
        Ok(())
    }

    pub fn upsert_disk(&self, vm: &str, disk: &str, path: &Path, size: u64) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO disks(vm_uuid, disk, path, size) VALUES(?1, ?2, ?3, ?4)
                 ON CONFLICT(vm_uuid, disk) DO UPDATE SET path = excluded.path, size = excluded.size",
                params![vm, disk, path.to_string_lossy(), size as i64],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// Record a disk's checkpoint (cdpd, once it is durable in the
    /// activity log): its segments up to `seq` may be trimmed.
    pub fn set_image_synced(&self, vm: &str, disk: &str, seq: u64) -> Result<()> {
        self.conn
            .execute(
                "UPDATE disks SET image_synced_seq = ?3 WHERE vm_uuid = ?1 AND disk = ?2",
                params![vm, disk, seq as i64],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// A disk's checkpoint as cdpd recorded it (None: none recorded).
    pub fn image_synced(&self, vm: &str, disk: &str) -> Result<Option<u64>> {
        let v: Option<Option<i64>> = self
            .conn
            .query_row(
                "SELECT image_synced_seq FROM disks WHERE vm_uuid = ?1 AND disk = ?2",
                params![vm, disk],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.err())?;
        Ok(v.flatten().map(|s| s as u64))
    }

    /// Resolve a VM given by name or UUID to its UUID.
    pub fn resolve_vm(&self, name_or_uuid: &str) -> Result<Option<(String, String)>> {
        self.conn
            .query_row(
                "SELECT uuid, name FROM vms WHERE uuid = ?1 OR name = ?1 ORDER BY uuid = ?1 DESC LIMIT 1",
                params![name_or_uuid],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(self.err())
    }

    pub fn last_seq(&self, vm: &str) -> Result<(u64, u64)> {
        let r: Option<(i64, i64)> = self
            .conn
            .query_row(
                "SELECT last_seq, last_ts_ns FROM vms WHERE uuid = ?1",
                params![vm],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(self.err())?;
        let (s, t) = r.unwrap_or((0, 0));
        Ok((s as u64, t as u64))
    }

    pub fn set_last_seq(&self, vm: &str, seq: u64, ts_ns: u64) -> Result<()> {
        self.conn
            .execute(
                "UPDATE vms SET last_seq = max(last_seq, ?2), last_ts_ns = max(last_ts_ns, ?3) WHERE uuid = ?1",
                params![vm, seq as i64, ts_ns as i64],
            )
            .map_err(self.err())?;
        Ok(())
    }

    pub fn last_session(&self, vm: &str) -> Result<Option<SessionRow>> {
        self.conn
            .query_row(
                "SELECT id, boot_id, pid, started_ns, end_kind FROM sessions
                 WHERE vm_uuid = ?1 ORDER BY id DESC LIMIT 1",
                params![vm],
                |r| {
                    Ok(SessionRow {
                        id: r.get(0)?,
                        boot_id: r.get(1)?,
                        pid: r.get(2)?,
                        started_ns: r.get(3)?,
                        end_kind: r.get(4)?,
                    })
                },
            )
            .optional()
            .map_err(self.err())
    }

    /// Record how an earlier session ended, as found by recovery.
    pub fn end_session(&self, id: i64, ended_ns: u64, kind: &str) -> Result<()> {
        self.conn
            .execute(
                "UPDATE sessions SET ended_ns = ?2, end_kind = ?3 WHERE id = ?1",
                params![id, ended_ns as i64, kind],
            )
            .map_err(self.err())?;
        Ok(())
    }

    pub fn start_session(
        &self,
        vm: &str,
        boot_id: &str,
        pid: u32,
        started_ns: u64,
        start_seq: u64,
        previous_end: &str,
    ) -> Result<i64> {
        self.conn
            .execute(
                "INSERT INTO sessions(vm_uuid, boot_id, pid, started_ns, start_seq, previous_end)
                 VALUES(?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    vm,
                    boot_id,
                    pid as i64,
                    started_ns as i64,
                    start_seq as i64,
                    previous_end
                ],
            )
            .map_err(self.err())?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Insert or update a segment (open or sealed).
    pub fn put_segment(&self, vm: &str, disk: &str, s: &SealedSegment, sealed: bool) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO segments(vm_uuid, disk, first_seq, last_seq, first_ts_ns, last_ts_ns,
                                      records, record_base, size_bytes, sealed, path)
                 VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                 ON CONFLICT(vm_uuid, disk, first_seq) DO UPDATE SET
                    last_seq = excluded.last_seq, first_ts_ns = excluded.first_ts_ns,
                    last_ts_ns = excluded.last_ts_ns, records = excluded.records,
                    record_base = excluded.record_base, size_bytes = excluded.size_bytes,
                    sealed = excluded.sealed, path = excluded.path",
                params![
                    vm,
                    disk,
                    s.first_seq as i64,
                    s.last_seq as i64,
                    s.first_ts_ns as i64,
                    s.last_ts_ns as i64,
                    s.records as i64,
                    s.record_base as i64,
                    s.size_bytes as i64,
                    sealed as i64,
                    s.path.to_string_lossy()
                ],
            )
            .map_err(self.err())?;
        Ok(())
    }

    pub fn delete_segment(&self, vm: &str, disk: &str, first_seq: u64) -> Result<()> {
        self.conn
            .execute(
                "DELETE FROM segments WHERE vm_uuid = ?1 AND disk = ?2 AND first_seq = ?3",
                params![vm, disk, first_seq as i64],
            )
            .map_err(self.err())?;
        Ok(())
    }

    pub fn segments(&self, vm: &str) -> Result<Vec<SegmentRow>> {
        self.segment_query(
            "SELECT disk, first_seq, last_seq, first_ts_ns, last_ts_ns, records, record_base,
                    size_bytes, sealed, path
             FROM segments WHERE vm_uuid = ?1 ORDER BY disk, first_seq",
            params![vm],
        )
    }

    pub fn add_mark(&self, vm: &str, label: &str, seq: u64, ts_ns: u64) -> Result<()> {
        self.add_mark_as(vm, label, seq, ts_ns, false)
    }

    /// A mark, `quiesced` when the guest's filesystems were frozen through
    /// its guest agent while it was taken (`cdpctl mark --quiesce`).
    pub fn add_mark_as(
        &self,
        vm: &str,
        label: &str,
        seq: u64,
        ts_ns: u64,
        quiesced: bool,
    ) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO marks(vm_uuid, label, seq, ts_ns, quiesced) VALUES(?1, ?2, ?3, ?4, ?5)",
                params![vm, label, seq as i64, ts_ns as i64, quiesced],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// The labels of the VM's quiesced marks.
    pub fn quiesced_marks(&self, vm: &str) -> Result<std::collections::HashSet<String>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT label FROM marks WHERE vm_uuid = ?1 AND quiesced != 0")
            .map_err(self.err())?;
        let rows = st
            .query_map(params![vm], |r| r.get(0))
            .map_err(self.err())?;
        rows.collect::<rusqlite::Result<_>>().map_err(self.err())
    }

    pub fn mark_exists(&self, vm: &str, label: &str) -> Result<bool> {
        let n: i64 = self
            .conn
            .query_row(
                "SELECT count(*) FROM marks WHERE vm_uuid = ?1 AND label = ?2",
                params![vm, label],
                |r| r.get(0),
            )
            .map_err(self.err())?;
        Ok(n > 0)
    }

    /// Every mark of the VM, oldest first: (label, seq, ts_ns) (the status
    /// page's timeline).
    pub fn marks(&self, vm: &str) -> Result<Vec<(String, u64, u64)>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT label, seq, ts_ns FROM marks WHERE vm_uuid = ?1 ORDER BY seq")
            .map_err(self.err())?;
        let rows = st
            .query_map(params![vm], |r| {
                Ok((
                    r.get(0)?,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, i64>(2)? as u64,
                ))
            })
            .map_err(self.err())?;
        rows.collect::<std::result::Result<Vec<_>, _>>()
            .map_err(self.err())
    }

    /// Every GAP recorded for the VM, oldest first: (disk, seq, ts_ns,
    /// reason) (the status page's timeline).
    pub fn gaps(&self, vm: &str) -> Result<Vec<(String, u64, u64, String)>> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT disk, seq, ts_ns, reason FROM gaps WHERE vm_uuid = ?1 ORDER BY disk, seq",
            )
            .map_err(self.err())?;
        let rows = st
            .query_map(params![vm], |r| {
                Ok((
                    r.get(0)?,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, i64>(2)? as u64,
                    r.get(3)?,
                ))
            })
            .map_err(self.err())?;
        rows.collect::<std::result::Result<Vec<_>, _>>()
            .map_err(self.err())
    }

    pub fn add_gap(&self, vm: &str, disk: &str, seq: u64, ts_ns: u64, reason: &str) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO gaps(vm_uuid, disk, seq, ts_ns, reason) VALUES(?1, ?2, ?3, ?4, ?5)",
                params![vm, disk, seq as i64, ts_ns as i64, reason],
            )
            .map_err(self.err())?;
        Ok(())
    }
}

/// A target's state, as the shipper last saw it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TargetRow {
    pub target: String,
    pub url: String,
    pub state: String,
    pub last_error: Option<String>,
    pub updated_ns: u64,
}

/// One segment received by one target: a `shipments` row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shipment<'a> {
    pub disk: &'a str,
    pub first_seq: u64,
    pub target: &'a str,
    /// The object's key in the target's repository.
    pub key: &'a str,
    pub object_bytes: u64,
    pub shipped_ns: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BaselineRow {
    pub disk: String,
    pub target: String,
    pub s0: u64,
    pub s1: u64,
    pub key: String,
    pub created_ns: u64,
    pub chunks_total: u64,
    pub chunks_uploaded: u64,
}

impl Catalog {
    /// Sealed segments still on this host that `target` has not received.
    pub fn unshipped(&self, vm: &str, target: &str) -> Result<Vec<SegmentRow>> {
        self.segment_query(
            "SELECT disk, first_seq, last_seq, first_ts_ns, last_ts_ns, records, record_base,
                    size_bytes, sealed, path FROM segments s
             WHERE vm_uuid = ?1 AND sealed = 1 AND local = 1 AND NOT EXISTS (
                 SELECT 1 FROM shipments h WHERE h.vm_uuid = s.vm_uuid AND h.disk = s.disk
                 AND h.first_seq = s.first_seq AND h.target = ?2)
             ORDER BY first_seq",
            params![vm, target],
        )
    }

    /// Local segments (sealed or not) not yet trimmed.
    pub fn local_segments(&self, vm: &str) -> Result<Vec<SegmentRow>> {
        self.segment_query(
            "SELECT disk, first_seq, last_seq, first_ts_ns, last_ts_ns, records, record_base,
                    size_bytes, sealed, path FROM segments
             WHERE vm_uuid = ?1 AND local = 1 ORDER BY disk, first_seq",
            params![vm],
        )
    }

    fn segment_query(&self, sql: &str, p: impl rusqlite::Params) -> Result<Vec<SegmentRow>> {
        let mut st = self.conn.prepare_cached(sql).map_err(self.err())?;
        let rows = st
            .query_map(p, |r| {
                Ok(SegmentRow {
                    disk: r.get(0)?,
                    first_seq: r.get::<_, i64>(1)? as u64,
                    last_seq: r.get::<_, i64>(2)? as u64,
                    first_ts_ns: r.get::<_, i64>(3)? as u64,
                    last_ts_ns: r.get::<_, i64>(4)? as u64,
                    records: r.get::<_, i64>(5)? as u64,
                    record_base: r.get::<_, i64>(6)? as u64,
                    size_bytes: r.get::<_, i64>(7)? as u64,
                    sealed: r.get::<_, i64>(8)? != 0,
                    path: r.get(9)?,
                })
            })
            .map_err(self.err())?;
        rows.collect::<std::result::Result<Vec<_>, _>>()
            .map_err(self.err())
    }

    /// Record that `s.target` holds segment `s.first_seq` of `s.disk` (a
    /// second record of the same shipment is ignored).
    pub fn record_shipment(&self, vm: &str, s: &Shipment<'_>) -> Result<()> {
        self.conn
            .execute(
                "INSERT OR IGNORE INTO shipments(vm_uuid, disk, first_seq, target, key, shipped_ns, object_bytes)
                 VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    vm,
                    s.disk,
                    s.first_seq as i64,
                    s.target,
                    s.key,
                    s.shipped_ns as i64,
                    s.object_bytes as i64
                ],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// Segments every one of `targets` has, still present locally.
    pub fn fully_shipped(&self, vm: &str, targets: &[String]) -> Result<Vec<SegmentRow>> {
        let all = self.segment_query(
            "SELECT disk, first_seq, last_seq, first_ts_ns, last_ts_ns, records, record_base,
                    size_bytes, sealed, path FROM segments
             WHERE vm_uuid = ?1 AND sealed = 1 AND local = 1
               AND last_seq <= coalesce((SELECT image_synced_seq FROM disks d
                                         WHERE d.vm_uuid = ?1 AND d.disk = segments.disk),
                                        last_seq)
             ORDER BY disk, first_seq",
            params![vm],
        )?;
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT count(*) FROM shipments WHERE vm_uuid = ?1 AND disk = ?2 AND first_seq = ?3 AND target = ?4",
            )
            .map_err(self.err())?;
        let mut out = Vec::new();
        'seg: for s in all {
            for t in targets {
                let n: i64 = st
                    .query_row(params![vm, s.disk, s.first_seq as i64, t], |r| r.get(0))
                    .map_err(self.err())?;
                if n == 0 {
                    continue 'seg;
                }
            }
            out.push(s);
        }
        Ok(out)
    }

    /// Bytes of segment objects each target received, per target.
    pub fn shipped_bytes(&self, vm: &str) -> Result<Vec<(String, u64)>> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT target, coalesce(sum(object_bytes), 0) FROM shipments
                 WHERE vm_uuid = ?1 GROUP BY target ORDER BY target",
            )
            .map_err(self.err())?;
        let rows = st
            .query_map(params![vm], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))
            .map_err(self.err())?;
        rows.collect::<std::result::Result<Vec<_>, _>>()
            .map_err(self.err())
    }

    pub fn set_trimmed(&self, vm: &str, disk: &str, first_seq: u64) -> Result<()> {
        self.conn
            .execute(
                "UPDATE segments SET local = 0 WHERE vm_uuid = ?1 AND disk = ?2 AND first_seq = ?3",
                params![vm, disk, first_seq as i64],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// How many segments and bytes `target` still lacks; and the first
    /// timestamp among them (for the RPO).
    pub fn backlog(&self, vm: &str, disk: &str, target: &str) -> Result<(u64, u64, Option<u64>)> {
        self.conn
            .query_row(
                "SELECT count(*), coalesce(sum(size_bytes), 0), min(first_ts_ns) FROM segments s
                 WHERE vm_uuid = ?1 AND disk = ?2 AND sealed = 1 AND local = 1 AND NOT EXISTS (
                     SELECT 1 FROM shipments h WHERE h.vm_uuid = s.vm_uuid AND h.disk = s.disk
                     AND h.first_seq = s.first_seq AND h.target = ?3)",
                params![vm, disk, target],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)? as u64,
                        r.get::<_, i64>(1)? as u64,
                        r.get::<_, Option<i64>>(2)?.map(|v| v as u64),
                    ))
                },
            )
            .map_err(self.err())
    }

    /// The BLAKE3 of segment `first_seq`'s repository index, once recorded.
    pub fn segment_index_hash(
        &self,
        vm: &str,
        disk: &str,
        first_seq: u64,
    ) -> Result<Option<String>> {
        self.conn
            .query_row(
                "SELECT index_blake3 FROM segments WHERE vm_uuid = ?1 AND disk = ?2 AND first_seq = ?3",
                params![vm, disk, first_seq as i64],
                |r| r.get::<_, Option<String>>(0),
            )
            .optional()
            .map(Option::flatten)
            .map_err(self.err())
    }

    /// Record the BLAKE3 of segment `first_seq`'s repository index (the
    /// first one recorded stays).
    pub fn set_segment_index_hash(
        &self,
        vm: &str,
        disk: &str,
        first_seq: u64,
        hash: &str,
    ) -> Result<()> {
        self.conn
            .execute(
                "UPDATE segments SET index_blake3 = ?4
                 WHERE vm_uuid = ?1 AND disk = ?2 AND first_seq = ?3 AND index_blake3 IS NULL",
                params![vm, disk, first_seq as i64, hash],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// The segment of `disk` right before `first_seq` (trimmed or not):
    /// its row, whether its local file is still there, and its index hash
    /// if recorded.
    pub fn previous_segment(
        &self,
        vm: &str,
        disk: &str,
        first_seq: u64,
    ) -> Result<Option<(SegmentRow, bool, Option<String>)>> {
        self.conn
            .query_row(
                "SELECT disk, first_seq, last_seq, first_ts_ns, last_ts_ns, records, record_base,
                        size_bytes, sealed, path, local, index_blake3 FROM segments
                 WHERE vm_uuid = ?1 AND disk = ?2 AND first_seq < ?3
                 ORDER BY first_seq DESC LIMIT 1",
                params![vm, disk, first_seq as i64],
                |r| {
                    let row = SegmentRow {
                        disk: r.get(0)?,
                        first_seq: r.get::<_, i64>(1)? as u64,
                        last_seq: r.get::<_, i64>(2)? as u64,
                        first_ts_ns: r.get::<_, i64>(3)? as u64,
                        last_ts_ns: r.get::<_, i64>(4)? as u64,
                        records: r.get::<_, i64>(5)? as u64,
                        record_base: r.get::<_, i64>(6)? as u64,
                        size_bytes: r.get::<_, i64>(7)? as u64,
                        sealed: r.get::<_, i64>(8)? != 0,
                        path: r.get(9)?,
                    };
                    Ok((
                        row,
                        r.get::<_, i64>(10)? != 0,
                        r.get::<_, Option<String>>(11)?,
                    ))
                },
            )
            .optional()
            .map_err(self.err())
    }

    /// Has any target received segment `first_seq` of `disk`?
    pub fn shipped_anywhere(&self, vm: &str, disk: &str, first_seq: u64) -> Result<bool> {
        self.conn
            .prepare_cached(
                "SELECT 1 FROM shipments WHERE vm_uuid = ?1 AND disk = ?2 AND first_seq = ?3",
            )
            .and_then(|mut st| st.exists(params![vm, disk, first_seq as i64]))
            .map_err(self.err())
    }

    /// Record base for a disk's next segment, from every segment the catalog
    /// knows (trimmed ones too): the chain continues after local segments
    /// were shipped and removed.
    pub fn next_record_base(&self, vm: &str, disk: &str) -> Result<u64> {
        self.conn
            .query_row(
                "SELECT coalesce(max(record_base + records), 0) FROM segments WHERE vm_uuid = ?1 AND disk = ?2",
                params![vm, disk],
                |r| r.get::<_, i64>(0),
            )
            .map(|v| v as u64)
            .map_err(self.err())
    }

    /// Sealed local segments that no target has yet: what a lost host
    /// would lose. Count, bytes, oldest first timestamp.
    pub fn unprotected(&self, vm: &str, disk: &str) -> Result<(u64, u64, Option<u64>)> {
        self.conn
            .query_row(
                "SELECT count(*), coalesce(sum(size_bytes), 0), min(first_ts_ns) FROM segments s
                 WHERE vm_uuid = ?1 AND disk = ?2 AND sealed = 1 AND local = 1 AND NOT EXISTS (
                     SELECT 1 FROM shipments h WHERE h.vm_uuid = s.vm_uuid AND h.disk = s.disk
                     AND h.first_seq = s.first_seq)",
                params![vm, disk],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)? as u64,
                        r.get::<_, i64>(1)? as u64,
                        r.get::<_, Option<i64>>(2)?.map(|v| v as u64),
                    ))
                },
            )
            .map_err(self.err())
    }

    /// SQLite's `PRAGMA data_version`: changes whenever another connection
    /// (cdpd sealing a segment) committed to the catalog since this one last
    /// asked; never for this connection's own writes. A cheap read (no
    /// query of any table): the shipper's idle wake-up.
    pub fn data_version(&self) -> Result<u64> {
        self.conn
            .pragma_query_value(None, "data_version", |r| r.get::<_, i64>(0))
            .map(|v| v as u64)
            .map_err(self.err())
    }

    pub fn set_target_state(
        &self,
        vm: &str,
        target: &str,
        url: &str,
        state: &str,
        last_error: Option<&str>,
        now_ns: u64,
    ) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO targets(vm_uuid, target, url, state, last_error, updated_ns)
                 VALUES(?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(vm_uuid, target) DO UPDATE SET url = excluded.url, state = excluded.state,
                    last_error = coalesce(excluded.last_error, targets.last_error),
                    updated_ns = excluded.updated_ns",
                params![vm, target, url, state, last_error, now_ns as i64],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// Every shipment: (disk, first_seq, target, shipped_ns), in the order
    /// they were recorded (the plan's order, docs/DESIGN.md "Plans").
    pub fn shipments(&self, vm: &str) -> Result<Vec<(String, u64, String, u64)>> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT disk, first_seq, target, shipped_ns FROM shipments WHERE vm_uuid = ?1
                 ORDER BY shipped_ns, rowid",
            )
            .map_err(self.err())?;
        let rows = st
            .query_map(params![vm], |r| {
                Ok((
                    r.get(0)?,
                    r.get::<_, i64>(1)? as u64,
                    r.get(2)?,
                    r.get::<_, i64>(3)? as u64,
                ))
            })
            .map_err(self.err())?;
        rows.collect::<std::result::Result<Vec<_>, _>>()
            .map_err(self.err())
    }

    /// How many uploads the VM's shipper has in flight to `target` now
    /// (the agent's `cdp_uploads_in_flight`).
    pub fn set_in_flight(&self, vm: &str, target: &str, n: u64, now_ns: u64) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO uploads(vm_uuid, target, in_flight, updated_ns) VALUES(?1, ?2, ?3, ?4)
                 ON CONFLICT(vm_uuid, target) DO UPDATE SET in_flight = excluded.in_flight,
                    updated_ns = excluded.updated_ns",
                params![vm, target, n as i64, now_ns as i64],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// Per target: the uploads in flight as the shipper last recorded them.
    pub fn in_flight(&self, vm: &str) -> Result<Vec<(String, u64)>> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT target, in_flight FROM uploads WHERE vm_uuid = ?1 ORDER BY target",
            )
            .map_err(self.err())?;
        let rows = st
            .query_map(params![vm], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))
            .map_err(self.err())?;
        rows.collect::<std::result::Result<Vec<_>, _>>()
            .map_err(self.err())
    }

    pub fn targets(&self, vm: &str) -> Result<Vec<TargetRow>> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT target, url, state, last_error, updated_ns FROM targets WHERE vm_uuid = ?1 ORDER BY target",
            )
            .map_err(self.err())?;
        let rows = st
            .query_map(params![vm], |r| {
                Ok(TargetRow {
                    target: r.get(0)?,
                    url: r.get(1)?,
                    state: r.get(2)?,
                    last_error: r.get(3)?,
                    updated_ns: r.get::<_, i64>(4)? as u64,
                })
            })
            .map_err(self.err())?;
        rows.collect::<std::result::Result<Vec<_>, _>>()
            .map_err(self.err())
    }

    /// Record (or replace) a baseline of `b.disk` on `b.target`.
    pub fn add_baseline(&self, vm: &str, b: &BaselineRow) -> Result<()> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO baselines(vm_uuid, disk, target, s0, s1, key, created_ns, chunks_total, chunks_uploaded)
                 VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    vm,
                    b.disk,
                    b.target,
                    b.s0 as i64,
                    b.s1 as i64,
                    b.key,
                    b.created_ns as i64,
                    b.chunks_total as i64,
                    b.chunks_uploaded as i64
                ],
            )
            .map_err(self.err())?;
        Ok(())
    }

    pub fn baselines(&self, vm: &str) -> Result<Vec<BaselineRow>> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT disk, target, s0, s1, key, created_ns, chunks_total, chunks_uploaded
                 FROM baselines WHERE vm_uuid = ?1 ORDER BY disk, s1",
            )
            .map_err(self.err())?;
        let rows = st
            .query_map(params![vm], |r| {
                Ok(BaselineRow {
                    disk: r.get(0)?,
                    target: r.get(1)?,
                    s0: r.get::<_, i64>(2)? as u64,
                    s1: r.get::<_, i64>(3)? as u64,
                    key: r.get(4)?,
                    created_ns: r.get::<_, i64>(5)? as u64,
                    chunks_total: r.get::<_, i64>(6)? as u64,
                    chunks_uploaded: r.get::<_, i64>(7)? as u64,
                })
            })
            .map_err(self.err())?;
        rows.collect::<std::result::Result<Vec<_>, _>>()
            .map_err(self.err())
    }

    /// Gaps recorded after `seq` (by a tool while the VM was stopped, e.g.
    /// an in-place restore): (disk, reason).
    pub fn gaps_after(&self, vm: &str, seq: u64) -> Result<Vec<(String, String)>> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT disk, reason FROM gaps WHERE vm_uuid = ?1 AND seq > ?2 ORDER BY seq",
            )
            .map_err(self.err())?;
        let rows = st
            .query_map(params![vm, seq as i64], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(self.err())?;
        rows.collect::<std::result::Result<Vec<_>, _>>()
            .map_err(self.err())
    }

    /// Newest GAP per disk (a baseline older than it cannot be used).
    /// Is a GAP recorded for `disk` at exactly `seq`?
    pub fn has_gap_at(&self, vm: &str, disk: &str, seq: u64) -> Result<bool> {
        self.conn
            .query_row(
                "SELECT count(*) FROM gaps WHERE vm_uuid = ?1 AND disk = ?2 AND seq = ?3",
                params![vm, disk, seq as i64],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n > 0)
            .map_err(self.err())
    }

    pub fn last_gap_seq(&self, vm: &str, disk: &str) -> Result<Option<u64>> {
        self.conn
            .query_row(
                "SELECT max(seq) FROM gaps WHERE vm_uuid = ?1 AND disk = ?2",
                params![vm, disk],
                |r| r.get::<_, Option<i64>>(0),
            )
            .map(|v| v.map(|x| x as u64))
            .map_err(self.err())
    }

    pub fn disks(&self, vm: &str) -> Result<Vec<(String, String, u64)>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT disk, path, size FROM disks WHERE vm_uuid = ?1 ORDER BY disk")
            .map_err(self.err())?;
        let rows = st
            .query_map(params![vm], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
            })
            .map_err(self.err())?;
        rows.collect::<std::result::Result<Vec<_>, _>>()
            .map_err(self.err())
    }

    pub fn vm_name(&self, vm: &str) -> Result<Option<String>> {
        self.conn
            .query_row("SELECT name FROM vms WHERE uuid = ?1", params![vm], |r| {
                r.get(0)
            })
            .optional()
            .map_err(self.err())
    }

    pub fn last_config(&self, vm: &str, target: &str) -> Result<Option<String>> {
        self.conn
            .query_row(
                "SELECT blake3 FROM configs WHERE vm_uuid = ?1 AND target = ?2 ORDER BY ts_ns DESC LIMIT 1",
                params![vm, target],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.err())
    }

    pub fn add_config(&self, vm: &str, target: &str, ts_ns: u64, hash: &str) -> Result<()> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO configs(vm_uuid, target, ts_ns, blake3) VALUES(?1, ?2, ?3, ?4)",
                params![vm, target, ts_ns as i64, hash],
            )
            .map_err(self.err())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: &str = "0b5c6a3e-1d2f-4a5b-8c9d-0e1f2a3b4c5d";

    /// Root never opens a catalog in a VM directory another user owns
    /// (it drops to that user first: `cdp_core::privsep`).
    #[test]
    fn root_refuses_a_vm_owned_catalog() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (chown)"
        );
        let dir = tempfile::tempdir().unwrap();
        let vm = crate::layout::StateDir::new(dir.path()).vm(U);
        std::fs::create_dir_all(vm.path()).unwrap();
        std::os::unix::fs::chown(vm.path(), Some(65534), Some(65534)).unwrap();
        let e = Catalog::open(dir.path(), U).err().unwrap();
        assert!(matches!(e, CatalogError::AsRoot { uid: 65534, .. }), "{e}");
        assert!(!vm.catalog().exists());
        // A name that is not a UUID never becomes a path.
        let e = Catalog::open(dir.path(), "../../etc").err().unwrap();
        assert!(matches!(e, CatalogError::Name { .. }), "{e}");
    }

    /// A VM's first per-VM catalog takes that VM's rows (and only them)
    /// from the host catalog of older versions.
    #[test]
    fn the_legacy_host_catalog_is_imported_once_per_vm() {
        let dir = tempfile::tempdir().unwrap();
        let other = "1b5c6a3e-1d2f-4a5b-8c9d-0e1f2a3b4c5d";
        {
            let old = Connection::open(dir.path().join("catalog.sqlite")).unwrap();
            old.execute_batch(SCHEMA).unwrap();
            for (u, n) in [(U, "web"), (other, "db")] {
                old.execute(
                    "INSERT INTO vms(uuid, name, last_seq) VALUES(?1, ?2, 7)",
                    params![u, n],
                )
                .unwrap();
                old.execute(
                    "INSERT INTO sessions(vm_uuid, boot_id, pid, started_ns, start_seq, previous_end)
                     VALUES(?1, 'b', 1, 2, 3, 'first')",
                    params![u],
                )
                .unwrap();
                old.execute("INSERT INTO marks VALUES(?1, 'm', 5, 6)", params![u])
                    .unwrap();
            }
        }
        let c = Catalog::open(dir.path(), U).unwrap();
        let vms = c.vms().unwrap();
        assert_eq!(vms.len(), 1);
        assert_eq!((vms[0].name.as_str(), vms[0].last_seq), ("web", 7));
        assert!(c.last_session(U).unwrap().is_some());
        assert!(c.mark_exists(U, "m").unwrap());
        assert!(c.last_session(other).unwrap().is_none());
        c.upsert_vm(U, "web2").unwrap();
        drop(c);
        // Not again: the VM's own catalog is what counts from now on.
        let c = Catalog::open(dir.path(), U).unwrap();
        assert_eq!(c.vms().unwrap()[0].name, "web2");
    }

    #[test]
    fn roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(dir.path(), U).unwrap();
        c.upsert_vm("u1", "web").unwrap();
        c.upsert_vm("u1", "web2").unwrap();
        assert_eq!(
            c.resolve_vm("web2").unwrap(),
            Some(("u1".into(), "web2".into()))
        );
        assert_eq!(c.resolve_vm("u1").unwrap().unwrap().0, "u1");
        assert!(c.last_session("u1").unwrap().is_none());
        let id = c.start_session("u1", "boot", 1, 2, 3, "first").unwrap();
        assert_eq!(c.last_session("u1").unwrap().unwrap().end_kind, None);
        c.end_session(id, 5, "clean").unwrap();
        assert_eq!(
            c.last_session("u1").unwrap().unwrap().end_kind.as_deref(),
            Some("clean")
        );
        let s = SealedSegment {
            path: "/x".into(),
            first_seq: 1,
            last_seq: 9,
            first_ts_ns: 1,
            last_ts_ns: 2,
            records: 3,
            record_base: 0,
            size_bytes: 100,
        };
        c.put_segment("u1", "vda", &s, false).unwrap();
        c.put_segment("u1", "vda", &s, true).unwrap();
        let segs = c.segments("u1").unwrap();
        assert_eq!(segs.len(), 1);
        assert!(segs[0].sealed);
        c.set_last_seq("u1", 9, 2).unwrap();
        c.set_last_seq("u1", 4, 1).unwrap();
        assert_eq!(c.last_seq("u1").unwrap(), (9, 2));
        // Reopening keeps everything.
        drop(c);
        let c = Catalog::open(dir.path(), U).unwrap();
        assert_eq!(c.segments("u1").unwrap().len(), 1);
        assert_eq!(c.vms().unwrap()[0].policy, None);
        c.set_vm_policy("u1", "gold").unwrap();
        assert_eq!(c.vms().unwrap()[0].policy.as_deref(), Some("gold"));
    }

    /// A catalog whose marks table predates `quiesced` gains the column;
    /// its marks read as crash-consistent, new ones keep the flag.
    #[test]
    fn marks_without_the_quiesced_column_read_as_not_quiesced() {
        let dir = tempfile::tempdir().unwrap();
        {
            let vm = crate::layout::StateDir::new(dir.path()).vm(U);
            std::fs::create_dir_all(vm.path()).unwrap();
            let conn = Connection::open(vm.catalog()).unwrap();
            conn.execute_batch(&format!(
                "CREATE TABLE marks(vm_uuid TEXT NOT NULL, label TEXT NOT NULL,
                    seq INTEGER NOT NULL, ts_ns INTEGER NOT NULL, PRIMARY KEY(vm_uuid, label));
                 INSERT INTO marks VALUES('{U}', 'old', 5, 6);
                 PRAGMA user_version = 2;"
            ))
            .unwrap();
        }
        let c = Catalog::open(dir.path(), U).unwrap();
        assert!(c.quiesced_marks(U).unwrap().is_empty());
        c.add_mark_as(U, "frozen", 7, 8, true).unwrap();
        c.add_mark(U, "plain", 9, 10).unwrap();
        assert_eq!(
            c.quiesced_marks(U).unwrap().into_iter().collect::<Vec<_>>(),
            vec!["frozen".to_string()]
        );
        assert_eq!(c.marks(U).unwrap().len(), 3);
        drop(c);
        // Opening again migrates nothing twice.
        let c = Catalog::open(dir.path(), U).unwrap();
        assert_eq!(c.quiesced_marks(U).unwrap().len(), 1);
    }

    #[test]
    fn version_1_catalog_gains_the_policy_column() {
        let dir = tempfile::tempdir().unwrap();
        {
            let vm = crate::layout::StateDir::new(dir.path()).vm(U);
            std::fs::create_dir_all(vm.path()).unwrap();
            let conn = Connection::open(vm.catalog()).unwrap();
            conn.execute_batch(
                "CREATE TABLE vms(uuid TEXT PRIMARY KEY, name TEXT NOT NULL,
                    last_seq INTEGER NOT NULL DEFAULT 0, last_ts_ns INTEGER NOT NULL DEFAULT 0);
                 INSERT INTO vms(uuid, name, last_seq) VALUES('u1', 'web', 7);
                 PRAGMA user_version = 1;",
            )
            .unwrap();
        }
        let c = Catalog::open(dir.path(), U).unwrap();
        let vms = c.vms().unwrap();
        assert_eq!(vms.len(), 1);
        assert_eq!((vms[0].name.as_str(), vms[0].last_seq), ("web", 7));
        assert_eq!(vms[0].policy, None);
        c.set_vm_policy("u1", "default").unwrap();
        drop(c);
        // Opening again (already version 2) changes nothing.
        let c = Catalog::open(dir.path(), U).unwrap();
        assert_eq!(c.vms().unwrap()[0].policy.as_deref(), Some("default"));
        let v: i64 = c
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
    }

    fn sealed(first_seq: u64, last_ts_ns: u64) -> SealedSegment {
        SealedSegment {
            path: format!("/j/{first_seq}").into(),
            first_seq,
            last_seq: first_seq + 9,
            first_ts_ns: last_ts_ns - 1,
            last_ts_ns,
            records: 10,
            record_base: first_seq,
            size_bytes: 1000,
        }
    }

    /// Shipments decide what is unshipped, fully shipped, in the backlog and
    /// unprotected; a repeated shipment record is ignored; trimmed segments
    /// leave every local list.
    #[test]
    fn shipments_drive_unshipped_and_backlog() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(dir.path(), U).unwrap();
        c.upsert_vm("u1", "web").unwrap();
        c.put_segment("u1", "vda", &sealed(1, 100), true).unwrap();
        c.put_segment("u1", "vda", &sealed(11, 200), true).unwrap();
        c.put_segment("u1", "vda", &sealed(21, 300), false).unwrap();
        let firsts = |v: Vec<SegmentRow>| v.iter().map(|s| s.first_seq).collect::<Vec<_>>();
        assert_eq!(firsts(c.unshipped("u1", "a").unwrap()), [1, 11]);
        assert_eq!(c.backlog("u1", "vda", "a").unwrap(), (2, 2000, Some(99)));
        assert_eq!(c.unprotected("u1", "vda").unwrap(), (2, 2000, Some(99)));
        let ship = |target, first_seq| Shipment {
            disk: "vda",
            first_seq,
            target,
            key: "k",
            object_bytes: 500,
            shipped_ns: 7,
        };
        c.record_shipment("u1", &ship("a", 1)).unwrap();
        c.record_shipment("u1", &ship("a", 1)).unwrap();
        c.record_shipment("u1", &ship("b", 11)).unwrap();
        assert_eq!(firsts(c.unshipped("u1", "a").unwrap()), [11]);
        assert_eq!(firsts(c.unshipped("u1", "b").unwrap()), [1]);
        assert_eq!(c.backlog("u1", "vda", "a").unwrap(), (1, 1000, Some(199)));
        assert_eq!(c.unprotected("u1", "vda").unwrap(), (0, 0, None));
        let ab = ["a".to_string(), "b".to_string()];
        assert!(c.fully_shipped("u1", &ab).unwrap().is_empty());
        c.record_shipment("u1", &ship("b", 1)).unwrap();
        // Not before the image is durable past it (seqs 1..=10).
        c.upsert_disk("u1", "vda", Path::new("/i"), 1 << 20)
            .unwrap();
        assert_eq!(c.image_synced("u1", "vda").unwrap(), None);
        c.set_image_synced("u1", "vda", 9).unwrap();
        assert_eq!(c.image_synced("u1", "vda").unwrap(), Some(9));
        assert!(c.fully_shipped("u1", &ab).unwrap().is_empty());
        c.set_image_synced("u1", "vda", 10).unwrap();
        assert_eq!(firsts(c.fully_shipped("u1", &ab).unwrap()), [1]);
        c.upsert_disk("u1", "vda", Path::new("/i"), 1 << 20)
            .unwrap();
        assert_eq!(
            firsts(c.fully_shipped("u1", &ab).unwrap()),
            [1],
            "kept by an upsert"
        );
        assert_eq!(
            c.shipped_bytes("u1").unwrap(),
            [("a".to_string(), 500), ("b".to_string(), 1000)]
        );
        c.set_trimmed("u1", "vda", 1).unwrap();
        assert!(c.fully_shipped("u1", &ab).unwrap().is_empty());
        assert_eq!(firsts(c.local_segments("u1").unwrap()), [11, 21]);
        // The chain continues after trimmed segments.
        assert_eq!(c.next_record_base("u1", "vda").unwrap(), 31);
    }

    #[test]
    fn baselines_are_replaced_by_key_columns() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(dir.path(), U).unwrap();
        c.upsert_vm("u1", "web").unwrap();
        let mut b = BaselineRow {
            disk: "vda".into(),
            target: "a".into(),
            s0: 0,
            s1: 10,
            key: "baselines/x".into(),
            created_ns: 5,
            chunks_total: 4,
            chunks_uploaded: 1,
        };
        c.add_baseline("u1", &b).unwrap();
        b.chunks_uploaded = 4;
        c.add_baseline("u1", &b).unwrap();
        assert_eq!(c.baselines("u1").unwrap(), [b.clone()]);
        let later = BaselineRow {
            s1: 20,
            ..b.clone()
        };
        c.add_baseline("u1", &later).unwrap();
        assert_eq!(c.baselines("u1").unwrap(), [b, later]);
        assert!(c.baselines("u2").unwrap().is_empty());
    }
}
