//! Stripe's path grammar: `/`-separated segments, each made of ASCII letters, digits, `_`, `-`
//! and `.`.
//!
//! Stripe's own ids (`cus_…`, `pi_…`) use letters, digits and `_`; ids chosen by users (coupon,
//! customer, product, plan and SKU ids) "can only contain alphanumeric and `_-` characters on
//! creation" since API version 2018-05-21 (Stripe changelog: valid characters for IDs); report
//! types (`balance.summary.1`) add `.`. Percent-encoding is decoded once; the decoded path must
//! be in that alphabet, so it is also its own, only encoding on the wire: a parser upstream
//! cannot decode it into anything else. Refused: encoded `/`, empty, `.` and `..` segments,
//! anything outside the alphabet (including encoded characters that decode outside it),
//! malformed escapes. (Objects created before 2018 with other characters in their ids cannot be
//! reached through keygate; rename them in the Dashboard.)

use crate::Refusal;

/// The longest path accepted (Stripe's longest templates with ids are far shorter).
pub const MAX_PATH_BYTES: usize = 2048;

/// Whether a decoded byte may appear in a path segment.
pub fn is_segment_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')
}

/// Decodes and checks a raw path (without the query string); returns its canonical form.
pub fn canonical_path(raw: &str) -> Result<String, Refusal> {
    if raw.len() > MAX_PATH_BYTES {
        return Err(Refusal::Path("it is longer than 2048 bytes"));
    }
    let Some(rest) = raw.strip_prefix('/') else {
        return Err(Refusal::Path("it does not start with `/`"));
    };
    let mut out = String::with_capacity(raw.len());
    for segment in rest.split('/') {
        out.push('/');
        let start = out.len();
        let bytes = segment.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            let b = match bytes[i] {
                b'%' => {
                    let decoded = bytes.get(i + 1..i + 3).and_then(|hex| {
                        let hi = char::from(hex[0]).to_digit(16)?;
                        let lo = char::from(hex[1]).to_digit(16)?;
                        u8::try_from(hi * 16 + lo).ok()
                    });
                    let Some(decoded) = decoded else {
                        return Err(Refusal::Path("it has a malformed percent-escape"));
                    };
                    i += 3;
                    if decoded == b'/' || decoded == b'\\' {
                        return Err(Refusal::Path("it has an encoded `/` or `\\`"));
                    }
                    decoded
                }
                other => {
                    i += 1;
                    other
                }
            };
            if !is_segment_byte(b) {
                return Err(Refusal::Path(
                    "a segment holds a character outside Stripe's id alphabet (ASCII letters, digits, `_`, `-`, `.`)",
                ));
            }
            out.push(char::from(b));
        }
        match &out[start..] {
            "" => return Err(Refusal::Path("it has an empty segment (`//` or a trailing `/`)")),
            "." | ".." => return Err(Refusal::Path("it has a `.` or `..` segment")),
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn decodes_once_into_the_alphabet() {
        assert_eq!(canonical_path("/v1/%72efunds").unwrap(), "/v1/refunds");
        assert_eq!(canonical_path("/v1/refund%73").unwrap(), "/v1/refunds");
        assert_eq!(canonical_path("/v1/customers/%73earch").unwrap(), "/v1/customers/search");
        assert_eq!(
            canonical_path("/v1/reporting/report_types/balance.summary.1").unwrap(),
            "/v1/reporting/report_types/balance.summary.1"
        );
        assert_eq!(canonical_path("/v1/coupons/SUMMER-25_off").unwrap(), "/v1/coupons/SUMMER-25_off");
    }

    #[test]
    fn refuses_what_a_server_could_read_otherwise() {
        for raw in [
            "/v1/customers/cus_1%2Frefunds",
            "/v1/customers/cus_1%2frefunds",
            "/v1//refunds",
            "/v1/refunds/",
            "/v1/./refunds",
            "/v1/x/../refunds",
            "/v1/%2E%2E/refunds",
            "/v1/%2e/refunds",
            "/v1/refunds%00",
            "/v1/ref%unds",
            "/v1/refunds%2",
            "/v1/cus%20tomers",
            "/v1/customers/cus_1%5C..",
            "/v1/custo\u{e9}mers",
            "/v1/%25",
            "v1/refunds",
            "/",
            "",
        ] {
            assert!(canonical_path(raw).is_err(), "{raw:?} accepted");
        }
    }

    #[test]
    fn canonical_paths_are_fixed_points() {
        for raw in ["/v1/%72efunds", "/v2/core/accounts/acct_1", "/oauth/token"] {
            let once = canonical_path(raw).unwrap();
            assert_eq!(canonical_path(&once).unwrap(), once);
        }
    }
}
