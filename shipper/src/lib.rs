//! cdp-shipper: moves a VM's sealed journal segments, its baselines and its
//! definition to the policy's targets, and trims local segments once every
//! target has them.
//!
//! Policy lives here, never in a storage backend: which segments go where
//! (delays), how many uploads run at once (scaled to the backlog), retry and
//! backoff per target, when a baseline is due, what may be trimmed.

pub mod baseline;
pub mod error;
pub mod lock;
pub mod plan;
pub mod pool;
pub mod service;
pub mod ship;
pub mod throttle;
pub mod wake;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cdp_core::catalog::{Catalog, SegmentRow, Shipment};
use cdp_core::config::Config;
use cdp_core::time::now_ns;
use cdp_repo::format as rf;
use cdp_repo::store::{RetryPolicy, Store, StoreError};
use futures::StreamExt;

pub use error::{Kind, Result, ShipError};

/// One target of the policy, opened.
pub struct Target {
    pub name: String,
    pub url: String,
    pub delay: Duration,
    pub store: Store,
    /// Its `rate`, shared by all its uploads.
    pub throttle: throttle::Throttle,
    /// Its `capacity` (free space = capacity - what the repository holds).
    pub capacity: Option<u64>,
    /// What the repository held when last listed, and when (`capacity` only).
    used: Option<(Instant, u64)>,
    /// Segment uploads in flight to it now.
    in_flight: AtomicU64,
    /// The text of its last failure (the catalog's message for it).
    failure_text: Option<String>,
    /// (The primary under `cascade`:) segments the secondaries received
    /// without it since it last worked, and the wait; said in its message.
    bypassed: Option<(u64, Duration)>,
    /// Reachable and of our format once ([`Target::check`]); until then the
    /// target is retried with backoff and nothing else is sent to it.
    checked: bool,
    failures: u32,
    next_try: Option<Instant>,
    /// The vm.json this target is known to hold (no GET per pass).
    vm_json: Option<Vec<u8>>,
    /// Why the last pass failed on this target, until taken.
    last_error: Option<ShipError>,
    /// Per disk: when a failed baseline may be tried again, and the wait
    /// after that try fails too (a baseline reads the whole disk: never
    /// again every pass).
    baseline_backoff: std::collections::HashMap<String, (Instant, Duration)>,
    /// The state and message last written to the catalog for it, and when
    /// ([`state_write_due`]).
    written: Option<(String, Option<String>, Instant)>,
}

/// How often an unchanged target state is written again: its `updated_ns`
/// tells readers (the agent's metrics and page pick each target's freshest
/// observation across VMs) that the shipper still sees it so; rewriting it
/// on every pass cost an idle shipper a catalog commit every poll.
pub const TARGET_STATE_REFRESH: Duration = Duration::from_secs(10);

/// Must the target state `state` (with `msg`) be written at `now`, given
/// what was last written (`prev`: state, message, when)? When it differs,
/// when nothing was written yet by this shipper, and as a refresh every
/// [`TARGET_STATE_REFRESH`]; never else.
pub fn state_write_due(
    prev: Option<(&str, Option<&str>, Instant)>,
    state: &str,
    msg: Option<&str>,
    now: Instant,
) -> bool {
    match prev {
        None => true,
        Some((s, m, at)) => {
            s != state || m != msg || now.saturating_duration_since(at) >= TARGET_STATE_REFRESH
        }
    }
}

/// How often a target with a `capacity` is listed for what it holds.
pub const USAGE_REFRESH: Duration = Duration::from_secs(300);

/// Threads that remove trimmed segments at once ([`remove_files`]).
const TRIM_THREADS: usize = 4;

/// Remove `paths`, [`TRIM_THREADS`] at a time; each one's result, in order.
fn remove_files(paths: &[&std::path::Path]) -> Vec<std::io::Result<()>> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut done: Vec<(usize, std::io::Result<()>)> = std::thread::scope(|sc| {
        let workers: Vec<_> = (0..TRIM_THREADS.min(paths.len()))
            .map(|_| {
                sc.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(p) = paths.get(i) else { break mine };
                        mine.push((i, std::fs::remove_file(p)));
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("an unlink does not panic"))
            .collect()
    });
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
}

/// The first wait after a failed baseline, doubled after each failure.
const BASELINE_BACKOFF_MIN: Duration = Duration::from_secs(1);
/// The longest wait between two tries of a failing baseline.
const BASELINE_BACKOFF_MAX: Duration = Duration::from_secs(300);

/// The wait after a baseline failed, given the previous wait.
fn next_baseline_backoff(prev: Option<Duration>) -> Duration {
    prev.map_or(BASELINE_BACKOFF_MIN, |d| (d * 2).min(BASELINE_BACKOFF_MAX))
}

/// A target that failed in a pass, with why.
#[derive(Debug)]
pub struct TargetFailure {
    pub target: String,
    pub error: ShipError,
}

impl std::fmt::Display for TargetFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.target, self.error)
    }
}

