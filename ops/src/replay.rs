//! `keygate policy replay`: what a candidate policy folder would have decided about every
//! request the lake recorded in a period, against what production decided.
//!
//! Requests are re-decided in arrival order by one [`PolicyEngine`] on a [`ManualClock`] that is
//! moved to each request's recorded arrival time, through the same calls the proxy makes (the
//! rate limit from the head, then the decision, then the budget charge): rate limits and budgets
//! count in the engine's memory with `keygate-limits`' window arithmetic, as they would have run.
//!
//! Each request ends up in one of four classes, per service × operation × rule (the candidate's
//! rule): newly denied (production let it through — `allow` or `would_deny` counts as let
//! through only when `allow`, see [`Change`]), newly allowed, unchanged, or undecidable (a rule
//! the candidate consults has a condition on a field the record holds only redacted, or the
//! payload could not be decrypted; the field is named).
//!
//! Rows not decided by a policy (unauthenticated requests, requests refused before their
//! decision: a malformed body, a secret store outage) are counted as skipped, though an
//! authenticated one still takes its rate-limit token, as it did in production.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use keygate_policies::{
    Decision, HeadCheck, ManualClock, PolicyEngine, PolicySet, RequestFacts, ServicePolicy, Verdict, match_operation,
};
use serde::Serialize;

use crate::OpsError;
use crate::lake::{RecordedRequest, RecordedRow};

/// What to replay.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// Rows received at or after this time (µs since the epoch).
    pub since_us: i64,
    /// Only these services (all when empty).
    pub services: Vec<String>,
}

/// How a request's decision changes under the candidate. A decision *lets a request through*
/// when it is `allow`; `deny` and `would_deny` (report mode) both count as the policy denying it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    NewlyDenied,
    NewlyAllowed,
    Unchanged,
    Undecidable,
}

impl Change {
    /// `newly_denied`, …
    pub fn as_str(self) -> &'static str {
        match self {
            Change::NewlyDenied => "newly_denied",
            Change::NewlyAllowed => "newly_allowed",
            Change::Unchanged => "unchanged",
            Change::Undecidable => "undecidable",
        }
    }

    const ALL: [Change; 4] = [Change::NewlyDenied, Change::NewlyAllowed, Change::Unchanged, Change::Undecidable];
}

/// One replayed request.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayedRow {
    pub event_id: String,
    /// Arrival time, RFC 3339.
    pub time: String,
    pub service: String,
    pub operation: String,
    pub old_decision: String,
    pub old_rule: Option<String>,
    pub new_decision: String,
    pub new_rule: String,
    pub change: Change,
    pub amount: Option<i64>,
    pub currency: Option<String>,
    /// For an undecidable request: the field, and why its value is not known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub undecidable: Option<String>,
}

/// Counts and money (per currency, in minor units) of one class.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub requests: u64,
    pub money: BTreeMap<String, i64>,
}

impl Tally {
    fn add(&mut self, amount: Option<i64>, currency: Option<&str>) {
        self.requests += 1;
        if let (Some(amount), Some(currency)) = (amount, currency) {
            let sum = self.money.entry(currency.to_owned()).or_default();
            *sum = sum.saturating_add(amount);
        }
    }
}

/// The classes of one service × operation × rule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub newly_denied: Tally,
    pub newly_allowed: Tally,
    pub unchanged: Tally,
    pub undecidable: Tally,
}

impl Summary {
    fn tally(&mut self, change: Change) -> &mut Tally {
        match change {
            Change::NewlyDenied => &mut self.newly_denied,
            Change::NewlyAllowed => &mut self.newly_allowed,
            Change::Unchanged => &mut self.unchanged,
            Change::Undecidable => &mut self.undecidable,
        }
    }

    fn get(&self, change: Change) -> &Tally {
        match change {
            Change::NewlyDenied => &self.newly_denied,
            Change::NewlyAllowed => &self.newly_allowed,
            Change::Unchanged => &self.unchanged,
            Change::Undecidable => &self.undecidable,
        }
    }
}

/// The result of a replay.
#[derive(Debug, Clone, Default)]
pub struct ReplayReport {
    /// Every re-decided request, in arrival order.
    pub rows: Vec<ReplayedRow>,
    /// (service, operation, candidate rule) → classes.
    pub summary: BTreeMap<(String, String, String), Summary>,
    /// Rows not decided by a policy in production (see the module doc).
    pub skipped: u64,
}

impl ReplayReport {
    /// Requests of one class.
    pub fn count(&self, change: Change) -> u64 {
        self.rows.iter().filter(|r| r.change == change).count() as u64
    }

    /// The changed decisions (newly denied or newly allowed), as JSON lines.
    pub fn jsonl(&self) -> String {
        let mut out = String::new();
        for row in self.rows.iter().filter(|r| matches!(r.change, Change::NewlyDenied | Change::NewlyAllowed)) {
            if let Ok(line) = serde_json::to_string(row) {
                out.push_str(&line);
                out.push('\n');
            }
        }
        out
    }

