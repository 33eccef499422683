//! `/etc/cdp/cdp.toml`: paths, targets and policies (docs/DESIGN.md, "Configuration").
//!
//! Unknown keys are errors everywhere. A missing file at the default path
//! means built-in defaults; a missing file named with `--config` is an error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

pub const DEFAULT_CONFIG: &str = "/etc/cdp/cdp.toml";
/// The environment variable naming the config file when `--config` is not given.
pub const CONFIG_ENV: &str = "CDP_CONFIG";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/cdp";
pub const DEFAULT_RUN_DIR: &str = "/run/cdp";
pub const DEFAULT_SEGMENT_SIZE: u64 = 64 * 1024 * 1024;
/// The largest `segment_size`: a repository refuses segments of more than 4 GiB
/// (docs/REPOSITORY_FORMAT.md, "Limits").
pub const MAX_SEGMENT_SIZE: u64 = 4 << 30;
/// The default `segment_age`: a quarter of a second, so that a busy disk's
/// record waits at most that long before its segment is sealed and shipped
/// (the RPO's floor). Measured at 50 MB/s (BENCHMARKS.md, "Shipper:
/// throughput and RPO"): the typical RPO halves against 500 ms (p50 234 vs
/// 432 ms on a quiet machine); the p99 is set by seal-to-shipped syncs and
/// was not better (1184 vs 1046 ms quiet; 878 vs 1873 ms in a loaded run).
/// A disk written without a pause makes four segments (objects) a second;
/// a policy that would rather pay fewer object PUTs sets a longer age.
pub const DEFAULT_SEGMENT_AGE: Duration = Duration::from_millis(250);
/// Bounds of `segment_age`: at least 1 ms (the sealer would spin below it),
/// at most 1 h (the age bounds how long a write stays out of the repository).
pub const MIN_SEGMENT_AGE: Duration = Duration::from_millis(1);
pub const MAX_SEGMENT_AGE: Duration = Duration::from_secs(3600);
/// The default `checkpoint_interval`: the longest time between two syncs of
/// a written disk's image (docs/DESIGN.md, "Write path", step 5): what a
/// power loss makes recovery redo from sealed segments, and how long a
/// shipped segment waits for its trim. The kernel writes back dirty pages
/// after 30 s anyway.
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(30);
/// Bounds of `checkpoint_interval`.
pub const MIN_CHECKPOINT_INTERVAL: Duration = Duration::from_millis(10);
pub const MAX_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(3600);
/// The default `journal_cache`: how much of a disk's newest journal cdpd
/// leaves in the page cache for the shipper to read (docs/DESIGN.md, "Write
/// path", step 6). Four default segments: at the 250 ms `segment_age` a
/// shipper that keeps up reads a segment within a second of its seal, from
/// memory, at up to 1 GB/s of writes.
pub const DEFAULT_JOURNAL_CACHE: u64 = 256 << 20;
/// The least `journal_max` that makes sense (a few records).
pub const MIN_JOURNAL_MAX: u64 = 1 << 20;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("reading config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Bad TOML, an unknown key, or a value of the wrong form (the message
    /// names the line and the key).
    #[error("config {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Paths {
    pub state_dir: Option<PathBuf>,
    pub run_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub url: String,
    /// A copy that deliberately lags, e.g. "1h".
    #[serde(default, deserialize_with = "opt_duration")]
    pub delay: Option<Duration>,
    /// File holding S3 credentials (never on the command line): the
    /// shipping identity, which needs create-only rights (docs/CREDENTIALS.md).
    pub credentials_file: Option<PathBuf>,
    /// File holding the credentials retention and prune use (same format),
    /// readable by root (or the agent's user) only; the shipper never reads
    /// it. Absent: prune uses `credentials_file` (shipping and pruning then
    /// share a credential, with a warning).
    #[serde(default, alias = "prune_credentials")]
    pub prune_credentials_file: Option<PathBuf>,
    /// The most the shipper uploads to this target, in bytes per second
    /// ("20MiB" or a number of bytes), shared by that target's concurrent
    /// uploads of segments and baselines (docs/DESIGN.md, "Shipping").
    /// Absent: unlimited.
    #[serde(default, deserialize_with = "opt_size")]
    pub rate: Option<u64>,
    /// What the target may hold in all, in bytes ("2TiB"), for targets that
    /// cannot report their free space (S3): free space is this minus what
    /// the repository holds. It orders a policy's secondaries
    /// (docs/DESIGN.md, "Plans"). Absent on S3: such a target comes last.
    #[serde(default, deserialize_with = "opt_size")]
    pub capacity: Option<u64>,
    /// The key file that unwraps an encrypted repository's key (made by
    /// `cdpctl repo init --encrypt --key-file`); readable by its owner (root
    /// or the reader) only, or root-owned and group-readable (0640).
    /// docs/REPOSITORY_FORMAT.md, "Encryption".
    pub key_file: Option<PathBuf>,
    /// The file holding the passphrase that unwraps an encrypted repository's
    /// key (argon2id); same rules as `key_file`, of which it is the
    /// alternative.
    pub passphrase_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Target names; the first is the primary.
    #[serde(default)]
    pub targets: Vec<String>,
    /// Seal a journal segment at this size, e.g. "64MiB".
    #[serde(default, deserialize_with = "opt_size")]
    pub segment_size: Option<u64>,
    /// Seal a journal segment at this age, e.g. "1s" (bounds the RPO).
    #[serde(default, deserialize_with = "opt_duration")]
    pub segment_age: Option<Duration>,
    /// Make a written disk's image durable at least this often, e.g. "30s"
    /// (the default): a FLUSH makes the journal durable, a checkpoint the
    /// image (docs/DESIGN.md, "Write path").
    #[serde(default, deserialize_with = "opt_duration")]
    pub checkpoint_interval: Option<Duration>,
    /// How much of a disk's newest journal stays in the page cache, e.g.
    /// "256MiB" (the default); the pages of older sealed segments are
    /// dropped once they are durable (docs/DESIGN.md, "Write path").
    #[serde(default, deserialize_with = "opt_size")]
    pub journal_cache: Option<u64>,
    /// The most a disk's local journal may hold, e.g. "20GiB", or
    /// "unlimited" (the default). Past it cdpd runs degraded
    /// (docs/RELIABILITY.md, "A full journal").
    #[serde(default, deserialize_with = "opt_journal_max")]
    pub journal_max: Option<u64>,
    /// Free space kept on the journal's filesystem, e.g. "2GiB", "5%" or
    /// "min(5%, 1GiB)" (the default): below it cdpd runs degraded.
    #[serde(default, deserialize_with = "opt_min_free")]
    pub journal_min_free: Option<MinFree>,
    /// What the repository keeps (absent: everything, forever).
    pub retention: Option<RetentionConfig>,
    /// Secondaries (every target after the first) receive a segment only
    /// once the primary has it (plus their own delay), in order of free
    /// space (docs/DESIGN.md, "Plans"). Default false: all at once.
    #[serde(default)]
    pub cascade: bool,
    /// With `cascade`: how long a segment waits for a primary that does not
    /// take it (down, refusing) before the secondaries receive it anyway,
    /// e.g. "15m" (the default, [`DEFAULT_CASCADE_WAIT`]).
    #[serde(default, deserialize_with = "opt_duration")]
    pub cascade_wait: Option<Duration>,
}