/// What the catalog (and so `cdpctl status`, the agent's metrics) says of a
/// failing target: the error, and what to do when it is a permission
/// error on a file:// repository (the shipper runs as the VM's QEMU user,
/// who must be able to write the repository directory).
pub fn failure_text(url: &str, e: &ShipError) -> String {
    let msg = e.to_string();
    if url.starts_with("file://") && is_permission_error(e, &msg) {
        let uid = nix::unistd::geteuid();
        let user = nix::unistd::User::from_uid(uid).ok().flatten().map_or_else(
            || format!("uid {uid}"),
            |u| format!("{} (uid {uid})", u.name),
        );
        return format!(
            "{msg}; the repository directory is not writable by {user}: chown/chmod it, \
             or see `cdpctl protect`"
        );
    }
    msg
}

/// Is `e` (whose text is `msg`) a permission error: EACCES or EPERM
/// somewhere in its causes, or said so by a backend that kept only the text?
fn is_permission_error(e: &ShipError, msg: &str) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::PermissionDenied {
                return true;
            }
        }
        cause = c.source();
    }
    msg.contains("Permission denied") || msg.contains("Operation not permitted")
}

/// How long to leave a failing target alone after its `failures`-th failure
/// in a row: doubling from 400ms while retrying may help, at once the most
/// (10s) when it may not (credentials, format: an operator has to act).
pub fn backoff(failures: u32, transient: bool) -> Duration {
    const MAX: Duration = Duration::from_secs(10);
    if !transient {
        return MAX;
    }
    Duration::from_millis(200)
        .saturating_mul(1 << failures.min(6))
        .min(MAX)
}

pub struct Options {
    pub vm_uuid: String,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub policy: String,
    pub max_parallel: usize,
    pub vm_config: Option<PathBuf>,
    pub poll: Duration,
    /// Take a baseline by itself when a disk has none (or after a GAP).
    pub auto_baseline: bool,
    /// Images opened by root from libvirt's definition, by disk (cdp-agent's
    /// child): a baseline reads these, not the catalog's paths.
    pub images: Arc<ImageFds>,
}

/// Disk → (image opened by root, its path).
pub type ImageFds = std::collections::BTreeMap<String, (std::fs::File, PathBuf)>;

pub struct Shipper {
    pub opts: Options,
    /// The policy's targets; the first is the primary.
    pub targets: Vec<Target>,
    /// `cascade = true`: how long a segment waits for the primary before
    /// the secondaries receive it anyway (docs/DESIGN.md, "Plans").
    pub cascade: Option<Duration>,
    pub catalog: Arc<Mutex<Catalog>>,
    pub retry: RetryPolicy,
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PassStats {
    pub shipped: u64,
    pub shipped_bytes: u64,
    pub trimmed: u64,
    /// Breaks in a disk's record-base chain found this pass, each recorded
    /// as a catalog GAP (a new baseline follows).
    pub holes: u64,
    pub failed_targets: u64,
    pub baselines: u64,
    /// Segments still waiting (a failing target, or a delay not yet over,
    /// or a primary that does not have them yet under `cascade`).
    pub waiting: u64,
    /// Segments a secondary received without the primary (`cascade`: the
    /// primary lacked them for `cascade_wait`).
    pub without_primary: u64,
}

/// The delay of the target `name` (zero for a target without one): how
/// long a segment waits after its last record before it may go there.
pub fn target_delay(config: &Config, name: &str) -> Result<Duration> {
    match config.target.get(name) {
        Some(t) => Ok(t.delay.unwrap_or_default()),
        None => Err(ShipError::UnknownTarget {
            target: name.to_string(),
        }),
    }
}

/// May the sealed segment `row` go to a target of delay `delay` at `now_ns`:
/// is its newest record at least `delay` old?
/// ([`plan::due`] without a cascade.)
pub fn is_due(row: &SegmentRow, delay: Duration, now_ns: u64) -> bool {
    plan::due(row.last_ts_ns, delay, now_ns, None).ships()
}

/// Open every target of a policy without touching it: the configuration
/// errors (unknown policy or target, a bad URL, unreadable credentials) come
/// out here; whether a target is reachable is [`Target::check`]'s question.
pub fn policy_targets(config: &Config, policy: &str) -> Result<Vec<Target>> {
    let Some(p) = config.policy.get(policy) else {
        return Err(ShipError::UnknownPolicy {
            policy: policy.to_string(),
            config: config.source.clone(),
        });
    };
    if p.targets.is_empty() {
        return Err(ShipError::NoTargets {
            policy: policy.to_string(),
        });
    }
    let mut out = Vec::new();
    for name in &p.targets {
        let delay = target_delay(config, name)?;
        let t = &config.target[name];
        let store = Store::for_target(t).map_err(ShipError::store(name))?;
        out.push(Target {
            name: name.clone(),
            url: t.url.clone(),
            delay,
            store,
            throttle: throttle::Throttle::new(t.rate),
            capacity: t.capacity,
            used: None,
            in_flight: AtomicU64::new(0),
            failure_text: None,
            bypassed: None,
            checked: false,
            failures: 0,
            next_try: None,
            vm_json: None,
            baseline_backoff: Default::default(),
            last_error: None,
            written: None,
        });
    }
    Ok(out)
}

/// Open every target of a policy, check that it is reachable and holds a
/// repository of our format (creating the marker in an empty one). Any
/// target failing fails the whole (`cdpctl baseline`: the operator asked
/// for every target); the shipper opens with [`policy_targets`] instead and
/// lets each target fail by itself.
pub async fn open_targets(config: &Config, policy: &str) -> Result<Vec<Target>> {
    let mut out = policy_targets(config, policy)?;
    for t in &mut out {
        t.check().await?;
    }
    Ok(out)
}

impl Target {
    /// Is the target reachable, and does it hold a repository of our format
    /// (the marker is created in an empty one)? Once this succeeded, it is
    /// not asked again.
    pub async fn check(&mut self) -> Result<()> {
        if self.checked {
            return Ok(());
        }
        self.store
            .check()
            .await
            .map_err(ShipError::store(&self.name))?;
        ensure_format(&self.store, &self.name).await?;
        self.checked = true;
        Ok(())
    }

