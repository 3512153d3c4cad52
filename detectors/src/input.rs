//! What the detectors see: one [`Input`] per finished request or per received webhook event.

use serde::{Deserialize, Serialize};

/// The service name given to requests whose caller did not authenticate (their `service` column
/// is null), so that a burst of refused, unauthenticated calls is still seen.
pub const UNAUTHENTICATED: &str = "(unauthenticated)";

/// One finished request, as its audit row's plaintext columns describe it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestInput {
    /// The audit row's `event_id` (cited by alerts).
    pub event_id: String,
    /// `completed_at`, microseconds since the Unix epoch (UTC).
    pub at_us: i64,
    /// The authenticated service ([`UNAUTHENTICATED`] when there is none).
    pub service: String,
    /// The matched operation template, e.g. `POST /v1/payment_intents`.
    pub operation: Option<String>,
    /// The status returned to the client.
    pub status: u16,
    /// `Some(code or rule)` when keygate itself refused the request (policy denial, rate limit,
    /// budget, malformed request...): the status then is keygate's, not Stripe's.
    pub refusal: Option<String>,
    /// Stripe could not be reached or answered unusably (`outcome = upstream_error`).
    pub upstream_error: bool,
    /// Amount in the currency's minor unit, where the request carried one.
    pub amount: Option<i64>,
    /// Lower-case ISO currency code, where the request carried one.
    pub currency: Option<String>,
    /// `Stripe-Account` (a connected account), if any.
    pub stripe_account: Option<String>,
    /// The key mode: `Some(true)` for a live key.
    pub livemode: Option<bool>,
}

impl RequestInput {
    /// Whether the request reached Stripe and Stripe answered 2xx.
    pub fn succeeded(&self) -> bool {
        self.refusal.is_none() && !self.upstream_error && (200..300).contains(&self.status)
    }
}

/// Derives [`RequestInput::refusal`] from an audit row's `decision`, `outcome`, `rule` and
/// `reason` columns: a row is keygate's refusal when it was rejected before Stripe answered
/// (`outcome = rejected`) or denied by policy (`decision = deny`). The code is the reason when it
/// is a `keygate_…` code, else the rule, else the decision.
pub fn refusal_of(decision: &str, outcome: &str, rule: Option<&str>, reason: Option<&str>) -> Option<String> {
    if outcome != "rejected" && decision != "deny" {
        return None;
    }
    let code = match (reason, rule) {
        (Some(r), _) if r.starts_with("keygate_") => r,
        (_, Some(rule)) => rule,
        (Some(r), None) => r,
        (None, None) => decision,
    };
    Some(code.to_owned())
}

/// One webhook event received from Stripe (fed by the webhook ingress once it is wired).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookInput {
    /// The `webhooks` row's event id (Stripe's `evt_…`).
    pub event_id: String,
    /// Received at, microseconds since the Unix epoch (UTC).
    pub at_us: i64,
    /// The webhook endpoint (the service it belongs to).
    pub service: String,
    /// Stripe's event type, e.g. `charge.dispute.created`.
    pub event_type: String,
    pub livemode: Option<bool>,
}

/// One input to the detectors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Input {
    Request(RequestInput),
    Webhook(WebhookInput),
}

impl Input {
    pub fn at_us(&self) -> i64 {
        match self {
            Input::Request(r) => r.at_us,
            Input::Webhook(w) => w.at_us,
        }
    }

    pub fn service(&self) -> &str {
        match self {
            Input::Request(r) => &r.service,
            Input::Webhook(w) => &w.service,
        }
    }

    pub fn event_id(&self) -> &str {
        match self {
            Input::Request(r) => &r.event_id,
            Input::Webhook(w) => &w.event_id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_keygates_rejections_and_denials() {
        assert_eq!(refusal_of("allow", "completed", Some("r1"), Some("ok")), None);
        assert_eq!(refusal_of("would_deny", "completed", Some("r1"), None), None);
        assert_eq!(
            refusal_of("deny", "rejected", None, Some("keygate_rate_limited")).as_deref(),
            Some("keygate_rate_limited")
        );
        assert_eq!(
            refusal_of("deny", "rejected", Some("no-refunds"), Some("amount over 500")).as_deref(),
            Some("no-refunds")
        );
        assert_eq!(refusal_of("allow", "rejected", None, None).as_deref(), Some("allow"));
    }
}