    /// The summary as a text table, then the undecidable fields.
    pub fn table(&self) -> String {
        let mut lines = vec![vec![
            "service".to_owned(),
            "operation".to_owned(),
            "rule".to_owned(),
            "newly denied".to_owned(),
            "newly allowed".to_owned(),
            "unchanged".to_owned(),
            "undecidable".to_owned(),
        ]];
        for ((service, operation, rule), summary) in &self.summary {
            let mut line = vec![service.clone(), operation.clone(), rule.clone()];
            line.extend(Change::ALL.iter().map(|c| cell(summary.get(*c))));
            lines.push(line);
        }
        let widths: Vec<usize> =
            (0..7).map(|i| lines.iter().map(|l| l[i].chars().count()).max().unwrap_or(0)).collect();
        let mut out = String::new();
        for line in &lines {
            let cells: Vec<String> =
                line.iter().zip(&widths).map(|(c, w)| format!("{c:<width$}", width = *w)).collect();
            out.push_str(cells.join("  ").trim_end());
            out.push('\n');
        }
        out.push_str(&format!(
            "\n{} requests replayed: {} newly denied, {} newly allowed, {} unchanged, {} undecidable; {} not decided by a policy (skipped)\n",
            self.rows.len(),
            self.count(Change::NewlyDenied),
            self.count(Change::NewlyAllowed),
            self.count(Change::Unchanged),
            self.count(Change::Undecidable),
            self.skipped
        ));
        let mut reasons: BTreeMap<&str, u64> = BTreeMap::new();
        for row in &self.rows {
            if let Some(reason) = &row.undecidable {
                *reasons.entry(reason.as_str()).or_default() += 1;
            }
        }
        for (reason, n) in reasons {
            out.push_str(&format!("undecidable: {reason} ({n} requests)\n"));
        }
        out
    }
}

fn cell(tally: &Tally) -> String {
    if tally.money.is_empty() {
        return tally.requests.to_string();
    }
    let money: Vec<String> = tally.money.iter().map(|(c, a)| format!("{c} {a}")).collect();
    format!("{} ({})", tally.requests, money.join(", "))
}

/// Loads the candidate folder (validated as `keygate policy check` does).
pub fn load_candidate(dir: &Path) -> Result<PolicySet, OpsError> {
    Ok(PolicySet::load_dir(dir)?)
}

/// Re-decides `rows` (in arrival order, as [`crate::LakeReader::read`] returns them) under
/// `candidate`.
pub fn replay(candidate: PolicySet, rows: &[RecordedRow], mut progress: impl FnMut(usize, usize)) -> ReplayReport {
    let clock = ManualClock::new();
    let engine = PolicyEngine::with_manual_clock(candidate.clone(), &clock);
    let mut now: i64 = 0;
    let mut report = ReplayReport::default();
    for (i, row) in rows.iter().enumerate() {
        progress(i + 1, rows.len());
        let c = &row.columns;
        // Outcome rows written by `keygate reconcile` are not requests.
        if c.outcome == "reconciled" {
            continue;
        }
        if c.received_at_us > now {
            clock.advance(Duration::from_micros(u64::try_from(c.received_at_us - now).unwrap_or(0)));
            now = c.received_at_us;
        }
        let Some(service) = c.service.as_deref() else {
            report.skipped += 1;
            continue;
        };
        let request = row.request.clone().unwrap_or_else(|| from_columns(row));
        let decided_by_policy = c.rule.is_some();
        let head = engine.rate_limit_from_head(service, &request.method, &request.path);
        if !decided_by_policy {
            report.skipped += 1;
            continue;
        }
        let facts = facts(&request, c.livemode.unwrap_or(false));
        let decision = match head {
            HeadCheck::Refuse(decision) => decision,
            HeadCheck::Continue(token) => engine.decide_after_rate_limit(service, &facts, token),
        };
        let undecidable = match (&row.request, candidate.service(service)) {
            (_, None) => None,
            (Some(recorded), Some(policy)) => undecidable_field(policy, &facts, &decision, recorded),
            (None, Some(policy)) => undecidable_without_payload(policy, &facts, &decision, row),
        };
        let old_denies = c.decision != Verdict::Allow.as_str();
        let new_denies = decision.verdict != Verdict::Allow;
        let change = match (undecidable.is_some(), old_denies, new_denies) {
            (true, _, _) => Change::Undecidable,
            (false, false, true) => Change::NewlyDenied,
            (false, true, false) => Change::NewlyAllowed,
            _ => Change::Unchanged,
        };
        let operation = decision
            .operation
            .map(str::to_owned)
            .or_else(|| c.operation.clone())
            .unwrap_or_else(|| format!("{} (no Stripe operation)", request.method));
        let amount = decision.amount.or(c.amount);
        let currency = decision.currency.clone().or_else(|| c.currency.clone());
        let replayed = ReplayedRow {
            event_id: c.event_id.to_string(),
            time: crate::rfc3339(c.received_at_us),
            service: service.to_owned(),
            operation: operation.clone(),
            old_decision: c.decision.clone(),
            old_rule: c.rule.clone(),
            new_decision: decision.verdict.as_str().to_owned(),
            new_rule: decision.rule.clone(),
            change,
            amount,
            currency: currency.clone(),
            undecidable,
        };
        report
            .summary
            .entry((service.to_owned(), operation, decision.rule.clone()))
            .or_default()
            .tally(change)
            .add(amount, currency.as_deref());
        report.rows.push(replayed);
    }
    report
}