    /// Its free space for the plan ([`plan::free_space`]): what its
    /// filesystem reports, and with a `capacity`, that minus what the
    /// repository holds (listed at most every [`USAGE_REFRESH`], and only
    /// while the target is up).
    pub async fn free_space(&mut self) -> Option<u64> {
        let stale = self
            .used
            .is_none_or(|(at, _)| at.elapsed() >= USAGE_REFRESH);
        if self.capacity.is_some() && stale && self.checked && self.next_try.is_none() {
            if let Ok(list) = self.store.list(&format!("{}/", rf::ROOT)).await {
                self.used = Some((Instant::now(), list.iter().map(|o| o.size).sum()));
            }
        }
        plan::free_space(
            self.store.free_space(),
            self.capacity,
            self.used.map(|(_, u)| u),
        )
    }

    /// `msg`, plus what the secondaries received without this primary.
    fn with_bypassed(&self, msg: String) -> String {
        match self.bypassed {
            Some((n, wait)) => format!(
                "{msg}; cascade: the secondaries received {n} segment(s) without the primary \
                 (each waited cascade_wait = {wait:?} for it)"
            ),
            None => msg,
        }
    }

    /// Has [`Target::check`] succeeded (the target was reachable once)?
    pub fn is_checked(&self) -> bool {
        self.checked
    }

    /// Note a failure: the target waits out its backoff before the next try
    /// (passes skip it until then). Returns the backoff.
    fn failed(&mut self, e: ShipError) -> Duration {
        self.failures += 1;
        let backoff = backoff(self.failures, e.is_transient());
        self.next_try = Some(Instant::now() + backoff);
        if self.failures == 1 || self.failures.is_multiple_of(20) {
            eprintln!(
                "cdp-shipper: target {}: {e} (failure {}, retrying in {backoff:?})",
                self.name, self.failures
            );
        }
        self.failure_text = Some(self.with_bypassed(failure_text(&self.url, &e)));
        self.last_error = Some(e);
        backoff
    }
}

/// Create `cdp/v1/FORMAT` in an empty repository; refuse one of another
/// format or version.
/// `target` names it in errors.
pub async fn ensure_format(store: &Store, target: &str) -> Result<()> {
    match store.get(rf::FORMAT_KEY).await {
        Ok(b) => rf::check_format_marker(&b).map_err(|source| ShipError::Format {
            target: target.to_string(),
            source,
        }),
        Err(StoreError::NotFound { .. }) => store
            .put(rf::FORMAT_KEY, bytes::Bytes::from(rf::format_marker()))
            .await
            .map_err(ShipError::store(target)),
        Err(e) => Err(ShipError::store(target)(e)),
    }
}

impl Shipper {
    pub async fn new(opts: Options, config: &Config) -> Result<Shipper> {
        cdp_core::names::check_uuid(&opts.vm_uuid)?;
        let catalog = Catalog::open(&opts.state_dir, &opts.vm_uuid)?;
        // A target unreachable now does not hold back the others: it stays
        // in its backoff, retried by the passes, and gets its backlog (what
        // the catalog says it lacks) once it answers (docs/RELIABILITY.md,
        // "A target is down").
        let targets = policy_targets(config, &opts.policy)?;
        let cascade = config
            .policy
            .get(&opts.policy)
            .filter(|p| p.cascade)
            .map(|p| {
                p.cascade_wait
                    .unwrap_or(cdp_core::config::DEFAULT_CASCADE_WAIT)
            });
        let mut s = Shipper {
            opts,
            targets,
            cascade,
            catalog: Arc::new(Mutex::new(catalog)),
            // Short: a pass gives up on a target quickly and the per-target
            // backoff of the loop takes over, so the others keep moving.
            retry: RetryPolicy {
                max_attempts: 3,
                deadline: Duration::from_secs(3),
                ..RetryPolicy::default()
            },
        };
        // A shipper killed mid-upload left its count behind.
        for t in &s.targets {
            s.cat()
                .set_in_flight(&s.opts.vm_uuid, &t.name, 0, now_ns())?;
        }
        s.check_targets().await?;
        Ok(s)
    }

