//! The validated policy model: what a policy file means once it has been loaded.
//!
//! Everything here is immutable after loading. A `ServicePolicy` also carries a per-operation
//! index of the rules that can apply to each operation of the Stripe table, built once at load
//! time so that `decide()` looks at only those rules.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::operations::operations;
use crate::params::NameFilter;
use crate::pattern::{OperationPattern, TemplateMatch};

/// `enforce` (denials are returned to the client) or `report` (denials are recorded as
/// `would_deny` and the request goes through).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Deny what the policy does not allow. The default.
    Enforce,
    /// Let everything through, but record what would have been denied.
    Report,
}

impl Mode {
    /// `enforce` or `report`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Report => "report",
        }
    }
}

/// What keygate does about `Idempotency-Key` on mutations (`POST`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdempotencyMode {
    /// A `POST` without `Idempotency-Key` is rejected (400 `keygate_idempotency_key_required`).
    Require,
    /// A `POST` without `Idempotency-Key` gets a fresh one from keygate.
    Inject,
    /// Nothing is checked or added. The default.
    Off,
}

impl IdempotencyMode {
    /// `require`, `inject` or `off`.
    pub fn as_str(&self) -> &'static str {
        match self {
            IdempotencyMode::Require => "require",
            IdempotencyMode::Inject => "inject",
            IdempotencyMode::Off => "off",
        }
    }
}

/// Whether a rule allows or denies what it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    /// The request is allowed (subject to rate limit, idempotency and budgets).
    Allow,
    /// The request is denied.
    Deny,
}

/// Which Stripe key mode a rule applies to: the key keygate would inject is a test key or a
/// live key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyMode {
    /// Only when the service's key is a test key.
    Test,
    /// Only when the service's key is a live key.
    Live,
    /// Either. The default.
    Any,
}

/// A condition on a `Stripe-Account` or `Stripe-Context` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderCondition {
    /// The header must be absent. The default: no connected accounts unless a rule says so.
    Absent,
    /// Anything, including absent.
    Any,
    /// The header must be one of `values`, or absent when `allow_absent`.
    OneOf {
        /// Allowed header values (e.g. `acct_1Nv0...`).
        values: Vec<String>,
        /// The list contained `none`: requests without the header also match.
        allow_absent: bool,
    },
}

impl HeaderCondition {
    pub(crate) fn matches(&self, value: Option<&str>) -> bool {
        match (self, value) {
            (HeaderCondition::Any, _) => true,
            (HeaderCondition::Absent, None) => true,
            (HeaderCondition::Absent, Some(_)) => false,
            (HeaderCondition::OneOf { allow_absent, .. }, None) => *allow_absent,
            (HeaderCondition::OneOf { values, .. }, Some(v)) => values.iter().any(|a| a == v),
        }
    }
}

/// A condition on one request parameter (name normalised, see [`crate::params`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParamCondition {
    /// Normalised parameter name: `amount`, `metadata[order_id]`, `items[][price]`, `expand`.
    pub name: String,
    /// Every value must be an integer ≥ this.
    pub min: Option<i64>,
    /// Every value must be an integer ≤ this.
    pub max: Option<i64>,
    /// Every value must match one of these (ASCII case-insensitive, `*` is a wildcard).
    pub allowed: Option<Vec<String>>,
    /// No value may match any of these (ASCII case-insensitive, `*` is a wildcard).
    pub denied: Vec<String>,
    /// The parameter must be present.
    pub required: bool,
    /// Neither the parameter nor anything nested under it may be present.
    pub forbidden: bool,
}

impl ParamCondition {
    /// Whether this condition needs the parameter to be present to hold.
    pub(crate) fn needs_presence(&self) -> bool {
        self.required || self.min.is_some() || self.max.is_some() || self.allowed.is_some()
    }
}

/// One rule of a service policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Unique within the service; names the rule in decisions, logs and audit rows.
    pub id: String,
    /// Allow or deny.
    pub effect: Effect,
    /// The operations the rule is about (any of them).
    pub operations: Vec<OperationPattern>,
    /// Parameter conditions; all must hold.
    pub params: Vec<ParamCondition>,
    /// `Stripe-Account` condition (default: header absent).
    pub stripe_account: HeaderCondition,
    /// `Stripe-Context` condition (default: header absent).
    pub stripe_context: HeaderCondition,
    /// Test or live key (default: any).
    pub key_mode: KeyMode,
    /// The rule also applies to requests that match no operation of the Stripe table.
    pub unknown_operations: bool,
    /// Why the rule exists; shown in denials it makes.
    pub reason: Option<String>,
    /// Line of the rule in its file (0 when built in code).
    pub line: u64,
}