/// What the policy engine reads of a recorded request. An `Idempotency-Key` keygate injected
/// itself (`keygate-…`, idempotency mode `inject`) is taken as absent: the client did not send it.
fn facts<'a>(request: &'a RecordedRequest, livemode: bool) -> RequestFacts<'a> {
    RequestFacts {
        method: &request.method,
        path: &request.path,
        query: request.query.as_deref(),
        content_type: request.header("content-type"),
        body: &request.body,
        stripe_account: request.header("stripe-account"),
        stripe_context: request.header("stripe-context"),
        idempotency_key: request.header("idempotency-key").filter(|k| !k.starts_with("keygate-")),
        livemode,
    }
}

/// A request rebuilt from the plaintext columns alone (no key, or a payload that did not open):
/// method, path, `Stripe-Account`, `Idempotency-Key`, and `amount` and `currency` as the only
/// parameters.
fn from_columns(row: &RecordedRow) -> RecordedRequest {
    let c = &row.columns;
    let (path, query) = match c.path.split_once('?') {
        Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
        None => (c.path.clone(), None),
    };
    let mut headers = vec![("content-type".to_owned(), "application/x-www-form-urlencoded".to_owned())];
    if let Some(account) = &c.stripe_account {
        headers.push(("stripe-account".to_owned(), account.clone()));
    }
    if let Some(key) = &c.idempotency_key {
        headers.push(("idempotency-key".to_owned(), key.clone()));
    }
    let mut pairs = Vec::new();
    if let Some(amount) = c.amount {
        pairs.push(("amount".to_owned(), amount.to_string()));
    }
    if let Some(currency) = &c.currency {
        pairs.push(("currency".to_owned(), currency.clone()));
    }
    RecordedRequest {
        method: c.method.clone(),
        path,
        query,
        headers,
        body: keygate_wire::form::serialize(&pairs).into_bytes(),
        body_omitted: None,
        masked: Default::default(),
        size_differs: false,
    }
}

/// The rules the candidate consulted for this decision, in policy order: those whose operation
/// pattern covers the request, up to the one that decided (all of them when the default deny or
/// a later check — idempotency, budget — decided, or none when the rate limit did).
fn consulted_rules<'p>(
    policy: &'p ServicePolicy,
    facts: &RequestFacts<'_>,
    decision: &Decision,
) -> Vec<&'p keygate_policies::Rule> {
    if decision.rule == "rate-limit" || decision.rule == "unknown-service" {
        return Vec::new();
    }
    let known = match_operation(facts.method, facts.path).is_some();
    let mut out = Vec::new();
    for rule in &policy.rules {
        let covers = (known || rule.unknown_operations)
            && rule.operations.iter().any(|p| p.match_request(facts.method, facts.path));
        if !covers {
            continue;
        }
        out.push(rule);
        if rule.id == decision.rule {
            break;
        }
    }
    out
}

fn undecidable_field(
    policy: &ServicePolicy,
    facts: &RequestFacts<'_>,
    decision: &Decision,
    recorded: &RecordedRequest,
) -> Option<String> {
    for rule in consulted_rules(policy, facts, decision) {
        for condition in &rule.params {
            if let Some(why) = recorded.field_unknown(&condition.name) {
                return Some(format!("rule `{}` checks `{}`, {why}", rule.id, condition.name));
            }
        }
    }
    // A budget needs the amount and currency.
    if decision.rule.starts_with("budget:") && recorded.body_omitted.is_some() {
        return Some("the budget needs `amount` and `currency`, but the body was not recorded".to_owned());
    }
    None
}

fn undecidable_without_payload(
    policy: &ServicePolicy,
    facts: &RequestFacts<'_>,
    decision: &Decision,
    row: &RecordedRow,
) -> Option<String> {
    let why = row.not_decrypted.as_deref().unwrap_or("payload not decrypted");
    for rule in consulted_rules(policy, facts, decision) {
        for condition in &rule.params {
            if condition.name != "amount" && condition.name != "currency" {
                return Some(format!("rule `{}` checks `{}`, {why}", rule.id, condition.name));
            }
        }
    }
    None
}