    /// Check the targets not checked yet whose backoff is over, all at once;
    /// each one failing goes (back) into its backoff, marked "failing" in
    /// the catalog.
    async fn check_targets(&mut self) -> Result<()> {
        let now = Instant::now();
        let results = futures::future::join_all(
            self.targets
                .iter_mut()
                .enumerate()
                .filter(|(_, t)| !t.checked && t.next_try.is_none_or(|n| now >= n))
                .map(|(i, t)| async move { (i, t.check().await) }),
        )
        .await;
        for (i, r) in results {
            if let Err(e) = r {
                self.target_failed(i, e)?;
            }
        }
        Ok(())
    }

    fn cat(&self) -> std::sync::MutexGuard<'_, Catalog> {
        self.catalog.lock().unwrap()
    }

    /// One pass: ship what is due to every target, trim, baseline, config.
    pub async fn pass(&mut self) -> Result<PassStats> {
        let mut stats = PassStats::default();
        self.publish_vm_json().await?;
        self.check_targets().await?;
        self.ship_due(&mut stats).await?;
        stats.holes = self.record_holes()?;
        stats.trimmed = self.trim()?;
        if self.opts.auto_baseline {
            stats.baselines = self.baselines_due().await?;
        }
        stats.failed_targets += self.publish_config().await?;
        Ok(stats)
    }

    /// Ship to each target that is up what is due to it (docs/DESIGN.md,
    /// "Plans"). Without `cascade` every target at once, so a slow or dead
    /// one never holds back the others. With it the primary first, then the
    /// secondaries one after the other, the most free space first, each
    /// only what the primary holds (or what waited `cascade_wait` for it).
    async fn ship_due(&mut self, stats: &mut PassStats) -> Result<()> {
        let vm = self.opts.vm_uuid.clone();
        let now = Instant::now();
        let up: Vec<usize> = (0..self.targets.len())
            .filter(|&i| {
                let t = &self.targets[i];
                t.checked && t.next_try.is_none_or(|n| now >= n)
            })
            .collect();
        stats.failed_targets += (self.targets.len() - up.len()) as u64;
        let first = FirstBatches::new(up.len());
        let Some(wait) = self.cascade else {
            let ctx = self.pass_ctx(&vm, Some(&first));
            let results = futures::future::join_all(
                up.iter()
                    .map(|&i| ship_target(&self.targets[i], &ctx, None)),
            )
            .await;
            for (&i, r) in up.iter().zip(results) {
                self.shipped_to(i, r, stats)?;
            }
            return Ok(());
        };
        for i in self.plan_order().await {
            if !up.contains(&i) {
                continue;
            }
            let cascade = if i == 0 {
                None
            } else {
                let primary = &self.targets[0].name;
                let primary_lacks = self
                    .cat()
                    .unshipped(&vm, primary)?
                    .into_iter()
                    .map(|r| (r.disk, r.first_seq))
                    .collect();
                Some(CascadeFrom {
                    primary_lacks,
                    wait,
                })
            };
            let ctx = self.pass_ctx(&vm, None);
            let r = ship_target(&self.targets[i], &ctx, cascade.as_ref()).await;
            self.shipped_to(i, r, stats)?;
        }
        if stats.without_primary > 0 {
            self.note_without_primary(stats.without_primary, wait)?;
        }
        Ok(())
    }

