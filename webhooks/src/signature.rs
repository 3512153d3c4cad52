//! Stripe's webhook signature scheme, both ways: verifying what Stripe sends, and signing what
//! keygate delivers so that consumers verify it with the official SDKs unchanged.
//!
//! Header: `Stripe-Signature: t=<unix seconds>,v1=<hex>[,v1=<hex>…]`; the signed string is
//! `<t>.<raw body>`, HMAC-SHA256 keyed with the secret's text (`whsec_…` as ASCII), hex-encoded.
//!
//! Invariants:
//! - only `v1` is a signature; every other scheme (`v0` included) is ignored, so a header
//!   carrying nothing but other schemes is refused;
//! - every `v1` value is compared with the expected tag of every secret, in constant time, and
//!   all comparisons run whatever matched: neither the answer nor its timing says which secret
//!   (or which value) came close;
//! - a header with two timestamps is ambiguous and refused;
//! - a [`Rejection`]'s message never quotes the header, a secret or the body.

use std::time::Duration;

use ring::hmac;
use subtle::{Choice, ConstantTimeEq};

/// The header Stripe signs with.
pub const HEADER: &str = "stripe-signature";

/// Longest `Stripe-Signature` header considered (Stripe sends one `v1` per active secret).
pub const MAX_HEADER_BYTES: usize = 4096;

/// Most `v1` values considered in one header.
pub const MAX_SIGNATURES: usize = 16;

/// Why a request's signature was refused. Each has a metric label and a short message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// No `Stripe-Signature` header.
    MissingHeader,
    /// The header is not `t=…,v1=…` (no timestamp, two timestamps, not text, too long).
    MalformedHeader,
    /// No `v1` signature in the header (a `v0`-only test header, say).
    NoV1Signature,
    /// The timestamp is further from keygate's clock than the endpoint's tolerance.
    TimestampOutsideTolerance,
    /// No `v1` value matches the body under any of the endpoint's secrets.
    SignatureMismatch,
}

impl Rejection {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Rejection::MissingHeader => "missing_header",
            Rejection::MalformedHeader => "malformed_header",
            Rejection::NoV1Signature => "no_v1_signature",
            Rejection::TimestampOutsideTolerance => "timestamp_outside_tolerance",
            Rejection::SignatureMismatch => "signature_mismatch",
        }
    }

    /// The short reason given to the sender.
    pub fn message(self) -> &'static str {
        match self {
            Rejection::MissingHeader => "No Stripe-Signature header.",
            Rejection::MalformedHeader => "The Stripe-Signature header is not t=<timestamp>,v1=<signature>.",
            Rejection::NoV1Signature => {
                "The Stripe-Signature header has no v1 signature (only v1 is accepted; v0 is not a signature)."
            }
            Rejection::TimestampOutsideTolerance => {
                "The Stripe-Signature timestamp is outside this endpoint's tolerance; check the sender's clock."
            }
            Rejection::SignatureMismatch => "No v1 signature matches the body under this endpoint's signing secrets.",
        }
    }
}

/// A parsed `Stripe-Signature` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedHeader {
    /// The `t` value.
    pub timestamp: i64,
    /// Every `v1` value that is 64 hex digits, decoded (others cannot match and are dropped).
    pub v1: Vec<[u8; 32]>,
    /// How many `v1` entries the header had, well-formed or not.
    pub v1_entries: usize,
}

