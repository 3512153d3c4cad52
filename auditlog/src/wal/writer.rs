//! The WAL writer: one dedicated thread that owns the active segment, assigns `seq` and chain
//! hashes, seals payloads under the segment's data key, and fsyncs batches (group commit).
//!
//! Invariants:
//! * Callers are acknowledged only after the frames they wait for are written *and* fsynced
//!   (for `sync` rows and for every intent); one fsync covers every record of a batch.
//! * A failed write or fsync abandons the segment: nothing is retried on it (after a failed
//!   fsync the kernel may have dropped the dirty pages while reporting them clean). The chain is
//!   rewound to the last durable row, the next segment starts there, and until it can be created
//!   every record fails with an error that `is_unavailable()`.
//! * A new segment is durable (header and carried-over open intents fsynced, folder fsynced)
//!   before the segment it replaces is handed to the lake shipper, so no intent is ever only in a
//!   segment that may be deleted.
//! * The active segment keeps zeros written ahead of its last frame ([`PREALLOCATE_BYTES`]), so
//!   that an `fdatasync` flushes data only and not also a new file size; readers take zeros
//!   where a frame should start, to the end, as the unwritten rest (`Tail::Unwritten`). A
//!   segment is trimmed to its frames when it is sealed or abandoned; recovery trims the rest.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, oneshot};

use crate::anomaly::PreparedAnomaly;
use crate::config::{Durability, RollConfig};
use crate::crypto::{DataKey, KeyEncryptionKey, intent_aad};
use crate::error::AuditError;
use crate::metrics::Metrics;
use crate::row::{RowColumns, micros, unknown_outcome};
use crate::table::{Table, TableRow};
use crate::wal::faults::{Fault, WalFaults};
use crate::wal::segment::{
    ChainPos, SegmentHeader, WalIntent, WalRow, encode_header, encode_intent, encode_row, segment_path,
};
use crate::webhook::PreparedWebhook;

/// A redacted, compressed record waiting to be sealed and appended.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub columns: RowColumns,
    pub compressed: Vec<u8>,
}

pub type Ack = oneshot::Sender<Result<(), AuditError>>;

/// What callers send to the writer thread.
#[derive(Debug)]
pub enum Command {
    Row {
        prepared: Prepared,
        intent: Option<uuid::Uuid>,
        ack: Option<Ack>,
    },
    Intent {
        prepared: Prepared,
        ack: Ack,
    },
    /// A `webhooks` row; `sync` makes it wait for its fsync whatever the durability setting.
    WebhookRow {
        prepared: PreparedWebhook,
        sync: bool,
        ack: Option<Ack>,
    },
    /// An `anomalies` row; durable as `audit.durability` says.
    AnomalyRow {
        prepared: PreparedAnomaly,
        ack: Option<Ack>,
    },
    Shutdown {
        ack: Ack,
    },
}

/// What a queued record is counted for besides its compressed payload: its columns (ids,
/// service, operation, times, hashes), for `audit.queue_max_bytes`.
pub const QUEUED_COLUMNS_BYTES: usize = 1024;

impl Command {
    /// What the command holds in memory while it waits for the writer, as counted against
    /// `audit.queue_max_bytes`.
    pub fn queued_bytes(&self) -> usize {
        let payload = match self {
            Command::Row { prepared, .. } | Command::Intent { prepared, .. } => prepared.compressed.len(),
            Command::WebhookRow { prepared, .. } => prepared.compressed.as_ref().map_or(0, Vec::len),
            Command::AnomalyRow { prepared, .. } => prepared.compressed.len(),
            Command::Shutdown { .. } => return 0,
        };
        payload + QUEUED_COLUMNS_BYTES
    }
}

/// A command on its way to the writer thread, with the room it holds within
/// `audit.queue_max_bytes` (`None` for shutdown, which is always let through).
#[derive(Debug)]
pub struct Queued {
    pub cmd: Command,
    pub room: Option<QueueRoom>,
}

/// Room within `audit.queue_max_bytes`: given back (and taken off `keygate_audit_queue_bytes`)
/// when dropped, which the writer does once it has appended the command.
#[derive(Debug)]
pub struct QueueRoom {
    _permit: tokio::sync::OwnedSemaphorePermit,
    bytes: i64,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl QueueRoom {
    pub fn new(permit: tokio::sync::OwnedSemaphorePermit, gauge: prometheus_client::metrics::gauge::Gauge) -> Self {
        let bytes = i64::from(u32::try_from(permit.num_permits()).unwrap_or(u32::MAX));
        gauge.inc_by(bytes);
        QueueRoom { _permit: permit, bytes, gauge }
    }
}

impl Drop for QueueRoom {
    fn drop(&mut self) {
        self.gauge.dec_by(self.bytes);
    }
}

/// A segment the writer no longer appends to, for the lake shipper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedSegment {
    pub segno: u64,
    pub path: PathBuf,
    /// Per table ([`Table::index`]): rows with `seq >= upto[table]` are superseded (written after
    /// the last durable point of an abandoned segment) and are not shipped.
    pub upto: [u64; Table::COUNT],
    /// When it was handed to the shipper (µs since the epoch), for the lake lag.
    pub sealed_at_us: i64,
}