/// How long a segment waits for the primary under `cascade` by default.
pub const DEFAULT_CASCADE_WAIT: Duration = Duration::from_secs(15 * 60);

/// `[policy.P.retention]`: every point within `any_point`, then one point
/// per `every` for as long as `keep` (measured from now), tier by tier.
#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Every write restorable for this long, e.g. "24h".
    #[serde(deserialize_with = "duration")]
    pub any_point: Duration,
    /// Thinned tiers, e.g. `[{ every = "1h", keep = "7d" }, { every = "1d", keep = "30d" }]`.
    #[serde(default)]
    pub thin: Vec<ThinConfig>,
}

#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ThinConfig {
    /// One point per this interval ("1h": the state at each full hour).
    #[serde(deserialize_with = "duration")]
    pub every: Duration,
    /// Kept for this long, counted from now (must exceed `any_point`).
    #[serde(deserialize_with = "duration")]
    pub keep: Duration,
}

/// Retention resolved from a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    pub any_point: Duration,
    /// (every, keep), in the order given.
    pub thin: Vec<(Duration, Duration)>,
}

/// `[agent]`: the host-wide cdp-agent.
#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Prometheus metrics on this address, e.g. "127.0.0.1:9650"; "" turns them off.
    pub metrics_listen: Option<String>,
    /// How often to look for journals nobody ships, e.g. "10s".
    #[serde(default, deserialize_with = "opt_duration")]
    pub scan_interval: Option<Duration>,
    /// How often to apply retention, e.g. "1h".
    #[serde(default, deserialize_with = "opt_duration")]
    pub retention_interval: Option<Duration>,
}

