//! `keygate reconcile`: closes the lake's `outcome = unknown` rows (see
//! [`keygate_ops::reconcile`] for how each is classified).
//!
//! Re-sends run **in this process, through keygate's own pipeline** ([`crate::pipeline::resend`]):
//! the configuration of the deployment (`--config`) gives the policies, the secret store and the
//! upstreams, so a re-sent request is decided by the policy in force, gets the service's key
//! injected, and is recorded with a durable intent first, exactly as a request through the
//! listener would be, without needing any service's token. Resolution rows are written by an
//! audit log of its own: writer id `<audit.writer_id>-reconcile` (`keygate-reconcile` when none is
//! configured) with its write-ahead log beside the proxy's (`<audit.wal_dir>-reconcile`), so that it
//! never shares a WAL or a hash chain with a running keygate; it is committed into the lake
//! before the command returns. The webhook ingress and the limit store are not started
//! (a re-send takes no rate-limit token and no budget charge: the first attempt's charge stayed).
//!
//! Invariants: nothing is sent or written without `--apply`; the unknown row is never changed;
//! a re-send carries the recorded `Idempotency-Key`, so Stripe performs the mutation at most once.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use keygate_auditlog::{Exchange, Outcome as AuditOutcome};
use keygate_ops::LakeReader;
use keygate_ops::reconcile::{Action, PlanItem, plan};
use keygate_secrets::SecretStore;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use uuid::Uuid;

use crate::pipeline::{ResendRequest, Resent, resend};