/// State shared between the writer, the shipper and [`crate::AuditLog`].
#[derive(Debug)]
pub struct Shared {
    pub dir: PathBuf,
    pub quota: u64,
    pub bytes_on_disk: AtomicU64,
    pub failure: Mutex<Option<String>>,
    pub metrics: Metrics,
    /// Armed only by fault-injection tests ([`crate::wal::faults`]).
    pub faults: Arc<WalFaults>,
    /// Sealed segments handed to the shipper and not yet committed (kept by both sides, so the
    /// gauge is current while the shipper is stuck in a retry or a hanging call).
    pub backlog_segments: std::sync::atomic::AtomicI64,
    /// `sealed_at_us` of the oldest segment not yet committed; 0 when there is none.
    pub oldest_unshipped_us: std::sync::atomic::AtomicI64,
    /// Segments set aside after a permanent lake error, with their reasons (for `/readyz`).
    pub set_aside: Mutex<Vec<String>>,
}

impl Shared {
    pub fn add_bytes(&self, n: u64) {
        let v = self.bytes_on_disk.fetch_add(n, Ordering::SeqCst) + n;
        self.metrics.wal_bytes.set(i64::try_from(v).unwrap_or(i64::MAX));
    }

    pub fn sub_bytes(&self, n: u64) {
        let prev = self.bytes_on_disk.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| Some(v.saturating_sub(n)));
        let v = prev.unwrap_or(0).saturating_sub(n);
        self.metrics.wal_bytes.set(i64::try_from(v).unwrap_or(i64::MAX));
    }

    /// A segment was handed to the shipper.
    pub fn segment_sealed(&self, sealed_at_us: i64) {
        let n = self.backlog_segments.fetch_add(1, Ordering::SeqCst) + 1;
        self.metrics.wal_segments_backlog.set(n);
        let _ = self.oldest_unshipped_us.compare_exchange(0, sealed_at_us.max(1), Ordering::SeqCst, Ordering::SeqCst);
    }

    /// The shipper committed (or dropped as already committed) a segment; `next_oldest` is the
    /// sealing time of the oldest one still waiting.
    pub fn segment_shipped(&self, next_oldest: Option<i64>) {
        let n = (self.backlog_segments.fetch_sub(1, Ordering::SeqCst) - 1).max(0);
        self.metrics.wal_segments_backlog.set(n);
        self.oldest_unshipped_us.store(if n == 0 { 0 } else { next_oldest.unwrap_or(0).max(1) }, Ordering::SeqCst);
    }

    /// Seconds since the oldest uncommitted segment was sealed (0 when none), also set as the
    /// `lake_lag_seconds` gauge.
    pub fn lake_lag_seconds(&self) -> i64 {
        let oldest = self.oldest_unshipped_us.load(Ordering::SeqCst);
        let lag = if oldest == 0 { 0 } else { (micros(SystemTime::now()) - oldest).max(0) / 1_000_000 };
        self.metrics.lake_lag_seconds.set(lag);
        lag
    }

    pub fn set_failure(&self, reason: Option<String>) {
        if let Ok(mut f) = self.failure.lock() {
            *f = reason;
        }
    }

    pub fn failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }
}

/// Where the writer starts (from recovery).
#[derive(Debug, Clone)]
pub struct StartPoint {
    pub next_segno: u64,
    /// Where each table's chain continues ([`Table::index`]).
    pub chains: [ChainPos; Table::COUNT],
}

/// Writer settings.
#[derive(Clone, Debug)]
pub struct WriterConfig {
    pub writer_id: String,
    pub durability: Durability,
    pub async_flush_interval: Duration,
    pub roll: RollConfig,
}

/// Zeros the writer keeps written ahead of the active segment's last frame: appends then
/// overwrite space the file already has, and an `fdatasync` need not also update its size (on
/// ext4, measured here, a synced 2 KiB append took 180-260 µs against 120-145 µs into written
/// zeros). Extended when less than a quarter is left; capped at `roll.max_bytes`. Not counted in
/// `wal_quota_bytes` (which counts frames): the disk holds up to this much more per writer.
pub const PREALLOCATE_BYTES: u64 = 1024 * 1024;

/// A zeroed buffer to preallocate from.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

struct Active {
    file: File,
    path: PathBuf,
    segno: u64,
    /// Per table: the first `seq` of the segment's rows (their file's first seq, in their AAD).
    first_seqs: [u64; Table::COUNT],
    key: DataKey,
    /// Bytes of frames written (where the next frame goes).
    bytes: u64,
    /// The file's length: `bytes` and the zeros preallocated after them.
    allocated: u64,
    /// Set after a preallocation failed (a nearly full disk): the segment goes on without
    /// zeros ahead, so that they never take the last free space.
    prealloc_off: bool,
    first_row: Option<(Instant, i64)>,
    rows: u64,
    dirty: bool,
    last_sync: Instant,
}