/// `[libvirt]`: what the libvirt hook needs.
#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LibvirtConfig {
    /// The user QEMU runs as (libvirt's qemu.conf `user`), owner of the run
    /// and state directories. Default "libvirt-qemu".
    pub qemu_user: Option<String>,
    /// Its group. Default: the user's primary group.
    pub qemu_group: Option<String>,
}

pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9650";
pub const DEFAULT_SCAN_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_RETENTION_INTERVAL: Duration = Duration::from_secs(3600);
pub const DEFAULT_QEMU_USER: &str = "libvirt-qemu";

#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub paths: Paths,
    #[serde(default)]
    pub target: BTreeMap<String, Target>,
    #[serde(default)]
    pub policy: BTreeMap<String, Policy>,
    #[serde(default)]
    pub agent: AgentConfig,
    #[serde(default)]
    pub libvirt: LibvirtConfig,
    /// Where this config came from (not a key).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// Journal settings resolved from a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalSettings {
    pub segment_size: u64,
    pub segment_age: Duration,
    /// The longest time between checkpoints of a written disk.
    pub checkpoint_interval: Duration,
    /// How many bytes of a disk's newest sealed segments may stay in the
    /// page cache.
    pub journal_cache: u64,
    /// The most a disk's journal may hold ([`UNLIMITED`]: no bound).
    pub journal_max: u64,
    /// Free space kept on the journal's filesystem.
    pub journal_min_free: MinFree,
}

/// `journal_max = "unlimited"`.
pub const UNLIMITED: u64 = u64::MAX;

/// The default `journal_min_free`: 5% of the journal's filesystem, at most
/// 1 GiB (a large, nearly full host disk does not make every write degrade).
pub const DEFAULT_MIN_FREE: MinFree = MinFree {
    percent: Some(5),
    bytes: Some(1 << 30),
};

/// Free space kept on a filesystem: a size, a share of its size, or the
/// smaller of both (`"min(5%, 1GiB)"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinFree {
    /// Percent of the filesystem's size (0 to 50).
    pub percent: Option<u8>,
    pub bytes: Option<u64>,
}

impl MinFree {
    /// The floor in bytes on a filesystem of `fs_size` bytes.
    pub fn bytes(self, fs_size: u64) -> u64 {
        let share = self.percent.map(|p| fs_size / 100 * u64::from(p));
        match (share, self.bytes) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b).unwrap_or(0),
        }
    }

    /// "5%", a size ("1GiB"), or "min(5%, 1GiB)".
    pub fn parse(s: &str) -> Result<MinFree, String> {
        let t = s.trim();
        let parts: Vec<&str> = match t.strip_prefix("min(").and_then(|r| r.strip_suffix(')')) {
            Some(inner) => inner.split(',').collect(),
            None => vec![t],
        };
        let mut m = MinFree {
            percent: None,
            bytes: None,
        };
        for part in &parts {
            let part = part.trim();
            match part.strip_suffix('%') {
                Some(p) => match p.trim().parse::<u8>() {
                    Ok(p) if p <= 50 && m.percent.is_none() => m.percent = Some(p),
                    _ => {
                        return Err(format!(
                            "{s:?}: a share of the filesystem must be 0% to 50%"
                        ))
                    }
                },
                None if m.bytes.is_none() => {
                    m.bytes = Some(parse_size(part).map_err(|e| e.to_string())?)
                }
                None => return Err(format!("{s:?}: give at most one size and one share")),
            }
        }
        let is_min = t.starts_with("min(");
        if is_min && (m.percent.is_none() || m.bytes.is_none()) {
            return Err(format!("{s:?}: write min(SHARE%, SIZE)"));
        }
        Ok(m)
    }
}

impl Default for JournalSettings {
    fn default() -> Self {
        JournalSettings {
            segment_size: DEFAULT_SEGMENT_SIZE,
            segment_age: DEFAULT_SEGMENT_AGE,
            checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
            journal_cache: DEFAULT_JOURNAL_CACHE,
            journal_max: UNLIMITED,
            journal_min_free: DEFAULT_MIN_FREE,
        }
    }
}