    /// What [`ship_target`] needs of this shipper for a pass.
    fn pass_ctx<'a>(&'a self, vm: &'a str, first: Option<&'a FirstBatches>) -> PassCtx<'a> {
        PassCtx {
            catalog: &self.catalog,
            vm,
            max_parallel: self.opts.max_parallel,
            retry: &self.retry,
            targets: self.targets.len(),
            first,
            poll: self.opts.poll,
        }
    }

    /// Target `i` was shipped to: its state ("up", or "failing" with why)
    /// into the catalog, its figures into `stats`.
    fn shipped_to(
        &mut self,
        i: usize,
        (r, st): (Result<()>, PassStats),
        stats: &mut PassStats,
    ) -> Result<()> {
        stats.shipped += st.shipped;
        stats.shipped_bytes += st.shipped_bytes;
        stats.waiting += st.waiting;
        stats.without_primary += st.without_primary;
        let t = &mut self.targets[i];
        let (state, msg) = match r {
            Ok(()) => {
                t.failures = 0;
                t.next_try = None;
                t.last_error = None;
                t.failure_text = None;
                if i == 0 {
                    t.bypassed = None;
                }
                ("up", None)
            }
            Err(e) => {
                stats.failed_targets += 1;
                t.failed(e);
                ("failing", t.failure_text.clone())
            }
        };
        self.record_state(i, state, msg.as_deref())
    }

    /// Write target `i`'s state into the catalog when it changed, or as the
    /// refresh of [`TARGET_STATE_REFRESH`] ([`state_write_due`]): an idle
    /// pass commits nothing.
    fn record_state(&mut self, i: usize, state: &str, msg: Option<&str>) -> Result<()> {
        let now = Instant::now();
        let t = &self.targets[i];
        let prev = t
            .written
            .as_ref()
            .map(|(s, m, at)| (s.as_str(), m.as_deref(), *at));
        if !state_write_due(prev, state, msg, now) {
            return Ok(());
        }
        self.cat()
            .set_target_state(&self.opts.vm_uuid, &t.name, &t.url, state, msg, now_ns())?;
        self.targets[i].written = Some((state.to_string(), msg.map(str::to_string), now));
        Ok(())
    }

    /// The soonest time-driven work of an idle shipper: a target's backoff
    /// or a baseline's ending (only those still ahead). The service wakes
    /// for it, for a catalog change (a sealed segment), and at least every
    /// [`service::IDLE_PASS`].
    pub fn next_wake(&self) -> Option<Instant> {
        let now = Instant::now();
        let baselines = self
            .targets
            .iter()
            .filter(|_| self.opts.auto_baseline)
            .flat_map(|t| t.baseline_backoff.values().map(|(at, _)| *at));
        self.targets
            .iter()
            .filter_map(|t| t.next_try)
            .chain(baselines)
            .filter(|&at| at > now)
            .min()
    }

    /// The catalog's data version ([`Catalog::data_version`]): it changes
    /// when another process (cdpd sealing a segment) committed to it.
    /// `None` when it cannot be read (the caller then runs a pass).
    pub fn catalog_version(&self) -> Option<u64> {
        self.cat().data_version().ok()
    }

    /// Secondaries received `n` segments the primary lacked: said in the
    /// log and on the primary's row of the catalog (`cdpctl status`, the
    /// agent's page), with why the primary lacks them.
    fn note_without_primary(&mut self, n: u64, wait: Duration) -> Result<()> {
        let p = &mut self.targets[0];
        let total = p.bypassed.map_or(0, |(m, _)| m) + n;
        p.bypassed = Some((total, wait));
        let why = p
            .failure_text
            .as_deref()
            .map_or("it has not taken them", |w| {
                w.split("; cascade: ").next().unwrap_or(w)
            });
        let msg = p.with_bypassed(why.to_string());
        p.failure_text = p.failure_text.as_ref().map(|_| msg.clone());
        eprintln!("cdp-shipper: target {}: {msg}", p.name);
        let state = if p.failure_text.is_some() {
            "failing"
        } else {
            "up"
        };
        self.record_state(0, state, Some(&msg))
    }

    /// The order targets are served in ([`plan::order`]): the primary, then
    /// the secondaries by free space (a target in its backoff is not asked).
    async fn plan_order(&mut self) -> Vec<usize> {
        let mut free = Vec::with_capacity(self.targets.len());
        for t in &mut self.targets {
            free.push(t.free_space().await);
        }
        plan::order(&free)
    }

    /// Check each disk's chain of segments in the catalog (docs/DESIGN.md,
    /// "Shipping"): a sealed segment's `record_base + records` must be the
    /// next segment's `record_base`. A break means records that will never
    /// reach a repository (a segment lost with its row): it is recorded once
    /// as a GAP at the first seq after it, so the next baseline is taken,
    /// and said in the log; restore refuses points in the hole by itself.
    fn record_holes(&self) -> Result<u64> {
        let vm = &self.opts.vm_uuid;
        let cat = self.cat();
        let segs = cat.segments(vm)?;
        let mut found = 0;
        for w in segs.windows(2) {
            let (a, b) = (&w[0], &w[1]);
            let expected = a.record_base + a.records;
            if a.disk != b.disk || !a.sealed || b.record_base == expected {
                continue;
            }
            if cat.has_gap_at(vm, &b.disk, b.first_seq)? {
                continue;
            }
            let reason = format!(
                "journal records missing: the segment after seq {} starts at record {} of the \
                 disk, {} expected (a segment was lost before it was shipped); a new baseline \
                 is taken",
                a.last_seq, b.record_base, expected
            );
            eprintln!("cdp-shipper: {vm}/{}: {reason}", b.disk);
            cat.add_gap(vm, &b.disk, b.first_seq, b.first_ts_ns, &reason)?;
            found += 1;
        }
        Ok(found)
    }

    /// Remove local segments that every target has. The files are removed
    /// by a few threads at once, outside the catalog's lock (an unlink
    /// frees the file's page cache: ~50 ms for a full 64 MiB segment, one
    /// after the other the longest part of draining a backlog's end); each
    /// is marked trimmed once removed, in order, up to the first failure.
    fn trim(&self) -> Result<u64> {
        let names: Vec<String> = self.targets.iter().map(|t| t.name.clone()).collect();
        let done = self.cat().fully_shipped(&self.opts.vm_uuid, &names)?;
        let paths: Vec<&std::path::Path> =
            done.iter().map(|s| std::path::Path::new(&s.path)).collect();
        let removed = remove_files(&paths);
        let cat = self.cat();
        for (s, r) in done.iter().zip(removed) {
            match r {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(ShipError::io("trimming", &s.path)(e)),
            }
            cat.set_trimmed(&self.opts.vm_uuid, &s.disk, s.first_seq)?;
        }
        Ok(done.len() as u64)
    }

    /// Take a baseline of each disk that has none newer than its last GAP,
    /// on every target, in the plan's order ([`plan::order`]).
    async fn baselines_due(&mut self) -> Result<u64> {
        let vm = self.opts.vm_uuid.clone();
        let disks = self.cat().disks(&vm)?;
        let order = self.plan_order().await;
        let mut n = 0;
        for (disk, path, _) in disks {
            let gap = self.cat().last_gap_seq(&vm, &disk)?;
            for &i in &order {
                if self.targets[i].next_try.is_some() {
                    continue;
                }
                let t = &self.targets[i];
                let have =
                    self.cat().baselines(&vm)?.into_iter().any(|b| {
                        b.disk == disk && b.target == t.name && gap.is_none_or(|g| b.s0 >= g)
                    });
                if have {
                    continue;
                }
                if t.baseline_backoff
                    .get(&disk)
                    .is_some_and(|(at, _)| Instant::now() < *at)
                {
                    continue;
                }
                let job = baseline::BaselineJob {
                    store: &t.store,
                    target: &t.name,
                    throttle: &t.throttle,
                    retry: &self.retry,
                    catalog: &self.catalog,
                    run_dir: &self.opts.run_dir,
                    vm: &vm,
                    disk: &disk,
                    image: self
                        .opts
                        .images
                        .get(&disk)
                        .map_or(std::path::Path::new(&path), |(_, p)| p.as_path()),
                    opened: self.opts.images.get(&disk).map(|(f, _)| f),
                };
                let r = baseline::take(&job).await;
                let t = &mut self.targets[i];
                match r {
                    Ok(_) => {
                        n += 1;
                        t.baseline_backoff.remove(&disk);
                    }
                    Err(e) => {
                        let wait =
                            next_baseline_backoff(t.baseline_backoff.get(&disk).map(|b| b.1));
                        t.baseline_backoff
                            .insert(disk.clone(), (Instant::now() + wait, wait));
                        eprintln!(
                            "cdp-shipper: baseline of {disk} to {}: {e} (tried again in {wait:?})",
                            t.name
                        );
                    }
                }
            }
        }
        Ok(n)
    }

    async fn publish_vm_json(&mut self) -> Result<()> {
        let vm = &self.opts.vm_uuid;
        let (name, disks) = {
            let cat = self.cat();
            (cat.vm_name(vm)?.unwrap_or_default(), cat.disks(vm)?)
        };
        if disks.is_empty() {
            return Ok(());
        }
        let j = rf::VmJson {
            uuid: vm.clone(),
            name,
            disks: disks
                .into_iter()
                .map(|(name, path, size)| rf::VmDisk {
                    name,
                    size,
                    source_path: path,
                })
                .collect(),
        };
        let body = serde_json::to_vec_pretty(&j).expect("vm.json serializes");
        let vm = vm.clone();
        let vm = &vm;
        for i in 0..self.targets.len() {
            let t = &mut self.targets[i];
            if t.next_try.is_some() || t.vm_json.as_deref() == Some(&body[..]) {
                continue;
            }
            // Objects are never rewritten: the first version is vm.json,
            // each change a new vm.json.d/<ts>.json (readers take the
            // newest: cdp_repo::read::latest_vm_json).
            let latest = match cdp_repo::read::latest_vm_json(&t.store, vm).await {
                Ok(l) => l,
                Err(_) => continue, // unreachable now: the next pass tries again
            };
            let key = match &latest {
                Some((_, b)) if b[..] == body[..] => {
                    t.vm_json = Some(body.clone());
                    continue;
                }
                Some(_) => rf::vm_json_version_key(vm, cdp_core::time::now_ns()),
                None => rf::vm_json_key(vm),
            };
            match t.store.put(&key, bytes::Bytes::from(body.clone())).await {
                Ok(()) => t.vm_json = Some(body.clone()),
                // Reachable but refusing (a directory QEMU's user cannot
                // write): a failing target, tried again after its backoff.
                Err(e) => {
                    let e = ShipError::store(&t.name)(e);
                    self.target_failed(i, e)?;
                }
            }
        }
        Ok(())
    }

    /// Store the VM definition whenever it changed since the last upload.
    /// A target refusing it is a failing target (in its backoff, "failing"
    /// in the catalog with why), never the end of the shipper: the others
    /// keep going and it is tried again.
    async fn publish_config(&mut self) -> Result<u64> {
        let Some(path) = &self.opts.vm_config else {
            return Ok(0);
        };
        let Ok(xml) = std::fs::read(path) else {
            return Ok(0);
        };
        let hash = blake3::hash(&xml).to_hex().to_string();
        let vm = self.opts.vm_uuid.clone();
        let mut failed = 0;
        for i in 0..self.targets.len() {
            if self.targets[i].next_try.is_some() {
                continue;
            }
            let name = self.targets[i].name.clone();
            if self.cat().last_config(&vm, &name)?.as_deref() == Some(hash.as_str()) {
                continue;
            }
            let ts = now_ns();
            let put = self.targets[i]
                .store
                .put(&rf::config_key(&vm, ts), bytes::Bytes::from(xml.clone()))
                .await;
            match put {
                Ok(()) => self.cat().add_config(&vm, &name, ts, &hash)?,
                Err(e) => {
                    failed += 1;
                    self.target_failed(i, ShipError::store(&name)(e))?;
                }
            }
        }
        Ok(failed)
    }

    /// Target `i` failed: into its backoff, and "failing" in the catalog
    /// with the error and what to do.
    fn target_failed(&mut self, i: usize, e: ShipError) -> Result<()> {
        let t = &mut self.targets[i];
        t.failed(e);
        let msg = t.failure_text.clone().unwrap_or_default();
        self.record_state(i, "failing", Some(&msg))
    }

    /// Is there anything left to ship to a target that is up?
    pub fn backlog(&self) -> Result<u64> {
        let cat = self.cat();
        let mut n = 0;
        for t in &self.targets {
            n += cat.unshipped(&self.opts.vm_uuid, &t.name)?.len() as u64;
        }
        Ok(n)
    }

    /// The targets that failed in the last pass, with why (each error is
    /// handed out once; the target stays in its backoff).
    pub fn take_failures(&mut self) -> Vec<TargetFailure> {
        self.targets
            .iter_mut()
            .filter_map(|t| {
                t.last_error.take().map(|error| TargetFailure {
                    target: t.name.clone(),
                    error,
                })
            })
            .collect()
    }
}