/// The writer thread's state.
#[allow(missing_debug_implementations)] // holds keys; nothing useful to print
pub struct Writer {
    cfg: WriterConfig,
    kek: Arc<dyn KeyEncryptionKey>,
    rt: tokio::runtime::Handle,
    shared: Arc<Shared>,
    shipper: mpsc::UnboundedSender<SealedSegment>,
    active: Option<Active>,
    next_segno: u64,
    /// Per table ([`Table::index`]): where its chain continues, and where it stood at the last
    /// fsync.
    chains: [ChainPos; Table::COUNT],
    durable: [ChainPos; Table::COUNT],
    open_intents: HashMap<uuid::Uuid, Prepared>,
    /// Intents whose completing rows are written but not yet fsynced: they stay in
    /// `open_intents` (and are carried into the next segment if this one is abandoned) until the
    /// fsync that makes their rows durable.
    undurable_completions: Vec<uuid::Uuid>,
    /// Set while appending rows that are already owed (recovery's and shutdown's `unknown`
    /// rows): those are written whatever the quota says, since the quota governs new traffic.
    quota_exempt: bool,
    pending_seal: Vec<SealedSegment>,
    last_reopen_attempt: Option<Instant>,
    /// The next segment's data key, generated and wrapped ahead of time on the runtime (never on
    /// this thread), so that a slow key-encryption key cannot stall the WAL.
    next_key: Option<std::sync::mpsc::Receiver<PreparedKey>>,
    /// After a failed roll, no new attempt before this instant (exponential back-off, jitter).
    roll_retry_at: Option<Instant>,
    roll_backoff: Duration,
}

/// A data key and its wrapped form, or why wrapping failed.
type PreparedKey = Result<(DataKey, Vec<u8>), String>;

