//! Fuzz targets for the canonical request (issue 12): the head checks, the path grammar, the form,
//! JSON and multipart parsers, and the whole target canonicalisation.
//!
//! Under `cargo test` each target first replays its seed corpus (the attacker's probes of issue
//! 12 and what the SDKs send), then runs random inputs for a bounded time
//! ([`FUZZ_TIME`], or `KEYGATE_FUZZ_SECONDS`). With a nightly toolchain the same targets run
//! under libFuzzer: `cargo bolero test -p keygate-wire --test fuzz_targets path_target`.
//!
//! Properties: nothing panics; what is accepted is canonical (a fixed point of its own
//! canonicalisation) and made only of what the grammar allows.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use keygate_wire::{form, json, multipart, path};

/// How long each target runs random inputs under `cargo test`.
const FUZZ_TIME: Duration = Duration::from_secs(3);

fn fuzz_time() -> Duration {
    std::env::var("KEYGATE_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).map_or(FUZZ_TIME, Duration::from_secs)
}

const PATH_SEEDS: &[&str] = &[
    "/v1/refunds",
    "/v1/%72efunds",
    "/v1/refund%73",
    "/v1/%70ayouts",
    "/v1/%2570ayouts",
    "/v1/customers/%73earch",
    "/v1/customers/cus_1%2Frefunds",
    "/v1/customers/../refunds",
    "/v1/%2E%2E/refunds",
    "/v1//refunds",
    "/V1/Refunds",
    "/v1/ref%unds",
    "/v1/reporting/report_types/balance.summary.1",
    "/v1/cus\u{e9}tomers",
    "/v2/core/accounts/acct_1",
    "/v1/customers/%00",
];

const FORM_SEEDS: &[&str] = &[
    "amount=100&currency=usd",
    "amount=100&amount=999999",
    "amount=100&%61mount=999999",
    "type=card;card[cvc]=123",
    "card[cvc=123",
    "card[cvc][]=123&card[cvc][]=456",
    "expand%5B0%5D=latest_charge&metadata%5Bk%5D=a+b",
    "a=%zz",
    "a=%ff",
    "description=4242424242424242%D9%A4%D9%A4",
    "{\"amount\":100,\"x\":\"&amount=999999\"}",
    "&&=&=",
];

const JSON_SEEDS: &[&str] = &[
    r#"{"amount":100,"currency":"usd"}"#,
    r#"{"amount":100,"amount":999999}"#,
    r#"{"a":{"b":1,"\u0062":2}}"#,
    r#"{"amount":1e400}"#,
    r#"{"n":18446744073709551616}"#,
    "[1,2]",
    "{} {}",
    r#"{"a":"sk_kg_x"}"#,
];

const MULTIPART_SEEDS: &[&[u8]] = &[
    b"--b\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\ndispute_evidence\r\n--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.pdf\"\r\nContent-Type: application/pdf\r\n\r\n%PDF\r\n--b--\r\n",
    b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\nX: y\r\n\r\nx\r\n--b--",
    b"junk--b\r\n\r\n--b--",
    b"--b\r\n\r\n\r\n--b--",
];

/// Header lines as `name: value` separated by `\n`, for the head target.
const HEAD_SEEDS: &[&[u8]] = &[
    b"POST\nconnection: Stripe-Account\nstripe-account: acct_1",
    b"GET\nstripe-account: acct_1\nstripe-account: acct_2",
    b"GET\nstripe-account: acct_EVIL\xa0",
    b"post\ncontent-type: application/x-www-form-urlencoded",
    b"GET\nconnection: keep-alive, Content-Type",
    b"GET\nuser-agent: Stripe/v1 PythonBindings/12.0.0\nx-stripe-client-user-agent: {\"lang\":\"python\"}",
    b"DELETE\nstripe-context: sk_kg_abc",
];

fn check_path(raw: &str) {
    if let Ok(canonical) = path::canonical_path(raw) {
        assert!(canonical.starts_with('/'));
        assert!(canonical.bytes().all(|b| b == b'/' || path::is_segment_byte(b)), "{canonical:?}");
        assert!(!canonical.contains("//") && !canonical.ends_with('/'));
        assert!(canonical.split('/').skip(1).all(|s| s != "." && s != ".."));
        assert_eq!(path::canonical_path(&canonical).as_ref(), Ok(&canonical), "fixed point");
    }
}

fn check_form(raw: &[u8]) {
    if let Ok(pairs) = form::parse(raw) {
        let text = form::serialize(&pairs);
        assert!(!text.contains(';') && !text.contains('+'));
        assert_eq!(form::parse(text.as_bytes()).as_ref(), Ok(&pairs), "round trip of {text:?}");
    }
    let _ = form::parse_repeated(raw);
}

fn check_json(raw: &[u8]) {
    if let Ok(canonical) = json::canonical(raw) {
        let again = json::canonical(&canonical.bytes).expect("canonical JSON is accepted");
        assert_eq!(again.bytes, canonical.bytes, "fixed point");
    }
}

fn check_multipart(raw: &[u8]) {
    if let Ok(parts) = multipart::parse("b", raw) {
        let (content_type, body) = multipart::serialize(&parts);
        let boundary = content_type.strip_prefix("multipart/form-data; boundary=").expect("boundary");
        assert_eq!(multipart::parse(boundary, &body).as_ref(), Ok(&parts), "round trip");
    }
}

fn check_head(raw: &[u8]) {
    let mut lines = raw.split(|&b| b == b'\n');
    let method = String::from_utf8_lossy(lines.next().unwrap_or_default()).into_owned();
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(&line[..colon]), HeaderValue::from_bytes(line[colon + 1..].trim_ascii()))
        else {
            continue;
        };
        headers.append(name, value);
    }
    if let Ok(method) = keygate_wire::check_head(&method, &headers) {
        assert!(matches!(method, Method::GET | Method::POST | Method::DELETE));
        let forwarded = keygate_wire::forwarded_headers(&headers);
        for (name, value) in &forwarded {
            assert!(keygate_wire::FORWARDED_HEADERS.contains(&name.as_str()));
            assert!(value.as_bytes().iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b)));
            assert!(!keygate_wire::contains_keygate_token(value.to_str().unwrap_or("")));
        }
        for name in keygate_wire::SINGLE_VALUED_HEADERS {
            assert!(forwarded.get_all(*name).iter().count() <= 1);
        }
    }
}