/// What a secondary of a cascading policy needs to know of the primary.
struct CascadeFrom {
    /// (disk, first_seq) of every segment the primary lacks.
    primary_lacks: std::collections::HashSet<(String, u64)>,
    wait: Duration,
}

/// One segment upload in flight to a target: counted while it lives, the
/// count recorded in the catalog for the agent's `cdp_uploads_in_flight`
/// (a metric: a catalog that refuses the row does not fail the upload).
struct InFlight<'a> {
    t: &'a Target,
    catalog: &'a Mutex<Catalog>,
    vm: &'a str,
}

impl<'a> InFlight<'a> {
    fn start(t: &'a Target, catalog: &'a Mutex<Catalog>, vm: &'a str) -> InFlight<'a> {
        let n = t.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        let f = InFlight { t, catalog, vm };
        f.record(n);
        f
    }

    fn record(&self, n: u64) {
        if let Ok(c) = self.catalog.lock() {
            let _ = c.set_in_flight(self.vm, &self.t.name, n, now_ns());
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let n = self.t.in_flight.fetch_sub(1, Ordering::SeqCst) - 1;
        self.record(n);
    }
}

/// What the targets shipped to in one pass share.
struct PassCtx<'a> {
    catalog: &'a Mutex<Catalog>,
    vm: &'a str,
    max_parallel: usize,
    retry: &'a RetryPolicy,
    /// The policy's targets (each segment goes to all of them).
    targets: usize,
    /// Without `cascade`: the targets still on their first batch of the
    /// pass ([`ship_target`]).
    first: Option<&'a FirstBatches>,
    poll: Duration,
}

/// How many targets of a pass are still on their first batch, and the
/// wake when the last one is done.
struct FirstBatches {
    left: AtomicU64,
    done: tokio::sync::Notify,
}

impl FirstBatches {
    fn new(n: usize) -> FirstBatches {
        FirstBatches {
            left: AtomicU64::new(n as u64),
            done: tokio::sync::Notify::new(),
        }
    }