const HOUR_US: i64 = 3_600_000_000;
const MAX_BATCH: usize = 4096;
const REOPEN_INTERVAL: Duration = Duration::from_millis(500);
/// How long wrapping one data key may take before the attempt fails (the KEK is slow or down).
pub const KEY_WRAP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the WAL thread waits for a pre-wrapped key when it has no segment at all (at start,
/// or after a failure); while a segment is active, a roll never waits: the segment keeps
/// growing until the key is there.
pub const KEY_WAIT_WITHOUT_SEGMENT: Duration = Duration::from_secs(2);
const ROLL_BACKOFF_MIN: Duration = Duration::from_millis(500);
const ROLL_BACKOFF_MAX: Duration = Duration::from_secs(30);

impl Writer {
    pub fn new(
        cfg: WriterConfig,
        kek: Arc<dyn KeyEncryptionKey>,
        rt: tokio::runtime::Handle,
        shared: Arc<Shared>,
        shipper: mpsc::UnboundedSender<SealedSegment>,
        start: StartPoint,
    ) -> Writer {
        Writer {
            cfg,
            kek,
            rt,
            shared,
            shipper,
            active: None,
            next_segno: start.next_segno,
            chains: start.chains,
            durable: start.chains,
            open_intents: HashMap::new(),
            undurable_completions: Vec::new(),
            quota_exempt: false,
            pending_seal: Vec::new(),
            last_reopen_attempt: None,
            next_key: None,
            roll_retry_at: None,
            roll_backoff: ROLL_BACKOFF_MIN,
        }
    }

    /// Creates the first segment; called before the thread starts so that `open` fails loudly.
    pub fn start(&mut self) -> Result<(), AuditError> {
        self.ensure_active_waiting(KEY_WRAP_TIMEOUT)
    }

    /// Appends the `outcome = unknown` rows found by recovery, durably, before anything else.
    pub fn append_recovered(&mut self, rows: Vec<(uuid::Uuid, Prepared)>) -> Result<(), AuditError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut waits = Vec::with_capacity(rows.len());
        let cmds = rows
            .into_iter()
            .map(|(id, prepared)| {
                let (ack, done) = oneshot::channel();
                waits.push(done);
                Command::Row { prepared, intent: Some(id), ack: Some(ack) }
            })
            .collect();
        let durability = self.cfg.durability;
        self.cfg.durability = Durability::Sync;
        self.quota_exempt = true;
        self.process(cmds);
        self.quota_exempt = false;
        self.cfg.durability = durability;
        for mut w in waits {
            w.try_recv().map_err(|_| AuditError::Closed)??;
        }
        Ok(())
    }

    /// After a failed start: removes the segment [`Writer::start`] created if nothing but its
    /// header was written to it, so that failed starts leave no litter.
    pub fn discard_unused_segment(&mut self) {
        if let Some(active) = self.active.take_if(|a| a.rows == 0 && self.open_intents.is_empty()) {
            let _ = std::fs::remove_file(&active.path);
            self.shared.sub_bytes(active.bytes);
        }
    }

    /// The thread's loop; returns when shut down or when every sender is gone.
    pub fn run(mut self, rx: std::sync::mpsc::Receiver<Box<Queued>>) {
        let tick = self.cfg.async_flush_interval.min(Duration::from_millis(250)).max(Duration::from_millis(5));
        loop {
            let first = match rx.recv_timeout(tick) {
                Ok(cmd) => cmd,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    self.on_tick();
                    continue;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = self.finish();
                    return;
                }
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(queued) => batch.push(queued),
                    Err(_) => break,
                }
            }
            let mut shutdown = None;
            let mut work = Vec::with_capacity(batch.len());
            // Given back once the batch is appended (its records are then in the segment).
            let mut rooms = Vec::with_capacity(batch.len());
            for queued in batch {
                let Queued { cmd, room } = *queued;
                rooms.push(room);
                match cmd {
                    Command::Shutdown { ack } => shutdown = Some(ack),
                    other => work.push(other),
                }
            }
            if !work.is_empty() {
                self.process(work);
            }
            drop(rooms);
            if let Some(ack) = shutdown {
                // Anything still queued behind the shutdown is processed first.
                let (rest, rooms): (Vec<Command>, Vec<Option<QueueRoom>>) =
                    rx.try_iter().map(|queued| (queued.cmd, queued.room)).unzip();
                if !rest.is_empty() {
                    self.process(rest.into_iter().filter(|c| !matches!(c, Command::Shutdown { .. })).collect());
                }
                drop(rooms);
                let _ = ack.send(self.finish());
                return;
            }
        }
    }

    fn on_tick(&mut self) {
        if self.active.is_none() {
            let _ = self.ensure_active();
            return;
        }
        let flush_due =
            self.active.as_ref().is_some_and(|a| a.dirty && a.last_sync.elapsed() >= self.cfg.async_flush_interval);
        if flush_due && let Err(e) = self.sync_active() {
            self.abandon(&e);
            return;
        }
        self.maybe_roll();
    }

    /// Refuses a row of new traffic while the WAL holds its quota (owed rows, `exempt`, are
    /// written whatever it says): counts it and answers its sender. `pending` is what this batch
    /// has encoded so far. Associated, not a method: the caller holds the active segment mutably.
    fn refuse_over_quota(shared: &Shared, exempt: bool, used: u64, pending: usize, ack: &mut Option<Ack>) -> bool {
        if exempt || used + pending as u64 <= shared.quota {
            return false;
        }
        shared.metrics.quota_exceeded.inc();
        if let Some(ack) = ack.take() {
            let _ = ack.send(Err(AuditError::QuotaExceeded { used, quota: shared.quota }));
        }
        true
    }

    fn fail_all(cmds: Vec<Command>, err: &AuditError, shared: &Shared) {
        for cmd in cmds {
            let e = clone_unavailable(err, shared);
            match cmd {
                Command::Row { ack: Some(ack), .. }
                | Command::WebhookRow { ack: Some(ack), .. }
                | Command::AnomalyRow { ack: Some(ack), .. }
                | Command::Intent { ack, .. }
                | Command::Shutdown { ack } => {
                    let _ = ack.send(Err(e));
                }
                Command::Row { ack: None, .. }
                | Command::WebhookRow { ack: None, .. }
                | Command::AnomalyRow { ack: None, .. } => {}
            }
        }
    }

    fn process(&mut self, cmds: Vec<Command>) {
        if let Err(e) = self.ensure_active() {
            Self::fail_all(cmds, &e, &self.shared);
            return;
        }
        self.maybe_roll();
        let Some(active) = self.active.as_mut() else {
            let e = self.unavailable("no active WAL segment");
            Self::fail_all(cmds, &e, &self.shared);
            return;
        };
        let mut buf = Vec::with_capacity(cmds.len() * 1024);
        let mut acks: Vec<Ack> = Vec::new();
        let mut need_sync = false;
        let mut new_intents = Vec::new();
        let mut completed = Vec::new();
        let mut rows = 0u64;
        let mut table_rows = [0u64; Table::COUNT];
        let now = SystemTime::now();
        let logged_at_us = micros(now);
        let used = self.shared.bytes_on_disk.load(Ordering::SeqCst);
        for cmd in cmds {
            let (ack, frame_result) = match cmd {
                Command::Row { prepared, intent, mut ack } => {
                    if Self::refuse_over_quota(&self.shared, self.quota_exempt, used, buf.len(), &mut ack) {
                        continue;
                    }
                    let res = append_row(
                        active,
                        &self.cfg.writer_id,
                        &mut self.chains,
                        prepared.columns,
                        Some(&prepared.compressed),
                        (logged_at_us, intent),
                        &mut buf,
                    );
                    if res.is_ok() {
                        rows += 1;
                        table_rows[Table::Audit.index()] += 1;
                        if let Some(id) = intent {
                            completed.push(id);
                        }
                        if ack.is_some() && self.cfg.durability == Durability::Sync {
                            need_sync = true;
                        }
                    }
                    (ack, res)
                }
                Command::WebhookRow { prepared, sync, mut ack } => {
                    if Self::refuse_over_quota(&self.shared, self.quota_exempt, used, buf.len(), &mut ack) {
                        continue;
                    }
                    let res = append_row(
                        active,
                        &self.cfg.writer_id,
                        &mut self.chains,
                        prepared.columns,
                        prepared.compressed.as_deref(),
                        (logged_at_us, None),
                        &mut buf,
                    );
                    if res.is_ok() {
                        rows += 1;
                        table_rows[Table::Webhooks.index()] += 1;
                        if ack.is_some() && (sync || self.cfg.durability == Durability::Sync) {
                            need_sync = true;
                        }
                    }
                    (ack, res)
                }
                Command::AnomalyRow { prepared, mut ack } => {
                    if Self::refuse_over_quota(&self.shared, self.quota_exempt, used, buf.len(), &mut ack) {
                        continue;
                    }
                    let res = append_row(
                        active,
                        &self.cfg.writer_id,
                        &mut self.chains,
                        prepared.columns,
                        Some(&prepared.compressed),
                        (logged_at_us, None),
                        &mut buf,
                    );
                    if res.is_ok() {
                        rows += 1;
                        table_rows[Table::Anomalies.index()] += 1;
                        if ack.is_some() && self.cfg.durability == Durability::Sync {
                            need_sync = true;
                        }
                    }
                    (ack, res)
                }
                Command::Intent { prepared, ack } => {
                    if used + buf.len() as u64 > self.shared.quota {
                        self.shared.metrics.quota_exceeded.inc();
                        let _ = ack.send(Err(AuditError::QuotaExceeded { used, quota: self.shared.quota }));
                        continue;
                    }
                    let id = prepared.columns.event_id;
                    let aad = intent_aad(&self.cfg.writer_id, active.segno, &id);
                    let res = active.key.seal(&aad, &prepared.compressed).and_then(|payload| {
                        encode_intent(&WalIntent { logged_at_us, columns: prepared.columns.clone(), payload }, &mut buf)
                    });
                    if res.is_ok() {
                        need_sync = true;
                        new_intents.push((id, prepared));
                    }
                    (Some(ack), res)
                }
                Command::Shutdown { ack } => {
                    let _ = ack.send(Ok(()));
                    continue;
                }
            };
            match (ack, frame_result) {
                (Some(ack), Ok(())) => acks.push(ack),
                (Some(ack), Err(e)) => {
                    let _ = ack.send(Err(e));
                }
                (None, _) => {}
            }
        }
        if buf.is_empty() {
            for ack in acks {
                let _ = ack.send(Ok(()));
            }
            return;
        }
        let write = match self.shared.faults.take(Fault::Write) {
            Some(error) => Err(error),
            None => active.file.write_all(&buf),
        };
        if let Err(e) = write {
            let err = self.unavailable(&format!("write failed: {e}"));
            self.abandon(&err);
            for ack in acks {
                let _ = ack.send(Err(clone_unavailable(&err, &self.shared)));
            }
            return;
        }
        active.bytes += buf.len() as u64;
        active.allocated = active.allocated.max(active.bytes);
        active.dirty = true;
        Self::preallocate(active, self.cfg.roll.max_bytes);
        if rows > 0 && active.first_row.is_none() {
            active.first_row = Some((Instant::now(), logged_at_us.div_euclid(HOUR_US)));
        }
        active.rows += rows;
        self.shared.add_bytes(buf.len() as u64);
        for t in Table::ALL {
            self.shared.metrics.records_of(t).inc_by(table_rows[t.index()]);
        }
        self.shared.metrics.intents.inc_by(new_intents.len() as u64);
        let sync_due = need_sync
            || (self.cfg.durability == Durability::Async
                && active.last_sync.elapsed() >= self.cfg.async_flush_interval);
        if sync_due {
            self.shared.metrics.wal_batch_records.observe((acks.len().max(1)) as f64);
            if let Err(e) = self.sync_active() {
                self.abandon(&e);
                for ack in acks {
                    let _ = ack.send(Err(clone_unavailable(&e, &self.shared)));
                }
                return;
            }
        }
        for (id, p) in new_intents {
            self.open_intents.insert(id, p);
        }
        if sync_due {
            for id in completed.into_iter().chain(self.undurable_completions.drain(..)) {
                self.open_intents.remove(&id);
            }
        } else {
            // Not durable yet: the intents stay open until the fsync that covers these rows.
            self.undurable_completions.extend(completed);
        }
        for ack in acks {
            let _ = ack.send(Ok(()));
        }
    }

    fn sync_active(&mut self) -> Result<(), AuditError> {
        let Some(active) = self.active.as_mut() else { return Ok(()) };
        let started = Instant::now();
        let res = match self.shared.faults.take(Fault::Fsync) {
            Some(error) => Err(error),
            None => active.file.sync_data(),
        };
        self.shared.metrics.wal_fsync_seconds.observe(started.elapsed().as_secs_f64());
        match res {
            Ok(()) => {
                active.dirty = false;
                active.last_sync = Instant::now();
                self.durable = self.chains;
                for id in self.undurable_completions.drain(..) {
                    self.open_intents.remove(&id);
                }
                Ok(())
            }
            Err(e) => Err(self.unavailable(&format!("fsync failed: {e}"))),
        }
    }

    fn unavailable(&self, reason: &str) -> AuditError {
        AuditError::WalUnavailable { dir: self.shared.dir.clone(), reason: reason.to_owned() }
    }

    /// Gives up the active segment after a failed write or fsync.
    fn abandon(&mut self, err: &AuditError) {
        self.shared.metrics.wal_failures.inc();
        self.shared.set_failure(Some(bare_reason(err)));
        tracing::error!(error = %err, "audit WAL segment abandoned; refusing records until a new segment can be written");
        // Everything after the last successful fsync is treated as never written: the intents
        // those rows completed are open again, and are carried into the next segment.
        self.chains = self.durable;
        self.undurable_completions.clear();
        if let Some(active) = self.active.take() {
            trim(&active);
            self.pending_seal.push(SealedSegment {
                segno: active.segno,
                path: active.path,
                upto: self.durable.map(|c| c.next_seq),
                sealed_at_us: micros(SystemTime::now()),
            });
        }
    }

    /// Hands a segment whose every row is durable to the shipper.
    fn seal_whole(&self, segment: Active) {
        trim(&segment);
        let sealed = SealedSegment {
            segno: segment.segno,
            path: segment.path,
            upto: self.chains.map(|c| c.next_seq),
            sealed_at_us: micros(SystemTime::now()),
        };
        self.hand_to_shipper(sealed);
    }

    /// Hands a sealed segment to the shipper and counts it in the backlog.
    fn hand_to_shipper(&self, sealed: SealedSegment) {
        self.shared.segment_sealed(sealed.sealed_at_us);
        if self.shipper.send(sealed).is_err() {
            // The shipper is gone (shutdown gave up on it): the segment stays on disk for the
            // next start, and is no longer counted as waiting in this process.
            self.shared.segment_shipped(None);
        }
    }

    /// Makes sure there is an active segment, creating one if needed (after a failure, at most
    /// every [`REOPEN_INTERVAL`]).
    fn ensure_active(&mut self) -> Result<(), AuditError> {
        self.ensure_active_waiting(KEY_WAIT_WITHOUT_SEGMENT)
    }

    fn ensure_active_waiting(&mut self, key_wait: Duration) -> Result<(), AuditError> {
        if self.active.is_some() {
            return Ok(());
        }
        if let Some(t) = self.last_reopen_attempt
            && t.elapsed() < REOPEN_INTERVAL
            && let Some(reason) = self.shared.failure()
        {
            return Err(self.unavailable(&reason));
        }
        self.last_reopen_attempt = Some(Instant::now());
        match self.create_segment(key_wait) {
            Ok(active) => {
                self.active = Some(active);
                self.shared.set_failure(None);
                for sealed in std::mem::take(&mut self.pending_seal) {
                    self.hand_to_shipper(sealed);
                }
                Ok(())
            }
            Err(e) => {
                let reason = e.to_string();
                self.shared.set_failure(Some(reason.clone()));
                Err(self.unavailable(&reason))
            }
        }
    }

    /// Starts generating and wrapping the next segment's data key on the runtime, unless that
    /// is already under way.
    fn prewrap_next_key(&mut self) {
        if self.next_key.is_some() {
            return;
        }
        let kek = self.kek.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        self.rt.spawn(async move {
            let result = match DataKey::generate() {
                Ok((key, raw)) => match tokio::time::timeout(KEY_WRAP_TIMEOUT, kek.wrap(&raw)).await {
                    Ok(Ok(wrapped)) => Ok((key, wrapped)),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("wrapping a data key did not finish within {KEY_WRAP_TIMEOUT:?}")),
                },
                Err(e) => Err(e.to_string()),
            };
            let _ = tx.send(result);
        });
        self.next_key = Some(rx);
    }

    /// The pre-wrapped key, waiting at most `wait` for it.
    fn take_next_key(&mut self, wait: Duration) -> Result<(DataKey, Vec<u8>), AuditError> {
        self.prewrap_next_key();
        let kek_error = |reason: String| AuditError::Kek { key_id: self.kek.key_id(), reason };
        let Some(rx) = self.next_key.as_ref() else {
            return Err(kek_error("no data key is being prepared".into()));
        };
        let received = if wait.is_zero() { rx.try_recv().ok() } else { rx.recv_timeout(wait).ok() };
        match received {
            Some(Ok(pair)) => {
                self.next_key = None;
                Ok(pair)
            }
            Some(Err(reason)) => {
                self.next_key = None;
                Err(kek_error(reason))
            }
            // Still under way: keep waiting for it on the next attempt.
            None => Err(kek_error("the next data key is still being wrapped by the key-encryption key".into())),
        }
    }

    /// Creates, fills (carried intents) and fsyncs a new segment, waiting at most `key_wait`
    /// for its pre-wrapped data key.
    fn create_segment(&mut self, key_wait: Duration) -> Result<Active, AuditError> {
        let segno = self.next_segno;
        let path = segment_path(&self.shared.dir, segno);
        let (mut key, wrapped) = self.take_next_key(key_wait)?;
        let mut header = SegmentHeader {
            version: 1,
            writer_id: self.cfg.writer_id.clone(),
            segno,
            first_seq: 0,
            prev_hash: [0; 32],
            kek_id: self.kek.key_id(),
            wrapped_key: wrapped,
            created_at_us: micros(SystemTime::now()),
            webhooks_start: ChainPos::default(),
            anomalies_start: ChainPos::default(),
        };
        header.set_chain_starts(self.chains);
        let mut buf = Vec::new();
        encode_header(&header, &mut buf)?;
        let logged_at_us = micros(SystemTime::now());
        for (id, p) in &self.open_intents {
            let payload = key.seal(&intent_aad(&self.cfg.writer_id, segno, id), &p.compressed)?;
            encode_intent(&WalIntent { logged_at_us, columns: p.columns.clone(), payload }, &mut buf)?;
        }
        if let Some(error) = self.shared.faults.take(Fault::CreateSegment) {
            return Err(AuditError::io("create WAL segment", &path, error));
        }
        let mut file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)
            .map_err(|e| AuditError::io("create WAL segment", &path, e))?;
        // Whatever goes wrong from here, the partial file must not be mistaken for a segment.
        let bytes = buf.len() as u64;
        let mut allocated = bytes + Self::preallocation(self.cfg.roll.max_bytes);
        let mut prealloc_off = false;
        let result = (|| {
            file.write_all(&buf)?;
            // Preallocation only saves time: with too little space for it (a nearly full disk),
            // the segment starts without it.
            if let Err(e) = write_zeros(&file, bytes, allocated) {
                tracing::warn!(path = %path.display(), error = %e, "could not preallocate WAL space; the segment starts without it");
                file.set_len(bytes)?;
                allocated = bytes;
                prealloc_off = true;
            }
            file.sync_all()?;
            File::open(&self.shared.dir)?.sync_all()
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&path);
            return Err(AuditError::io("write WAL segment", &path, e));
        }
        self.next_segno += 1;
        self.shared.add_bytes(buf.len() as u64);
        self.prewrap_next_key();
        Ok(Active {
            file,
            path,
            segno,
            first_seqs: header.chain_starts().map(|c| c.next_seq),
            key,
            bytes,
            allocated,
            prealloc_off,
            first_row: None,
            rows: 0,
            dirty: false,
            last_sync: Instant::now(),
        })
    }

    /// How many zeros a segment keeps ahead of its frames, for a roll size of `max_bytes`.
    fn preallocation(max_bytes: u64) -> u64 {
        PREALLOCATE_BYTES.min(max_bytes)
    }

    /// Extends the active segment's zeros when less than a quarter of the preallocation is left
    /// ahead of its frames. A failure costs only speed, so it is logged, not returned: the zeros
    /// it wrote are cut again (they must not take a nearly full disk's last space from the
    /// frames) and the segment goes on without preallocation.
    fn preallocate(active: &mut Active, max_bytes: u64) {
        let ahead = Self::preallocation(max_bytes);
        if active.prealloc_off || active.allocated - active.bytes >= ahead / 4 {
            return;
        }
        let to = active.bytes + ahead;
        if let Err(e) = write_zeros(&active.file, active.allocated, to) {
            tracing::warn!(path = %active.path.display(), error = %e, "could not preallocate WAL space; this segment goes on without it");
            active.prealloc_off = true;
            if let Err(e) = active.file.set_len(active.allocated) {
                tracing::warn!(path = %active.path.display(), error = %e, "could not cut the partial preallocation");
            }
            return;
        }
        active.allocated = to;
    }

    fn roll_due(&self, active: &Active) -> bool {
        let Some((since, hour)) = active.first_row else { return false };
        active.bytes >= self.cfg.roll.max_bytes
            || since.elapsed() >= self.cfg.roll.max_age
            || micros(SystemTime::now()).div_euclid(HOUR_US) != hour
    }

    /// Seals the active segment when it is due, once its successor is durable. A failure to
    /// create the successor (say, the KEK is unreachable) leaves the active segment in place.
    fn maybe_roll(&mut self) {
        let due = self.active.as_ref().is_some_and(|a| self.roll_due(a));
        if !due || self.roll_retry_at.is_some_and(|t| Instant::now() < t) {
            return;
        }
        if let Err(e) = self.sync_active() {
            self.abandon(&e);
            return;
        }
        match self.create_segment(Duration::ZERO) {
            Ok(next) => {
                self.roll_retry_at = None;
                self.roll_backoff = ROLL_BACKOFF_MIN;
                if let Some(old) = self.active.replace(next) {
                    self.seal_whole(old);
                }
            }
            Err(e) => {
                // Back off (with jitter) instead of retrying on every batch; the current segment
                // keeps growing meanwhile.
                let jittered = self.roll_backoff.mul_f64(0.5 + rand::random::<f64>() / 2.0);
                self.roll_retry_at = Some(Instant::now() + jittered);
                self.roll_backoff = (self.roll_backoff * 2).min(ROLL_BACKOFF_MAX);
                tracing::warn!(error = %e, retry_in = ?jittered, "could not start a new WAL segment; the current one keeps growing");
            }
        }
    }

    /// Graceful end: open intents become `unknown` rows (whatever the quota says: they are owed),
    /// the active segment is fsynced and, when it holds rows, handed to the shipper.
    ///
    /// When those rows cannot be made durable (the WAL is failing), nothing is handed to the
    /// shipper: the segments holding the open intents stay on disk, and the next start's
    /// recovery turns the intents into `unknown` rows. The error says so.
    fn finish(&mut self) -> Result<(), AuditError> {
        // Rows already written become durable first, so that the intents they complete are not
        // also recorded as `unknown`.
        if let Err(e) = self.sync_active() {
            self.abandon(&e);
        }
        let leftovers: Vec<Prepared> = self.open_intents.values().cloned().collect();
        let open = leftovers.len();
        if !leftovers.is_empty() {
            let cmds = leftovers
                .into_iter()
                .map(|mut p| {
                    let id = p.columns.event_id;
                    p.columns = unknown_outcome(p.columns, SystemTime::now());
                    Command::Row { prepared: p, intent: Some(id), ack: None }
                })
                .collect();
            self.quota_exempt = true;
            self.process(cmds);
            self.quota_exempt = false;
        }
        if let Err(e) = self.sync_active() {
            self.abandon(&e);
        }
        if !self.open_intents.is_empty() || (self.active.is_none() && open > 0) {
            let kept = self.open_intents.len().max(open);
            let reason = format!(
                "{kept} open intent(s) could not be recorded as `unknown` rows ({}); their WAL segments stay on disk and the next start records them",
                self.shared.failure().unwrap_or_else(|| "the WAL is not writable".into())
            );
            tracing::error!(open_intents = kept, "audit WAL: {reason}");
            return Err(self.unavailable(&reason));
        }
        self.shared.metrics.unknown_outcomes.inc_by(open as u64);
        if let Some(active) = self.active.take() {
            if active.rows > 0 {
                self.seal_whole(active);
            } else {
                trim(&active);
                self.active = Some(active);
            }
        }
        for sealed in std::mem::take(&mut self.pending_seal) {
            self.hand_to_shipper(sealed);
        }
        match self.shared.failure() {
            Some(reason) => Err(self.unavailable(&reason)),
            None => Ok(()),
        }
    }
}

