//! The decider: `PolicyEngine::decide()` turns one request of one service into a `Decision`.
//!
//! Order of checks: rate limit, rules (first match wins, default deny), idempotency, budget.
//! In `enforce` mode the first failing check decides. In `report` mode every request goes
//! through: the verdict is `would_deny` with the first failing check, and money that moves is
//! still charged to the budget.
//!
//! Rate limits and budgets are counted in a limit store (`keygate-limits`), which the engine
//! never calls: it says what must be acquired ([`PolicyEngine::plan_rate_limit`], from the head
//! alone, before the body is read) and what must be charged ([`Decision::charge`], from
//! [`PolicyEngine::evaluate`]); the proxy does both in its store and hands the results back
//! ([`PolicyEngine::rate_limited`], [`PolicyEngine::apply_charge`]), which turn them into the
//! same decisions as before. [`PolicyEngine::decide`] (and `rate_limit_from_head`,
//! `decide_after_rate_limit`) do all of it against the engine's own in-memory state, on the same
//! arithmetic: that is what `keygate policy test` and the engine's tests run.
//!
//! Invariants: no I/O; the body is parsed at most once, and only when a rule that could apply
//! has parameter conditions or the request is a `POST` (amount and currency for budgets and the
//! audit row); reasons never contain a request value other than amount, currency and the
//! operation; `&self` everywhere, so one engine serves all tasks.

use std::sync::{Arc, PoisonError};

use arc_swap::ArcSwap;
use keygate_limits::{ChargeOutcome, ChargeRequest, ManualClock, MemoryLimits, RateOutcome, RateSpec, SystemClock};

use crate::conditions::{self, Failure};
use crate::limits::{budget_key, rate_spec};
use crate::model::{Effect, IdempotencyMode, Mode, ServicePolicy};
use crate::operations::{Operation, is_normal_path, match_operation};
use crate::params::{NameFilter, RequestParams};
use crate::set::PolicySet;

/// Operations whose `amount` counts against a service's budgets: creating a payment intent, a
/// charge, a refund, a transfer or a payout.
pub const MONEY_MOVING_OPERATIONS: &[&str] =
    &["POST /v1/payment_intents", "POST /v1/charges", "POST /v1/refunds", "POST /v1/transfers", "POST /v1/payouts"];

/// What the decider needs to know about a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    /// HTTP method, upper case.
    pub method: &'a str,
    /// Path without the query string.
    pub path: &'a str,
    /// Query string, without `?`.
    pub query: Option<&'a str>,
    /// `Content-Type` header.
    pub content_type: Option<&'a str>,
    /// Request body (may be empty).
    pub body: &'a [u8],
    /// `Stripe-Account` header.
    pub stripe_account: Option<&'a str>,
    /// `Stripe-Context` header.
    pub stripe_context: Option<&'a str>,
    /// `Idempotency-Key` header.
    pub idempotency_key: Option<&'a str>,
    /// The key keygate would inject for this service is a live key.
    pub livemode: bool,
}

/// The outcome of a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Forward the request.
    Allow,
    /// Refuse it with [`Decision::denial`].
    Deny,
    /// Report mode: it would have been denied; forward it anyway and record this.
    WouldDeny,
}

impl Verdict {
    /// `allow`, `deny` or `would_deny`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::WouldDeny => "would_deny",
        }
    }

    /// The request goes to Stripe (`allow` and `would_deny`).
    pub fn forwards(&self) -> bool {
        !matches!(self, Verdict::Deny)
    }
}

/// The error the client gets (or, in report mode, would get). Stripe-shaped: the proxy renders
/// `{"error":{"type":"invalid_request_error","code":code,"message":message}}` with `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// HTTP status: 403, 429 or 400.
    pub status: u16,
    /// `keygate_policy_denied`, `keygate_rate_limited`, `keygate_budget_exceeded` or
    /// `keygate_idempotency_key_required`.
    pub code: &'static str,
    /// Names the rule and the reason, and says what to do.
    pub message: String,
}

/// Denial code: a rule (or the default deny) refused the request.
pub const CODE_POLICY_DENIED: &str = "keygate_policy_denied";
/// Denial code: the service's rate limit is exhausted.
pub const CODE_RATE_LIMITED: &str = "keygate_rate_limited";
/// Denial code: a money budget would be exceeded.
pub const CODE_BUDGET_EXCEEDED: &str = "keygate_budget_exceeded";
/// Denial code: the service must send `Idempotency-Key` on mutations.
pub const CODE_IDEMPOTENCY_KEY_REQUIRED: &str = "keygate_idempotency_key_required";

