//! The canonical request: what keygate decides on is exactly what it forwards.
//!
//! A request reaches keygate in whatever form its client chose: percent-encoded paths, headers
//! named hop-by-hop, bodies whose bytes read one way as JSON and another as a form. Every parser
//! between keygate and Stripe might read such a request differently from the policy that
//! approved it. This crate removes the choice: it parses each part of a request once, with one
//! strict parser per encoding ([`path`], [`form`], [`json`], [`multipart`]), refuses what cannot
//! be made canonical without guessing ([`Refusal`], each naming its problem), and re-serialises
//! the rest in one canonical encoding that keygate then decides on, forwards and records.
//!
//! The grammar, and every refusal, is documented in `docs/reliability.md` ("The canonical
//! request"). The same parsers serve the policy engine (through the canonical bytes) and the
//! audit log's redaction.
//!
//! Invariants:
//! - nothing here panics, on any input (fuzzed by `tests/fuzz_targets.rs`);
//! - canonicalisation is idempotent: the canonical form of a canonical request is itself;
//! - a refusal's message names the problem (a header name, a rule), never a value from the
//!   request, since values may hold secrets;
//! - a keygate token is never part of a canonical request, nor a credential in its query string
//!   ([`Refusal::Credential`]).

pub mod form;
pub mod head;
pub mod json;
pub mod multipart;
pub mod path;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method};

pub use head::{FORWARDED_HEADERS, SINGLE_VALUED_HEADERS, check_head, forwarded_headers};

/// Why a request cannot be made canonical. Every variant becomes a 400 in Stripe's error JSON
/// with [`Refusal::code`] and the variant's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "The request method is not one of Stripe's (GET, POST, DELETE; methods are case-sensitive), so keygate refuses it."
    )]
    Method,
    #[error(
        "The `{0}` header was sent more than once; it must appear once, since Stripe and keygate could read different copies."
    )]
    DuplicateHeader(&'static str),
    #[error(
        "The value of the `{0}` header holds bytes outside visible ASCII; send it as visible ASCII (Stripe ids and keys are ASCII)."
    )]
    HeaderBytes(String),
    #[error(
        "The `Connection` header names `{0}` as hop-by-hop; only `keep-alive`, `close`, `upgrade`, `te` and `http2-settings` may be named, since naming an end-to-end header would remove it after the policy saw it."
    )]
    ConnectionNominates(String),
    #[error("The request path is not in Stripe's grammar: {0}.")]
    Path(&'static str),
    #[error("The query string cannot be read unambiguously: {0}.")]
    Query(form::FormError),
    #[error("The request body cannot be read unambiguously: {0}.")]
    Body(String),
    #[error("{0}")]
    BodyEncoding(&'static str),
    #[error(
        "The request carries a credential in its {0} (a keygate token, or in a query string also a Stripe key or an `api_key`-like parameter); credentials go only in the `Authorization` header, and keygate never forwards them."
    )]
    Credential(&'static str),
}

impl Refusal {
    /// The `code` in Stripe's error JSON.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Credential(_) => "keygate_credential_in_request",
            _ => "keygate_ambiguous_request",
        }
    }
}

/// How a canonical body is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// No body.
    Empty,
    /// `application/x-www-form-urlencoded` (Stripe's v1 API).
    Form,
    /// `application/json` (Stripe's v2 API).
    Json,
    /// `multipart/form-data` (file uploads).
    Multipart,
}

impl BodyKind {
    /// What a body of this kind must declare as its media type.
    pub fn media_type(self) -> &'static str {
        match self {
            BodyKind::Empty => "",
            BodyKind::Form => "application/x-www-form-urlencoded",
            BodyKind::Json => "application/json",
            BodyKind::Multipart => "multipart/form-data",
        }
    }
}

/// The part of a request after its head: path, query and body, in canonical form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalTarget {
    /// The decoded path: only `/`-separated segments of `[A-Za-z0-9_.-]`, which is also its one
    /// encoding on the wire.
    pub path: String,
    /// The query string re-serialised by [`form::serialize`], without `?`; `None` when empty.
    pub query: Option<String>,
    /// The body re-serialised in its one encoding.
    pub body: Bytes,
    pub kind: BodyKind,
    /// The `Content-Type` to forward (`None` for a read without a body).
    pub content_type: Option<HeaderValue>,
}