/// Writes zeros into `file` from `from` to `to` (positioned writes: the file's cursor, where
/// frames are appended, does not move).
fn write_zeros(file: &File, from: u64, to: u64) -> std::io::Result<()> {
    let mut at = from;
    while at < to {
        let n = usize::try_from(to - at).unwrap_or(usize::MAX).min(ZEROS.len());
        file.write_all_at(&ZEROS[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Cuts a segment leaving the writer to its frames: the zeros preallocated after them, and after
/// a failed write whatever part of it reached the file (nothing after `bytes` was acknowledged).
/// Best effort: readers take what is left as unwritten space or a torn tail.
fn trim(active: &Active) {
    if let Err(e) = active.file.set_len(active.bytes) {
        tracing::warn!(path = %active.path.display(), error = %e, "could not trim a WAL segment's unwritten space");
    }
}

/// Seals `compressed` (`None`: the row has no payload, stored empty) under the active segment's
/// key with the row's associated data, links the row into its table's chain (in `chains`, by
/// [`Table::index`]) and appends its frame to `buf`. The chain moves only when the frame is
/// encoded.
fn append_row<C: TableRow>(
    active: &mut Active,
    writer_id: &str,
    chains: &mut [ChainPos; Table::COUNT],
    columns: C,
    compressed: Option<&[u8]>,
    (logged_at_us, intent): (i64, Option<uuid::Uuid>),
    buf: &mut Vec<u8>,
) -> Result<(), AuditError> {
    let i = C::TABLE.index();
    let aad = C::aad(writer_id, active.first_seqs[i], &columns.event_id());
    let payload = match compressed {
        Some(c) => active.key.seal(&aad, c)?,
        None => Vec::new(),
    };
    let chain = &mut chains[i];
    let hash = C::chain_hash(&chain.head, writer_id, chain.next_seq, &columns, &payload);
    let row = WalRow { seq: chain.next_seq, prev_hash: chain.head, hash, logged_at_us, intent, columns, payload };
    encode_row(&row, buf)?;
    chain.next_seq += 1;
    chain.head = hash;
    Ok(())
}

/// What went wrong, without the "WAL cannot be written" frame that [`AuditError::WalUnavailable`]
/// adds: the stored failure is wrapped in that frame again when it is reported.
fn bare_reason(err: &AuditError) -> String {
    match err {
        AuditError::WalUnavailable { reason, .. } => reason.clone(),
        other => other.to_string(),
    }
}

/// The same error for every caller of a failed batch (errors are not `Clone`).
fn clone_unavailable(err: &AuditError, shared: &Shared) -> AuditError {
    match err {
        AuditError::QuotaExceeded { used, quota } => AuditError::QuotaExceeded { used: *used, quota: *quota },
        AuditError::WalUnavailable { dir, reason } => {
            AuditError::WalUnavailable { dir: dir.clone(), reason: reason.clone() }
        }
        other => AuditError::WalUnavailable { dir: shared.dir.clone(), reason: other.to_string() },
    }
}