/// The whole target: bytes split into path, query, content type and body by `\n`.
fn check_target(raw: &[u8]) {
    let mut parts = raw.splitn(5, |&b| b == b'\n');
    let method = match parts.next().and_then(|m| m.first()) {
        Some(b) if b % 3 == 0 => Method::GET,
        Some(b) if b % 3 == 1 => Method::DELETE,
        _ => Method::POST,
    };
    let path = String::from_utf8_lossy(parts.next().unwrap_or(b"/v1/customers")).into_owned();
    let query = parts.next().map(|q| String::from_utf8_lossy(q).into_owned());
    let content_type = parts.next().map(|c| String::from_utf8_lossy(c).into_owned());
    let body = parts.next().unwrap_or_default();
    if let Ok(target) =
        keygate_wire::canonicalize_target(&method, &path, query.as_deref(), content_type.as_deref(), body)
    {
        let ct = target.content_type.as_ref().map(|v| v.to_str().unwrap_or("").to_owned());
        // Multipart boundaries are fresh on every serialisation; compare everything else.
        let again = keygate_wire::canonicalize_target(
            &method,
            &target.path,
            target.query.as_deref(),
            ct.as_deref(),
            &target.body,
        )
        .expect("a canonical target is accepted");
        assert_eq!(again.path, target.path);
        assert_eq!(again.query, target.query);
        assert_eq!(again.kind, target.kind);
        if target.kind != keygate_wire::BodyKind::Multipart {
            assert_eq!(again.body, target.body);
        }
    }
}

#[test]
fn path_target() {
    PATH_SEEDS.iter().for_each(|s| check_path(s));
    bolero::check!().with_test_time(fuzz_time()).for_each(|input: &[u8]| check_path(&String::from_utf8_lossy(input)));
}

#[test]
fn form_target() {
    FORM_SEEDS.iter().for_each(|s| check_form(s.as_bytes()));
    bolero::check!().with_test_time(fuzz_time()).for_each(|input: &[u8]| check_form(input));
}

#[test]
fn json_target() {
    JSON_SEEDS.iter().for_each(|s| check_json(s.as_bytes()));
    bolero::check!().with_test_time(fuzz_time()).for_each(|input: &[u8]| check_json(input));
}

#[test]
fn multipart_target() {
    MULTIPART_SEEDS.iter().for_each(|s| check_multipart(s));
    bolero::check!().with_test_time(fuzz_time()).for_each(|input: &[u8]| check_multipart(input));
}

#[test]
fn head_target() {
    HEAD_SEEDS.iter().for_each(|s| check_head(s));
    bolero::check!().with_test_time(fuzz_time()).for_each(|input: &[u8]| check_head(input));
}

#[test]
fn target_target() {
    for path in PATH_SEEDS {
        for body in FORM_SEEDS {
            let raw = format!("\u{2}\n{path}\nexpand[]=a\napplication/x-www-form-urlencoded\n{body}");
            check_target(raw.as_bytes());
        }
    }
    for body in JSON_SEEDS {
        check_target(format!("\u{2}\n/v2/core/accounts\n\napplication/json\n{body}").as_bytes());
    }
    bolero::check!().with_test_time(fuzz_time()).for_each(|input: &[u8]| check_target(input));
}
