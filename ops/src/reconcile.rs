//! `keygate reconcile`: closing `outcome = unknown` rows (keygate stopped between forwarding a
//! mutation and recording Stripe's answer).
//!
//! [`plan`] decides, for each unknown row of the period, what closes it, in this order:
//! 1. already closed: a `reconciled` row links to it (a rerun does nothing twice);
//! 2. resolved by the client: a later `completed` row of the same service with the same
//!    `Idempotency-Key` (the SDK retried, and Stripe answered that retry);
//! 3. re-send: the row is within Stripe's idempotency window ([`IDEMPOTENCY_WINDOW`]), carries an
//!    `Idempotency-Key`, and its recorded request is complete (redaction changed nothing in it):
//!    sent again with the same key, Stripe answers with the first attempt's result if it went
//!    through, or performs it now — either way exactly once;
//! 4. otherwise `needs_review`, with what a person needs to find it in the Stripe Dashboard.
//!
//! The caller (the `keygate` binary, which can send through its own pipeline) acts on the plan.
//! Each resolution is a new row with outcome `reconciled` whose `reconciles` column holds the
//! `event_id` of the unknown row; the unknown row is never changed.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use serde::Serialize;

use crate::lake::{RecordedRequest, RecordedRow};

/// How long Stripe keeps an idempotency key's answer.
pub const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// The outcome of a resolution row.
pub const OUTCOME_RECONCILED: &str = "reconciled";

/// What closes one unknown row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// A `reconciled` row already links to it.
    AlreadyReconciled { by: String },
    /// A later completed request with the same key: link to it, send nothing.
    ResolvedByClient { by: String, status: u16, request_id: Option<String> },
    /// Send it again with its `Idempotency-Key`.
    Resend,
    /// A person must look: why, and what to look for.
    NeedsReview { why: String },
}

impl Action {
    /// `already_reconciled`, `resolved_by_client`, `resend`, `needs_review`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Action::AlreadyReconciled { .. } => "already_reconciled",
            Action::ResolvedByClient { .. } => "resolved_by_client",
            Action::Resend => "resend",
            Action::NeedsReview { .. } => "needs_review",
        }
    }
}

/// One unknown row and what closes it.
#[derive(Debug, Clone, Serialize)]
pub struct PlanItem {
    pub event_id: String,
    /// Arrival time, RFC 3339.
    pub time: String,
    pub service: Option<String>,
    pub operation: Option<String>,
    pub method: String,
    /// The recorded (redacted) path.
    pub path: String,
    pub idempotency_key: Option<String>,
    /// `Stripe-Account` (the connected account), when the request named one.
    pub stripe_account: Option<String>,
    pub livemode: Option<bool>,
    #[serde(flatten)]
    pub action: Action,
    /// The recorded request, for a re-send.
    #[serde(skip)]
    pub request: Option<RecordedRequest>,
    #[serde(skip)]
    pub unknown_id: uuid::Uuid,
}

/// What to do about every unknown row among `rows` (arrival order), at time `now_us`.
pub fn plan(rows: &[RecordedRow], now_us: i64) -> Vec<PlanItem> {
    let reconciled: BTreeMap<uuid::Uuid, String> = rows
        .iter()
        .filter(|r| r.columns.outcome == OUTCOME_RECONCILED)
        .filter_map(|r| Some((r.columns.reconciles?, r.columns.event_id.to_string())))
        .collect();
    let window = i64::try_from(IDEMPOTENCY_WINDOW.as_micros()).unwrap_or(i64::MAX);
    let mut seen_keys: HashSet<(String, String)> = HashSet::new();
    let mut out = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let c = &row.columns;
        if c.outcome != "unknown" {
            continue;
        }
        let key = c.idempotency_key.clone();
        let action = if let Some(by) = reconciled.get(&c.event_id) {
            Action::AlreadyReconciled { by: by.clone() }
        } else if let Some(later) = key.as_ref().and_then(|key| {
            rows[i + 1..].iter().find(|r| {
                r.columns.outcome == "completed"
                    && r.columns.service == c.service
                    && r.columns.idempotency_key.as_ref() == Some(key)
                    && r.columns.received_at_us >= c.received_at_us
            })
        }) {
            Action::ResolvedByClient {
                by: later.columns.event_id.to_string(),
                status: later.columns.status,
                request_id: later.columns.request_id.clone(),
            }
        } else {
            needs_review(row, now_us, window).unwrap_or(Action::Resend)
        };
        // Two unknown rows with one key (a retry that was cut off too): re-send once only.
        let action = match (&action, &c.service, &key) {
            (Action::Resend, Some(service), Some(key)) if !seen_keys.insert((service.clone(), key.clone())) => {
                Action::NeedsReview {
                    why: "another unknown row with the same Idempotency-Key is re-sent in this run; check that one"
                        .to_owned(),
                }
            }
            _ => action,
        };
        out.push(PlanItem {
            event_id: c.event_id.to_string(),
            time: crate::rfc3339(c.received_at_us),
            service: c.service.clone(),
            operation: c.operation.clone(),
            method: c.method.clone(),
            path: c.path.clone(),
            idempotency_key: key,
            stripe_account: c.stripe_account.clone(),
            livemode: c.livemode,
            action,
            request: row.request.clone(),
            unknown_id: c.event_id,
        });
    }
    out
}

/// Why a row cannot be re-sent, if it cannot.
fn needs_review(row: &RecordedRow, now_us: i64, window: i64) -> Option<Action> {
    let c = &row.columns;
    let why = if c.service.is_none() {
        "the row names no service".to_owned()
    } else if c.idempotency_key.is_none() {
        "the request carried no Idempotency-Key, so sending it again could do it twice".to_owned()
    } else if now_us.saturating_sub(c.received_at_us) >= window {
        "older than Stripe's 24-hour idempotency window: a re-send could do it twice".to_owned()
    } else {
        match &row.request {
            None => format!(
                "the recorded request is not available ({})",
                row.not_decrypted.as_deref().unwrap_or("payload not decrypted")
            ),
            Some(request) if !request.is_complete() => {
                "the recorded request is incomplete (redaction masked or dropped part of it), so it cannot be sent again"
                    .to_owned()
            }
            Some(_) => return None,
        }
    };
    Some(Action::NeedsReview { why })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(outcome: &str, key: Option<&str>, reconciles: Option<uuid::Uuid>) -> RecordedRow {
        let mut ex = keygate_auditlog::Exchange::new(uuid::Uuid::now_v7(), "POST", "/v1/charges");
        ex.service = Some("checkout".into());
        ex.idempotency_key = key.map(str::to_owned);
        ex.reconciles = reconciles;
        let (mut columns, _) = keygate_auditlog::row::redact_exchange(&ex);
        columns.outcome = outcome.to_owned();
        RecordedRow { writer_id: "w".into(), seq: 1, columns, request: None, not_decrypted: None }
    }

    #[test]
    fn an_unknown_row_named_by_a_reconciled_rows_column_is_already_closed_and_only_that_one() {
        let unknown = row("unknown", Some("k1"), None);
        let other = row("unknown", None, None);
        let resolution = row(OUTCOME_RECONCILED, Some("k1"), Some(unknown.columns.event_id));
        let rows = vec![unknown.clone(), other, resolution.clone()];
        let plan = plan(&rows, unknown.columns.received_at_us);
        assert_eq!(plan.len(), 2, "the reconciled row is not itself an unknown one");
        assert_eq!(plan[0].action, Action::AlreadyReconciled { by: resolution.columns.event_id.to_string() });
        assert!(matches!(plan[1].action, Action::NeedsReview { .. }), "{:?}", plan[1].action);
    }
}