/// Parses the header the way Stripe's SDKs do (`,`-separated `key=value` pairs), refusing
/// ambiguity they let through (two `t` values).
pub fn parse_header(value: &[u8]) -> Result<ParsedHeader, Rejection> {
    if value.len() > MAX_HEADER_BYTES {
        return Err(Rejection::MalformedHeader);
    }
    let text = std::str::from_utf8(value).map_err(|_| Rejection::MalformedHeader)?;
    let mut timestamp = None;
    let mut v1 = Vec::new();
    let mut v1_entries = 0usize;
    for item in text.split(',') {
        let Some((key, val)) = item.trim().split_once('=') else { continue };
        match key {
            "t" => {
                if timestamp.is_some() {
                    return Err(Rejection::MalformedHeader);
                }
                let parsed: i64 = val.parse().map_err(|_| Rejection::MalformedHeader)?;
                timestamp = Some(parsed);
            }
            "v1" => {
                v1_entries += 1;
                if v1.len() < MAX_SIGNATURES {
                    let mut tag = [0u8; 32];
                    if val.len() == 64 && hex::decode_to_slice(val, &mut tag).is_ok() {
                        v1.push(tag);
                    }
                }
            }
            // v0 and any future scheme: ignored, so that no one can downgrade to them.
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(Rejection::MalformedHeader)?;
    Ok(ParsedHeader { timestamp, v1, v1_entries })
}

/// The HMAC-SHA256 tag of `"{timestamp}.{body}"` under `secret`.
pub fn tag(secret: &[u8], timestamp: i64, body: &[u8]) -> [u8; 32] {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut context = hmac::Context::with_key(&key);
    context.update(timestamp.to_string().as_bytes());
    context.update(b".");
    context.update(body);
    let mut out = [0u8; 32];
    out.copy_from_slice(context.sign().as_ref());
    out
}

/// Verifies a request: the header (if any), the raw body, the endpoint's current secrets, its
/// tolerance, and keygate's clock (`now`, unix seconds). Returns the signature's timestamp.
pub fn verify(
    header: Option<&[u8]>,
    body: &[u8],
    secrets: &[&[u8]],
    tolerance: Duration,
    now: i64,
) -> Result<i64, Rejection> {
    let header = header.ok_or(Rejection::MissingHeader)?;
    let parsed = parse_header(header)?;
    if parsed.v1_entries == 0 {
        return Err(Rejection::NoV1Signature);
    }
    let tolerance = i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX);
    if now.saturating_sub(parsed.timestamp).unsigned_abs() > tolerance.unsigned_abs() {
        return Err(Rejection::TimestampOutsideTolerance);
    }
    let mut matched = Choice::from(0);
    for secret in secrets {
        let expected = tag(secret, parsed.timestamp, body);
        for candidate in &parsed.v1 {
            matched |= expected.ct_eq(candidate);
        }
    }
    if bool::from(matched) { Ok(parsed.timestamp) } else { Err(Rejection::SignatureMismatch) }
}

/// The `Stripe-Signature` value keygate sends with a delivery: `t=<timestamp>,v1=<hex>`.
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    format!("t={timestamp},v1={}", hex::encode(tag(secret, timestamp, body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"whsec_test_secret";
    const OTHER: &[u8] = b"whsec_other_secret";
    const BODY: &[u8] = br#"{"id":"evt_1","object":"event","type":"invoice.paid"}"#;
    const NOW: i64 = 1_700_000_000;
    const TOLERANCE: Duration = Duration::from_secs(300);

    fn check(header: &str, secrets: &[&[u8]]) -> Result<i64, Rejection> {
        verify(Some(header.as_bytes()), BODY, secrets, TOLERANCE, NOW)
    }

    #[test]
    fn a_signature_made_by_sign_verifies() {
        let header = sign(SECRET, NOW, BODY);
        assert_eq!(check(&header, &[SECRET]), Ok(NOW));
        // Known answer: HMAC-SHA256("whsec_test_secret", "1700000000.{body}") as Stripe computes it.
        let expected = hex::encode(tag(SECRET, NOW, BODY));
        assert_eq!(header, format!("t={NOW},v1={expected}"));
    }

    #[test]
    fn every_v1_is_checked_against_every_secret() {
        let good = hex::encode(tag(SECRET, NOW, BODY));
        let bad = hex::encode(tag(OTHER, NOW, BODY));
        // Stripe sends one v1 per active secret while a secret rolls; any match verifies.
        assert!(check(&format!("t={NOW},v1={bad},v1={good}"), &[SECRET]).is_ok());
        assert!(check(&format!("t={NOW},v1={good}"), &[OTHER, SECRET]).is_ok());
        assert_eq!(check(&format!("t={NOW},v1={bad}"), &[SECRET]), Err(Rejection::SignatureMismatch));
    }

    #[test]
    fn tampering_wrong_secrets_and_other_schemes_are_refused() {
        let good = hex::encode(tag(SECRET, NOW, BODY));
        let tampered = verify(Some(format!("t={NOW},v1={good}").as_bytes()), b"{}", &[SECRET], TOLERANCE, NOW);
        assert_eq!(tampered, Err(Rejection::SignatureMismatch));
        assert_eq!(check(&format!("t={NOW},v1={good}"), &[OTHER]), Err(Rejection::SignatureMismatch));
        // v0 carries a real-looking HMAC: still not a signature.
        assert_eq!(check(&format!("t={NOW},v0={good}"), &[SECRET]), Err(Rejection::NoV1Signature));
        assert_eq!(check(&format!("t={NOW},v2={good}"), &[SECRET]), Err(Rejection::NoV1Signature));
        // The timestamp is part of what is signed.
        assert_eq!(check(&format!("t={},v1={good}", NOW - 1), &[SECRET]), Err(Rejection::SignatureMismatch));
    }

    #[test]
    fn malformed_headers_are_told_apart_from_bad_signatures() {
        assert_eq!(verify(None, BODY, &[SECRET], TOLERANCE, NOW), Err(Rejection::MissingHeader));
        for header in ["", "garbage", "v1=abc", "t=abc,v1=00", "t=1,t=2,v1=00"] {
            assert_eq!(check(header, &[SECRET]), Err(Rejection::MalformedHeader), "{header}");
        }
        assert_eq!(check(&"x".repeat(MAX_HEADER_BYTES + 1), &[SECRET]), Err(Rejection::MalformedHeader));
        assert_eq!(check(&format!("t={NOW},v1=zz"), &[SECRET]), Err(Rejection::SignatureMismatch));
        assert_eq!(verify(Some(&[0xff, 0xfe]), BODY, &[SECRET], TOLERANCE, NOW), Err(Rejection::MalformedHeader));
    }

    #[test]
    fn the_tolerance_holds_both_ways() {
        for (t, ok) in [(NOW - 300, true), (NOW - 301, false), (NOW + 300, true), (NOW + 301, false), (0, false)] {
            let result = check(&sign(SECRET, t, BODY), &[SECRET]);
            assert_eq!(result.is_ok(), ok, "t = now {:+}", t - NOW);
            if !ok {
                assert_eq!(result, Err(Rejection::TimestampOutsideTolerance));
            }
        }
        assert_eq!(check(&sign(SECRET, i64::MIN, BODY), &[SECRET]), Err(Rejection::TimestampOutsideTolerance));
    }

    #[test]
    fn messages_never_quote_the_request() {
        for rejection in [
            Rejection::MissingHeader,
            Rejection::MalformedHeader,
            Rejection::NoV1Signature,
            Rejection::TimestampOutsideTolerance,
            Rejection::SignatureMismatch,
        ] {
            assert!(!rejection.message().contains("whsec"));
            assert!(!rejection.label().is_empty());
        }
    }
}