    fn finished_one(&self) {
        if self.left.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.done.notify_waiters();
        }
    }

    /// Wait `poll`, or less if the last first batch ends; false once none
    /// is left.
    async fn others_busy(&self, poll: Duration) -> bool {
        let done = self.done.notified();
        tokio::pin!(done);
        done.as_mut().enable();
        if self.left.load(Ordering::SeqCst) == 0 {
            return false;
        }
        tokio::select! {
            _ = done => false,
            _ = tokio::time::sleep(poll) => self.left.load(Ordering::SeqCst) > 0,
        }
    }
}

/// Ship to one target what is due to it ([`ship_batch`]). Without
/// `cascade`, once its first batch is done, it goes on shipping what is
/// sealed meanwhile for as long as another target of the pass is still on
/// its first batch: a slow target (S3 far away) never holds back a fast
/// one (the RPO is the fastest target's), and the pass still ends after
/// every target's first batch (trimming, baselines and the definition come
/// after it).
async fn ship_target(
    t: &Target,
    ctx: &PassCtx<'_>,
    cascade: Option<&CascadeFrom>,
) -> (Result<()>, PassStats) {
    let mut stats = PassStats::default();
    let mut r = ship_batch(t, ctx, cascade, &mut stats).await;
    if let Some(first) = ctx.first {
        first.finished_one();
        while r.is_ok() {
            let before = stats.shipped;
            r = ship_batch(t, ctx, cascade, &mut stats).await;
            if stats.shipped == before && !first.others_busy(ctx.poll).await {
                break;
            }
        }
    }
    (r, stats)
}

