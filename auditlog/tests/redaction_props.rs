//! Property: whatever Stripe-shaped exchange keygate records, in whatever encoding, its
//! redacted payload and plaintext columns never hold a planted card number (beyond its last 4
//! digits), CVC, bank or identity number, or secret.
//!
//! Generated: v1 form bodies with bracket keys (arrays too), v2 JSON bodies nested at random
//! depth, JSON responses, query strings, `text/plain`, untyped and `;`-separated bodies,
//! multipart uploads; planted card numbers in every separator style, Luhn-valid or not, glued
//! to letters, inside longer digit runs and as JSON numbers; CVCs under every CVC name (arrays
//! too); random values under bank and identity fields; `sk_live_`/`rk_test_`/`whsec_`/`sk_kg_`
//! keys and client secrets in free text, headers and columns.
//!
//! The checks, and why they are sound (a correct redactor never fails them, a leak does):
//! - Secrets and bank/identity values are random strings of 12+ characters: they cannot appear
//!   in the output by chance, so the output must not contain them (nor a secret's body) at all.
//! - Card numbers: 16 random digits, of which the last 4 may be kept. Every *string* of the
//!   output (JSON keys and values of the payload, every plaintext column) is reduced to its
//!   ASCII digits, and none of these projections may contain any 8-digit window of the card's
//!   first 12 digits. Projecting away separators and letters catches a card number that
//!   survived split by separators or with letters in between; 8 random digits recur by chance
//!   with probability ~1e-8 per position, so a correct redactor does not trip it; and a
//!   correct redactor keeps at most the last 4 digits, which no such window contains.
//! - CVCs are random 3–4 digit values that may well occur by chance (amounts), so the check is
//!   structural: the CVC *field* is absent. Only CVC fields carry the names `cvc`/`cvv`/
//!   `security_code` in the inputs, so the lower-cased output must not contain those names at
//!   all (not as a JSON key, a form key, nor percent-encoded in a query string).
//! - Not everything is masked: the planted `amount` survives wherever the body was recorded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::strings_of;

use bytes::Bytes;
use keygate_auditlog::row::redact_exchange;
use keygate_auditlog::{Exchange, HttpMessage};
use proptest::prelude::*;
use serde_json::{Value, json};

const SEPARATORS: &[&str] = &[" ", "-", ".", "/", "_", "\\", ",", "\t", "\u{a0}"];
const CVC_NAMES: &[&str] = &["cvc", "cvv", "cvc2", "cvv2", "card_cvc", "security_code", "CVC"];
const BANK_NAMES: &[&str] = &[
    "account_number",
    "routing_number",
    "iban",
    "bsb_number",
    "sort_code",
    "transit_number",
    "institution_number",
    "branch_code",
    "bank_code",
    "clabe",
];
const IDENTITY_NAMES: &[&str] = &[
    "ssn",
    "ssn_last_4",
    "id_number",
    "id_number_secondary",
    "personal_id_number",
    "tax_id",
    "vat_id",
    "business_tax_id",
    "document_number",
];

/// Letters glued to card numbers, and the ids kept before `_secret_`: without `c` and `v`, so
/// that they never spell a CVC field name by chance (see the CVC check).
const GLUE: &str = "[A-BD-UW-Za-bd-uw-z]{1,4}";

#[derive(Debug, Clone, Copy)]
enum Encoding {
    Form,
    JsonV2,
    Query,
    TextPlain,
    Untyped,
    UntypedForm,
    Semicolons,
    Multipart,
    Response,
}

/// A card number and how it is written.
#[derive(Debug, Clone)]
struct Pan {
    digits: String,
    written: String,
    as_number: bool,
}

