//! `keygate policy explain`: the decision for a described request, the rule that made it, and
//! how every rule that covers the operation fared.
//!
//! The request is decided by a fresh engine: the rate limit has a full bucket and budgets are
//! unspent, so explain shows what the policy says, not what a running instance's counters say.

use std::fmt;

use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};

use crate::engine::{Decision, PolicyEngine, RequestFacts, RuleTrace, trace_rules};
use crate::model::Mode;
use crate::set::PolicySet;

/// Why a request could not be explained.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExplainError {
    /// No policy for this service.
    #[error("no policy for service `{service}` (services in this folder: {known})")]
    UnknownService {
        /// The service asked for.
        service: String,
        /// Comma-separated services that exist.
        known: String,
    },
    /// The request description is malformed.
    #[error("{0}")]
    BadRequest(String),
}

/// A request described on the command line or in a test case, owned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct DescribedRequest {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
    pub stripe_account: Option<String>,
    pub stripe_context: Option<String>,
    pub idempotency_key: Option<String>,
    pub livemode: bool,
}

impl DescribedRequest {
    /// `request` is `METHOD /path[?query]`; `params` go to the query string for GET and
    /// DELETE, to a form body otherwise; `headers` may set Stripe-Account, Stripe-Context,
    /// Idempotency-Key and Content-Type.
    pub(crate) fn build(
        request: &str,
        params: &[(String, String)],
        headers: &[(String, String)],
        livemode: bool,
    ) -> Result<DescribedRequest, String> {
        let request = request.trim();
        let Some((method, target)) = request.split_once(' ') else {
            return Err(format!("request `{request}` has no method (write it like `POST /v1/payment_intents`)"));
        };
        let method = method.trim();
        if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(format!(
                "request method `{method}` is not an upper-case HTTP method (write it like `POST /v1/payment_intents`)"
            ));
        }
        let target = target.trim();
        if !target.starts_with('/') {
            return Err(format!(
                "request path `{target}` does not start with `/` (write it like `POST /v1/payment_intents`)"
            ));
        }
        let (path, query) = match target.split_once('?') {
            Some((path, query)) => (path, Some(query.to_owned())),
            None => (target, None),
        };
        let encoded = params
            .iter()
            .map(|(k, v)| {
                format!("{}={}", utf8_percent_encode(k, NON_ALPHANUMERIC), utf8_percent_encode(v, NON_ALPHANUMERIC))
            })
            .collect::<Vec<_>>()
            .join("&");
        let mut described = DescribedRequest {
            method: method.to_owned(),
            path: path.to_owned(),
            query,
            livemode,
            ..DescribedRequest::default()
        };
        if !encoded.is_empty() {
            if method == "GET" || method == "DELETE" {
                described.query = Some(match described.query.take() {
                    Some(q) if !q.is_empty() => format!("{q}&{encoded}"),
                    _ => encoded,
                });
            } else {
                described.body = encoded.into_bytes();
                described.content_type = Some("application/x-www-form-urlencoded".to_owned());
            }
        }
        for (name, value) in headers {
            let slot = match name.trim().to_ascii_lowercase().as_str() {
                "stripe-account" => &mut described.stripe_account,
                "stripe-context" => &mut described.stripe_context,
                "idempotency-key" => &mut described.idempotency_key,
                "content-type" => &mut described.content_type,
                other => {
                    return Err(format!(
                        "header `{other}` does not affect decisions (use Stripe-Account, Stripe-Context, Idempotency-Key or Content-Type)"
                    ));
                }
            };
            *slot = Some(value.trim().to_owned());
        }
        Ok(described)
    }

    pub(crate) fn facts(&self) -> RequestFacts<'_> {
        RequestFacts {
            method: &self.method,
            path: &self.path,
            query: self.query.as_deref(),
            content_type: self.content_type.as_deref(),
            body: &self.body,
            stripe_account: self.stripe_account.as_deref(),
            stripe_context: self.stripe_context.as_deref(),
            idempotency_key: self.idempotency_key.as_deref(),
            livemode: self.livemode,
        }
    }
}

/// The decision for a described request, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// Service name.
    pub service: String,
    /// Its policy file.
    pub file: String,
    /// Its mode.
    pub mode: Mode,
    /// The request as described: `METHOD /path[?query] name=value…`.
    pub request: String,
    /// The decision a fresh engine makes.
    pub decision: Decision,
    /// Every rule that covers the operation, in order, and whether it applies.
    pub rules: Vec<RuleTrace>,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "service:   {} (policy file {}, mode {})", self.service, self.file, self.mode.as_str())?;
        writeln!(f, "request:   {}", self.request)?;
        writeln!(f, "operation: {}", self.decision.operation.unwrap_or("(none: not in the Stripe operation table)"))?;
        writeln!(f, "decision:  {}", self.decision.verdict.as_str())?;
        writeln!(f, "rule:      {}", self.decision.rule)?;
        writeln!(f, "reason:    {}", self.decision.reason)?;
        if let Some(denial) = &self.decision.denial {
            writeln!(f, "response:  {} {}: {}", denial.status, denial.code, denial.message)?;
        }
        if self.decision.inject_idempotency_key {
            writeln!(f, "note:      keygate adds an Idempotency-Key")?;
        }
        if self.rules.is_empty() {
            write!(f, "rules:     none covers this request")?;
        } else {
            write!(f, "rules:")?;
            for trace in &self.rules {
                match &trace.not_applied {
                    None => write!(f, "\n  {} (line {}): applies", trace.rule, trace.line)?,
                    Some(why) => write!(f, "\n  {} (line {}): does not apply: {why}", trace.rule, trace.line)?,
                }
            }
        }
        Ok(())
    }
}

/// Decides a described request against `set` for `service`, with a fresh engine (full rate
/// bucket, unspent budgets). `request` is `METHOD /path[?query]`; `params` are
/// `(name, value)` pairs in Stripe's bracket notation; `headers` may set Stripe-Account,
/// Stripe-Context, Idempotency-Key and Content-Type; `livemode` says whether the service's key
/// is live.
pub fn explain(
    set: &PolicySet,
    service: &str,
    request: &str,
    params: &[(String, String)],
    headers: &[(String, String)],
    livemode: bool,
) -> Result<Explanation, ExplainError> {
    let Some(policy) = set.service(service) else {
        return Err(ExplainError::UnknownService {
            service: service.to_owned(),
            known: set.services().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", "),
        });
    };
    let described = DescribedRequest::build(request, params, headers, livemode).map_err(ExplainError::BadRequest)?;
    let facts = described.facts();
    let engine = PolicyEngine::new(set.clone());
    let decision = engine.decide(service, &facts);
    let rules = trace_rules(policy, &facts);
    let mut request = request.trim().to_owned();
    for (k, v) in params {
        request.push_str(&format!(" {k}={v}"));
    }
    Ok(Explanation {
        service: policy.name.clone(),
        file: policy.file_name(),
        mode: policy.mode,
        request,
        decision,
        rules,
    })
}