/// The encoding a request's body must have: multipart for file uploads, JSON on `/v2`, forms
/// everywhere else (`/v1`, `/oauth`).
pub fn expected_body_kind(method: &Method, path: &str) -> BodyKind {
    if *method == Method::POST && path == "/v1/files" {
        BodyKind::Multipart
    } else if path.starts_with("/v2/") {
        BodyKind::Json
    } else {
        BodyKind::Form
    }
}

/// Canonicalises path, query and body. `content_type` is the request's single `Content-Type`
/// (duplicates are refused by [`check_head`]).
pub fn canonicalize_target(
    method: &Method,
    raw_path: &str,
    raw_query: Option<&str>,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<CanonicalTarget, Refusal> {
    let (path, query) = canonical_location(raw_path, raw_query)?;
    let body = canonical_body(method, &path, content_type, body)?;
    Ok(CanonicalTarget { path, query, body: body.bytes, kind: body.kind, content_type: body.content_type })
}

/// The canonical path and query string (known before the body is read).
pub fn canonical_location(raw_path: &str, raw_query: Option<&str>) -> Result<(String, Option<String>), Refusal> {
    let path = path::canonical_path(raw_path)?;
    let query = match raw_query {
        None | Some("") => None,
        Some(raw) => {
            // Stripe's v2 API sends arrays in query strings as repeated names.
            let pairs = if path.starts_with("/v2/") {
                form::parse_repeated(raw.as_bytes())
            } else {
                form::parse(raw.as_bytes())
            }
            .map_err(Refusal::Query)?;
            if pairs.iter().any(|(name, value)| {
                is_credential_name(name) || contains_credential(name) || contains_credential(value)
            }) {
                return Err(Refusal::Credential("query string"));
            }
            if pairs.is_empty() { None } else { Some(form::serialize(&pairs)) }
        }
    };
    Ok((path, query))
}

/// A canonical body with its kind and the `Content-Type` to forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalBody {
    pub bytes: Bytes,
    pub kind: BodyKind,
    pub content_type: Option<HeaderValue>,
}

/// Canonicalises a body for the (canonical) `path`.
pub fn canonical_body(
    method: &Method,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<CanonicalBody, Refusal> {
    let expected = expected_body_kind(method, path);
    if body.is_empty() {
        let content_type = match (method, expected) {
            (&Method::POST, BodyKind::Form | BodyKind::Json) => Some(HeaderValue::from_static(expected.media_type())),
            _ => None,
        };
        return Ok(CanonicalBody { bytes: Bytes::new(), kind: BodyKind::Empty, content_type });
    }
    if *method == Method::GET {
        return Err(Refusal::BodyEncoding(
            "A GET request must not have a body: Stripe reads GET parameters from the query string only, so send them there.",
        ));
    }
    let Some(content_type) = content_type else {
        return Err(Refusal::BodyEncoding(match expected {
            BodyKind::Json => "The request has a body but no `Content-Type`; Stripe's v2 API takes `application/json`.",
            BodyKind::Multipart => {
                "The request has a body but no `Content-Type`; file uploads take `multipart/form-data`."
            }
            _ => {
                "The request has a body but no `Content-Type`; Stripe's v1 API takes `application/x-www-form-urlencoded`."
            }
        }));
    };
    let (media_type, params) = split_media_type(content_type);
    if !media_type.eq_ignore_ascii_case(expected.media_type()) {
        return Err(Refusal::BodyEncoding(match expected {
            BodyKind::Json => "The body's `Content-Type` is not `application/json`, which Stripe's v2 API requires.",
            BodyKind::Multipart => {
                "The body's `Content-Type` is not `multipart/form-data`, which file uploads require."
            }
            _ => {
                "The body's `Content-Type` is not `application/x-www-form-urlencoded`, which Stripe's v1 API requires (keygate reads the body exactly as Stripe will)."
            }
        }));
    }
    if matches!(expected, BodyKind::Form | BodyKind::Json)
        && params
            .iter()
            .any(|(name, value)| !(name.eq_ignore_ascii_case("charset") && value.eq_ignore_ascii_case("utf-8")))
    {
        return Err(Refusal::BodyEncoding(
            "The body's `Content-Type` has a parameter other than `charset=utf-8`; Stripe reads bodies as UTF-8 only.",
        ));
    }
    let (bytes, content_type) = match expected {
        BodyKind::Json => {
            let canonical = json::canonical(body).map_err(|e| Refusal::Body(e.to_string()))?;
            if json::any_string(&canonical.value, &contains_keygate_token) {
                return Err(Refusal::Credential("body"));
            }
            (Bytes::from(canonical.bytes), HeaderValue::from_static(BodyKind::Json.media_type()))
        }
        BodyKind::Multipart => {
            let boundary = params
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case("boundary"))
                .map(|(_, value)| *value)
                .ok_or(Refusal::BodyEncoding("The `multipart/form-data` body's `Content-Type` has no boundary."))?;
            let parts = multipart::parse(boundary, body).map_err(|e| Refusal::Body(e.to_string()))?;
            if parts
                .iter()
                .any(|p| p.filename.is_none() && std::str::from_utf8(&p.data).is_ok_and(contains_keygate_token))
            {
                return Err(Refusal::Credential("body"));
            }
            let (content_type, bytes) = multipart::serialize(&parts);
            let value = HeaderValue::from_str(&content_type)
                .map_err(|_| Refusal::BodyEncoding("The multipart body could not be re-encoded."))?;
            (bytes, value)
        }
        BodyKind::Form | BodyKind::Empty => {
            let pairs = form::parse(body).map_err(|e| Refusal::Body(e.to_string()))?;
            if pairs.iter().any(|(name, value)| contains_keygate_token(name) || contains_keygate_token(value)) {
                return Err(Refusal::Credential("body"));
            }
            (Bytes::from(form::serialize(&pairs)), HeaderValue::from_static(BodyKind::Form.media_type()))
        }
    };
    Ok(CanonicalBody { bytes, kind: expected, content_type: Some(content_type) })
}

