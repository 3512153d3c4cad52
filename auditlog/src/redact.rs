//! Redaction: the one list of what is never recorded, and the code that applies it.
//!
//! Runs before anything is compressed, encrypted or written. Rules, in order of application:
//!
//! 1. Headers dropped whole: [`DROPPED_HEADERS`] (the client's `Authorization` above all).
//! 2. Body and query fields dropped whole: [`DROPPED_FIELDS`] (CVC and friends).
//! 3. Body and query fields masked: [`MASKED_FIELDS`] (client secrets, ephemeral-key secrets,
//!    OAuth tokens, account and id numbers), `url` fields of single-use links
//!    ([`SINGLE_USE_URL_PREFIXES`]), and `code` in OAuth requests.
//! 4. Everywhere (header values, every string in a body, query strings, plaintext columns):
//!    values shaped like Stripe secrets ([`SECRET_PATTERNS`]: `sk_…`, `rk_…`, `whsec_…`, `ek_…`,
//!    `…_secret_…`) are masked, and digit runs that pass the Luhn check (13–19 digits, spaces or
//!    dashes allowed) keep only their last 4 digits.
//!
//! Bodies that are neither form-encoded, JSON nor UTF-8 text are not recorded (only their size
//! and content type), since they cannot be inspected.

use std::borrow::Cow;
use std::sync::LazyLock;

use regex::Regex;
use serde::Serialize;
use serde_json::Value;

use crate::exchange::HttpMessage;

/// Headers never recorded, compared case-insensitively.
pub const DROPPED_HEADERS: &[&str] =
    &["authorization", "proxy-authorization", "cookie", "set-cookie", "x-keygate-token"];

/// Field names (the last `[segment]` of a form key, or a JSON object key) dropped whole.
pub const DROPPED_FIELDS: &[&str] = &["cvc", "cvv", "cvc2", "cvv2", "card_cvc", "pin"];

/// Field names whose values are replaced by [`MASK`].
pub const MASKED_FIELDS: &[&str] = &[
    "client_secret",
    "secret",
    "access_token",
    "refresh_token",
    "id_token",
    "password",
    "account_number",
    "id_number",
    "personal_id_number",
    "ssn",
    "stripe_publishable_key",
];

/// `url` values that are bearer links (whoever has them can use them) start with one of these.
pub const SINGLE_USE_URL_PREFIXES: &[&str] = &[
    "https://connect.stripe.com/setup/",
    "https://connect.stripe.com/express/",
    "https://connect.stripe.com/d/setup/",
    "https://connect.stripe.com/oauth/",
    "https://billing.stripe.com/p/session/",
    "https://checkout.stripe.com/c/pay/",
    "https://verify.stripe.com/start/",
    "https://files.stripe.com/links/",
    "https://hooks.stripe.com/",
    "https://pay.stripe.com/",
    "https://invoice.stripe.com/",
];

/// What a masked value becomes.
pub const MASK: &str = "[redacted]";

/// Secret-shaped values masked wherever they appear; the first capture group is kept so a
/// reader can tell what kind of secret was there.
pub const SECRET_PATTERNS: &[&str] = &[
    // Secret and restricted keys, live or test, and keygate's own `sk_kg_` tokens.
    r"\b((?:sk|rk)_[a-z]+_)[A-Za-z0-9]{6,}",
    // Webhook signing secrets.
    r"\b(whsec_)[A-Za-z0-9+/=]{6,}",
    // Ephemeral keys.
    r"\b(ek_[a-z]+_)[A-Za-z0-9]{6,}",
    // Client secrets of PaymentIntents, SetupIntents, Sessions: `pi_123_secret_abc`.
    r"\b([a-z]+_[A-Za-z0-9]+_secret_)[A-Za-z0-9]+",
];

static SECRET_REGEXES: LazyLock<Vec<Regex>> =
    LazyLock::new(|| SECRET_PATTERNS.iter().filter_map(|p| Regex::new(p).ok()).collect());