/// A decision, with what the log line, metrics and audit row need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Allow, deny or would-deny.
    pub verdict: Verdict,
    /// The rule that decided: a policy rule id, or `default-deny`, `rate-limit`,
    /// `budget:<currency>`, `budget:unpriced`, `idempotency`, `unknown-service`.
    pub rule: String,
    /// Short and human; never a request value other than amount, currency and operation.
    pub reason: String,
    /// `POST /v1/payment_intents`; `None` when the request matches no Stripe operation.
    pub operation: Option<&'static str>,
    /// `amount` of the request, when present (v2: `amount[value]`).
    pub amount: Option<i64>,
    /// `currency` of the request, lower case, when present (v2: `amount[currency]`).
    pub currency: Option<String>,
    /// Set for `deny` and `would_deny`.
    pub denial: Option<Denial>,
    /// Idempotency mode `inject`, a `POST` without `Idempotency-Key`, and the request goes
    /// through: the proxy adds a fresh key.
    pub inject_idempotency_key: bool,
    /// The budget charge this request needs before it may be forwarded (a money-moving request
    /// of a service with a budget in its currency, going upstream), from
    /// [`PolicyEngine::evaluate`]: the caller charges it in its store and hands the outcome to
    /// [`PolicyEngine::apply_charge`]. `None` when nothing is to be charged, or once charged.
    pub charge: Option<Box<ChargeRequest>>,
}

/// Whether a request's rate-limit token was already taken from its head
/// ([`PolicyEngine::rate_limit_from_head`]); tells [`PolicyEngine::decide_after_rate_limit`]
/// not to take a second one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimitToken {
    /// Not taken yet: the decision takes one (what [`PolicyEngine::decide`] does).
    Pending,
    /// Taken from the head (or the service has no rate limit): the decision takes no other.
    Taken,
    /// The bucket was empty at the head and the service is in `report` mode, so the request
    /// goes on: the decision is `would_deny` with rule `rate-limit`.
    Exceeded,
}

/// What the head check must acquire, from [`PolicyEngine::plan_rate_limit`].
#[derive(Debug, Clone, PartialEq)]
pub enum HeadPlan {
    /// Refuse at once (an unknown service).
    Refuse(Decision),
    /// The service has no rate limit: go on with [`RateLimitToken::Taken`].
    Unlimited,
    /// Take one request of this rate from the store: allowed → go on with
    /// [`RateLimitToken::Taken`]; limited → [`PolicyEngine::rate_limited`].
    Acquire(RateSpec),
}

/// What [`PolicyEngine::rate_limit_from_head`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadCheck {
    /// Read the body, fetch the key, then decide with
    /// [`PolicyEngine::decide_after_rate_limit`] and this token.
    Continue(RateLimitToken),
    /// Refuse now, before the body is read: a `deny` decision with rule `rate-limit` (429
    /// `keygate_rate_limited`) or `unknown-service`.
    Refuse(Decision),
}

/// The body, parsed on first use.
pub(crate) struct LazyParams<'a> {
    facts: &'a RequestFacts<'a>,
    names: &'a NameFilter,
    parsed: Option<RequestParams<'a>>,
}

impl<'a> LazyParams<'a> {
    pub(crate) fn new(facts: &'a RequestFacts<'a>, names: &'a NameFilter) -> LazyParams<'a> {
        LazyParams { facts, names, parsed: None }
    }

    pub(crate) fn get(&mut self) -> &RequestParams<'a> {
        let (facts, names) = (self.facts, self.names);
        self.parsed.get_or_insert_with(|| {
            RequestParams::parse_with(facts.path, facts.query, facts.content_type, facts.body, Some(names))
        })
    }

    pub(crate) fn parsed(&self) -> Option<&RequestParams<'a>> {
        self.parsed.as_ref()
    }
}

/// A policy set, plus the in-memory rate limiters and budgets that [`decide`](Self::decide)
/// counts in. `Send + Sync`; share it.
#[derive(Debug)]
pub struct PolicyEngine {
    /// Lock-free reads on the request path; `replace` swaps the whole snapshot.
    current: ArcSwap<Snapshot>,
    /// Serialises `replace`.
    replacing: std::sync::Mutex<()>,
    /// What `decide` (not the proxy, which has its store) counts in.
    memory: MemoryLimits,
}

