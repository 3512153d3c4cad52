//! The request head: method, header bytes, single-valued headers, `Connection`, and which
//! headers are forwarded at all.
//!
//! keygate forwards an allowlist ([`FORWARDED_HEADERS`]) and sets `Authorization`,
//! `Content-Type`, `Accept-Encoding` and the framing itself; everything else a client sends is
//! dropped, so no header keygate did not look at reaches Stripe.

use http::{HeaderMap, Method};

use crate::Refusal;

/// Headers that must appear at most once: two copies could be read differently by keygate and
/// by Stripe.
pub const SINGLE_VALUED_HEADERS: &[&str] = &[
    "authorization",
    "content-type",
    "content-length",
    "stripe-account",
    "stripe-context",
    "stripe-version",
    "idempotency-key",
    "host",
];

/// The client headers keygate forwards (all single-valued or informational); `Content-Type` is
/// replaced by the canonical body's.
pub const FORWARDED_HEADERS: &[&str] = &[
    "stripe-account",
    "stripe-context",
    "stripe-version",
    "idempotency-key",
    "user-agent",
    "x-stripe-client-user-agent",
    "x-stripe-client-telemetry",
    "accept",
    "accept-language",
];

/// Tokens `Connection` may name: hop-by-hop headers that keygate never forwards anyway.
const CONNECTION_TOKENS: &[&str] = &["keep-alive", "close", "upgrade", "te", "http2-settings"];

/// Checks the head; returns the method (one of Stripe's: GET, POST, DELETE).
pub fn check_head(method: &str, headers: &HeaderMap) -> Result<Method, Refusal> {
    let method = match method {
        "GET" => Method::GET,
        "POST" => Method::POST,
        "DELETE" => Method::DELETE,
        _ => return Err(Refusal::Method),
    };
    for (name, value) in headers {
        if !value.as_bytes().iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b)) {
            return Err(Refusal::HeaderBytes(crate::echo_name(name.as_str())));
        }
    }
    for &name in SINGLE_VALUED_HEADERS {
        let mut values = headers.get_all(name).iter();
        if values.next().is_some() && values.next().is_some() {
            return Err(Refusal::DuplicateHeader(name));
        }
    }
    for value in headers.get_all(http::header::CONNECTION) {
        // Visible ASCII was checked above.
        let text = value.to_str().unwrap_or("");
        for token in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if !CONNECTION_TOKENS.iter().any(|t| t.eq_ignore_ascii_case(token)) {
                return Err(Refusal::ConnectionNominates(crate::echo_name(token)));
            }
        }
    }
    for name in FORWARDED_HEADERS {
        if headers.get_all(*name).iter().any(|v| v.to_str().is_ok_and(crate::contains_keygate_token)) {
            return Err(Refusal::Credential("headers"));
        }
    }
    Ok(method)
}

/// The allowlisted client headers, for forwarding.
pub fn forwarded_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(FORWARDED_HEADERS.len() + 4);
    for name in FORWARDED_HEADERS {
        for value in headers.get_all(*name) {
            out.append(*name, value.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http::HeaderValue;

    fn head(pairs: &[(&'static str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(*name, HeaderValue::from_bytes(value).unwrap());
        }
        h
    }

    #[test]
    fn methods_are_stripes_and_case_sensitive() {
        assert_eq!(check_head("POST", &HeaderMap::new()).unwrap(), Method::POST);
        for m in ["post", "Post", "PUT", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE"] {
            assert_eq!(check_head(m, &HeaderMap::new()).unwrap_err(), Refusal::Method, "{m}");
        }
    }

    #[test]
    fn connection_may_name_hop_by_hop_headers_only() {
        assert!(check_head("GET", &head(&[("connection", b"keep-alive")])).is_ok());
        assert!(check_head("GET", &head(&[("connection", b"Upgrade, HTTP2-Settings")])).is_ok());
        for nominated in ["Stripe-Account", "content-type", "keep-alive, Idempotency-Key", "x-anything"] {
            assert!(
                matches!(
                    check_head("GET", &head(&[("connection", nominated.as_bytes())])),
                    Err(Refusal::ConnectionNominates(_))
                ),
                "{nominated}"
            );
        }
    }

    #[test]
    fn duplicates_and_non_ascii_are_refused() {
        let dup = head(&[("stripe-account", b"acct_1"), ("stripe-account", b"acct_2")]);
        assert_eq!(check_head("GET", &dup).unwrap_err(), Refusal::DuplicateHeader("stripe-account"));
        let evil = head(&[("stripe-account", b"acct_EVIL\xa0")]);
        assert_eq!(check_head("GET", &evil).unwrap_err(), Refusal::HeaderBytes("stripe-account".into()));
        assert!(check_head("GET", &head(&[("stripe-context", b"ctx\xff")])).is_err());
        assert!(check_head("GET", &head(&[("user-agent", b"Stripe/v1 PythonBindings/12.0.0")])).is_ok());
    }

    #[test]
    fn only_the_allowlist_is_forwarded() {
        let h = head(&[
            ("stripe-account", b"acct_1"),
            ("x-forwarded-for", b"1.2.3.4"),
            ("cookie", b"a=b"),
            ("user-agent", b"x"),
        ]);
        let out = forwarded_headers(&h);
        let mut names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["stripe-account", "user-agent"]);
        assert_eq!(
            check_head("GET", &head(&[("stripe-account", b"sk_kg_abc")])).unwrap_err(),
            Refusal::Credential("headers")
        );
        // A header name shaped like a credential is not repeated in the refusal.
        let named = check_head("GET", &head(&[("sk_kg_abcdef", b"x\xff")])).unwrap_err().to_string();
        assert!(!named.contains("sk_kg_") && named.contains("withheld"), "{named}");
    }
}
