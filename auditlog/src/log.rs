//! [`AuditLog`]: the handle the proxy records through.
//!
//! Invariants: `record_intent` returns only after the intent is fsynced; `record` returns after
//! its row is fsynced under `durability: sync`; every error that means "not durable" answers
//! `is_unavailable()`; `open` recovers the WAL before accepting anything.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

use tokio::sync::{mpsc, oneshot};

use crate::config::{AuditConfig, Durability};
use crate::crypto::{KeyEncryptionKey, SigningKey};
use crate::error::AuditError;
use crate::exchange::{Exchange, IntentId};
use crate::lake::{Lake, check_writer_id};
use crate::metrics::Metrics;
use crate::payload::{RedactedRequest, prepare_completing, prepare_intent};
use crate::shipper::{Backoff, Shipper};
use crate::wal::faults::WalFaults;
use crate::wal::recovery::recover;
use crate::wal::state::{DirLock, lock_dir, writer_id};
use crate::wal::writer::{Command, QueueRoom, Queued, Shared, StartPoint, Writer, WriterConfig};

/// The audit log. Cheap to clone; `Send + Sync`.
#[derive(Clone, Debug)]
pub struct AuditLog {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    /// Bounded (`audit.queue_capacity`): the request path never blocks on it (see `send`).
    /// Boxed: a bounded std channel allocates (and touches) all its slots up front, and an
    /// unboxed command is hundreds of bytes (65,536 of them took 40 MiB at start).
    tx: std::sync::mpsc::SyncSender<Box<Queued>>,
    queue_capacity: usize,
    /// Room within `audit.queue_max_bytes`, one permit per byte (see `send`).
    room: Arc<tokio::sync::Semaphore>,
    queue_max_bytes: u32,
    queue_wait: std::time::Duration,
    /// Prepares large records off the async workers.
    prep: crate::prep::PrepPool,
    shared: Arc<Shared>,
    durability: Durability,
    zstd_level: i32,
    writer_id: String,
    lake: Lake,
    /// For reading the log's own `webhooks` rows back ([`AuditLog::read_webhooks`]).
    kek: Arc<dyn KeyEncryptionKey>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    shipper: Mutex<Option<tokio::task::JoinHandle<()>>>,
    shutdown_timeout: std::time::Duration,
    max_lake_lag: std::time::Duration,
    checkpoints: crate::checkpoint::Publisher,
    _lock: DirLock,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").field("writer_id", &self.writer_id).field("lake", &self.lake).finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens the WAL (recovering it), starts the writer thread and the lake shipper. With
    /// `enabled: false`, returns a log that records nothing.
    pub async fn open(
        config: &AuditConfig,
        kek: Arc<dyn KeyEncryptionKey>,
        signing_key: SigningKey,
    ) -> Result<AuditLog, AuditError> {
        if !config.enabled {
            return Ok(AuditLog { inner: None });
        }
        let lake = Lake::open(&config.lake, &config.s3, config.multipart_threshold_bytes)?;
        AuditLog::open_with_lake(config, lake, kek, signing_key).await
    }