/// Everything planted in one exchange.
#[derive(Debug, Clone)]
struct Plan {
    encoding: Encoding,
    pan: Pan,
    text_pan: Pan,
    cvc: u16,
    cvc_name: &'static str,
    cvc_array: bool,
    bank: (&'static str, String),
    identity: (&'static str, String),
    dob_year: String,
    secrets: Vec<(String, String)>, // (whole secret, its body that must disappear)
    client_secret: (String, String),
    amount: u32,
    depth: usize,
}

fn luhn_fix(digits: &mut [u8]) {
    let Some((last, body)) = digits.split_last_mut() else { return };
    let mut sum = 0u32;
    for (i, &d) in body.iter().rev().enumerate() {
        let mut v = u32::from(d);
        if i % 2 == 0 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    *last = u8::try_from((10 - sum % 10) % 10).unwrap();
}

fn pan() -> impl Strategy<Value = Pan> {
    (
        1u8..10,
        prop::collection::vec(0u8..10, 15),
        any::<bool>(),
        0u8..6,
        prop::collection::vec((0usize..3, prop::sample::select(SEPARATORS), prop::sample::select(SEPARATORS)), 15),
        "[0-9]{1,6}",
        "[0-9]{1,6}",
        GLUE,
        GLUE,
        any::<bool>(),
    )
        .prop_map(|(first, rest, luhn, style, gaps, before, after, left, right, as_number)| {
            let mut d = vec![first];
            d.extend(rest);
            if luhn {
                luhn_fix(&mut d);
            }
            let digits: String = d.iter().map(|x| char::from(b'0' + x)).collect();
            let chars: Vec<char> = digits.chars().collect();
            let written = match style {
                0 => digits.clone(),
                1 => {
                    // Groups of 4, the same 1–2 separator characters between groups.
                    let (n, a, b) = gaps[0];
                    let sep = if n == 2 { format!("{a}{b}") } else { a.to_owned() };
                    chars.chunks(4).map(|c| c.iter().collect::<String>()).collect::<Vec<_>>().join(&sep)
                }
                2 => {
                    // 0–2 random separator characters between any two digits.
                    let mut s = String::new();
                    for (i, c) in chars.iter().enumerate() {
                        s.push(*c);
                        if let Some((n, a, b)) = gaps.get(i) {
                            match n {
                                0 => {}
                                1 => s.push_str(a),
                                _ => {
                                    s.push_str(a);
                                    s.push_str(b);
                                }
                            }
                        }
                    }
                    s
                }
                3 => format!("{left}{digits}{right}"),
                4 => format!("{before}{digits}{after}"),
                _ => format!("{left}{before}-{digits}{right}"),
            };
            Pan { as_number: as_number && style == 0, digits, written }
        })
}

fn plan() -> impl Strategy<Value = Plan> {
    let encoding = prop_oneof![
        Just(Encoding::Form),
        Just(Encoding::JsonV2),
        Just(Encoding::Query),
        Just(Encoding::TextPlain),
        Just(Encoding::Untyped),
        Just(Encoding::UntypedForm),
        Just(Encoding::Semicolons),
        Just(Encoding::Multipart),
        Just(Encoding::Response),
    ];
    let secrets =
        ("[A-Za-z0-9]{24,40}", "[A-Za-z0-9]{24,40}", "[A-Za-z0-9+/]{32}", "[A-Za-z0-9_-]{43}", "[a-bd-uw-z]{0,3}")
            .prop_map(|(live, restricted, wh, kg, glue)| {
                vec![
                    (format!("{glue}sk_live_{live}"), live),
                    (format!("rk_test_{restricted}"), restricted),
                    (format!("whsec_{wh}"), wh),
                    (format!("sk_kg_{kg}"), kg),
                ]
            });
    let client_secret = (0u8..4, "[A-BD-UW-Za-bd-uw-z0-9]{14}", "[A-Za-z0-9]{24}").prop_map(|(kind, id, body)| {
        let whole = match kind {
            0 => format!("pi_{id}_secret_{body}"),
            1 => format!("seti_{id}_secret_{body}"),
            2 => format!("cs_test_{id}_secret_{body}"),
            _ => format!("cuss_secret_{body}"),
        };
        (whole, body)
    });
    (
        encoding,
        pan(),
        pan(),
        (100u16..10000, prop::sample::select(CVC_NAMES), any::<bool>()),
        (prop::sample::select(BANK_NAMES), "[A-Z]{4}[0-9]{10}"),
        (prop::sample::select(IDENTITY_NAMES), "[A-Z]{3}[0-9]{9}"),
        "Y[0-9]{4}[A-Z]{7}",
        secrets,
        client_secret,
        (1u32..1_000_000, 0usize..30),
    )
        .prop_map(
            |(
                encoding,
                pan,
                text_pan,
                (cvc, cvc_name, cvc_array),
                bank,
                identity,
                dob_year,
                secrets,
                client_secret,
                (amount, depth),
            )| Plan {
                encoding,
                pan,
                text_pan,
                cvc,
                cvc_name,
                cvc_array,
                bank,
                identity,
                dob_year,
                secrets,
                client_secret,
                amount,
                depth,
            },
        )
}

impl Plan {
    fn note(&self) -> String {
        let s: Vec<&str> = self.secrets.iter().map(|(w, _)| w.as_str()).collect();
        format!("pay {} and {}.{} then {} card {} ok", s[0], s[1], s[2], self.client_secret.0, self.text_pan.written)
    }

    /// (form key segments, value) pairs of the request.
    fn fields(&self) -> Vec<(Vec<String>, String)> {
        let v = |s: &[&str]| s.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        let mut cvc_key = v(&["payment_method_data", "card", self.cvc_name]);
        if self.cvc_array {
            cvc_key.push(String::new());
        }
        vec![
            (v(&["amount"]), self.amount.to_string()),
            (v(&["currency"]), "usd".into()),
            (v(&["payment_method_data", "type"]), "card".into()),
            (v(&["payment_method_data", "card", "number"]), self.pan.written.clone()),
            (cvc_key, self.cvc.to_string()),
            (v(&["bank_account", self.bank.0]), self.bank.1.clone()),
            (v(&["individual", self.identity.0]), self.identity.1.clone()),
            (v(&["individual", "dob", "year"]), self.dob_year.clone()),
            (v(&["client_secret"]), self.client_secret.0.clone()),
            (v(&["metadata", "note"]), self.note()),
            (v(&["metadata", "key"]), self.secrets[3].0.clone()),
        ]
    }

    fn form(&self) -> String {
        let mut ser = url::form_urlencoded::Serializer::new(String::new());
        for (segs, value) in self.fields() {
            let mut key = segs[0].clone();
            for s in &segs[1..] {
                key.push('[');
                key.push_str(s);
                key.push(']');
            }
            ser.append_pair(&key, &value);
        }
        ser.finish()
    }

    fn json(&self) -> Value {
        let mut root = json!({});
        for (segs, value) in self.fields() {
            let named: Vec<&String> = segs.iter().filter(|s| !s.is_empty()).collect();
            let leaf = if segs.last().is_some_and(String::is_empty) {
                json!([value])
            } else if named.last().is_some_and(|s| *s == "number") && self.pan.as_number {
                json!(self.pan.digits.parse::<u64>().unwrap())
            } else if named.last().is_some_and(|s| CVC_NAMES.contains(&s.as_str())) {
                json!(self.cvc)
            } else {
                json!(value)
            };
            let mut node = &mut root;
            for (i, s) in named.iter().enumerate() {
                if i + 1 == named.len() {
                    node[s.as_str()] = leaf.clone();
                } else {
                    if node.get(s.as_str()).is_none() {
                        node[s.as_str()] = json!({});
                    }
                    node = &mut node[s.as_str()];
                }
            }
        }
        for i in 0..self.depth {
            root = json!({ format!("level_{i}"): root, "object": "wrapper" });
        }
        root
    }

    fn exchange(&self) -> Exchange {
        let (method, path, content_type, body): (&str, String, Option<String>, String) = match self.encoding {
            Encoding::Form => {
                ("POST", "/v1/payment_intents".into(), Some("application/x-www-form-urlencoded".into()), self.form())
            }
            Encoding::JsonV2 => (
                "POST",
                "/v2/core/vault/us_bank_accounts".into(),
                Some("application/json".into()),
                self.json().to_string(),
            ),
            Encoding::Query => ("GET", format!("/v1/payment_intents?{}", self.form()), None, String::new()),
            Encoding::TextPlain => ("POST", "/v1/payment_intents".into(), Some("text/plain".into()), self.form()),
            Encoding::Untyped => ("POST", "/v1/payment_intents".into(), None, self.note()),
            Encoding::UntypedForm => ("POST", "/v1/payment_intents".into(), None, self.form()),
            Encoding::Semicolons => ("POST", "/v1/payment_intents".into(), None, self.form().replace('&', ";")),
            Encoding::Multipart => {
                let mut body = String::new();
                for (segs, value) in self.fields() {
                    body.push_str(&format!(
                        "--b\r\nContent-Disposition: form-data; name=\"{}\"\r\n\r\n{value}\r\n",
                        segs.join("/")
                    ));
                }
                body.push_str("--b--\r\n");
                ("POST", "/v1/files".into(), Some("multipart/form-data; boundary=b".into()), body)
            }
            Encoding::Response => ("GET", "/v1/payment_intents/pi_1".into(), None, String::new()),
        };
        let mut ex = Exchange::new(uuid::Uuid::now_v7(), method, &path);
        let mut headers = vec![
            ("Authorization".to_owned(), format!("Bearer {}", self.secrets[3].0).into_bytes()),
            ("User-Agent".to_owned(), format!("sdk/1 {} {}", self.secrets[3].0, self.text_pan.written).into_bytes()),
            ("X-Custom".to_owned(), self.bank.1.clone().into_bytes()),
            ("Stripe-Account".to_owned(), b"acct_1Abc".to_vec()),
        ];
        if let Some(ct) = content_type {
            headers.push(("Content-Type".to_owned(), ct.into_bytes()));
        }
        ex.request = HttpMessage { start_line: format!("{method} {path} HTTP/1.1"), headers, body: Bytes::from(body) };
        ex.idempotency_key = Some(format!("idem-{}", self.secrets[0].0));
        ex.reason = Some(format!("note {}", self.text_pan.written));
        ex.status = 200;
        let mut response = if matches!(self.encoding, Encoding::Response) {
            self.json()
        } else {
            json!({"id": "pi_1", "object": "payment_intent", "amount": self.amount})
        };
        response["description"] = json!(self.note());
        ex.response = Some(HttpMessage {
            start_line: "HTTP/1.1 200 OK".into(),
            headers: vec![
                ("Content-Type".into(), b"application/json".to_vec()),
                ("Request-Id".into(), b"req_1".to_vec()),
                ("X-Echo".into(), self.identity.1.clone().into_bytes()),
            ],
            body: Bytes::from(response.to_string()),
        });
        ex
    }

    /// Values that must not appear anywhere in the output.
    fn forbidden(&self) -> Vec<String> {
        let mut v: Vec<String> = self.secrets.iter().map(|(_, body)| body.clone()).collect();
        v.push(self.client_secret.1.clone());
        v.push(self.bank.1.clone());
        v.push(self.identity.1.clone());
        v.push(self.dob_year.clone());
        v
    }
}

fn digits_only(s: &str) -> String {
    s.chars().filter(char::is_ascii_digit).collect()
}

/// Asserts the redacted exchange holds none of the plan's planted values.
fn check(plan: &Plan) -> Result<(), TestCaseError> {
    let (columns, doc) = redact_exchange(&plan.exchange());
    let doc_value = serde_json::to_value(&doc).unwrap();
    let cols_value = serde_json::to_value(&columns).unwrap();
    let all = format!("{doc_value}\n{cols_value}");
    for f in plan.forbidden() {
        prop_assert!(!all.contains(&f), "`{}` survived in {}", f, all);
    }
    let lower = all.to_lowercase();
    for name in ["cvc", "cvv", "security_code"] {
        prop_assert!(!lower.contains(name), "a CVC field (`{}`) survived in {}", name, all);
    }
    let mut strings = Vec::new();
    strings_of(&doc_value, &mut strings);
    strings_of(&cols_value, &mut strings);
    for pan in [&plan.pan, &plan.text_pan] {
        let head = pan.digits.get(..12).unwrap();
        for w in 0..=4 {
            let window = head.get(w..w + 8).unwrap();
            for s in &strings {
                prop_assert!(
                    !digits_only(s).contains(window),
                    "digits {} of card {} (written {:?}) survived in {:?}",
                    window,
                    pan.digits,
                    pan.written,
                    s
                );
            }
        }
    }
    // Over-redaction guard: the amount survives where the request body was recorded.
    if let Some(body) = &doc.request.body_json {
        let amount = plan.amount.to_string();
        let mut body_strings = Vec::new();
        strings_of(body, &mut body_strings);
        prop_assert!(
            body_strings.contains(&amount),
            "amount {} lost in {}",
            amount,
            serde_json::to_string(&doc.request).unwrap()
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 768, ..ProptestConfig::default() })]

    #[test]
    fn planted_values_never_survive_redaction(plan in plan()) {
        check(&plan)?;
    }

    #[test]
    fn redaction_never_panics_on_arbitrary_text(
        body in prop::collection::vec(any::<u8>(), 0..200),
        text in "\\PC{0,80}",
        digits in "[0-9\u{660}-\u{669}\u{6f0}-\u{6f9}\u{ff10}-\u{ff19} .\u{a0}-]{0,40}",
        ct in prop::sample::select(&["", "application/json", "application/x-www-form-urlencoded", "text/plain", "multipart/form-data"][..]),
    ) {
        let mut ex = Exchange::new(uuid::Uuid::now_v7(), "POST", &format!("/v1/x/{digits}?q={text}&d={digits}"));
        let mut headers = vec![("User-Agent".to_owned(), format!("{text}{digits}").into_bytes()), ("X".to_owned(), body.clone())];
        if !ct.is_empty() {
            headers.push(("Content-Type".to_owned(), ct.as_bytes().to_vec()));
        }
        ex.request = HttpMessage { start_line: format!("POST /v1/x?{digits} HTTP/1.1"), headers, body: Bytes::from(body) };
        ex.reason = Some(digits.clone());
        ex.response = Some(HttpMessage {
            start_line: "HTTP/1.1 200 OK".into(),
            headers: vec![("Content-Type".into(), b"application/json".to_vec())],
            body: Bytes::from(json!({"a": digits, "b": text, digits.clone(): [digits.clone()]}).to_string()),
        });
        let (columns, _doc, failed) = keygate_auditlog::row::redact_exchange_reporting(&ex);
        prop_assert!(!failed, "redaction panicked");
        prop_assert_eq!(columns.event_id, ex.event_id);
    }
}