impl Config {
    /// Load `explicit` (`--config`), else the file named by `$CDP_CONFIG`
    /// (which must exist), else the default path if it exists, else
    /// built-in defaults. `CDP_CONFIG` lets a test harness (or a second
    /// installation) keep every program away from `/etc/cdp/cdp.toml`.
    pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with(explicit, std::env::var_os(CONFIG_ENV))
    }

    /// [`Config::load`] with the value of `CDP_CONFIG` given.
    fn load_with(
        explicit: Option<&Path>,
        from_env: Option<std::ffi::OsString>,
    ) -> Result<Config, ConfigError> {
        let from_env = from_env.filter(|v| !v.is_empty());
        match explicit {
            Some(p) => Self::load_file(p),
            None if from_env.is_some() => Self::load_file(Path::new(&from_env.unwrap_or_default())),
            None if Path::new(DEFAULT_CONFIG).exists() => {
                Self::load_file(Path::new(DEFAULT_CONFIG))
            }
            None => Ok(Config::default()),
        }
    }

    pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut c = Self::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        c.source = Some(path.to_path_buf());
        c.validate()?;
        Ok(c)
    }

    /// Parse TOML text: syntax, unknown keys and every duration and size are
    /// checked here; cross-references are checked by [`Config::validate`].
    pub fn parse(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    fn invalid(&self, message: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.source.clone().unwrap_or_else(|| "<built-in>".into()),
            message,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, t) in &self.target {
            if !(t.url.starts_with("file://") || t.url.starts_with("s3://")) {
                return Err(self.invalid(format!(
                    "target.{name}.url = {:?}: use file:///path or s3://bucket/prefix?endpoint=…",
                    t.url
                )));
            }
            if t.rate == Some(0) {
                return Err(self.invalid(format!(
                    "target.{name}.rate = 0: give bytes per second such as \"20MiB\", or remove the key for no limit"
                )));
            }
        }
        for (name, p) in &self.policy {
            for t in &p.targets {
                if !self.target.contains_key(t) {
                    return Err(self.invalid(format!(
                        "policy.{name}.targets names {t:?}, which has no [target.{t}] section"
                    )));
                }
            }
            self.journal_settings(name)?;
            self.retention(name)?;
        }
        if let Some(a) = &self.agent.metrics_listen {
            if !a.is_empty() && a.parse::<std::net::SocketAddr>().is_err() {
                return Err(self.invalid(format!(
                    "agent.metrics_listen = {a:?}: use an address and port such as \"127.0.0.1:9650\", or \"\" for none"
                )));
            }
        }
        Ok(())
    }

    /// Retention of a policy; `None` keeps everything.
    pub fn retention(&self, policy: &str) -> Result<Option<Retention>, ConfigError> {
        let Some(r) = self.policy.get(policy).and_then(|p| p.retention.as_ref()) else {
            return Ok(None);
        };
        let key = |k: &str| format!("policy.{policy}.retention.{k}");
        let any_point = r.any_point;
        let mut thin = Vec::new();
        let mut reach = any_point;
        for (i, t) in r.thin.iter().enumerate() {
            let (every, keep) = (t.every, t.keep);
            if every.is_zero() {
                return Err(self.invalid(format!(
                    "{}: must be more than 0",
                    key(&format!("thin[{i}].every"))
                )));
            }
            if keep <= reach {
                return Err(self.invalid(format!(
                    "{}: {} keeps nothing: it must be longer than the tier before it ({})",
                    key(&format!("thin[{i}].keep")),
                    humantime::format_duration(keep),
                    humantime::format_duration(reach)
                )));
            }
            reach = keep;
            thin.push((every, keep));
        }
        Ok(Some(Retention { any_point, thin }))
    }

    pub fn metrics_listen(&self) -> Option<std::net::SocketAddr> {
        match self.agent.metrics_listen.as_deref() {
            Some("") => None,
            Some(a) => a.parse().ok(),
            None => DEFAULT_METRICS_LISTEN.parse().ok(),
        }
    }

    pub fn scan_interval(&self) -> Duration {
        self.agent.scan_interval.unwrap_or(DEFAULT_SCAN_INTERVAL)
    }

    pub fn retention_interval(&self) -> Duration {
        self.agent
            .retention_interval
            .unwrap_or(DEFAULT_RETENTION_INTERVAL)
    }

    pub fn state_dir(&self, cli: Option<&Path>) -> PathBuf {
        cli.map(Path::to_path_buf)
            .or_else(|| self.paths.state_dir.clone())
            .unwrap_or_else(|| DEFAULT_STATE_DIR.into())
    }

    pub fn run_dir(&self, cli: Option<&Path>) -> PathBuf {
        cli.map(Path::to_path_buf)
            .or_else(|| self.paths.run_dir.clone())
            .unwrap_or_else(|| DEFAULT_RUN_DIR.into())
    }

    /// Journal settings of a policy. The policy "default" may be absent (then
    /// built-in defaults apply); any other must exist.
    pub fn journal_settings(&self, policy: &str) -> Result<JournalSettings, ConfigError> {
        let mut s = JournalSettings::default();
        let Some(p) = self.policy.get(policy) else {
            if policy == "default" {
                return Ok(s);
            }
            return Err(self.invalid(format!(
                "unknown policy {policy:?}: add a [policy.{policy}] section or use one of {:?}",
                self.policy.keys().collect::<Vec<_>>()
            )));
        };
        s.segment_size = p.segment_size.unwrap_or(s.segment_size);
        s.segment_age = p.segment_age.unwrap_or(s.segment_age);
        s.checkpoint_interval = p.checkpoint_interval.unwrap_or(s.checkpoint_interval);
        s.journal_cache = p.journal_cache.unwrap_or(s.journal_cache);
        s.journal_max = p.journal_max.unwrap_or(s.journal_max);
        s.journal_min_free = p.journal_min_free.unwrap_or(s.journal_min_free);
        if s.journal_max < MIN_JOURNAL_MAX {
            return Err(self.invalid(format!(
                "policy.{policy}.journal_max = {} bytes: use at least 1MiB, or \"unlimited\"",
                s.journal_max
            )));
        }
        if s.segment_size == 0 || s.segment_size > MAX_SEGMENT_SIZE {
            return Err(self.invalid(format!(
                "policy.{policy}.segment_size = {} bytes: use more than 0 and at most 4GiB \
                 (a repository refuses larger segments)",
                s.segment_size
            )));
        }
        if !(MIN_SEGMENT_AGE..=MAX_SEGMENT_AGE).contains(&s.segment_age) {
            return Err(self.invalid(format!(
                "policy.{policy}.segment_age = {:?}: use at least 1ms and at most 1h \
                 (the age bounds how long a write stays unsealed and unshipped)",
                s.segment_age
            )));
        }
        if !(MIN_CHECKPOINT_INTERVAL..=MAX_CHECKPOINT_INTERVAL).contains(&s.checkpoint_interval) {
            return Err(self.invalid(format!(
                "policy.{policy}.checkpoint_interval = {:?}: use at least 10ms and at most 1h \
                 (it bounds what recovery redoes after a power loss)",
                s.checkpoint_interval
            )));
        }
        Ok(s)
    }
}