#[derive(Debug)]
struct Snapshot {
    set: PolicySet,
}

impl PolicyEngine {
    /// An engine whose own counts follow the wall clock.
    pub fn new(set: PolicySet) -> PolicyEngine {
        PolicyEngine::with_memory(set, MemoryLimits::new(Arc::new(SystemClock)))
    }

    /// An engine whose own rate limits and budgets follow `clock` (tests, `keygate policy test`).
    pub fn with_manual_clock(set: PolicySet, clock: &ManualClock) -> PolicyEngine {
        PolicyEngine::with_memory(set, MemoryLimits::new(Arc::new(clock.clone())))
    }

    fn with_memory(set: PolicySet, memory: MemoryLimits) -> PolicyEngine {
        PolicyEngine { current: ArcSwap::from_pointee(Snapshot { set }), replacing: std::sync::Mutex::new(()), memory }
    }

    /// Hot reload: decisions from now on use `set`. Counts are kept by what they count (a
    /// service's rate limit by its rate and burst, a budget by service, currency and window), so
    /// an unchanged rate limit keeps its limiter, a budget with the same window keeps its
    /// spending (a new ceiling applies to it at once), and a changed rate or window starts
    /// afresh. In-flight `decide` calls finish on the set they started with.
    pub fn replace(&self, set: PolicySet) {
        let _one_at_a_time = self.replacing.lock().unwrap_or_else(PoisonError::into_inner);
        self.current.store(Arc::new(Snapshot { set }));
    }

    /// The set in force.
    pub fn policies(&self) -> PolicySet {
        self.snapshot().set.clone()
    }

