//! Header hygiene between the client and Stripe.
//!
//! Hop-by-hop headers (RFC 9110 §7.6.1: `Connection` and every header it names, `Keep-Alive`,
//! `Proxy-*`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`) are removed in both directions.
//! Everything Stripe-specific (`Stripe-Version`, `Stripe-Account`, `Stripe-Context`,
//! `Idempotency-Key`, `User-Agent`, `X-Stripe-Client-User-Agent`; and back `Request-Id`,
//! `Idempotent-Replayed`, `Stripe-Should-Retry`, `Retry-After`) passes unchanged because nothing
//! here touches it.

use http::HeaderMap;
use http::header::{CONNECTION, HeaderName, TE, TRAILER, TRANSFER_ENCODING, UPGRADE};

const KEEP_ALIVE: &str = "keep-alive";

/// Removes hop-by-hop headers, including those named by `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [CONNECTION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE] {
        headers.remove(name);
    }
    headers.remove(KEEP_ALIVE);
    let proxy_headers: Vec<HeaderName> =
        headers.keys().filter(|name| name.as_str().starts_with("proxy-")).cloned().collect();
    for name in proxy_headers {
        headers.remove(name);
    }
}

/// The value of a header as text, if present and visible ASCII.
pub fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn removes_hop_by_hop_and_connection_named_headers_only() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, X-Secret-Hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic abc"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("upgrade", "h2c"),
            ("transfer-encoding", "chunked"),
            ("stripe-version", "2025-07-30.basil"),
            ("stripe-account", "acct_123"),
            ("stripe-context", "ctx_123"),
            ("idempotency-key", "abc"),
            ("user-agent", "Stripe/v1 PythonBindings/12"),
            ("x-stripe-client-user-agent", "{}"),
        ] {
            headers.append(name, HeaderValue::from_static(value));
        }
        strip_hop_by_hop(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            [
                "idempotency-key",
                "stripe-account",
                "stripe-context",
                "stripe-version",
                "user-agent",
                "x-stripe-client-user-agent"
            ]
        );
    }
}