/// A size or duration that does not parse.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ValueError {
    #[error("{0:?} is not a size (examples: 4096, 64MiB, 1GiB)")]
    NotASize(String),
    #[error("unknown size unit {unit:?} in {value:?} (use KiB, MiB, GiB)")]
    SizeUnit { value: String, unit: String },
    #[error("{0:?} is too large")]
    TooLarge(String),
    #[error("{value:?} is not a duration ({source}; examples: 500ms, 1s, 1h)")]
    NotADuration {
        value: String,
        #[source]
        source: humantime::DurationError,
    },
}

/// Parse "64MiB", "1G", "4096".
pub fn parse_size(s: &str) -> Result<u64, ValueError> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| ValueError::NotASize(s.into()))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        "KB" | "kB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(ValueError::SizeUnit {
                value: s.into(),
                unit: other.into(),
            })
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| ValueError::TooLarge(s.into()))
}

/// Parse "1s", "200ms", "1h".
pub fn parse_duration(s: &str) -> Result<Duration, ValueError> {
    humantime::parse_duration(s.trim()).map_err(|source| ValueError::NotADuration {
        value: s.into(),
        source,
    })
}

/// `deserialize_with` for a duration key: the TOML error then names the key and line.
fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

fn opt_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

fn opt_journal_max<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let s = String::deserialize(d)?;
    if s.trim() == "unlimited" {
        return Ok(Some(UNLIMITED));
    }
    parse_size(&s).map(Some).map_err(serde::de::Error::custom)
}