/// What can stop `keygate reconcile`.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Start(#[from] crate::run::StartError),
    #[error(transparent)]
    Ops(#[from] keygate_ops::OpsError),
    #[error("audit log: {0}")]
    Audit(#[from] keygate_auditlog::AuditError),
    #[error("secrets: {0}")]
    Secrets(#[from] keygate_secrets::SecretError),
    #[error("{0}")]
    Usage(String),
}

/// The command's arguments.
#[derive(Debug, Clone)]
pub struct ReconcileOptions {
    /// keygate's configuration (required with `apply`; gives the lake and KEK otherwise).
    pub config_file: Option<PathBuf>,
    /// The lake (default: `audit.lake` of the configuration).
    pub lake: Option<String>,
    /// KEK secret references (default: `audit.kek` of the configuration).
    pub kek: Vec<String>,
    /// `--since` text.
    pub since: String,
    /// Act (otherwise only say what would be done).
    pub apply: bool,
}

/// One unknown row, what closes it, and (with `apply`) what was done.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Resolution {
    #[serde(flatten)]
    pub item: PlanItem,
    /// `false` in a dry run, or when nothing was to be done.
    pub applied: bool,
    /// The unknown row is closed by what was applied: Stripe answered the re-send, or a later
    /// request of the client had. A refused or failed re-send leaves it open for the next run.
    pub closed: bool,
    /// The event id of the `reconciled` row written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reconciled_by: Option<String>,
    /// A re-send's answer: status and whether Stripe replayed the first attempt's result.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotent_replayed: Option<bool>,
}

impl Resolution {
    fn planned(item: PlanItem) -> Resolution {
        Resolution { item, applied: false, closed: false, reconciled_by: None, status: None, idempotent_replayed: None }
    }

    /// One line for a person.
    pub fn line(&self) -> String {
        let i = &self.item;
        let mut out = format!(
            "{} {} service={} {} idempotency_key={} account={}: {}",
            i.event_id,
            i.time,
            i.service.as_deref().unwrap_or("-"),
            i.operation.as_deref().unwrap_or(&i.method),
            i.idempotency_key.as_deref().unwrap_or("-"),
            i.stripe_account.as_deref().unwrap_or("-"),
            i.action.as_str()
        );
        match &i.action {
            Action::NeedsReview { why } => out.push_str(&format!(" ({why})")),
            Action::ResolvedByClient { by, status, .. } => out.push_str(&format!(" (by {by}, status {status})")),
            Action::AlreadyReconciled { by } => out.push_str(&format!(" (by {by})")),
            Action::Resend => {}
        }
        if self.applied {
            if let Some(status) = self.status {
                out.push_str(&format!(" -> {status}"));
                if self.idempotent_replayed == Some(true) {
                    out.push_str(" (Idempotent-Replayed: true)");
                }
            }
            if !self.closed {
                out.push_str(" (Stripe did not answer: still open, retried on the next run)");
            }
            if let Some(by) = &self.reconciled_by {
                out.push_str(&format!("; recorded as {by}"));
            }
        } else if matches!(i.action, Action::Resend | Action::ResolvedByClient { .. }) {
            out.push_str(" [dry run: pass --apply]");
        }
        out
    }
}

/// Runs the command.
pub async fn run(options: ReconcileOptions) -> Result<Vec<Resolution>, ReconcileError> {
    let since_us = keygate_ops::parse_since(&options.since)?;
    let config = match &options.config_file {
        Some(file) => {
            Some(crate::config::load(Some(file), &crate::config::process_env()).map_err(crate::run::StartError::from)?)
        }
        None => None,
    };
    if options.apply && config.is_none() {
        return Err(ReconcileError::Usage(
            "--apply needs --config (keygate's configuration: policies, keys, upstreams and the audit log it re-sends and records with)"
                .into(),
        ));
    }
    let lake = match (&options.lake, &config) {
        (Some(lake), _) => lake.clone(),
        (None, Some(config)) if !config.audit.lake.is_empty() => config.audit.lake.clone(),
        _ => return Err(ReconcileError::Usage("say which lake: --lake URL, or --config with audit.lake".into())),
    };
    let kek = match (&options.kek, &config) {
        (kek, _) if !kek.is_empty() => kek.clone(),
        (_, Some(config)) if !config.audit.kek.trim().is_empty() => vec![config.audit.kek.clone()],
        _ => Vec::new(),
    };
    let reader = match &config {
        Some(config) => {
            let store = SecretStore::new(&config.secrets).await?;
            LakeReader::open_with(&lake, &config.audit.s3, &store, &kek).await?
        }
        None => LakeReader::open(&lake, &kek).await?,
    };
    let rows = reader.read(since_us, &[], |_, _| {}).await?;
    let now = keygate_auditlog::row::micros(SystemTime::now());
    let items = plan(&rows, now);
    let mut out: Vec<Resolution> = items.into_iter().map(Resolution::planned).collect();
    let Some(mut config) = config.filter(|_| options.apply) else { return Ok(out) };
    if !out.iter().any(|r| matches!(r.item.action, Action::Resend | Action::ResolvedByClient { .. })) {
        return Ok(out);
    }
    // Its own audit writer and WAL, the lake it read, and nothing else of a running keygate.
    let writer = config.audit.writer_id.clone().unwrap_or_else(|| "keygate".to_owned());
    config.audit.writer_id = Some(format!("{writer}-reconcile"));
    let mut wal = config.audit.wal_dir.clone().into_os_string();
    wal.push("-reconcile");
    config.audit.wal_dir = PathBuf::from(wal);
    config.audit.lake = lake;
    config.webhooks = None;
    // Nor a running keygate's detectors (whose state file it would share) or background job.
    config.anomalies = None;
    config.reconcile.enabled = false;
    config.limit_store.kind = keygate_limits::StoreKind::Memory;
    let dir = config.policies.dir.clone().ok_or_else(|| {
        ReconcileError::Usage("the configuration names no policies.dir: a re-send needs the policies in force".into())
    })?;
    let policies = crate::run::load_policies(&dir)?;
    let gateway = crate::run::build_gateway(config, policies).await?;
    let mut failure = None;
    for resolution in &mut out {
        let result = apply(&gateway, resolution).await;
        if let Err(error) = result {
            failure = Some(error);
            break;
        }
    }
    let shutdown = gateway.audit.clone().shutdown().await;
    if let Some(error) = failure {
        return Err(error);
    }
    shutdown?;
    Ok(out)
}

async fn apply(gateway: &crate::gateway::Gateway, resolution: &mut Resolution) -> Result<(), ReconcileError> {
    let item = &resolution.item;
    match &item.action {
        Action::ResolvedByClient { status, request_id, .. } => {
            let event_id = Uuid::now_v7();
            let mut exchange = Exchange::new(event_id, &item.method, &item.path);
            exchange.service = item.service.clone();
            exchange.operation = item.operation.clone();
            exchange.stripe_account = item.stripe_account.clone();
            exchange.livemode = item.livemode;
            exchange.idempotency_key = item.idempotency_key.clone();
            exchange.request_id = request_id.clone();
            exchange.peer = "keygate-reconcile".to_owned();
            exchange.status = *status;
            exchange.outcome = AuditOutcome::Reconciled;
            exchange.reconciles = Some(item.unknown_id);
            // The later row is not named in the reason (a UUID there could meet the digit-run
            // redaction rule): it shares this row's Idempotency-Key.
            exchange.reason = Some(format!(
                "completed by a later request with the same Idempotency-Key (status {status}); nothing sent"
            ));
            gateway.audit.record(exchange, None).await?;
            resolution.applied = true;
            resolution.closed = true;
            resolution.reconciled_by = Some(event_id.to_string());
            resolution.status = Some(*status);
        }
        Action::Resend => {
            let (Some(service), Some(request)) = (&item.service, &item.request) else { return Ok(()) };
            let method = Method::from_bytes(request.method.as_bytes()).map_err(|_| {
                ReconcileError::Usage(format!("row {}: method {} unreadable", item.event_id, request.method))
            })?;
            let mut headers = HeaderMap::new();
            for (name, value) in &request.headers {
                let forwarded = keygate_wire::FORWARDED_HEADERS.contains(&name.as_str()) || name == "content-type";
                if !forwarded || value.contains(keygate_auditlog::redact::MASK) {
                    continue;
                }
                if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
                    headers.append(name, value);
                }
            }
            let event_id = Uuid::now_v7();
            let Resent { reply, closed } = resend(
                gateway,
                ResendRequest {
                    event_id,
                    service: service.clone(),
                    method,
                    path: request.path.clone(),
                    query: request.query.clone(),
                    headers,
                    body: Bytes::from(request.body.clone()),
                    unknown: item.unknown_id,
                },
            )
            .await;
            resolution.applied = true;
            resolution.closed = closed;
            resolution.reconciled_by = Some(event_id.to_string());
            resolution.status = Some(reply.status.as_u16());
            resolution.idempotent_replayed =
                Some(reply.headers.get("idempotent-replayed").is_some_and(|v| v.as_bytes() == b"true"));
        }
        Action::NeedsReview { .. } | Action::AlreadyReconciled { .. } => {}
    }
    Ok(())
}