    /// What [`decide`](Self::decide) has charged to `service`'s `currency` budget in the
    /// current window (the engine's own count, not the proxy's store).
    pub fn budget_spent(&self, service: &str, currency: &str) -> Option<i64> {
        let snapshot = self.snapshot();
        let policy = snapshot.set.service(service)?;
        let budget = policy.budgets.iter().find(|b| b.currency == currency)?;
        Some(self.memory.spent(&budget_key(service, budget)))
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// What the head check must acquire for `service` (before the body is read or a key is
    /// fetched): nothing, one request of its rate, or a refusal (an unknown service).
    pub fn plan_rate_limit(&self, service: &str, method: &str, path: &str) -> HeadPlan {
        let snapshot = self.current.load();
        let Some(policy) = snapshot.set.service(service) else {
            return HeadPlan::Refuse(unknown_service(service, match_operation(method, path)));
        };
        match policy.rate_limit {
            Some(rate) => HeadPlan::Acquire(rate_spec(rate)),
            None => HeadPlan::Unlimited,
        }
    }

    /// The store found `service` over its rate limit: in `enforce` mode the denial
    /// [`decide`](Self::decide) would have made (rule `rate-limit`, 429 `keygate_rate_limited`;
    /// no amount or currency, the body being unread); in `report` mode, go on with
    /// [`RateLimitToken::Exceeded`].
    pub fn rate_limited(&self, service: &str, method: &str, path: &str) -> HeadCheck {
        let snapshot = self.current.load();
        let operation = match_operation(method, path);
        let Some(policy) = snapshot.set.service(service) else {
            return HeadCheck::Refuse(unknown_service(service, operation));
        };
        let Some(rate) = policy.rate_limit else {
            return HeadCheck::Continue(RateLimitToken::Taken);
        };
        if policy.mode == Mode::Report {
            return HeadCheck::Continue(RateLimitToken::Exceeded);
        }
        let facts = RequestFacts {
            method,
            path,
            query: None,
            content_type: None,
            body: b"",
            stripe_account: None,
            stripe_context: None,
            idempotency_key: None,
            livemode: false,
        };
        let mut ctx = Ctx { policy, facts: &facts, operation, denied: None };
        deny_rate_limited(&mut ctx, rate);
        let Some(denied) = ctx.denied else {
            return HeadCheck::Continue(RateLimitToken::Exceeded);
        };
        HeadCheck::Refuse(Decision {
            verdict: Verdict::Deny,
            rule: denied.rule,
            reason: denied.reason,
            operation: operation.map(|op| op.name),
            amount: None,
            currency: None,
            denial: Some(denied.denial),
            inject_idempotency_key: false,
            charge: None,
        })
    }

    /// The cheap refusal, from the request head alone, against the engine's own rate limiters:
    /// [`plan_rate_limit`](Self::plan_rate_limit), acquired in memory, then
    /// [`rate_limited`](Self::rate_limited) when over. Returns the token to pass to
    /// [`decide_after_rate_limit`](Self::decide_after_rate_limit), which then takes no second one.
    pub fn rate_limit_from_head(&self, service: &str, method: &str, path: &str) -> HeadCheck {
        match self.plan_rate_limit(service, method, path) {
            HeadPlan::Refuse(decision) => HeadCheck::Refuse(decision),
            HeadPlan::Unlimited => HeadCheck::Continue(RateLimitToken::Taken),
            HeadPlan::Acquire(rate) => match self.memory.acquire(service, rate) {
                RateOutcome::Allowed => HeadCheck::Continue(RateLimitToken::Taken),
                RateOutcome::Limited { .. } => self.rate_limited(service, method, path),
            },
        }
    }

    /// Decides one request of `service` (the authenticated service name), taking its
    /// rate-limit token.
    pub fn decide(&self, service: &str, facts: &RequestFacts<'_>) -> Decision {
        self.decide_after_rate_limit(service, facts, RateLimitToken::Pending)
    }

    /// [`decide`](Self::decide) for a request whose rate-limit token `token` says whether it was
    /// already taken ([`rate_limit_from_head`](Self::rate_limit_from_head)): evaluates, then
    /// charges the budget in the engine's own memory.
    pub fn decide_after_rate_limit(&self, service: &str, facts: &RequestFacts<'_>, token: RateLimitToken) -> Decision {
        let decision = self.evaluate(service, facts, token);
        match decision.charge.clone() {
            Some(request) => {
                let outcome = self.memory.charge(&request);
                self.apply_charge(service, decision, &outcome)
            }
            None => decision,
        }
    }

    /// The decision before its budget is charged: [`Decision::charge`] names what the caller must
    /// charge (then [`apply_charge`](Self::apply_charge)). `token` says whether the rate-limit
    /// token was taken from the head; [`RateLimitToken::Pending`] takes it from the engine's own
    /// limiters.
    pub fn evaluate(&self, service: &str, facts: &RequestFacts<'_>, token: RateLimitToken) -> Decision {
        let snapshot = self.current.load();
        let operation = match_operation(facts.method, facts.path);
        let Some(policy) = snapshot.set.service(service) else {
            return unknown_service(service, operation);
        };
        let mut params = LazyParams::new(facts, &policy.names);
        let mut ctx = Ctx { policy, facts, operation, denied: None };

        // 1. Rate limit: every request of the service takes one token, here or from its head.
        if let Some(rate) = policy.rate_limit {
            let exceeded = match token {
                RateLimitToken::Pending => self.memory.acquire(service, rate_spec(rate)) != RateOutcome::Allowed,
                RateLimitToken::Taken => false,
                RateLimitToken::Exceeded => true,
            };
            if exceeded {
                deny_rate_limited(&mut ctx, rate);
            }
        }

        // 2. Rules.
        let mut allowed_by = None;
        if ctx.continues() {
            match evaluate_rules(policy, operation, facts, &mut params) {
                RulesOutcome::Allowed(rule) => allowed_by = Some(rule),
                RulesOutcome::Denied(rule) => {
                    let rule = &policy.rules[rule];
                    let reason = rule
                        .reason
                        .clone()
                        .unwrap_or_else(|| format!("rule `{}` denies {}", rule.id, ctx.operation_text()));
                    let advice = format!(
                        "If {} needs this call, ask the owner of policy file {} to change rule `{}`.",
                        policy.name,
                        policy.file_name(),
                        rule.id
                    );
                    ctx.deny(rule.id.clone(), reason, 403, CODE_POLICY_DENIED, advice);
                }
                RulesOutcome::NoRule { closest } => {
                    let reason = default_deny_reason(&ctx, closest, params.parsed());
                    let advice = format!(
                        "If {} needs this call, ask the owner of policy file {} to add a rule allowing {}.",
                        policy.name,
                        policy.file_name(),
                        ctx.operation_text()
                    );
                    ctx.deny("default-deny".to_owned(), reason, 403, CODE_POLICY_DENIED, advice);
                }
            }
        }

        let is_post = facts.method == "POST";
        // 3. Idempotency.
        if ctx.continues()
            && is_post
            && facts.idempotency_key.is_none()
            && policy.idempotency == IdempotencyMode::Require
        {
            ctx.deny(
                "idempotency".to_owned(),
                "POST without Idempotency-Key; this service must send one".to_owned(),
                400,
                CODE_IDEMPOTENCY_KEY_REQUIRED,
                "Send an Idempotency-Key header with every POST (the Stripe SDKs do when retries are enabled)."
                    .to_owned(),
            );
        }

        // Amount and currency for budgets and the audit row.
        let (amount, currency) = if is_post || params.parsed().is_some() {
            let p = params.get();
            (p.amount(), p.currency())
        } else {
            (None, None)
        };

        // 4. Budget: charged only for money that actually moves (by the caller, in its store).
        let money_moving = operation.is_some_and(|op| MONEY_MOVING_OPERATIONS.contains(&op.name));
        let charge = if money_moving && !policy.budgets.is_empty() && ctx.forwards() {
            budget_charge(&mut ctx, amount, currency.as_deref())
        } else {
            None
        };

        let verdict = match (&ctx.denied, policy.mode) {
            (None, _) => Verdict::Allow,
            (Some(_), Mode::Enforce) => Verdict::Deny,
            (Some(_), Mode::Report) => Verdict::WouldDeny,
        };
        let inject_idempotency_key = verdict.forwards()
            && is_post
            && facts.idempotency_key.is_none()
            && policy.idempotency == IdempotencyMode::Inject;
        let operation_name = operation.map(|op| op.name);
        match ctx.denied {
            Some(denied) => Decision {
                verdict,
                rule: denied.rule,
                reason: denied.reason,
                operation: operation_name,
                amount,
                currency,
                denial: Some(denied.denial),
                inject_idempotency_key,
                charge,
            },
            None => {
                let rule = allowed_by.map(|i| &policy.rules[i]);
                Decision {
                    verdict,
                    rule: rule.map(|r| r.id.clone()).unwrap_or_default(),
                    reason: match rule.and_then(|r| r.reason.as_deref()) {
                        Some(reason) => reason.to_owned(),
                        None => "allowed by rule".to_owned(),
                    },
                    operation: operation_name,
                    amount,
                    currency,
                    denial: None,
                    inject_idempotency_key,
                    charge,
                }
            }
        }
    }

    /// Applies the store's answer to a decision's [`charge`](Decision::charge): within the
    /// budget, the decision stands; over it, the request is denied (`enforce`) or reported
    /// `would_deny` (`report`, where the store charged it anyway) with rule `budget:<currency>`,
    /// unless an earlier check already failed (the first failing check is the one reported).
    pub fn apply_charge(&self, service: &str, mut decision: Decision, outcome: &ChargeOutcome) -> Decision {
        let Some(request) = decision.charge.take() else {
            return decision;
        };
        if !outcome.exceeded || decision.denial.is_some() {
            return decision;
        }
        let snapshot = self.current.load();
        let Some(policy) = snapshot.set.service(service) else {
            return unknown_service(service, operation_by_name_static(decision.operation));
        };
        let facts = RequestFacts {
            method: "POST",
            path: "",
            query: None,
            content_type: None,
            body: b"",
            stripe_account: None,
            stripe_context: None,
            idempotency_key: None,
            livemode: false,
        };
        let mut ctx = Ctx { policy, facts: &facts, operation: None, denied: None };
        let currency = &request.key.currency;
        ctx.deny(
            format!("budget:{currency}"),
            format!(
                "{currency} budget of {} per {} would be exceeded: {} spent, this request {}",
                request.max,
                humantime::format_duration(request.key.window),
                outcome.spent_before,
                request.amount
            ),
            403,
            CODE_BUDGET_EXCEEDED,
            format!(
                "Retry when earlier spending leaves the window, or ask the owner of policy file {} to raise the budget.",
                policy.file_name()
            ),
        );
        if let Some(denied) = ctx.denied {
            decision.verdict = match policy.mode {
                Mode::Enforce => Verdict::Deny,
                Mode::Report => Verdict::WouldDeny,
            };
            decision.rule = denied.rule;
            decision.reason = denied.reason;
            decision.denial = Some(denied.denial);
            decision.inject_idempotency_key = decision.inject_idempotency_key && decision.verdict.forwards();
        }
        decision
    }
}

/// The operation of a decision, looked up again by name (for a decision whose service vanished
/// in a reload between evaluation and charge).
fn operation_by_name_static(name: Option<&'static str>) -> Option<&'static Operation> {
    name.and_then(crate::operations::operation_by_name)
}

/// The first denial of a decision.
struct Denied {
    rule: String,
    reason: String,
    denial: Denial,
}

struct Ctx<'p, 'f> {
    policy: &'p ServicePolicy,
    facts: &'f RequestFacts<'f>,
    operation: Option<&'static Operation>,
    denied: Option<Denied>,
}

impl Ctx<'_, '_> {
    /// Keep checking: nothing denied yet, or report mode (later checks still charge budgets).
    fn continues(&self) -> bool {
        self.denied.is_none()
    }

    /// The request will reach Stripe.
    fn forwards(&self) -> bool {
        self.denied.is_none() || self.policy.mode == Mode::Report
    }

    fn operation_text(&self) -> String {
        match self.operation {
            Some(op) => op.name.to_owned(),
            None => format!("{} requests to this path (it matches no Stripe operation)", self.facts.method),
        }
    }

    fn deny(&mut self, rule: String, reason: String, status: u16, code: &'static str, advice: String) {
        if self.denied.is_some() {
            return;
        }
        let message = format!(
            "keygate {} this request of service {}: {reason} (rule {rule}). {advice}",
            if self.policy.mode == Mode::Report { "would deny" } else { "denied" },
            self.policy.name,
        );
        self.denied = Some(Denied { rule, reason, denial: Denial { status, code, message } });
    }
}

fn deny_rate_limited(ctx: &mut Ctx<'_, '_>, config: crate::model::RateLimit) {
    ctx.deny(
        "rate-limit".to_owned(),
        format!("rate limit of {}/s with bursts of {} exceeded", config.per_second, config.burst),
        429,
        CODE_RATE_LIMITED,
        "Slow down and retry with backoff.".to_owned(),
    );
}

fn unknown_service(service: &str, operation: Option<&'static Operation>) -> Decision {
    let reason = format!("service `{service}` has no policy");
    Decision {
        verdict: Verdict::Deny,
        rule: "unknown-service".to_owned(),
        operation: operation.map(|op| op.name),
        amount: None,
        currency: None,
        denial: Some(Denial {
            status: 403,
            code: CODE_POLICY_DENIED,
            message: format!(
                "keygate denied this request: {reason} (rule unknown-service). Ask the keygate operators to add a policy file for {service}."
            ),
        }),
        reason,
        inject_idempotency_key: false,
        charge: None,
    }
}

enum RulesOutcome {
    Allowed(usize),
    Denied(usize),
    /// No rule matched; `closest` is the first allow rule whose operation matched but whose
    /// conditions did not.
    NoRule {
        closest: Option<(usize, Failure)>,
    },
}

fn evaluate_rules(
    policy: &ServicePolicy,
    operation: Option<&'static Operation>,
    facts: &RequestFacts<'_>,
    params: &mut LazyParams<'_>,
) -> RulesOutcome {
    let mut closest = None;
    let mut consider = |rule_index: usize, params: &mut LazyParams<'_>| -> Option<RulesOutcome> {
        let rule = &policy.rules[rule_index];
        match conditions::evaluate(rule, facts, params) {
            Ok(()) => Some(match rule.effect {
                Effect::Allow => RulesOutcome::Allowed(rule_index),
                Effect::Deny => RulesOutcome::Denied(rule_index),
            }),
            Err(failure) => {
                if rule.effect == Effect::Allow && closest.is_none() {
                    closest = Some((rule_index, failure));
                }
                None
            }
        }
    };
    match operation {
        Some(op) => {
            let candidates = policy.index.per_operation.get(op.id).map(Vec::as_slice).unwrap_or_default();
            for candidate in candidates {
                let rule_index = candidate.rule as usize;
                if candidate.path_check
                    && !policy.rules[rule_index].operations.iter().any(|p| p.match_request(facts.method, facts.path))
                {
                    continue;
                }
                if let Some(outcome) = consider(rule_index, params) {
                    return outcome;
                }
            }
        }
        None => {
            // Unknown operations: only rules that opt in, and only for normal paths (a path
            // with `..` or empty segments could mean something else upstream).
            let normal = facts.path.strip_prefix('/').is_some_and(is_normal_path);
            if normal {
                for &rule in &policy.index.unknown {
                    let rule_index = rule as usize;
                    let matches =
                        policy.rules[rule_index].operations.iter().any(|p| p.match_request(facts.method, facts.path));
                    if matches && let Some(outcome) = consider(rule_index, params) {
                        return outcome;
                    }
                }
            }
        }
    }
    RulesOutcome::NoRule { closest }
}

fn default_deny_reason(
    ctx: &Ctx<'_, '_>,
    closest: Option<(usize, Failure)>,
    params: Option<&RequestParams<'_>>,
) -> String {
    let base = match ctx.operation {
        Some(op) => format!("no rule allows {}", op.name),
        None if !ctx.facts.path.strip_prefix('/').is_some_and(is_normal_path) => {
            "the path is not in normal form (empty, `.` or `..` segments, or encoded separators), so it matches no operation".to_owned()
        }
        None => format!(
            "{} to a path that matches no Stripe operation, and no rule allows unknown operations",
            ctx.facts.method
        ),
    };
    match closest {
        Some((rule_index, failure)) => {
            let rule = &ctx.policy.rules[rule_index];
            format!("{base}; rule `{}` does not apply because {}", rule.id, conditions::describe(rule, failure, params))
        }
        None => base,
    }
}

/// What a money-moving request must charge: `None` when the service has no budget in its
/// currency; a denial (`budget:unpriced`) when amount or currency cannot be read.
fn budget_charge(ctx: &mut Ctx<'_, '_>, amount: Option<i64>, currency: Option<&str>) -> Option<Box<ChargeRequest>> {
    let policy = ctx.policy;
    let (Some(amount), Some(currency)) = (amount, currency) else {
        ctx.deny(
            "budget:unpriced".to_owned(),
            "money-moving request without a readable `amount` and `currency`, so it cannot be counted against the budget".to_owned(),
            403,
            CODE_BUDGET_EXCEEDED,
            format!(
                "Send `amount` and `currency` explicitly; service {} has money budgets (policy file {}).",
                policy.name,
                policy.file_name()
            ),
        );
        return None;
    };
    let budget = policy.budgets.iter().find(|b| b.currency == currency)?;
    // Report mode: the request goes through, so its money moves and counts, over budget or not.
    Some(Box::new(ChargeRequest {
        key: budget_key(&policy.name, budget),
        max: budget.max,
        amount,
        force: policy.mode == Mode::Report,
    }))
}

/// How one rule fared against a request (for `explain`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleTrace {
    /// Rule id.
    pub rule: String,
    /// Line of the rule in its policy file.
    pub line: u64,
    /// `None` when the rule matches; otherwise why it does not apply.
    pub not_applied: Option<String>,
}