/// Literals that every [`SECRET_PATTERNS`] match contains. One literal search (a SIMD multi-
/// substring scan) rules out the common case, a string with no secret, before any of the
/// patterns runs. Keep in step with [`SECRET_PATTERNS`]; `secret_hint_covers_every_pattern`
/// checks it.
const SECRET_HINT_LITERALS: &str = "sk_|rk_|whsec_|ek_|_secret_";

static SECRET_HINT: LazyLock<Option<Regex>> = LazyLock::new(|| Regex::new(SECRET_HINT_LITERALS).ok());

/// Candidate card numbers: 13 to 19 digits, optionally grouped by single spaces or dashes.
static PAN_CANDIDATE: LazyLock<Option<Regex>> = LazyLock::new(|| Regex::new(r"\b\d(?:[ -]?\d){12,18}\b").ok());

/// Masks secret-shaped substrings and card numbers in free text.
pub fn redact_text(text: &str) -> String {
    redact_text_cow(text).into_owned()
}

/// [`redact_text`] without a copy when nothing needs masking (the common case).
pub fn redact_text_cow(text: &str) -> Cow<'_, str> {
    let mut out = Cow::Borrowed(text);
    // Fail closed: if the hint cannot be built, every pattern runs.
    if SECRET_HINT.as_ref().is_none_or(|hint| hint.is_match(text)) {
        for re in SECRET_REGEXES.iter() {
            if re.is_match(&out) {
                out = Cow::Owned(re.replace_all(&out, "${1}[redacted]").into_owned());
            }
        }
    }
    if let Some(re) = PAN_CANDIDATE.as_ref()
        && out.bytes().filter(u8::is_ascii_digit).count() >= 13
        && re.is_match(&out)
    {
        out = Cow::Owned(re.replace_all(&out, |caps: &regex::Captures<'_>| mask_pan(&caps[0])).into_owned());
    }
    out
}

fn mask_pan(candidate: &str) -> String {
    let digits: Vec<u8> = candidate.bytes().filter(u8::is_ascii_digit).map(|b| b - b'0').collect();
    if !luhn_valid(&digits) {
        return candidate.to_owned();
    }
    let last4: String = digits[digits.len() - 4..].iter().map(|d| char::from(b'0' + d)).collect();
    format!("****{last4}")
}

fn luhn_valid(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, &d) in digits.iter().rev().enumerate() {
        let mut v = u32::from(d);
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum.is_multiple_of(10)
}

/// What a redacted HTTP message looks like inside the encrypted payload.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct RedactedMessage {
    pub start_line: String,
    pub headers: Vec<(String, String)>,
    /// Body as JSON when it was JSON, as (redacted) form pairs when form-encoded.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub body_json: Option<Value>,
    /// Body as text otherwise.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub body_text: Option<String>,
    /// Set when the body was not recorded (binary content).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub body_omitted: Option<String>,
    pub body_bytes: u64,
}

/// Request context that changes rules (OAuth `code`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Context {
    pub oauth: bool,
}

impl Context {
    /// Context derived from the request path.
    pub fn for_path(path: &str) -> Context {
        Context { oauth: path.starts_with("/oauth/") || path.contains("/oauth/token") }
    }
}

/// Redacts one message.
pub fn redact_message(msg: &HttpMessage, ctx: Context) -> RedactedMessage {
    let mut content_type = String::new();
    let mut headers = Vec::with_capacity(msg.headers.len());
    for (name, value) in &msg.headers {
        let lower = name.to_ascii_lowercase();
        if DROPPED_HEADERS.contains(&lower.as_str()) {
            continue;
        }
        let value = String::from_utf8_lossy(value);
        if lower == "content-type" {
            content_type = value.to_ascii_lowercase();
        }
        headers.push((lower, redact_text(&value)));
    }
    let mut out = RedactedMessage {
        start_line: redact_start_line(&msg.start_line, ctx),
        headers,
        body_json: None,
        body_text: None,
        body_omitted: None,
        body_bytes: msg.body.len() as u64,
    };
    if msg.body.is_empty() {
        return out;
    }
    let body = &msg.body[..];
    if content_type.starts_with("application/x-www-form-urlencoded") {
        out.body_json = Some(Value::Array(
            redact_form_pairs(body, ctx)
                .into_iter()
                .map(|(k, v)| Value::Array(vec![Value::String(k), Value::String(v)]))
                .collect(),
        ));
    } else if let Ok(mut json) = serde_json::from_slice::<Value>(body) {
        redact_json(&mut json, ctx);
        out.body_json = Some(json);
    } else if content_type.starts_with("multipart/") || std::str::from_utf8(body).is_err() {
        out.body_omitted =
            Some(format!("{} body of {} bytes not recorded", content_type_or_unknown(&content_type), body.len()));
    } else {
        let text = String::from_utf8_lossy(body);
        // Text that looks form-encoded (no content type) is treated as such.
        if content_type.is_empty() && text.contains('=') && !text.contains(' ') {
            out.body_json = Some(Value::Array(
                redact_form_pairs(body, ctx)
                    .into_iter()
                    .map(|(k, v)| Value::Array(vec![Value::String(k), Value::String(v)]))
                    .collect(),
            ));
        } else {
            out.body_text = Some(redact_text(&text));
        }
    }
    out
}