/// The background job's metrics (registered only when `reconcile.enabled`).
#[derive(Debug, Default)]
pub struct ReconcileMetrics {
    open: Gauge,
    needs_review: Gauge,
    resolved: Counter,
    passes: Family<PassLabels, Counter>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct PassLabels {
    result: &'static str,
}

impl ReconcileMetrics {
    /// Registers the job's metrics.
    pub fn register(registry: &mut Registry) -> Arc<ReconcileMetrics> {
        let metrics = Arc::new(ReconcileMetrics::default());
        registry.register(
            "keygate_reconcile_unknown_open",
            "Unknown-outcome rows of the lookback still open after the last pass (needing review, or not closed by a re-send)",
            metrics.open.clone(),
        );
        registry.register(
            "keygate_reconcile_needs_review",
            "Unknown-outcome rows of the lookback that only a person can close, as of the last pass",
            metrics.needs_review.clone(),
        );
        registry.register(
            "keygate_reconcile_resolved",
            "Unknown-outcome rows closed by the background job (a `reconciled` row written)",
            metrics.resolved.clone(),
        );
        registry.register(
            "keygate_reconcile_passes",
            "Passes of the background reconcile job, by result (ok, error)",
            metrics.passes.clone(),
        );
        metrics
    }
}

/// What one pass found and did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassSummary {
    pub unknown: usize,
    pub resolved: usize,
    pub needs_review: usize,
    pub open: usize,
}