/// Every rule whose operation pattern covers the request, in policy order, with whether its
/// conditions hold. Ignores rate limits and budgets.
pub(crate) fn trace_rules(policy: &ServicePolicy, facts: &RequestFacts<'_>) -> Vec<RuleTrace> {
    let operation = match_operation(facts.method, facts.path);
    let mut params = LazyParams::new(facts, &policy.names);
    let rule_indexes: Vec<usize> = match operation {
        Some(op) => policy
            .index
            .per_operation
            .get(op.id)
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter(|c| {
                !c.path_check
                    || policy.rules[c.rule as usize]
                        .operations
                        .iter()
                        .any(|p| p.match_request(facts.method, facts.path))
            })
            .map(|c| c.rule as usize)
            .collect(),
        None if facts.path.strip_prefix('/').is_some_and(is_normal_path) => policy
            .index
            .unknown
            .iter()
            .map(|&r| r as usize)
            .filter(|&r| policy.rules[r].operations.iter().any(|p| p.match_request(facts.method, facts.path)))
            .collect(),
        None => Vec::new(),
    };
    rule_indexes
        .into_iter()
        .map(|i| {
            let rule = &policy.rules[i];
            let not_applied = conditions::evaluate(rule, facts, &mut params)
                .err()
                .map(|failure| conditions::describe(rule, failure, params.parsed()));
            RuleTrace { rule: rule.id.clone(), line: rule.line, not_applied }
        })
        .collect()
}
