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

/// What a caller-chosen text becomes when it is not of its field's shape: `currency` must be three
/// ASCII letters (kept lower-cased), `stripe_account` `acct_` and 1 to 64 ASCII letters and digits.
pub const INVALID: &str = "(invalid)";

/// Whether `currency` is an ISO code's shape: three ASCII letters.
pub fn is_currency(currency: &str) -> bool {
    currency.len() == 3 && currency.bytes().all(|b| b.is_ascii_alphabetic())
}

/// Whether `account` is a Stripe account id's shape: `acct_` and 1 to 64 ASCII letters and digits.
pub fn is_account(account: &str) -> bool {
    account
        .strip_prefix("acct_")
        .is_some_and(|id| (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// The input as the detectors see it, when that differs from `input`: its time `at_us`, an
/// upper-case currency lower-cased, and a `currency` or `stripe_account` not of its shape
/// ([`is_currency`], [`is_account`]) replaced with [`INVALID`]. `None` when nothing changes (the
/// usual case, so no copy is made).
pub fn normalized(input: &Input, at_us: i64) -> Option<Input> {
    let clean_currency = |c: &Option<String>| match c {
        Some(c) if !is_currency(c) => Some(Some(INVALID.to_owned())),
        Some(c) if c.bytes().any(|b| b.is_ascii_uppercase()) => Some(Some(c.to_ascii_lowercase())),
        _ => None,
    };
    let clean_account = |a: &Option<String>| match a {
        Some(a) if !is_account(a) => Some(Some(INVALID.to_owned())),
        _ => None,
    };
    match input {
        Input::Request(r) => {
            let currency = clean_currency(&r.currency);
            let account = clean_account(&r.stripe_account);
            if at_us == r.at_us && currency.is_none() && account.is_none() {
                return None;
            }
            let mut copy = r.clone();
            copy.at_us = at_us;
            if let Some(currency) = currency {
                copy.currency = currency;
            }
            if let Some(account) = account {
                copy.stripe_account = account;
            }
            Some(Input::Request(copy))
        }
        Input::Webhook(w) if w.at_us != at_us => {
            let mut copy = w.clone();
            copy.at_us = at_us;
            Some(Input::Webhook(copy))
        }
        Input::Webhook(_) => None,
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

    fn request(i: u32, currency: &str, account: Option<&str>) -> Input {
        Input::Request(RequestInput {
            event_id: format!("e{i}"),
            at_us: 1_764_650_000_000_000 + i64::from(i) * 1_000_000,
            service: "checkout".into(),
            operation: Some("POST /v1/charges".into()),
            status: 200,
            refusal: None,
            upstream_error: false,
            amount: Some(1000),
            currency: Some(currency.into()),
            stripe_account: account.map(str::to_owned),
            livemode: Some(false),
        })
    }

    #[test]
    fn caller_chosen_texts_not_of_their_shape_never_reach_an_alert() {
        let mut config = crate::AnomaliesConfig::default();
        config.first_seen.learn_for = std::time::Duration::ZERO;
        let mut engine = crate::Engine::new(&config);
        let card = "4242424242424242";
        let key = "sk_live_51CANARYcanary0000000000";
        let mut alerts = Vec::new();
        alerts.extend(engine.observe(&request(1, "usd", Some("acct_1AbC"))));
        alerts.extend(engine.observe(&request(2, key, Some(card))));
        alerts.extend(engine.observe(&request(3, "EUR", Some(&format!("acct_{card} {key}")))));
        let text = serde_json::to_string(&alerts).unwrap_or_else(|e| panic!("{e}"));
        assert!(!text.contains(card) && !text.contains("CANARY"), "{text}");
        let subjects: Vec<&str> = alerts.iter().map(|a| a.subject.as_str()).collect();
        for expected in [
            "connected_account acct_1AbC",
            "currency usd",
            "connected_account (invalid)",
            "currency (invalid)",
            "currency eur",
        ] {
            assert!(subjects.contains(&expected), "{expected} not in {subjects:?}");
        }
        let state = serde_json::to_string(&engine.state()).unwrap_or_else(|e| panic!("{e}"));
        assert!(!state.contains(card) && !state.contains("CANARY"), "the learned state holds only the shapes");
        assert!(
            normalized(&request(4, "usd", Some("acct_1AbC")), 1_764_650_004_000_000).is_none(),
            "no copy when clean"
        );
    }

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
