//! What keygate reads from a verified event body: the fields an operator filters on. The body
//! itself is kept and delivered byte for byte; it is never re-serialised.
//!
//! Snapshot (v1) events: `{id: "evt_…", object: "event", type, created: <unix s>, livemode,
//! api_version, account?}`. Thin (v2) events: `{id, object: "v2.core.event", type,
//! created: "<RFC 3339>", livemode, context?}`. Both are keyed on `id` for deduplication.

use serde::{Deserialize, Serialize};

/// Longest Stripe event id accepted.
const MAX_ID_BYTES: usize = 255;

/// The operator-facing fields of an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMeta {
    /// Stripe's event id (`evt_…`), the deduplication key.
    pub id: String,
    /// `event` (snapshot) or `v2.core.event` (thin).
    pub object: String,
    /// The event type (`invoice.paid`).
    pub event_type: String,
    /// Whether it is a live-mode event.
    pub livemode: Option<bool>,
    /// The connected account (`account` of v1 events, `context` of thin ones).
    pub account: Option<String>,
    /// The API version the event was rendered with (v1 events).
    pub api_version: Option<String>,
    /// When Stripe created the event, unix seconds.
    pub created: Option<i64>,
}

impl EventMeta {
    /// Whether this is a thin (API v2) event.
    pub fn is_thin(&self) -> bool {
        self.object == "v2.core.event"
    }
}

#[derive(Deserialize)]
struct Raw {
    id: Option<serde_json::Value>,
    object: Option<serde_json::Value>,
    #[serde(rename = "type")]
    event_type: Option<serde_json::Value>,
    livemode: Option<serde_json::Value>,
    account: Option<serde_json::Value>,
    context: Option<serde_json::Value>,
    api_version: Option<serde_json::Value>,
    created: Option<serde_json::Value>,
}

fn text(value: Option<serde_json::Value>) -> Option<String> {
    match value {
        Some(serde_json::Value::String(s)) if !s.is_empty() && s.len() <= MAX_ID_BYTES => Some(s),
        _ => None,
    }
}

/// Reads the fields of a verified body. `Err` carries a short reason (never body text).
pub fn parse(body: &[u8]) -> Result<EventMeta, &'static str> {
    let raw: Raw = serde_json::from_slice(body).map_err(|_| "The body is not a JSON object.")?;
    let id = text(raw.id).ok_or("The event has no `id`.")?;
    if !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("The event `id` is not a Stripe event id.");
    }
    let event_type = text(raw.event_type).ok_or("The event has no `type`.")?;
    if !event_type.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("The event `type` is not a Stripe event type.");
    }
    let object = text(raw.object).unwrap_or_else(|| "event".to_owned());
    let created = match raw.created {
        Some(serde_json::Value::Number(n)) => n.as_i64(),
        Some(serde_json::Value::String(s)) => humantime::parse_rfc3339_weak(s.trim_end_matches('Z'))
            .or_else(|_| humantime::parse_rfc3339(&s))
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .and_then(|d| i64::try_from(d.as_secs()).ok()),
        _ => None,
    };
    Ok(EventMeta {
        id,
        object,
        event_type,
        livemode: raw.livemode.and_then(|v| v.as_bool()),
        account: text(raw.account).or_else(|| text(raw.context)),
        api_version: text(raw.api_version),
        created,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_and_thin_events_are_both_read() {
        let v1 = parse(
            br#"{"id":"evt_1","object":"event","type":"invoice.paid","created":1700000000,"livemode":false,"api_version":"2024-06-20","account":"acct_1","data":{"object":{}}}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(v1.id, "evt_1");
        assert_eq!(v1.created, Some(1_700_000_000));
        assert_eq!(v1.account.as_deref(), Some("acct_1"));
        assert!(!v1.is_thin());
        let thin = parse(
            br#"{"id":"evt_test_65R","object":"v2.core.event","type":"v1.billing.meter.error_report_triggered","created":"2024-09-10T12:00:00.000Z","livemode":true,"context":"acct_2","related_object":{"id":"mtr_1","type":"billing.meter","url":"/v1/billing/meters/mtr_1"}}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(thin.is_thin());
        assert_eq!(thin.created, Some(1_725_969_600));
        assert_eq!(thin.account.as_deref(), Some("acct_2"));
        assert_eq!(thin.livemode, Some(true));
    }

    #[test]
    fn bodies_without_an_id_or_type_are_refused() {
        assert!(parse(b"not json").is_err());
        assert!(parse(b"[]").is_err());
        assert!(parse(br#"{"type":"x"}"#).is_err());
        assert!(parse(br#"{"id":"evt 1","type":"x"}"#).is_err());
        assert!(parse(br#"{"id":"evt_1"}"#).is_err());
    }
}
