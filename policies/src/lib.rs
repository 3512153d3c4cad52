//! keygate policies: the per-service policy model, the Stripe operation table and `decide()`.
//!
//! Pure: no I/O on the request path. The proxy authenticates a request to a service, builds
//! [`RequestFacts`] and asks a shared [`PolicyEngine`] for a [`Decision`]; the decision names
//! the rule that made it, and for denials carries the Stripe-shaped error the client gets.
//!
//! - [`operations`](mod@operations): the embedded Stripe operation table and [`match_operation`].
//! - [`PolicySet::load_dir`]: one YAML file per service, validated as a whole folder.
//! - [`PolicyEngine`]: rules, rate limits, budgets and idempotency; rate limits and budgets are
//!   named for the caller's limit store (`keygate-limits`), or counted in the engine's memory by
//!   [`PolicyEngine::decide`].
//! - [`check`], [`explain`], [`run_tests`]: the `keygate policy …` tools, as library functions.
//!
//! The policy grammar is documented in `docs/policies.md`.

mod conditions;
mod engine;
mod limits;
mod loader;
mod model;
pub mod operations;
pub mod params;
mod pattern;
mod schema;
mod set;
mod tools;

pub use engine::{
    CODE_BUDGET_EXCEEDED, CODE_IDEMPOTENCY_KEY_REQUIRED, CODE_POLICY_DENIED, CODE_RATE_LIMITED, Decision, Denial,
    HeadCheck, HeadPlan, MONEY_MOVING_OPERATIONS, PolicyEngine, RateLimitToken, RequestFacts, RuleTrace, Verdict,
};
pub use keygate_limits::{ChargeOutcome, ChargeRequest, ManualClock, RateOutcome, RateSpec};
pub use loader::{PolicyLoadError, Problem, is_valid_token_hash, parse_policy_text};
pub use model::{
    Budget, Effect, HeaderCondition, IdempotencyMode, KeyMode, Mode, ParamCondition, RateLimit, Rule, ServicePolicy,
};
pub use operations::{Operation, match_operation, operation_by_name, operations};
pub use pattern::{OperationPattern, PatternSegment};
pub use set::{PolicySet, QUICKSTART_RULE_ID};
pub use tools::{CaseResult, CheckReport, ExplainError, Explanation, TestReport, check, explain, run_tests};