    /// [`AuditLog::open`] with a lake the caller built (a store wrapped for fault injection,
    /// say; see [`crate::lake_faults`]).
    pub async fn open_with_lake(
        config: &AuditConfig,
        lake: Lake,
        kek: Arc<dyn KeyEncryptionKey>,
        signing_key: SigningKey,
    ) -> Result<AuditLog, AuditError> {
        if !config.enabled {
            return Ok(AuditLog { inner: None });
        }
        config.validate()?;
        let dir = config.wal_dir.clone();
        let lock = lock_dir(&dir)?;
        let (writer_id, configured) = writer_id(&dir, config.writer_id.as_deref())?;
        check_writer_id(&writer_id)?;
        let recovery = recover(&dir, &writer_id, &kek, config.zstd_level).await?;
        for (path, cut) in &recovery.truncated {
            tracing::warn!(path = %path.display(), bytes = cut, "cut a torn WAL tail");
        }
        let next_segno = recovery.max_segno.map_or(1, |s| s + 1);
        let start = match recovery.start.clone() {
            Some(s) => s,
            None if configured => crate::shipper::start_from_lake(&lake, &writer_id, next_segno).await?,
            None => StartPoint { next_segno, chains: Default::default() },
        };
        let metrics = Metrics::default();
        let shared = Arc::new(Shared {
            dir: dir.clone(),
            quota: config.wal_quota_bytes,
            bytes_on_disk: Default::default(),
            failure: Mutex::new(None),
            metrics: metrics.clone(),
            faults: Arc::new(WalFaults::default()),
            backlog_segments: Default::default(),
            oldest_unshipped_us: Default::default(),
            set_aside: Mutex::new(Vec::new()),
        });
        for sealed in &recovery.sealed {
            shared.segment_sealed(sealed.sealed_at_us);
        }
        shared.add_bytes(recovery.bytes_on_disk);
        metrics.unknown_outcomes.inc_by(recovery.unknown_rows.len() as u64);

        let prep = crate::prep::PrepPool::per_core()?;
        // `validate` keeps it within a u32; clamped all the same for a config that skipped it.
        let queue_max_bytes = u32::try_from(config.queue_max_bytes).unwrap_or(u32::MAX);
        // Carries only sealed segments' names (one per roll): small whatever the traffic.
        let (ship_tx, ship_rx) = mpsc::unbounded_channel();
        let (tx, rx) = std::sync::mpsc::sync_channel(config.queue_capacity);
        let writer = Writer::new(
            WriterConfig {
                writer_id: writer_id.clone(),
                durability: config.durability,
                async_flush_interval: config.async_flush_interval,
                roll: config.roll.clone(),
            },
            kek.clone(),
            tokio::runtime::Handle::current(),
            shared.clone(),
            ship_tx,
            start,
        );
        let (ready_tx, ready_rx) = oneshot::channel();
        let unknown_rows = recovery.unknown_rows;
        let thread = std::thread::Builder::new()
            .name("keygate-audit-wal".into())
            .spawn(move || {
                let mut writer = writer;
                let started = writer.start().and_then(|()| writer.append_recovered(unknown_rows));
                let ok = started.is_ok();
                if !ok {
                    writer.discard_unused_segment();
                }
                let _ = ready_tx.send(started);
                if ok {
                    writer.run(rx);
                }
            })
            .map_err(|e| AuditError::WalUnavailable {
                dir: dir.clone(),
                reason: format!("cannot start the WAL thread: {e}"),
            })?;
        ready_rx.await.map_err(|_| AuditError::Closed)??;

        let checkpoints = crate::checkpoint::Publisher::open(
            &config.checkpoints,
            &lake.display,
            config.multipart_threshold_bytes,
            config.lake_timeout,
        )?;
        let shipper = Shipper {
            lake: lake.clone(),
            writer_id: writer_id.clone(),
            shared: shared.clone(),
            signing_key,
            backoff: Backoff { initial: config.retry_initial_backoff, max: config.retry_max_backoff },
            head: Default::default(),
            attempt_timeout: config.lake_timeout,
            checkpoints: checkpoints.clone(),
            tree_rebuild_failed: [false; crate::Table::COUNT],
        };
        // Keeps the lag gauge current between scrapes of /readyz (ends with the log).
        let lag_gauge = {
            let shared = Arc::downgrade(&shared);
            tokio::spawn(async move {
                while let Some(shared) = shared.upgrade() {
                    shared.lake_lag_seconds();
                    drop(shared);
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            })
        };
        drop(lag_gauge);
        let shipper = tokio::spawn(shipper.run(ship_rx, recovery.sealed));
        tracing::info!(writer_id = %writer_id, lake = %lake.display, "audit log open");
        Ok(AuditLog {
            inner: Some(Arc::new(Inner {
                tx,
                queue_capacity: config.queue_capacity,
                room: Arc::new(tokio::sync::Semaphore::new(queue_max_bytes as usize)),
                queue_max_bytes,
                queue_wait: config.queue_wait,
                prep,
                shared,
                durability: config.durability,
                zstd_level: config.zstd_level,
                writer_id,
                lake,
                kek,
                thread: Mutex::new(Some(thread)),
                shipper: Mutex::new(Some(shipper)),
                shutdown_timeout: config.shutdown_timeout,
                max_lake_lag: config.max_lake_lag,
                checkpoints,
                _lock: lock,
            })),
        })
    }

    /// A log that records nothing (`audit.enabled: false`).
    pub fn disabled() -> AuditLog {
        AuditLog { inner: None }
    }

    /// The newest signed checkpoint of each of this log's trees (one per table with rows):
    /// `(table, writer, signed note text)`, as the admin listener serves them.
    pub fn checkpoints(&self) -> Vec<(crate::Table, String, String)> {
        self.inner.as_ref().map(|i| i.checkpoints.newest()).unwrap_or_default()
    }

    /// Whether this log records anything.
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// This instance's writer id (`None` when disabled).
    pub fn writer_id(&self) -> Option<&str> {
        self.inner.as_ref().map(|i| i.writer_id.as_str())
    }

    /// The metrics, for callers that want to read them directly.
    pub fn metrics(&self) -> Option<&Metrics> {
        self.inner.as_ref().map(|i| &i.shared.metrics)
    }

    /// Registers the audit metrics.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        if let Some(i) = &self.inner {
            i.shared.metrics.register(registry);
        }
    }

    /// The WAL's fault injection ([`crate::wal::faults`]), for tests that make writes, fsyncs or
    /// segment creations fail; `None` when the log is disabled.
    pub fn wal_faults(&self) -> Option<Arc<WalFaults>> {
        self.inner.as_ref().map(|i| i.shared.faults.clone())
    }

    /// `Ok` while the lake keeps up: the oldest sealed WAL segment has waited less than
    /// `audit.max_lake_lag`. For `/readyz` only; requests are still served while the WAL absorbs
    /// the backlog (up to `wal_quota_bytes`, where [`AuditLog::is_ready`] fails).
    pub fn lake_lag(&self) -> Result<(), String> {
        let Some(i) = &self.inner else { return Ok(()) };
        let lag = i.shared.lake_lag_seconds();
        let max = i.max_lake_lag.as_secs();
        if lag > i64::try_from(max).unwrap_or(i64::MAX) {
            let backlog = i.shared.backlog_segments.load(std::sync::atomic::Ordering::SeqCst);
            return Err(format!(
                "audit lake lagging: the oldest of {backlog} sealed WAL segment(s) has waited {lag} s for the lake, over audit.max_lake_lag ({max} s); check the lake store (keygate_audit_lake_failures_total)"
            ));
        }
        Ok(())
    }

    /// The segments the shipper set aside after a permanent lake error (for `/readyz`): each
    /// is a gap in the lake until an operator resolves it (docs/audit-lake.md, "Set-aside
    /// segments").
    pub fn set_aside(&self) -> Vec<String> {
        self.inner.as_ref().and_then(|i| i.shared.set_aside.lock().ok().map(|v| v.clone())).unwrap_or_default()
    }

    /// `Ok` when the WAL is writable and under its quota; the reason otherwise (for `/readyz`).
    pub fn is_ready(&self) -> Result<(), String> {
        let Some(i) = &self.inner else { return Ok(()) };
        if let Some(reason) = i.shared.failure() {
            return Err(format!("audit WAL not writable: {reason}"));
        }
        let used = i.shared.bytes_on_disk.load(std::sync::atomic::Ordering::SeqCst);
        if used > i.shared.quota {
            return Err(format!(
                "audit WAL backlog {used} bytes is over wal_quota_bytes {}: the lake is not keeping up",
                i.shared.quota
            ));
        }
        Ok(())
    }

    /// Queues a record for the WAL writer. Two bounds keep the queue's memory in check: room
    /// within `audit.queue_max_bytes`, waited for up to `audit.queue_wait` (backpressure: the
    /// request path slows to the writer's pace; counted in `keygate_audit_queue_waits_total`),
    /// and `audit.queue_capacity` records, never waited for. A record that gets past neither is
    /// an unavailable error (counted in `keygate_audit_queue_full_total`), never memory growth.
    async fn send(&self, i: &Inner, cmd: Command) -> Result<(), AuditError> {
        // A record larger than the whole bound waits for an empty queue instead of never fitting.
        let bytes = u32::try_from(cmd.queued_bytes()).unwrap_or(u32::MAX).min(i.queue_max_bytes);
        let permit = match i.room.clone().try_acquire_many_owned(bytes) {
            Ok(permit) => permit,
            Err(tokio::sync::TryAcquireError::Closed) => return Err(AuditError::Closed),
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                i.shared.metrics.queue_waits.inc();
                match tokio::time::timeout(i.queue_wait, i.room.clone().acquire_many_owned(bytes)).await {
                    Ok(Ok(permit)) => permit,
                    Ok(Err(_)) => return Err(AuditError::Closed),
                    Err(_) => {
                        i.shared.metrics.queue_full.inc();
                        return Err(AuditError::WalUnavailable {
                            dir: i.shared.dir.clone(),
                            reason: format!(
                                "the records waiting for the WAL writer hold audit.queue_max_bytes ({} bytes) and this one \
                                 found no room within audit.queue_wait ({:?}): the WAL disk is stalled or too slow",
                                i.queue_max_bytes, i.queue_wait
                            ),
                        });
                    }
                }
            }
        };
        let room = QueueRoom::new(permit, i.shared.metrics.queue_bytes.clone());
        i.tx.try_send(Box::new(Queued { cmd, room: Some(room) })).map_err(|error| match error {
            std::sync::mpsc::TrySendError::Full(_) => {
                i.shared.metrics.queue_full.inc();
                AuditError::WalUnavailable {
                    dir: i.shared.dir.clone(),
                    reason: format!(
                        "the queue to the WAL writer is full ({} records waiting, audit.queue_capacity)",
                        i.queue_capacity
                    ),
                }
            }
            std::sync::mpsc::TrySendError::Disconnected(_) => AuditError::Closed,
        })
    }

    /// Records the intent of a mutation before it is forwarded; durable when this returns.
    pub async fn record_intent(&self, intent: &Exchange) -> Result<IntentId, AuditError> {
        let Some(i) = &self.inner else { return Ok(IntentId::new(intent.event_id, None)) };
        let (prepared, kept) = prepare_counted(i, intent, Prep::Intent).await?;
        let (ack, done) = oneshot::channel();
        self.send(i, Command::Intent { prepared, ack }).await?;
        done.await.map_err(|_| AuditError::Closed)??;
        Ok(IntentId::new(intent.event_id, kept.map(Box::new)))
    }

    /// Records an exchange (completing `intent` if given). Under `sync` returns after the row is
    /// fsynced; under `async` returns once queued.
    pub async fn record(&self, exchange: Exchange, intent: Option<IntentId>) -> Result<(), AuditError> {
        let Some(i) = &self.inner else { return Ok(()) };
        let (intent, kept) = match intent {
            Some(intent) => (Some(intent.event_id()), intent.request),
            None => (None, None),
        };
        let (prepared, _) = prepare_counted(i, &exchange, Prep::Completing(kept)).await?;
        match i.durability {
            Durability::Sync => {
                let (ack, done) = oneshot::channel();
                self.send(i, Command::Row { prepared, intent, ack: Some(ack) }).await?;
                done.await.map_err(|_| AuditError::Closed)?
            }
            Durability::Async => {
                self.is_ready().map_err(|reason| AuditError::WalUnavailable { dir: i.shared.dir.clone(), reason })?;
                self.send(i, Command::Row { prepared, intent, ack: None }).await
            }
        }
    }

    /// Records a webhook event or delivery outcome in the `webhooks` table. Returns when the row
    /// is durable: fsynced for `received` and `duplicate` rows always (the 2xx to Stripe waits
    /// for it) and for every row under `durability: sync`, sharing group commit with egress rows;
    /// queued under `async` otherwise. An error that `is_unavailable()` means the row is not
    /// durable: answer Stripe 503 so that it retries.
    pub async fn record_webhook(&self, record: crate::webhook::WebhookRecord) -> Result<(), AuditError> {
        let Some(i) = &self.inner else { return Ok(()) };
        let size = record.body.as_ref().map_or(0, Bytes::len);
        let level = i.zstd_level;
        let (prepared, failed) = if size < crate::prep::OFFLOAD_BYTES {
            crate::webhook::prepare_webhook(&record, level)?
        } else {
            let record = record.clone();
            i.prep.run(move || crate::webhook::prepare_webhook(&record, level)).await??
        };
        crate::wal::segment::check_payload_fits(prepared.compressed.as_ref().map_or(0, Vec::len))?;
        if failed {
            i.shared.metrics.redaction_failures.inc();
            tracing::error!(event_id = %record.event_id, "webhook redaction failed; the row records fixed fields only");
        }
        let sync = record.kind.always_durable();
        if sync || i.durability == Durability::Sync {
            let (ack, done) = oneshot::channel();
            self.send(i, Command::WebhookRow { prepared, sync, ack: Some(ack) }).await?;
            done.await.map_err(|_| AuditError::Closed)?
        } else {
            self.is_ready().map_err(|reason| AuditError::WalUnavailable { dir: i.shared.dir.clone(), reason })?;
            self.send(i, Command::WebhookRow { prepared, sync, ack: None }).await
        }
    }

    /// Records an anomaly detector's alert (or shadow-mode record) as a row of the `anomalies`
    /// table, under a fresh UUIDv7 `event_id` which it returns. Durable as `audit.durability`
    /// says: under `sync` it returns once the row is fsynced (sharing group commit with the other
    /// tables), under `async` once queued. Never panics and waits for room in the queue at most
    /// `audit.queue_wait`: a full queue, a WAL over its quota or a closed log is an error (the
    /// alert is still logged and counted by the caller). A disabled log records nothing and
    /// returns a fresh id.
    pub async fn record_anomaly(&self, alert: &keygate_detectors::Alert) -> Result<uuid::Uuid, AuditError> {
        let Some(i) = &self.inner else { return Ok(uuid::Uuid::now_v7()) };
        let (prepared, failed) = crate::anomaly::prepare_anomaly(alert, i.zstd_level)?;
        crate::wal::segment::check_payload_fits(prepared.compressed.len())?;
        let id = prepared.columns.event_id;
        if failed {
            i.shared.metrics.redaction_failures.inc();
            tracing::error!(event_id = %id, "anomaly redaction failed; the row records fixed fields only");
        }
        match i.durability {
            Durability::Sync => {
                let (ack, done) = oneshot::channel();
                self.send(i, Command::AnomalyRow { prepared, ack: Some(ack) }).await?;
                done.await.map_err(|_| AuditError::Closed)??;
            }
            Durability::Async => {
                self.is_ready().map_err(|reason| AuditError::WalUnavailable { dir: i.shared.dir.clone(), reason })?;
                self.send(i, Command::AnomalyRow { prepared, ack: None }).await?;
            }
        }
        Ok(id)
    }

    /// Reads `webhooks` rows back from this log's lake with its KEK, decrypted (and redacted):
    /// for a replay beyond the ingress's local retention (see
    /// [`crate::webhook::read_webhooks`]; files under a KEK this instance no longer has need that
    /// function with a ring of the old keys). Empty when the log is disabled.
    pub async fn read_webhooks(
        &self,
        filter: &crate::webhook::WebhookFilter,
    ) -> Result<Vec<crate::webhook::StoredWebhook>, AuditError> {
        let Some(i) = &self.inner else { return Ok(Vec::new()) };
        let ring = crate::crypto::KekRing::new(vec![i.kek.clone()]);
        crate::webhook::read_webhooks(&i.lake, &ring, filter).await
    }

    /// Stops accepting records, commits everything the WAL holds into the lake (for at most
    /// `shutdown_timeout`), and returns. What could not be committed stays in the WAL for the
    /// next start.
    pub async fn shutdown(self) -> Result<(), AuditError> {
        let Some(i) = self.inner else { return Ok(()) };
        let (ack, done) = oneshot::channel();
        // Shutdown always gets through: it waits for room in the queue (on a blocking thread,
        // while the WAL thread drains it) instead of failing like a record would.
        let tx = i.tx.clone();
        let sent = tokio::task::spawn_blocking(move || {
            tx.send(Box::new(Queued { cmd: Command::Shutdown { ack }, room: None })).is_ok()
        })
        .await;
        let writer_result = match sent {
            Ok(true) => done.await.unwrap_or(Err(AuditError::Closed)),
            _ => Err(AuditError::Closed),
        };
        let thread = i.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        let shipper = i.shipper.lock().ok().and_then(|mut s| s.take());
        if let Some(handle) = shipper {
            let abort = handle.abort_handle();
            if tokio::time::timeout(i.shutdown_timeout, handle).await.is_err() {
                abort.abort();
                return Err(AuditError::Lake {
                    op: "commit on shutdown",
                    path: i.lake.display.clone(),
                    source: object_store::Error::Generic {
                        store: "lake",
                        source: format!(
                            "not everything was committed within {:?}; the rest stays in the WAL and is committed on the next start",
                            i.shutdown_timeout
                        )
                        .into(),
                    },
                });
            }
        }
        writer_result
    }
}