fn opt_min_free<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<MinFree>, D::Error> {
    let s = String::deserialize(d)?;
    MinFree::parse(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn opt_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let s = String::deserialize(d)?;
    parse_size(&s).map(Some).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_rate_is_a_size_per_second() {
        let c = Config::parse("[target.t]\nurl = \"file:///r\"\nrate = \"20MiB\"\n").unwrap();
        assert_eq!(c.target["t"].rate, Some(20 << 20));
        let c = Config::parse("[target.t]\nurl = \"file:///r\"\nrate = \"1000\"\n").unwrap();
        assert_eq!(c.target["t"].rate, Some(1000));
        assert!(Config::parse("[target.t]\nurl = \"file:///r\"\nrate = \"fast\"\n").is_err());
        assert!(Config::parse("[target.t]\nurl = \"file:///r\"\nrat = \"1MiB\"\n").is_err());
        let zero = Config::parse("[target.t]\nurl = \"file:///r\"\nrate = \"0\"\n").unwrap();
        let e = zero.validate().unwrap_err().to_string();
        assert!(e.contains("target.t.rate = 0"), "{e}");
    }

    #[test]
    fn design_example_parses() {
        let c = Config::parse(
            r#"
[paths]
state_dir = "/var/lib/cdp"
run_dir = "/run/cdp"
[target.primary]
url = "file:///srv/cdp"
[target.offsite]
url = "s3://bucket/prefix?endpoint=http://127.0.0.1:9000&region=us-east-1"
delay = "1h"
[policy.default]
targets = ["primary", "offsite"]
"#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.policy["default"].targets, vec!["primary", "offsite"]);
        assert_eq!(
            c.journal_settings("default").unwrap(),
            JournalSettings::default()
        );
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = Config::parse("[paths]\nstate_dri = \"/x\"\n").unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        assert!(Config::parse("[nope]\n").is_err());
        assert!(Config::parse("[policy.a]\nsegmnet_size = \"1M\"\n").is_err());
    }

    #[test]
    fn bad_values_are_errors() {
        let c = Config::parse("[policy.default]\ntargets = [\"x\"]\n").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("[target.x]"));
        let c = Config::parse("[target.t]\nurl = \"ftp://x\"\n").unwrap();
        assert!(c.validate().is_err());
        assert!(Config::default().journal_settings("gold").is_err());
    }

    #[test]
    fn retention_and_agent() {
        let c = Config::parse(
            r#"
[agent]
metrics_listen = "127.0.0.1:9999"
scan_interval = "2s"
[libvirt]
qemu_user = "qemu"
[policy.default.retention]
any_point = "24h"
thin = [{ every = "1h", keep = "7d" }, { every = "1d", keep = "30d" }]
"#,
        )
        .unwrap();
        c.validate().unwrap();
        let r = c.retention("default").unwrap().unwrap();
        assert_eq!(r.any_point, Duration::from_secs(86400));
        assert_eq!(
            r.thin[1],
            (Duration::from_secs(86400), Duration::from_secs(30 * 86400))
        );
        assert_eq!(c.scan_interval(), Duration::from_secs(2));
        assert_eq!(c.metrics_listen().unwrap().port(), 9999);
        assert!(Config::default().retention("default").unwrap().is_none());
        let c = Config::parse("[policy.default.retention]\nany_point = \"2d\"\nthin = [{ every = \"1h\", keep = \"1d\" }]\n").unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("keeps nothing"));
        let c = Config::parse("[agent]\nmetrics_listen = \"localhost\"\n").unwrap();
        assert!(c.validate().is_err());
        assert!(Config::parse("[agent]\nmetrics = \"x\"\n").is_err());
        assert!(
            Config::parse("[policy.default.retention]\nany_point = \"1h\"\nhourly = \"1d\"\n")
                .is_err()
        );
    }

    /// A segment age of 0 (a spinning sealer) or over 1 h is refused.
    #[test]
    fn segment_age_is_bounded() {
        for (age, ok) in [("0s", false), ("1ms", true), ("1h", true), ("2h", false)] {
            let c = Config::parse(&format!("[policy.default]\nsegment_age = \"{age}\"\n")).unwrap();
            let r = c.validate();
            assert_eq!(r.is_ok(), ok, "{age}: {r:?}");
            if !ok {
                assert!(r.unwrap_err().to_string().contains("at most 1h"));
            }
        }
    }

    /// `journal_cache` is a size (0 drops every sealed segment's pages), 256 MiB
    /// when not given.
    #[test]
    fn journal_cache_is_a_size_with_a_default() {
        let c = Config::parse("[policy.default]\njournal_cache = \"0\"\n").unwrap();
        assert_eq!(c.journal_settings("default").unwrap().journal_cache, 0);
        let c = Config::parse("[policy.default]\njournal_cache = \"1GiB\"\n").unwrap();
        assert_eq!(
            c.journal_settings("default").unwrap().journal_cache,
            1 << 30
        );
        let c = Config::parse("").unwrap();
        assert_eq!(
            c.journal_settings("default").unwrap().journal_cache,
            DEFAULT_JOURNAL_CACHE
        );
        let e = Config::parse("[policy.default]\njournal_cache = \"lots\"\n").unwrap_err();
        assert!(e.to_string().contains("not a size"), "{e}");
    }

    /// A checkpoint interval under 10 ms or over 1 h is refused; the policy's
    /// is used.
    #[test]
    fn checkpoint_interval_is_bounded() {
        for (every, ok) in [("1ms", false), ("10ms", true), ("1h", true), ("2h", false)] {
            let c = Config::parse(&format!(
                "[policy.default]\ncheckpoint_interval = \"{every}\"\n"
            ))
            .unwrap();
            let r = c.journal_settings("default");
            assert_eq!(r.is_ok(), ok, "{every}: {r:?}");
            match r {
                Ok(s) => assert_eq!(s.checkpoint_interval, parse_duration(every).unwrap()),
                Err(e) => assert!(e.to_string().contains("checkpoint_interval"), "{e}"),
            }
        }
    }

    /// A segment larger than a repository accepts (or empty) is refused at validation.
    #[test]
    fn segment_size_is_bounded_by_what_a_repository_accepts() {
        for (size, ok) in [
            ("4GiB", true),
            ("5GiB", false),
            ("0", false),
            ("1MiB", true),
        ] {
            let c =
                Config::parse(&format!("[policy.default]\nsegment_size = \"{size}\"\n")).unwrap();
            let r = c.validate();
            assert_eq!(r.is_ok(), ok, "{size}: {r:?}");
            if !ok {
                assert!(r.unwrap_err().to_string().contains("at most 4GiB"));
            }
        }
    }

    /// A bad duration or size fails at parse, naming the key and the value.
    #[test]
    fn bad_durations_and_sizes_fail_at_parse_naming_the_key() {
        for (text, key, value) in [
            ("[policy.default]\nsegment_size = \"12 parsecs\"\n", "segment_size", "12 parsecs"),
            ("[policy.default]\nsegment_age = \"soon\"\n", "segment_age", "soon"),
            ("[target.t]\nurl = \"file:///r\"\ndelay = \"1 fortnight\"\n", "delay", "1 fortnight"),
            ("[agent]\nscan_interval = \"often\"\n", "scan_interval", "often"),
            ("[agent]\nretention_interval = \"-1h\"\n", "retention_interval", "-1h"),
            ("[policy.p.retention]\nany_point = \"a day\"\n", "any_point", "a day"),
            (
                "[policy.p.retention]\nany_point = \"1h\"\nthin = [{ every = \"x\", keep = \"1d\" }]\n",
                "every",
                "x",
            ),
        ] {
            let e = Config::parse(text).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(value), "{text}: {e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cdp.toml");
        std::fs::write(&p, "[agent]\nscan_interval = \"often\"\n").unwrap();
        let e = Config::load_file(&p).unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
        assert!(e.to_string().contains("cdp.toml"), "{e}");
    }

    #[test]
    fn typed_values_and_defaults() {
        let c = Config::parse(
            "[target.t]\nurl = \"file:///r\"\ndelay = \"90s\"\n[policy.default]\nsegment_size = \"1MiB\"\nsegment_age = \"250ms\"\n[agent]\nretention_interval = \"2h\"\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.target["t"].delay, Some(Duration::from_secs(90)));
        assert_eq!(c.target["t"].rate, None);
        assert_eq!(
            c.journal_settings("default").unwrap(),
            JournalSettings {
                segment_size: 1 << 20,
                segment_age: Duration::from_millis(250),
                ..JournalSettings::default()
            }
        );
        assert_eq!(c.retention_interval(), Duration::from_secs(7200));
        assert_eq!(c.scan_interval(), DEFAULT_SCAN_INTERVAL);
        let d = Config::default();
        assert_eq!(d.retention_interval(), DEFAULT_RETENTION_INTERVAL);
        assert_eq!(d.metrics_listen(), DEFAULT_METRICS_LISTEN.parse().ok());
        let off = Config::parse("[agent]\nmetrics_listen = \"\"\n").unwrap();
        assert_eq!(off.metrics_listen(), None);
    }

    /// Degraded mode's bounds (docs/RELIABILITY.md, "A full journal").
    #[test]
    fn journal_bounds() {
        let d = JournalSettings::default();
        assert_eq!(
            (d.journal_max, d.journal_min_free),
            (UNLIMITED, DEFAULT_MIN_FREE)
        );
        assert_eq!(DEFAULT_MIN_FREE.bytes(1000 << 20), 50 << 20);
        assert_eq!(DEFAULT_MIN_FREE.bytes(250 << 30), 1 << 30, "at most 1GiB");
        assert_eq!(MinFree::parse("min(5%, 1GiB)"), Ok(DEFAULT_MIN_FREE));
        let pct = |p| MinFree {
            percent: Some(p),
            bytes: None,
        };
        let size = |b| MinFree {
            percent: None,
            bytes: Some(b),
        };
        assert_eq!(pct(10).bytes(1000), 100);
        let c = Config::parse(
            "[policy.default]\njournal_max = \"8MiB\"\njournal_min_free = \"0\"\n\
             [policy.b]\njournal_max = \"unlimited\"\njournal_min_free = \"10%\"\n",
        )
        .unwrap();
        let s = c.journal_settings("default").unwrap();
        assert_eq!((s.journal_max, s.journal_min_free), (8 << 20, size(0)));
        let s = c.journal_settings("b").unwrap();
        assert_eq!((s.journal_max, s.journal_min_free), (UNLIMITED, pct(10)));
        for bad in [
            "journal_min_free = \"60%\"",
            "journal_min_free = \"x\"",
            "journal_min_free = \"min(5%)\"",
            "journal_min_free = \"min(1GiB, 2GiB)\"",
            "journal_max = \"lots\"",
        ] {
            assert!(
                Config::parse(&format!("[policy.a]\n{bad}\n")).is_err(),
                "{bad}"
            );
        }
        let small = Config::parse("[policy.a]\njournal_max = \"4KiB\"\n").unwrap();
        assert!(small
            .journal_settings("a")
            .unwrap_err()
            .to_string()
            .contains("journal_max"));
    }

    #[test]
    fn zero_thinning_interval_is_refused() {
        let c = Config::parse(
            "[policy.default.retention]\nany_point = \"1h\"\nthin = [{ every = \"0s\", keep = \"1d\" }]\n",
        )
        .unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("thin[0].every") && e.contains("more than 0"),
            "{e}"
        );
    }

    #[test]
    fn load_prefers_the_flag_then_cdp_config() {
        let dir = tempfile::tempdir().unwrap();
        let flag = dir.path().join("flag.toml");
        let env = dir.path().join("env.toml");
        std::fs::write(&flag, "[agent]\nscan_interval = \"1s\"\n").unwrap();
        std::fs::write(&env, "[agent]\nscan_interval = \"2s\"\n").unwrap();
        let c = Config::load_with(Some(&flag), Some(env.clone().into())).unwrap();
        assert_eq!(c.scan_interval(), Duration::from_secs(1));
        assert_eq!(c.source.as_deref(), Some(flag.as_path()));
        let c = Config::load_with(None, Some(env.clone().into())).unwrap();
        assert_eq!(c.scan_interval(), Duration::from_secs(2));
        // A file named by CDP_CONFIG must exist.
        let gone = dir.path().join("gone.toml");
        assert!(matches!(
            Config::load_with(None, Some(gone.into())),
            Err(ConfigError::Read { .. })
        ));
        // An empty file (the test harness's /dev/null) is the built-in defaults.
        let c = Config::load_with(None, Some("/dev/null".into())).unwrap();
        assert_eq!(c.scan_interval(), DEFAULT_SCAN_INTERVAL);
        assert!(c.target.is_empty() && c.policy.is_empty());
        // A bad value in it fails at load, naming the file.
        std::fs::write(&env, "[policy.default]\nsegment_age = \"now\"\n").unwrap();
        let e = Config::load_with(None, Some(env.into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("env.toml") && e.contains("segment_age"), "{e}");
    }

    #[test]
    fn value_errors() {
        assert!(matches!(parse_size("x"), Err(ValueError::NotASize(_))));
        assert!(
            matches!(parse_size("3 parsecs"), Err(ValueError::SizeUnit { unit, .. }) if unit == "parsecs")
        );
        assert!(matches!(
            parse_size("99999999999999T"),
            Err(ValueError::TooLarge(_))
        ));
        assert!(matches!(
            parse_duration("soon"),
            Err(ValueError::NotADuration { .. })
        ));
        assert_eq!(
            parse_duration(" 200ms ").unwrap(),
            Duration::from_millis(200)
        );
        assert_eq!(parse_size("2kB").unwrap(), 2000);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1 GiB").unwrap(), 1 << 30);
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999999T").is_err());
    }
}

#[cfg(test)]
#[path = "config_sample_tests.rs"]
mod sample_tests;