fn content_type_or_unknown(ct: &str) -> &str {
    if ct.is_empty() { "untyped" } else { ct }
}

/// Redacts a request or status line: the query string's fields go through the field rules.
pub fn redact_start_line(line: &str, ctx: Context) -> String {
    let mut parts: Vec<&str> = line.splitn(3, ' ').collect();
    if parts.len() >= 2 && parts[1].contains('?') {
        let target = redact_path(parts[1], ctx);
        parts[1] = &target;
        return redact_text(&parts.join(" "));
    }
    redact_text(line)
}

/// Redacts a path with its query string (the lake's plaintext `path` column goes through this).
pub fn redact_path(path: &str, ctx: Context) -> String {
    match path.split_once('?') {
        None => redact_text(path),
        Some((p, query)) => {
            let pairs = redact_form_pairs(query.as_bytes(), ctx);
            let encoded: String = url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .finish();
            format!("{}?{}", redact_text(p), encoded)
        }
    }
}

/// The last `[segment]` of a form key: `card[number]` → `number`, `items[0][price]` → `price`.
fn field_name(key: &str) -> &str {
    let trimmed = key.trim_end_matches(']');
    match trimmed.rfind('[') {
        Some(i) => &trimmed[i + 1..],
        None => trimmed,
    }
}

enum FieldRule {
    Drop,
    Mask,
    Keep,
}

fn field_rule(name: &str, value: Option<&str>, ctx: Context) -> FieldRule {
    let is = |list: &[&str]| list.iter().any(|f| f.eq_ignore_ascii_case(name));
    if is(DROPPED_FIELDS) {
        return FieldRule::Drop;
    }
    if is(MASKED_FIELDS) || (ctx.oauth && name.eq_ignore_ascii_case("code")) {
        return FieldRule::Mask;
    }
    let ends_with_url = name.len() >= 3 && name.as_bytes()[name.len() - 3..].eq_ignore_ascii_case(b"url");
    if ends_with_url
        && let Some(v) = value
        && SINGLE_USE_URL_PREFIXES.iter().any(|p| v.starts_with(p))
    {
        return FieldRule::Mask;
    }
    FieldRule::Keep
}

fn redact_form_pairs(body: &[u8], ctx: Context) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (k, v) in url::form_urlencoded::parse(body) {
        match field_rule(field_name(&k), Some(&v), ctx) {
            FieldRule::Drop => {}
            FieldRule::Mask => out.push((redact_text(&k), MASK.to_owned())),
            FieldRule::Keep => out.push((redact_text(&k), redact_text_cow(&v).into_owned())),
        }
    }
    out
}