/// `type/subtype` and its `name=value` parameters (quotes removed), without validation beyond
/// splitting.
fn split_media_type(value: &str) -> (&str, Vec<(&str, &str)>) {
    let mut parts = value.split(';');
    let media_type = parts.next().unwrap_or("").trim();
    let params = parts
        .filter_map(|p| {
            let (name, value) = p.split_once('=')?;
            let value = value.trim();
            let value = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(value);
            Some((name.trim(), value))
        })
        .collect();
    (media_type, params)
}

/// A client-chosen name (header, parameter, JSON key) as a refusal message may quote it: only
/// `[A-Za-z0-9_.\[\]-]`, at most 64 characters, and withheld entirely when it holds anything
/// shaped like a credential (messages never repeat a secret, even the client's own).
pub fn echo_name(name: &str) -> String {
    if contains_credential(name) || name.contains("secret") {
        return "(name withheld: it looks like a credential)".to_owned();
    }
    name.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '[' | ']' | '-' | '.')).take(64).collect()
}

/// Query or body parameter names that carry credentials (`?api_key=`, as some HTTP clients send).
pub fn is_credential_name(name: &str) -> bool {
    ["api_key", "apikey", "key", "access_token", "token", "authorization", "bearer", "client_secret_key"]
        .iter()
        .any(|n| n.eq_ignore_ascii_case(name))
}

/// Whether text holds a keygate token (`sk_kg_…`): refused anywhere in a request but its
/// `Authorization` header. (A Stripe-key-shaped string in a body, say in metadata, is the
/// client's data: forwarded, and masked in the audit record.)
pub fn contains_keygate_token(text: &str) -> bool {
    memchr::memmem::find(text.as_bytes(), b"sk_kg_").is_some()
}

/// Whether text holds a keygate token or a Stripe secret or restricted key: refused in query
/// strings, which every proxy and server on the way logs.
pub fn contains_credential(text: &str) -> bool {
    memchr::memmem::find(text.as_bytes(), b"k_").is_some()
        && ["sk_kg_", "sk_live_", "sk_test_", "rk_live_", "rk_test_"].iter().any(|p| text.contains(p))
}