impl Rule {
    /// True when the rule checks parameters, so the body must be parsed to evaluate it.
    pub fn needs_params(&self) -> bool {
        !self.params.is_empty()
    }
}

/// A token bucket: `per_second` requests on average, bursts up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Sustained requests per second (may be fractional: 0.5 is one every two seconds).
    pub per_second: f64,
    /// Bucket size.
    pub burst: u32,
}

/// A money budget: at most `max` (in the currency's smallest unit) per rolling `window`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    /// Lower-case ISO currency code.
    pub currency: String,
    /// Ceiling of the sum of `amount` over the window, smallest currency unit (cents).
    pub max: i64,
    /// Length of the rolling window.
    pub window: Duration,
}

/// One service's policy.
#[derive(Debug, Clone)]
pub struct ServicePolicy {
    /// Service name (the `service` key).
    pub name: String,
    /// File the policy came from (empty for built-in policies).
    pub file: PathBuf,
    /// `sha256:<64 hex>` hashes of the service's keygate tokens.
    pub token_hashes: Vec<String>,
    /// mTLS identities: a URI SAN as is (`spiffe://…`) or `dns:<name>` for a DNS SAN.
    pub mtls_identities: Vec<String>,
    /// Secret reference of the Stripe key to inject, as written (the proxy resolves it).
    pub stripe_key: String,
    /// `enforce` or `report`.
    pub mode: Mode,
    /// Idempotency-Key handling for mutations.
    pub idempotency: IdempotencyMode,
    /// Request rate limit (counted in the proxy's limit store: shared by every replica with Redis).
    pub rate_limit: Option<RateLimit>,
    /// Money budgets, one per currency (counted in the proxy's limit store).
    pub budgets: Vec<Budget>,
    /// Ordered rules; the first that matches decides.
    pub rules: Vec<Rule>,
    pub(crate) index: RuleIndex,
    /// The parameter names this policy's rules can look at.
    pub(crate) names: NameFilter,
}

impl ServicePolicy {
    /// The file name to show people ("ask the owner of policy file X").
    pub fn file_name(&self) -> String {
        match self.file.file_name() {
            Some(name) => name.to_string_lossy().into_owned(),
            None => format!("{} (built in)", self.name),
        }
    }

    /// The budget for `currency`, if the service has one.
    pub fn budget(&self, currency: &str) -> Option<&Budget> {
        self.budgets.iter().find(|b| b.currency == currency)
    }

    /// Builds the per-operation rule index; call after `rules` is final.
    pub(crate) fn with_index(mut self) -> ServicePolicy {
        self.index = RuleIndex::build(&self.rules);
        let conditions = self.rules.iter().flat_map(|r| r.params.iter());
        self.names = NameFilter::new(
            conditions.clone().map(|c| c.name.clone()),
            conditions.filter(|c| c.forbidden).map(|c| c.name.clone()),
        );
        self
    }
}

/// A rule that can apply to an operation; `path_check` when the rule's pattern has a literal
/// where the template has a parameter, so the real path decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Candidate {
    pub rule: u32,
    pub path_check: bool,
}

/// Per operation of the table (by [`crate::Operation::index`]), the rules that can apply, in
/// policy order; and the rules that opt in to unknown operations.
#[derive(Debug, Clone, Default)]
pub(crate) struct RuleIndex {
    pub per_operation: Vec<Vec<Candidate>>,
    pub unknown: Vec<u32>,
}

impl RuleIndex {
    pub(crate) fn build(rules: &[Rule]) -> RuleIndex {
        let ops = operations();
        let mut per_operation = vec![Vec::new(); ops.len()];
        for (rule_idx, rule) in rules.iter().enumerate() {
            let Ok(rule_no) = u32::try_from(rule_idx) else {
                break;
            };
            for (op_idx, op) in ops.iter().enumerate() {
                let mut best = TemplateMatch::No;
                for pattern in &rule.operations {
                    match pattern.match_template(op) {
                        TemplateMatch::Yes => {
                            best = TemplateMatch::Yes;
                            break;
                        }
                        TemplateMatch::DependsOnPath => best = TemplateMatch::DependsOnPath,
                        TemplateMatch::No => {}
                    }
                }
                if best != TemplateMatch::No {
                    per_operation[op_idx]
                        .push(Candidate { rule: rule_no, path_check: best == TemplateMatch::DependsOnPath });
                }
            }
        }
        let unknown = rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.unknown_operations)
            .filter_map(|(i, _)| u32::try_from(i).ok())
            .collect();
        RuleIndex { per_operation, unknown }
    }
}