/// Which record [`prepare_counted`] prepares.
enum Prep {
    /// An intent: its redacted request is kept for the completing row.
    Intent,
    /// Any other row, with the redacted request of the intent it completes, if any.
    Completing(Option<Box<RedactedRequest>>),
}

impl Prep {
    fn run(&self, ex: &Exchange, level: i32) -> PrepResult {
        match self {
            Prep::Intent => prepare_intent(ex, level),
            Prep::Completing(kept) => {
                prepare_completing(ex, level, kept.as_deref()).map(|(prepared, failed)| (prepared, failed, None))
            }
        }
    }
}

type PrepResult = Result<(crate::wal::writer::Prepared, bool, Option<RedactedRequest>), AuditError>;

/// Prepares an exchange's record (on the pool when it is large, see [`crate::prep`]), counting
/// (and logging, by event id only) rows whose redaction failed.
async fn prepare_counted(
    i: &Inner,
    ex: &Exchange,
    what: Prep,
) -> Result<(crate::wal::writer::Prepared, Option<RedactedRequest>), AuditError> {
    let size = ex.request.body.len() + ex.response.as_ref().map_or(0, |r| r.body.len());
    let level = i.zstd_level;
    let (prepared, failed, kept) = if size < crate::prep::OFFLOAD_BYTES {
        what.run(ex, level)?
    } else {
        // Bodies are shared (`Bytes`), so the copy for the pool costs the headers and strings.
        let ex = ex.clone();
        i.prep.run(move || what.run(&ex, level)).await??
    };
    crate::wal::segment::check_payload_fits(prepared.compressed.len())?;
    if failed {
        i.shared.metrics.redaction_failures.inc();
        tracing::error!(event_id = %ex.event_id, "audit redaction failed; the row records fixed fields only");
    }
    Ok((prepared, kept))
}