/// The headers to forward plus the canonical `Content-Type`; see [`forwarded_headers`].
pub fn canonical_headers(headers: &HeaderMap, content_type: Option<&HeaderValue>) -> HeaderMap {
    let mut out = forwarded_headers(headers);
    out.remove(http::header::CONTENT_TYPE);
    if let Some(content_type) = content_type {
        out.insert(http::header::CONTENT_TYPE, content_type.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn target(
        method: Method,
        path: &str,
        query: Option<&str>,
        ct: Option<&str>,
        body: &str,
    ) -> Result<CanonicalTarget, Refusal> {
        canonicalize_target(&method, path, query, ct, body.as_bytes())
    }

    #[test]
    fn v1_form_is_reserialised() {
        let t = target(
            Method::POST,
            "/v1/payment_intents",
            Some("expand%5B0%5D=latest_charge"),
            Some("application/x-www-form-urlencoded"),
            "amount=100&currency=usd&metadata%5Bnote%5D=a+b",
        )
        .unwrap();
        assert_eq!(t.body, "amount=100&currency=usd&metadata[note]=a%20b");
        assert_eq!(t.query.as_deref(), Some("expand[0]=latest_charge"));
        assert_eq!(t.kind, BodyKind::Form);
    }

    #[test]
    fn polyglot_bodies_are_read_one_way_only() {
        // A JSON document on a v1 path is refused, whatever its Content-Type claims to be.
        let polyglot = r#"{"amount":100,"x":"&amount=999999"}"#;
        assert!(matches!(
            target(Method::POST, "/v1/payment_intents", None, Some("application/json"), polyglot),
            Err(Refusal::BodyEncoding(_))
        ));
        assert!(target(Method::POST, "/v1/payment_intents", None, None, "amount=1").is_err());
        assert!(target(Method::POST, "/v1/payment_intents", None, Some("text/plain"), "amount=1").is_err());
        // As a form it is read as a form: one `{"amount":100,"x":"` name and an `amount` value.
        let t = target(Method::POST, "/v1/payment_intents", None, Some("application/x-www-form-urlencoded"), polyglot);
        assert!(t.is_err() || !String::from_utf8_lossy(&t.unwrap().body).contains("{\""));
    }

    #[test]
    fn credentials_never_travel() {
        for query in ["api_key=sk_kg_abc", "key=x", "expand[0]=sk_live_123"] {
            assert_eq!(
                target(Method::GET, "/v1/customers", Some(query), None, "").unwrap_err(),
                Refusal::Credential("query string"),
                "{query}"
            );
        }
        assert_eq!(
            target(
                Method::POST,
                "/v1/customers",
                None,
                Some("application/x-www-form-urlencoded"),
                "description=sk_kg_x"
            )
            .unwrap_err(),
            Refusal::Credential("body")
        );
        assert_eq!(
            target(Method::POST, "/v2/core/accounts", None, Some("application/json"), r#"{"a":{"b":["sk_kg_x"]}}"#)
                .unwrap_err(),
            Refusal::Credential("body")
        );
    }

    #[test]
    fn get_with_body_and_odd_content_type_params_are_refused() {
        assert!(target(Method::GET, "/v1/customers", None, Some("application/x-www-form-urlencoded"), "a=1").is_err());
        assert!(
            target(
                Method::POST,
                "/v1/customers",
                None,
                Some("application/x-www-form-urlencoded; charset=latin1"),
                "a=1"
            )
            .is_err()
        );
        assert!(
            target(
                Method::POST,
                "/v1/customers",
                None,
                Some("application/x-www-form-urlencoded; charset=UTF-8"),
                "a=1"
            )
            .is_ok()
        );
    }

    #[test]
    fn empty_bodies_get_the_canonical_type_on_post_only() {
        let t = target(Method::POST, "/v1/payment_intents/pi_1/confirm", None, Some("application/json"), "").unwrap();
        assert_eq!(t.content_type.unwrap(), "application/x-www-form-urlencoded");
        let t = target(Method::GET, "/v1/customers", None, Some("application/x-www-form-urlencoded"), "").unwrap();
        assert!(t.content_type.is_none());
    }

    #[test]
    fn canonicalisation_is_idempotent() {
        let t = target(
            Method::POST,
            "/v1/%63ustomers",
            Some("limit=3&expand[]=a"),
            Some("application/x-www-form-urlencoded"),
            "name=J%C3%B6rg+M&metadata[k]=%26%3D%3B",
        )
        .unwrap();
        let again = target(
            Method::POST,
            &t.path,
            t.query.as_deref(),
            Some("application/x-www-form-urlencoded"),
            std::str::from_utf8(&t.body).unwrap(),
        )
        .unwrap();
        assert_eq!(t, again);
    }
}