/// The background job: a pass every `reconcile.interval` until `stop` resolves (the first one
/// an interval after start, once keygate's own recovery has shipped its unknown rows).
///
/// Unlike `keygate reconcile`, it records through the running keygate's own audit writer. The
/// unknown rows it closed are remembered for the life of the process, so that a pass that runs
/// before its resolution rows have reached the lake does not re-send them again; one it could not
/// close (the policy in force refuses it, Stripe is unreachable) is re-sent on at most
/// [`MAX_ATTEMPTS`] passes, so that it does not add a refused row to the lake every interval.
pub async fn background(
    gateway: Arc<crate::gateway::Gateway>,
    metrics: Arc<ReconcileMetrics>,
    stop: impl std::future::Future<Output = ()>,
) {
    let interval = gateway.config.reconcile.interval;
    let mut attempts = Attempts::default();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return,
            () = tokio::time::sleep(interval) => {}
        }
        match pass(&gateway, &mut attempts).await {
            Ok(summary) => {
                metrics.passes.get_or_create(&PassLabels { result: "ok" }).inc();
                metrics.open.set(i64::try_from(summary.open).unwrap_or(i64::MAX));
                metrics.needs_review.set(i64::try_from(summary.needs_review).unwrap_or(i64::MAX));
                metrics.resolved.inc_by(summary.resolved as u64);
                tracing::info!(
                    unknown = summary.unknown,
                    resolved = summary.resolved,
                    needs_review = summary.needs_review,
                    open = summary.open,
                    "reconcile pass"
                );
            }
            Err(error) => {
                metrics.passes.get_or_create(&PassLabels { result: "error" }).inc();
                tracing::warn!(error = %error, "reconcile pass failed; the next one retries");
            }
        }
    }
}

/// How many passes of one process re-send an unknown row that stays open.
pub const MAX_ATTEMPTS: u32 = 3;

/// What the background job did to each unknown row, for the life of the process.
#[derive(Debug, Default)]
pub struct Attempts {
    closed: HashSet<Uuid>,
    tried: HashMap<Uuid, u32>,
}

/// One pass: read the lookback, plan, apply.
pub async fn pass(gateway: &crate::gateway::Gateway, attempts: &mut Attempts) -> Result<PassSummary, ReconcileError> {
    let config = &gateway.config;
    let kek: Vec<String> = if config.audit.kek.trim().is_empty() { Vec::new() } else { vec![config.audit.kek.clone()] };
    let reader = LakeReader::open_with(&config.audit.lake, &config.audit.s3, &gateway.secrets, &kek).await?;
    let lookback = i64::try_from(config.reconcile.lookback.as_micros()).unwrap_or(i64::MAX);
    let now = keygate_auditlog::row::micros(SystemTime::now());
    let rows = reader.read(now.saturating_sub(lookback), &[], |_, _| {}).await?;
    let mut summary = PassSummary::default();
    for item in plan(&rows, now) {
        summary.unknown += 1;
        if attempts.closed.contains(&item.unknown_id) || matches!(item.action, Action::AlreadyReconciled { .. }) {
            continue;
        }
        if matches!(item.action, Action::NeedsReview { .. }) {
            summary.needs_review += 1;
            summary.open += 1;
            continue;
        }
        let tried = attempts.tried.entry(item.unknown_id).or_default();
        if *tried >= MAX_ATTEMPTS {
            summary.open += 1;
            continue;
        }
        *tried += 1;
        let mut resolution = Resolution::planned(item);
        apply(gateway, &mut resolution).await?;
        if resolution.closed {
            attempts.closed.insert(resolution.item.unknown_id);
            summary.resolved += 1;
        } else {
            summary.open += 1;
        }
    }
    Ok(summary)
}