/// Redacts a JSON document in place.
pub fn redact_json(value: &mut Value, ctx: Context) {
    match value {
        Value::Object(map) => {
            let mut drop = Vec::new();
            for (k, v) in map.iter_mut() {
                match field_rule(k, v.as_str(), ctx) {
                    FieldRule::Drop => drop.push(k.clone()),
                    FieldRule::Mask => {
                        if !v.is_null() {
                            *v = Value::String(MASK.to_owned());
                        }
                    }
                    FieldRule::Keep => redact_json(v, ctx),
                }
            }
            for k in drop {
                map.remove(&k);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| redact_json(v, ctx)),
        Value::String(s) => {
            if let Cow::Owned(r) = redact_text_cow(s) {
                *s = r;
            }
        }
        Value::Number(n) => {
            // A card number sent as a JSON number.
            if let Some(u) = n.as_u64()
                && u >= 1_000_000_000_000
            {
                let masked = redact_text(&u.to_string());
                if masked.starts_with('*') {
                    *value = Value::String(masked);
                }
            }
        }
        Value::Null | Value::Bool(_) => {}
    }
}

/// Applies [`redact_text`] to an optional plaintext column.
pub fn redact_opt(value: &Option<String>) -> Option<String> {
    value.as_deref().map(redact_text)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use bytes::Bytes;

    fn form_request(body: &str) -> HttpMessage {
        HttpMessage {
            start_line: "POST /v1/payment_intents HTTP/1.1".into(),
            headers: vec![
                ("Authorization".into(), b"Bearer sk_kg_abcdefghijklmnop".to_vec()),
                ("Content-Type".into(), b"application/x-www-form-urlencoded".to_vec()),
                ("Idempotency-Key".into(), b"idem-1".to_vec()),
            ],
            body: Bytes::from(body.to_owned()),
        }
    }

    fn json_response(body: &str) -> HttpMessage {
        HttpMessage {
            start_line: "HTTP/1.1 200 OK".into(),
            headers: vec![("content-type".into(), b"application/json".to_vec())],
            body: Bytes::from(body.to_owned()),
        }
    }

    fn rendered(m: &RedactedMessage) -> String {
        serde_json::to_string(m).unwrap()
    }

    #[test]
    fn authorization_cookie_and_proxy_authorization_headers_are_dropped() {
        let mut msg = form_request("amount=100");
        msg.headers.push(("Cookie".into(), b"session=abc".to_vec()));
        msg.headers.push(("Proxy-Authorization".into(), b"Basic dXNlcjpwYXNz".to_vec()));
        let r = redact_message(&msg, Context::default());
        let names: Vec<&str> = r.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["content-type", "idempotency-key"]);
        let text = rendered(&r);
        assert!(!text.contains("sk_kg_abcdefghijklmnop"));
        assert!(!text.contains("session=abc"));
        assert!(!text.contains("dXNlcjpwYXNz"));
    }

    #[test]
    fn table_of_field_rules() {
        // (form body, text that must be absent, text that must be present)
        let cases: &[(&str, &str, &str)] = &[
            ("card[number]=4242424242424242", "4242424242424242", "****4242"),
            ("card[number]=4242 4242 4242 4242", "4242 4242 4242 4242", "****4242"),
            ("payment_method_data[card][cvc]=314&payment_method_data[type]=card", "314", "payment_method_data[type]"),
            ("card[cvc]=987&amount=100", "987", "amount"),
            ("client_secret=pi_3Mtw_secret_YrKJUKribcBjcG8HVhfZluoGH", "YrKJUKribcBjcG8HVhfZluoGH", MASK),
            ("refresh_token=rt_abcdefabcdef", "rt_abcdefabcdef", MASK),
            ("access_token=sk_live_zzzzzzzzzzzzzz", "zzzzzzzzzzzzzz", MASK),
            ("metadata[note]=key sk_live_51Habcdefghijkl here", "51Habcdefghijkl", "sk_live_[redacted]"),
            ("metadata[note]=sk_test_51Habcdefghijkl", "51Habcdefghijkl", "sk_test_[redacted]"),
            ("metadata[k]=rk_live_51Habcdefghijkl", "51Habcdefghijkl", "rk_live_[redacted]"),
            ("metadata[k]=rk_test_51Habcdefghijkl", "51Habcdefghijkl", "rk_test_[redacted]"),
            ("metadata[k]=whsec_abcdefghijklmnop", "abcdefghijklmnop", "whsec_[redacted]"),
            ("bank_account[account_number]=000123456789", "000123456789", MASK),
            ("amount=100000000000", "", "100000000000"), // not Luhn-shaped card: kept
        ];
        for (body, absent, present) in cases {
            let r = redact_message(&form_request(body), Context::default());
            let text = rendered(&r);
            if !absent.is_empty() {
                assert!(!text.contains(absent), "{body}: `{absent}` survived in {text}");
            }
            assert!(text.contains(present), "{body}: `{present}` missing from {text}");
        }
    }

    #[test]
    fn response_secrets_are_masked() {
        let body = r#"{"id":"pi_1","object":"payment_intent","client_secret":"pi_1_secret_abcdef123456",
            "nested":{"secret":"ek_test_YWNjdF8xMjM0NTY3ODkw"},
            "webhook":{"secret":"whsec_0123456789abcdef"},
            "link":{"object":"account_link","url":"https://connect.stripe.com/setup/e/acct_1/abcdefgh"},
            "return_url":"https://example.com/return",
            "card":{"last4":"4242","cvc_check":"pass"},
            "amount":4242424242424242}"#;
        let r = redact_message(&json_response(body), Context::default());
        let text = rendered(&r);
        for absent in
            ["abcdef123456", "YWNjdF8xMjM0NTY3ODkw", "0123456789abcdef", "acct_1/abcdefgh", "4242424242424242"]
        {
            assert!(!text.contains(absent), "`{absent}` survived in {text}");
        }
        assert!(text.contains("https://example.com/return"));
        assert!(text.contains("cvc_check"), "cvc_check is a result, not a CVC");
        assert!(text.contains("\"last4\":\"4242\""));
    }

    #[test]
    fn oauth_code_is_masked_only_in_oauth_requests() {
        let msg = form_request("grant_type=authorization_code&code=ac_123456789");
        let r = redact_message(&msg, Context::for_path("/oauth/token"));
        assert!(!rendered(&r).contains("ac_123456789"));
        let r = redact_message(&json_response(r#"{"error":{"code":"card_declined"}}"#), Context::default());
        assert!(rendered(&r).contains("card_declined"));
    }

    #[test]
    fn query_strings_and_paths_are_redacted() {
        let path = "/v1/payment_intents/pi_1?client_secret=pi_1_secret_zzzzzzzz&expand[]=x";
        let p = redact_path(path, Context::default());
        assert!(!p.contains("zzzzzzzz"), "{p}");
        assert!(p.starts_with("/v1/payment_intents/pi_1?"));
        let line = redact_start_line(&format!("GET {path} HTTP/1.1"), Context::default());
        assert!(!line.contains("zzzzzzzz"), "{line}");
        assert!(line.ends_with(" HTTP/1.1"));
    }

    #[test]
    fn binary_bodies_are_not_recorded() {
        let msg = HttpMessage {
            start_line: "POST /v1/files HTTP/1.1".into(),
            headers: vec![("content-type".into(), b"multipart/form-data; boundary=x".to_vec())],
            body: Bytes::from_static(b"--x\r\n4242424242424242\r\n--x--"),
        };
        let r = redact_message(&msg, Context::default());
        assert!(r.body_omitted.is_some());
        assert!(!rendered(&r).contains("4242424242424242"));
        assert_eq!(r.body_bytes, 28);
    }

    #[test]
    fn secret_hint_covers_every_pattern() {
        let hint = Regex::new(SECRET_HINT_LITERALS).unwrap();
        assert_eq!(SECRET_REGEXES.len(), SECRET_PATTERNS.len(), "every pattern compiles");
        for sample in
            ["sk_live_abcdef123", "rk_test_abcdef123", "whsec_abcdef123", "ek_test_abcdef123", "pi_1_secret_abc"]
        {
            assert!(SECRET_REGEXES.iter().any(|re| re.is_match(sample)), "{sample} is a secret");
            assert!(hint.is_match(sample), "the hint misses {sample}");
        }
        assert!(matches!(redact_text_cow("payment_intent requires_confirmation"), Cow::Borrowed(_)));
    }

    #[test]
    fn luhn_rejects_non_card_digit_runs() {
        assert_eq!(redact_text("order 1234567890123"), "order 1234567890123");
        assert_eq!(redact_text("5555555555554444"), "****4444");
        assert_eq!(redact_text("378282246310005"), "****0005");
    }
}