/// Ship to one target what is due to it now ([`plan::due`]: its delay,
/// and under `cascade` the primary first), as many at once as the
/// backlog's count and bytes call for ([`plan::upload_parallelism`]);
/// counted in `stats` (`waiting`: what is not due yet, as of this batch).
async fn ship_batch(
    t: &Target,
    ctx: &PassCtx<'_>,
    cascade: Option<&CascadeFrom>,
    stats: &mut PassStats,
) -> Result<()> {
    let (catalog, vm) = (ctx.catalog, ctx.vm);
    let rows = catalog.lock().unwrap().unshipped(vm, &t.name)?;
    let now = now_ns();
    let mut due = Vec::new();
    stats.waiting = 0;
    for row in rows {
        let c = cascade.map(|c| plan::Cascade {
            primary_has: !c.primary_lacks.contains(&(row.disk.clone(), row.first_seq)),
            wait: c.wait,
        });
        match plan::due(row.last_ts_ns, t.delay, now, c) {
            plan::Due::Now => due.push((row, false)),
            plan::Due::WithoutPrimary => due.push((row, true)),
            plan::Due::Delay | plan::Due::Primary => stats.waiting += 1,
        }
    }
    let bytes = due.iter().map(|(r, _)| r.size_bytes).sum();
    let parallel = plan::upload_parallelism(due.len(), bytes, ctx.max_parallel);
    let to = ship::Upload {
        store: &t.store,
        target: &t.name,
        throttle: &t.throttle,
        retry: ctx.retry,
    };
    let to = &to;
    let mut results = futures::stream::iter(due.into_iter().map(|(row, alone)| async move {
        let _counted = InFlight::start(t, catalog, vm);
        let r = ship::ship_segment(to, vm, &row, catalog, ctx.targets).await;
        (row, alone, r)
    }))
    .buffered(parallel);
    while let Some((row, alone, r)) = results.next().await {
        let shipped = r?;
        catalog.lock().unwrap().record_shipment(
            vm,
            &Shipment {
                disk: &row.disk,
                first_seq: row.first_seq,
                target: &t.name,
                key: &shipped.key,
                object_bytes: shipped.object_bytes,
                shipped_ns: now_ns(),
            },
        )?;
        stats.shipped += 1;
        stats.shipped_bytes += shipped.object_bytes;
        stats.without_primary += alone as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::backoff;
    use std::time::Duration;

    #[test]
    fn backoff_doubles_while_retrying_may_help() {
        assert_eq!(backoff(1, true), Duration::from_millis(400));
        assert_eq!(backoff(2, true), Duration::from_millis(800));
        assert_eq!(backoff(5, true), Duration::from_millis(6400));
        assert_eq!(backoff(6, true), Duration::from_secs(10));
        assert_eq!(backoff(40, true), Duration::from_secs(10));
        // A permanent error waits the most from the first failure.
        assert_eq!(backoff(1, false), Duration::from_secs(10));
    }
}

#[cfg(test)]
mod state_tests {
    use super::*;

    /// The target state is written when it changes, the first time, and as
    /// a refresh every TARGET_STATE_REFRESH; never on an unchanged pass.
    #[test]
    fn an_unchanged_state_is_written_only_as_a_refresh() {
        let t0 = Instant::now();
        let soon = t0 + Duration::from_millis(100);
        let later = t0 + TARGET_STATE_REFRESH;
        assert!(state_write_due(None, "up", None, t0));
        assert!(!state_write_due(Some(("up", None, t0)), "up", None, soon));
        assert!(state_write_due(Some(("up", None, t0)), "up", None, later));
        assert!(state_write_due(
            Some(("up", None, t0)),
            "failing",
            Some("x"),
            soon
        ));
        assert!(!state_write_due(
            Some(("failing", Some("x"), t0)),
            "failing",
            Some("x"),
            soon
        ));
        assert!(state_write_due(
            Some(("failing", Some("x"), t0)),
            "failing",
            Some("y"),
            soon
        ));
        assert!(state_write_due(
            Some(("failing", Some("x"), t0)),
            "up",
            None,
            soon
        ));
    }
}

#[cfg(test)]
mod backoff_tests {
    use super::*;

    /// Every file is removed, whatever the number of threads; each result
    /// is its own path's, in order (a missing one says NotFound).
    #[test]
    fn trimmed_files_are_removed_in_parallel_with_their_own_results() {
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<std::path::PathBuf> = (0..9)
            .map(|i| dir.path().join(format!("{i}.seg")))
            .collect();
        for (i, p) in paths.iter().enumerate() {
            if i != 5 {
                std::fs::write(p, b"x").unwrap();
            }
        }
        let refs: Vec<&std::path::Path> = paths.iter().map(|p| p.as_path()).collect();
        let r = super::remove_files(&refs);
        assert_eq!(r.len(), 9);
        for (i, r) in r.iter().enumerate() {
            match (i, r) {
                (5, Err(e)) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound),
                (_, Ok(())) => assert!(!paths[i].exists()),
                (_, r) => panic!("{i}: {r:?}"),
            }
        }
        let one = dir.path().join("one");
        std::fs::write(&one, b"x").unwrap();
        assert!(super::remove_files(&[one.as_path()])[0].is_ok());
        assert!(!one.exists());
    }

    /// A failing baseline waits 1 s, then twice as long each time, at most
    /// 5 minutes: never a full-disk read every pass.
    #[test]
    fn a_failing_baseline_backs_off_to_five_minutes() {
        let mut w = None;
        let mut seen = Vec::new();
        for _ in 0..12 {
            let d = next_baseline_backoff(w);
            seen.push(d.as_secs());
            w = Some(d);
        }
        assert_eq!(seen, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
    }
}
