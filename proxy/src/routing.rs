//! Which Stripe host a request belongs to.
//!
//! A service sets one base URL (the Node SDK sends everything to one host), so keygate routes by
//! path the way the SDKs do (see `operations.txt`): `POST /v1/files` and
//! `GET /v1/quotes/{quote}/pdf` go to files, `/oauth/*` to connect,
//! `POST /v2/billing/meter_event_stream` to meter-events, everything else to api.

use http::Method;

/// One of Stripe's API hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StripeHost {
    Api,
    Files,
    Connect,
    MeterEvents,
}

impl StripeHost {
    /// Every host, in a fixed order.
    pub const ALL: [StripeHost; 4] = [StripeHost::Api, StripeHost::Files, StripeHost::Connect, StripeHost::MeterEvents];

    /// The name used in configuration (`upstreams.<name>`), logs, metrics and audit rows.
    pub fn as_str(self) -> &'static str {
        match self {
            StripeHost::Api => "api",
            StripeHost::Files => "files",
            StripeHost::Connect => "connect",
            StripeHost::MeterEvents => "meter_events",
        }
    }
}

/// Routes a request to its Stripe host, from its method and path (without query).
pub fn route(method: &Method, path: &str) -> StripeHost {
    if path == "/oauth" || path.starts_with("/oauth/") {
        return StripeHost::Connect;
    }
    if *method == Method::POST && path == "/v1/files" {
        return StripeHost::Files;
    }
    if *method == Method::GET
        && let Some(rest) = path.strip_prefix("/v1/quotes/")
        && let Some(quote) = rest.strip_suffix("/pdf")
        && !quote.is_empty()
        && !quote.contains('/')
    {
        return StripeHost::Files;
    }
    if *method == Method::POST && path == "/v2/billing/meter_event_stream" {
        return StripeHost::MeterEvents;
    }
    StripeHost::Api
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_like_the_sdks() {
        let cases = [
            (Method::POST, "/v1/files", StripeHost::Files),
            (Method::GET, "/v1/files", StripeHost::Api),
            (Method::GET, "/v1/files/file_123", StripeHost::Api),
            (Method::GET, "/v1/quotes/qt_123/pdf", StripeHost::Files),
            (Method::GET, "/v1/quotes/qt_123", StripeHost::Api),
            (Method::GET, "/v1/quotes//pdf", StripeHost::Api),
            (Method::POST, "/oauth/token", StripeHost::Connect),
            (Method::POST, "/oauth/deauthorize", StripeHost::Connect),
            (Method::POST, "/v2/billing/meter_event_stream", StripeHost::MeterEvents),
            (Method::POST, "/v2/billing/meter_events", StripeHost::Api),
            (Method::POST, "/v1/payment_intents", StripeHost::Api),
            (Method::GET, "/oauthx", StripeHost::Api),
        ];
        for (method, path, host) in cases {
            assert_eq!(route(&method, path), host, "{method} {path}");
        }
    }
}
