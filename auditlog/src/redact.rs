//! Redaction: the one table of what is never recorded, and the code that applies it.
//!
//! Runs before anything is compressed, encrypted or written ([`crate::row::redact_exchange`]
//! calls it, and catches a panic if one ever happens: see there).
//!
//! Invariants:
//! - **Nothing here panics on any input.** No indexing or slicing that can fail (`get` instead),
//!   ASCII-only character classes (`[0-9]`, never `\d`), and if a regex cannot be built the
//!   text it guards is masked whole (fail closed).
//! - **Clean strings are not copied.** Each text rule starts with a cheap check (a count of ASCII
//!   digits, one multi-literal scan for secret prefixes, a search for `%`) and hands the input
//!   back borrowed when it finds nothing.
//! - **What cannot be parsed strictly is not recorded.** A body is recorded only as strict
//!   form encoding or as valid JSON; anything else keeps only its size and content type.
//! - **One table.** What a field *means* decides its fate: [`SENSITIVE_FIELDS`]. Header values
//!   are kept only for [`RECORDED_HEADERS`].
//!
//! Rules, in order of application:
//!
//! 1. **Headers by allowlist.** [`DROPPED_HEADERS`] are not recorded at all (`Authorization`
//!    above all). Headers in [`RECORDED_HEADERS`] keep their value, passed through the text
//!    rules (4, 5). Every other header is recorded by name with the value [`MASK`].
//! 2. **Fields by meaning** ([`SENSITIVE_FIELDS`]), in form bodies, query strings and JSON at any
//!    depth. A form key is split into its bracket segments (`card[cvc][]` → `card`, `cvc`;
//!    empty and numeric segments are array indices and ignored); every segment is looked up, so
//!    an entry applies to the whole subtree under its name (`dob[year]`, `card[cvc][0]`), and
//!    in JSON a key's value is replaced whole, whatever it holds (string, number, array,
//!    object). Names compare case-insensitively after trimming spaces. The strongest verdict
//!    wins: drop > mask > last 4. Values of sensitive fields are masked even when they do not
//!    look sensitive (`ssn_last_4=1234`, `dob[year]=1990`).
//! 3. **Secret shapes** ([`SECRET_PATTERNS`]), in every string that is recorded (header values,
//!    form keys and values, JSON keys and strings, paths, plaintext columns): `sk_<mode>_…`,
//!    `rk_<mode>_…` (live, test, keygate's `sk_kg_` tokens), `whsec_…`, `ek_<mode>_…` and
//!    `…_secret_…` client secrets keep their prefix and lose their body (`sk_live_[redacted]`).
//!    No word boundary is required (`xsk_live_…` is masked too); bodies include `-` and `_`
//!    (keygate tokens are base64url). Publishable keys (`pk_…`) are not secret and are kept.
//! 4. **Digit runs** (card numbers, whatever Luhn says): any run of ASCII digits in which
//!    consecutive digits are separated by at most [`MAX_SEPARATORS`] separator characters
//!    (space, tab, `-`, `.`, `/`, `_`, `\`, `,`, `+`, `|`, `'`, NBSP and the Unicode spaces,
//!    dashes and invisible characters of [`is_unicode_separator`]) and that holds
//!    [`MIN_CARD_DIGITS`] (12) or more digits becomes `****` and its last 4 digits. No word
//!    boundary is required (`abc4242424242424242xyz`); runs longer than 19 digits are masked
//!    the same way (a card number may be inside). Shorter runs are kept: amounts
//!    (`amount=100000`), Unix timestamps in seconds (10 digits), phone numbers, Stripe ids
//!    (letters interrupt their digits). Accepted false positives: 13-digit millisecond
//!    timestamps, 12+ digit order numbers, UUIDs whose last group is all digits, version
//!    strings with many digit groups. JSON numbers of 12 or more digits become such a string.
//!    Only ASCII digits count: a string mixing ASCII and other digits (`…٤٤٤٤`) is masked on
//!    its ASCII digits and the others are kept as they are.
//! 5. **Percent-encoding.** A string holding `%` is also decoded (up to 3 levels); if a decoded
//!    level reveals something to mask, the decoded, redacted form is recorded instead.
//!
//! Bodies (`request` and `response` of the payload):
//! - `multipart/*` (file uploads): never recorded, only size and content type.
//! - Declared form (`application/x-www-form-urlencoded`) or no `Content-Type`: recorded as
//!   `[key, value]` pairs if the body is *strictly* form-encoded: only unreserved characters,
//!   `%XX` escapes, `+ & = [ ] ! ' ( ) * , : @ / ? $`, so never a `;`, a space, a quote or a
//!   brace (see [`is_strict_form`]). A body some parser could split differently is not
//!   recorded as form.
//! - Otherwise, if the body is valid JSON (any content type: `text/plain` too), as JSON.
//! - Otherwise (including `text/plain` that is not JSON, malformed JSON, non-UTF-8): only
//!   `body_omitted` with size and content type. Free text is never recorded: it cannot be
//!   redacted by meaning (`a=1;card[cvc]=123` as `text/plain`).
//!
//! Paths: the part before `?` goes through the text rules; the query string through the field
//! rules if it is strictly form-encoded, and is replaced by [`MASK`] otherwise.

use std::borrow::Cow;
use std::sync::LazyLock;

use regex::Regex;
use serde::Serialize;
use serde_json::Value;

use crate::exchange::HttpMessage;

/// Headers never recorded, not even by name; compared case-insensitively.
pub const DROPPED_HEADERS: &[&str] =
    &["authorization", "proxy-authorization", "cookie", "set-cookie", "x-keygate-token"];

/// Headers whose value is recorded (after the text rules). Any other header is recorded by name
/// with the value [`MASK`].
pub const RECORDED_HEADERS: &[&str] = &[
    "accept",
    "accept-encoding",
    "accept-language",
    "access-control-allow-origin",
    "cache-control",
    "connection",
    "content-encoding",
    "content-length",
    "content-type",
    "date",
    "host",
    "idempotency-key",
    "idempotent-replayed",
    "keygate-event-id",
    "original-request",
    "request-id",
    "retry-after",
    "server",
    "strict-transport-security",
    "stripe-account",
    "stripe-context",
    "stripe-should-retry",
    "stripe-version",
    "transfer-encoding",
    "user-agent",
    "vary",
    "x-stripe-client-user-agent",
];

/// What a sensitive field holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Category {
    CardNumber,
    Cvc,
    Pin,
    Expiry,
    TrackData,
    Bank,
    Identity,
    Secret,
}

/// What happens to a sensitive field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The field is not recorded at all (key and value).
    Drop,
    /// The value, whatever it holds, becomes [`MASK`].
    Mask,
    /// The value becomes `****` and its last 4 digits if it holds 12 or more digits, else
    /// [`MASK`].
    Last4,
    /// Masked when the value is a single-use link (starts with one of
    /// [`SINGLE_USE_URL_PREFIXES`]), kept otherwise.
    MaskSingleUseUrl,
}

/// Where a [`SENSITIVE_FIELDS`] entry applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Any key segment (form) or object key (JSON) with this name, at any depth, and its subtree.
    Anywhere,
    /// Only directly under a key with this name: `number` under `card`.
    Under(&'static str),
    /// Only in OAuth requests and their responses (path holds `/oauth/`).
    OAuthRequest,
    /// Only in requests to tax id endpoints and their responses (path holds `/tax_ids`).
    TaxIdRequest,
    /// Only in a JSON object whose `object` field is this: `value` of a `tax_id`.
    InObject(&'static str),
    /// Any name ending with this (`url`, `hosted_invoice_url`, `return_url`).
    Suffix,
}

/// One entry of [`SENSITIVE_FIELDS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SensitiveField {
    pub name: &'static str,
    pub category: Category,
    pub action: Action,
    pub scope: Scope,
}

const fn field(name: &'static str, category: Category, action: Action, scope: Scope) -> SensitiveField {
    SensitiveField { name, category, action, scope }
}

use Action::{Drop, Last4, Mask, MaskSingleUseUrl};
use Category::{Bank, CardNumber, Cvc, Expiry, Identity, Pin, Secret, TrackData};
use Scope::{Anywhere, InObject, OAuthRequest, Suffix, TaxIdRequest, Under};

/// The one table of sensitive fields, by what they mean in Stripe's API.
pub const SENSITIVE_FIELDS: &[SensitiveField] = &[
    // Card numbers keep at most their last 4 digits.
    field("number", CardNumber, Last4, Under("card")),
    field("card_number", CardNumber, Last4, Anywhere),
    field("pan", CardNumber, Last4, Anywhere),
    field("primary_account_number", CardNumber, Last4, Anywhere),
    // CVCs never survive, not even masked.
    field("cvc", Cvc, Drop, Anywhere),
    field("cvv", Cvc, Drop, Anywhere),
    field("cvc2", Cvc, Drop, Anywhere),
    field("cvv2", Cvc, Drop, Anywhere),
    field("cvn", Cvc, Drop, Anywhere),
    field("card_cvc", Cvc, Drop, Anywhere),
    field("security_code", Cvc, Drop, Anywhere),
    field("pin", Pin, Drop, Anywhere),
    field("pin_block", Pin, Drop, Anywhere),
    // Expiry.
    field("exp_month", Expiry, Mask, Anywhere),
    field("exp_year", Expiry, Mask, Anywhere),
    field("exp_date", Expiry, Mask, Anywhere),
    field("expiry", Expiry, Mask, Anywhere),
    // Track and chip data (card-present).
    field("track1", TrackData, Drop, Anywhere),
    field("track2", TrackData, Drop, Anywhere),
    field("track_1", TrackData, Drop, Anywhere),
    field("track_2", TrackData, Drop, Anywhere),
    field("track_data", TrackData, Drop, Anywhere),
    field("emv_auth_data", TrackData, Drop, Anywhere),
    field("emv_data", TrackData, Drop, Anywhere),
    // Bank accounts.
    field("account_number", Bank, Mask, Anywhere),
    field("routing_number", Bank, Mask, Anywhere),
    field("iban", Bank, Mask, Anywhere),
    field("bsb_number", Bank, Mask, Anywhere),
    field("sort_code", Bank, Mask, Anywhere),
    field("transit_number", Bank, Mask, Anywhere),
    field("institution_number", Bank, Mask, Anywhere),
    field("branch_code", Bank, Mask, Anywhere),
    field("bank_code", Bank, Mask, Anywhere),
    field("clabe", Bank, Mask, Anywhere),
    // Identity.
    field("ssn", Identity, Mask, Anywhere),
    field("ssn_last_4", Identity, Mask, Anywhere),
    field("id_number", Identity, Mask, Anywhere),
    field("id_number_secondary", Identity, Mask, Anywhere),
    field("personal_id_number", Identity, Mask, Anywhere),
    field("dob", Identity, Mask, Anywhere),
    field("tax_id", Identity, Mask, Anywhere),
    field("tax_id_data", Identity, Mask, Anywhere),
    field("vat_id", Identity, Mask, Anywhere),
    field("business_tax_id", Identity, Mask, Anywhere),
    field("document_number", Identity, Mask, Anywhere),
    field("passport_number", Identity, Mask, Anywhere),
    field("number", Identity, Mask, Under("document")),
    field("value", Identity, Mask, TaxIdRequest),
    field("value", Identity, Mask, InObject("tax_id")),
    // Secrets.
    field("client_secret", Secret, Mask, Anywhere),
    field("secret", Secret, Mask, Anywhere),
    field("secret_key", Secret, Mask, Anywhere),
    field("api_key", Secret, Mask, Anywhere),
    field("access_token", Secret, Mask, Anywhere),
    field("refresh_token", Secret, Mask, Anywhere),
    field("id_token", Secret, Mask, Anywhere),
    field("password", Secret, Mask, Anywhere),
    field("private_key", Secret, Mask, Anywhere),
    field("webhook_secret", Secret, Mask, Anywhere),
    field("signing_secret", Secret, Mask, Anywhere),
    field("stripe_publishable_key", Secret, Mask, Anywhere),
    field("code", Secret, Mask, OAuthRequest),
    field("url", Secret, MaskSingleUseUrl, Suffix),
];

/// `url` values that are bearer links (whoever has them can use them) start with one of these
/// (compared case-insensitively, after trimming spaces).
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

/// A digit run with at least this many ASCII digits is a card number (or may hold one).
pub const MIN_CARD_DIGITS: usize = 12;

/// At most this many separator characters may stand between two digits of one run.
pub const MAX_SEPARATORS: usize = 2;

/// Secret-shaped values masked wherever they appear; the first capture group is kept so a
/// reader can tell what kind of secret was there. No `\b`: glued secrets are secrets too.
pub const SECRET_PATTERNS: &[&str] = &[
    // Secret and restricted keys, live or test, and keygate's own `sk_kg_` tokens (base64url).
    // The mode is 2–8 letters and the body at least 8 characters, so that field names such as
    // `network_transaction_id` or `task_list_items` are not taken for keys.
    r"((?:sk|rk)_[a-z]{2,8}_)[A-Za-z0-9_\-]{8,}",
    // Webhook signing secrets.
    r"(whsec_)[A-Za-z0-9+/=_\-]+",
    // Ephemeral keys.
    r"(ek_[a-z]{2,8}_)[A-Za-z0-9_\-]{8,}",
    // Client secrets: `pi_123_secret_abc`, `seti_…_secret_…`, `cs_test_…_secret_…`,
    // `cuss_secret_…`. The id before `_secret_` is kept.
    r"(_secret_)[A-Za-z0-9_\-]+",
];

/// The compiled [`SECRET_PATTERNS`], or `None` if any fails to compile (then every string that
/// reaches the secret rule is masked whole).
static SECRET_REGEXES: LazyLock<Option<Vec<Regex>>> =
    LazyLock::new(|| SECRET_PATTERNS.iter().map(|p| Regex::new(p).ok()).collect());

/// Literals that every [`SECRET_PATTERNS`] match contains. One literal search (a SIMD multi-
/// substring scan) rules out the common case, a string with no secret, before any of the
/// patterns runs. Keep in step with [`SECRET_PATTERNS`]; `secret_hint_covers_every_pattern`
/// checks it.
const SECRET_HINT_LITERALS: &str = "sk_|rk_|whsec_|ek_|_secret_";

static SECRET_HINT: LazyLock<Option<Regex>> = LazyLock::new(|| Regex::new(SECRET_HINT_LITERALS).ok());

/// Masks secret shapes and digit runs in free text (rules 3–5).
pub fn redact_text(text: &str) -> String {
    redact_text_cow(text).into_owned()
}

/// [`redact_text`] without a copy when nothing needs masking (the common case).
pub fn redact_text_cow(text: &str) -> Cow<'_, str> {
    let plain = redact_plain(text);
    if !text.as_bytes().contains(&b'%') {
        return plain;
    }
    // Percent-encoding must not hide anything: look at up to 3 decoded levels.
    // Cheap while `plain` is borrowed (nothing was masked, the common case).
    let mut level: Cow<'_, str> = plain.clone();
    for _ in 0..3 {
        let Cow::Owned(decoded) = percent_decode_lossy(&level) else { break };
        let revealed = match redact_plain(&decoded) {
            Cow::Owned(r) => Some(r),
            Cow::Borrowed(_) => None,
        };
        if let Some(r) = revealed {
            return Cow::Owned(r);
        }
        level = Cow::Owned(decoded);
    }
    plain
}

/// Rules 3 and 4 on one string.
fn redact_plain(text: &str) -> Cow<'_, str> {
    let secrets = mask_secrets(text);
    let digits = match mask_digit_runs(&secrets) {
        Cow::Owned(s) => Some(s),
        Cow::Borrowed(_) => None,
    };
    match digits {
        Some(s) => Cow::Owned(s),
        None => secrets,
    }
}

fn mask_secrets(text: &str) -> Cow<'_, str> {
    let Some(regexes) = SECRET_REGEXES.as_ref() else {
        return Cow::Owned(MASK.to_owned());
    };
    // Fail closed: if the hint cannot be built, every pattern runs.
    if !SECRET_HINT.as_ref().is_none_or(|hint| hint.is_match(text)) {
        return Cow::Borrowed(text);
    }
    let mut out = Cow::Borrowed(text);
    for re in regexes {
        if re.is_match(&out) {
            out = Cow::Owned(re.replace_all(&out, "${1}[redacted]").into_owned());
        }
    }
    out
}

/// Separator bytes (ASCII) allowed between the digits of one run.
const SEPARATOR_BYTES: &[u8] = b" \t-./_\\,+|'";

/// Non-ASCII characters allowed between the digits of one run: no-break and other Unicode
/// spaces, dashes, invisible formatting characters (zero-width space, joiners, bidi marks, soft
/// hyphen, BOM) and fullwidth punctuation.
pub fn is_unicode_separator(c: char) -> bool {
    matches!(c,
        '\u{00A0}' | '\u{00AD}' | '\u{2000}'..='\u{2015}' | '\u{2024}'..='\u{2027}'
        | '\u{202A}'..='\u{202F}' | '\u{205F}'..='\u{2064}' | '\u{2212}' | '\u{3000}'
        | '\u{FE58}' | '\u{FE63}' | '\u{FEFF}' | '\u{FF0C}'..='\u{FF0F}' | '\u{FF3F}')
}

/// Length in bytes of the separator character at byte `at`, if there is one.
fn separator_len(text: &str, at: usize) -> Option<usize> {
    let b = *text.as_bytes().get(at)?;
    if b.is_ascii() {
        return SEPARATOR_BYTES.contains(&b).then_some(1);
    }
    let c = text.get(at..)?.chars().next()?;
    is_unicode_separator(c).then(|| c.len_utf8())
}

fn push_last4(out: &mut String, last4: [u8; 4]) {
    out.push_str("****");
    for b in last4 {
        out.push(char::from(b));
    }
}

/// Rule 4: every run of [`MIN_CARD_DIGITS`] or more ASCII digits (separated by at most
/// [`MAX_SEPARATORS`] separators) becomes `****` and its last 4 digits.
pub fn mask_digit_runs(text: &str) -> Cow<'_, str> {
    let bytes = text.as_bytes();
    if bytes.iter().filter(|b| b.is_ascii_digit()).count() < MIN_CARD_DIGITS {
        return Cow::Borrowed(text);
    }
    let is_digit = |at: usize| bytes.get(at).is_some_and(u8::is_ascii_digit);
    let mut out = String::new();
    let mut copied = 0usize;
    let mut i = 0usize;
    while i < bytes.len() {
        if !is_digit(i) {
            i += 1;
            continue;
        }
        // ASCII digits are always at character boundaries, so `start` and `end` are too.
        let start = i;
        let mut digits = 0usize;
        let mut last4 = [b'0'; 4];
        let mut j = i;
        let end = loop {
            while let Some(&b) = bytes.get(j).filter(|b| b.is_ascii_digit()) {
                last4 = [last4[1], last4[2], last4[3], b];
                digits += 1;
                j += 1;
            }
            let run_end = j;
            let mut k = j;
            let mut next = None;
            for _ in 0..MAX_SEPARATORS {
                let Some(n) = separator_len(text, k) else { break };
                k += n;
                if is_digit(k) {
                    next = Some(k);
                    break;
                }
            }
            match next {
                Some(k) => j = k,
                None => break run_end,
            }
        };
        if digits >= MIN_CARD_DIGITS {
            out.push_str(text.get(copied..start).unwrap_or_default());
            push_last4(&mut out, last4);
            copied = end;
        }
        i = end.max(i + 1);
    }
    if copied == 0 {
        return Cow::Borrowed(text);
    }
    out.push_str(text.get(copied..).unwrap_or_default());
    Cow::Owned(out)
}

/// The value of a card-number field: `****` and its last 4 digits if it holds at least
/// [`MIN_CARD_DIGITS`] digits, else [`MASK`].
fn keep_last4(value: &str) -> String {
    let mut last4 = [b'0'; 4];
    let mut n = 0usize;
    for b in value.bytes().filter(u8::is_ascii_digit) {
        last4 = [last4[1], last4[2], last4[3], b];
        n += 1;
    }
    if n < MIN_CARD_DIGITS {
        return MASK.to_owned();
    }
    let mut out = String::with_capacity(8);
    push_last4(&mut out, last4);
    out
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes `%XX` escapes (invalid UTF-8 becomes U+FFFD); borrowed when there is none.
fn percent_decode_lossy(text: &str) -> Cow<'_, str> {
    let bytes = text.as_bytes();
    let mut out: Vec<u8> = Vec::new();
    let mut copied = 0usize;
    let mut i = 0usize;
    while let Some(&b) = bytes.get(i) {
        if b == b'%'
            && let (Some(h), Some(l)) =
                (bytes.get(i + 1).copied().and_then(hex_value), bytes.get(i + 2).copied().and_then(hex_value))
        {
            out.extend_from_slice(bytes.get(copied..i).unwrap_or_default());
            out.push(h * 16 + l);
            i += 3;
            copied = i;
        } else {
            i += 1;
        }
    }
    if copied == 0 {
        return Cow::Borrowed(text);
    }
    out.extend_from_slice(bytes.get(copied..).unwrap_or_default());
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// Whether `body` is form-encoded the strict way: only unreserved characters, `%XX` escapes and
/// `+ & = [ ] ! ' ( ) * , : @ / ? $`. Everything else (`;`, spaces, quotes, braces, control
/// characters, raw non-ASCII bytes, a `%` without two hex digits) could be split differently by
/// some parser, so such a body is not recorded as form.
pub fn is_strict_form(body: &[u8]) -> bool {
    let mut i = 0usize;
    while let Some(&b) = body.get(i) {
        match b {
            b'%' => {
                let hex = |at: usize| body.get(at).copied().and_then(hex_value).is_some();
                if !(hex(i + 1) && hex(i + 2)) {
                    return false;
                }
                i += 3;
            }
            b'A'..=b'Z'
            | b'a'..=b'z'
            | b'0'..=b'9'
            | b'-'
            | b'.'
            | b'_'
            | b'~'
            | b'*'
            | b'+'
            | b'&'
            | b'='
            | b'['
            | b']'
            | b'!'
            | b'\''
            | b'('
            | b')'
            | b','
            | b':'
            | b'@'
            | b'/'
            | b'?'
            | b'$' => i += 1,
            _ => return false,
        }
    }
    true
}

/// What a redacted HTTP message looks like inside the encrypted payload.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct RedactedMessage {
    pub start_line: String,
    pub headers: Vec<(String, String)>,
    /// Body as JSON when it was JSON, as (redacted) form pairs when form-encoded.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub body_json: Option<Value>,
    /// Body as text (written by older versions only; text bodies are no longer recorded).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub body_text: Option<String>,
    /// Set when the body was not recorded, saying why.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub body_omitted: Option<String>,
    pub body_bytes: u64,
}

/// Request context that changes rules (OAuth `code`, tax id `value`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Context {
    pub oauth: bool,
    pub tax_ids: bool,
}

impl Context {
    /// Context derived from the request path (its part before `?`, percent-decoded, any case).
    pub fn for_path(path: &str) -> Context {
        let path = path.split('?').next().unwrap_or_default();
        let decoded = percent_decode_lossy(path).to_ascii_lowercase();
        Context { oauth: decoded.contains("/oauth/"), tax_ids: decoded.contains("/tax_ids") }
    }
}

/// Redacts one message.
pub fn redact_message(msg: &HttpMessage, ctx: Context) -> RedactedMessage {
    let mut content_types: Vec<String> = Vec::new();
    let mut headers = Vec::with_capacity(msg.headers.len());
    for (name, raw) in &msg.headers {
        let lower = name.trim().to_ascii_lowercase();
        if DROPPED_HEADERS.contains(&lower.as_str()) {
            continue;
        }
        let value = String::from_utf8_lossy(raw);
        if lower == "content-type" {
            content_types.push(value.trim().to_ascii_lowercase());
        }
        let recorded = if RECORDED_HEADERS.contains(&lower.as_str()) { redact_text(&value) } else { MASK.to_owned() };
        let name = match redact_text_cow(&lower) {
            Cow::Borrowed(_) => None,
            Cow::Owned(masked) => Some(masked),
        };
        headers.push((name.unwrap_or(lower), recorded));
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
    // Two different Content-Types are ambiguous: neither is believed.
    let content_type = match content_types.as_slice() {
        [] => "",
        [one] => one.as_str(),
        [first, rest @ ..] if rest.iter().all(|c| c == first) => first.as_str(),
        _ => "ambiguous",
    };
    let omitted = |why: &str| {
        let ct = if content_type.is_empty() { "untyped" } else { content_type };
        Some(format!("{} body of {} bytes not recorded: {why}", redact_text(ct), body.len()))
    };
    if content_type.starts_with("multipart/") {
        out.body_omitted = omitted("multipart bodies are not recorded");
        return out;
    }
    let form_allowed = content_type.is_empty() || content_type.starts_with("application/x-www-form-urlencoded");
    let form = if form_allowed && is_strict_form(body) { redact_form_pairs(body, ctx) } else { None };
    if let Some(pairs) = form {
        out.body_json = Some(Value::Array(
            pairs.into_iter().map(|(k, v)| Value::Array(vec![Value::String(k), Value::String(v)])).collect(),
        ));
    } else if let Ok(mut json) = serde_json::from_slice::<Value>(body) {
        redact_json(&mut json, ctx);
        out.body_json = Some(json);
    } else {
        out.body_omitted = omitted("neither strictly form-encoded nor valid JSON");
    }
    out
}

/// Redacts a request or status line: the target's query string goes through the field rules.
pub fn redact_start_line(line: &str, ctx: Context) -> String {
    let mut parts = line.splitn(3, ' ');
    let (first, target, rest) = (parts.next().unwrap_or_default(), parts.next(), parts.next());
    match target {
        Some(target) if target.contains('?') => {
            let mut out = redact_text(first);
            out.push(' ');
            out.push_str(&redact_path(target, ctx));
            if let Some(rest) = rest {
                out.push(' ');
                out.push_str(&redact_text_cow(rest));
            }
            out
        }
        _ => redact_text(line),
    }
}

/// Redacts a path with its query string (the lake's plaintext `path` column goes through this).
pub fn redact_path(path: &str, ctx: Context) -> String {
    match path.split_once('?') {
        None => redact_text(path),
        Some((p, query)) => {
            let p = redact_text_cow(p);
            let pairs = match redact_form_pairs(query.as_bytes(), ctx) {
                Some(pairs) if is_strict_form(query.as_bytes()) => pairs,
                _ => return format!("{p}?{MASK}"),
            };
            let encoded: String = url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .finish();
            format!("{p}?{encoded}")
        }
    }
}

/// The verdict on one field; ordered from weakest to strongest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Verdict {
    Keep,
    Last4,
    Mask,
    Drop,
}

fn trim_name(name: &str) -> &str {
    name.trim_matches(|c: char| c.is_whitespace())
}

fn is_single_use_url(value: &str) -> bool {
    let v = trim_name(value);
    SINGLE_USE_URL_PREFIXES.iter().any(|p| v.get(..p.len()).is_some_and(|head| head.eq_ignore_ascii_case(p)))
}

/// Looks `name` up in [`SENSITIVE_FIELDS`] (the strongest matching entry wins).
fn verdict(name: &str, parent: Option<&str>, object_type: Option<&str>, value: Option<&str>, ctx: Context) -> Verdict {
    let name = trim_name(name);
    let mut best = Verdict::Keep;
    for f in SENSITIVE_FIELDS {
        let named = || name.eq_ignore_ascii_case(f.name);
        let hit = match f.scope {
            Scope::Anywhere => named(),
            Scope::Under(p) => named() && parent.is_some_and(|q| trim_name(q).eq_ignore_ascii_case(p)),
            Scope::OAuthRequest => ctx.oauth && named(),
            Scope::TaxIdRequest => ctx.tax_ids && named(),
            Scope::InObject(t) => named() && object_type == Some(t),
            Scope::Suffix => name
                .len()
                .checked_sub(f.name.len())
                .and_then(|at| name.get(at..))
                .is_some_and(|tail| tail.eq_ignore_ascii_case(f.name)),
        };
        if !hit {
            continue;
        }
        let v = match f.action {
            Action::Drop => Verdict::Drop,
            Action::Mask => Verdict::Mask,
            Action::Last4 => Verdict::Last4,
            Action::MaskSingleUseUrl if value.is_some_and(is_single_use_url) => Verdict::Mask,
            Action::MaskSingleUseUrl => Verdict::Keep,
        };
        best = best.max(v);
    }
    best
}

/// The verdict on a form key: every bracket segment is looked up (an entry covers its
/// subtree); empty and numeric segments are array indices.
fn form_key_verdict(key: &str, value: &str, ctx: Context) -> Verdict {
    let mut parent: Option<&str> = None;
    let mut best = Verdict::Keep;
    for seg in key.split(['[', ']']) {
        let seg = trim_name(seg);
        if seg.is_empty() || seg.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        best = best.max(verdict(seg, parent, None, Some(value), ctx));
        parent = Some(seg);
    }
    best
}

/// The redacted pairs of a form, read by keygate's one form parser (`keygate_wire::form`, the
/// parser the proxy canonicalises requests with; names may repeat here, as both values are
/// redacted alike); `None` when it is not a form that parser accepts.
fn redact_form_pairs(body: &[u8], ctx: Context) -> Option<Vec<(String, String)>> {
    let pairs = keygate_wire::form::parse_repeated(body).ok()?;
    let mut out = Vec::with_capacity(pairs.len());
    for (k, v) in pairs {
        let value = match form_key_verdict(&k, &v, ctx) {
            Verdict::Drop => continue,
            Verdict::Mask => MASK.to_owned(),
            Verdict::Last4 => keep_last4(&v),
            Verdict::Keep => redact_text_cow(&v).into_owned(),
        };
        out.push((redact_text(&k), value));
    }
    Some(out)
}

/// Redacts a JSON document in place.
pub fn redact_json(value: &mut Value, ctx: Context) {
    redact_value(value, None, ctx);
}

fn redact_value(value: &mut Value, parent: Option<&str>, ctx: Context) {
    match value {
        Value::Object(map) => redact_object(map, parent, ctx),
        Value::Array(items) => items.iter_mut().for_each(|v| redact_value(v, parent, ctx)),
        Value::String(s) => {
            if let Cow::Owned(r) = redact_text_cow(s) {
                *s = r;
            }
        }
        Value::Number(n) => {
            // A card number sent as a JSON number. Integers too small to have 12 digits are
            // ruled out without formatting them.
            const SMALL: u64 = 100_000_000_000;
            let small = n.as_u64().map(|u| u < SMALL).or_else(|| n.as_i64().map(|i| i.unsigned_abs() < SMALL));
            if small == Some(true) {
                return;
            }
            if let Cow::Owned(masked) = mask_digit_runs(&n.to_string()) {
                *value = Value::String(masked);
            }
        }
        Value::Null | Value::Bool(_) => {}
    }
}

fn redact_object(map: &mut serde_json::Map<String, Value>, parent: Option<&str>, ctx: Context) {
    // The `object` type, if an entry of the table is scoped to it.
    let object_type: Option<&'static str> = map.get("object").and_then(Value::as_str).and_then(|o| {
        SENSITIVE_FIELDS.iter().find_map(|f| match f.scope {
            Scope::InObject(t) if t == o => Some(t),
            _ => None,
        })
    });
    let mut dropped = Vec::new();
    let mut renamed = Vec::new();
    for (k, v) in map.iter_mut() {
        match verdict(k, parent, object_type, v.as_str(), ctx) {
            Verdict::Drop => {
                dropped.push(k.clone());
                continue;
            }
            Verdict::Mask => {
                if !v.is_null() {
                    *v = Value::String(MASK.to_owned());
                }
            }
            Verdict::Last4 => {
                *v = match v {
                    Value::Null => Value::Null,
                    Value::String(s) => Value::String(keep_last4(s)),
                    Value::Number(n) => Value::String(keep_last4(&n.to_string())),
                    _ => Value::String(MASK.to_owned()),
                };
            }
            Verdict::Keep => redact_value(v, Some(k.as_str()), ctx),
        }
        if let Cow::Owned(r) = redact_text_cow(k) {
            renamed.push((k.clone(), r));
        }
    }
    for k in dropped {
        map.remove(&k);
    }
    for (from, to) in renamed {
        if let Some(v) = map.remove(&from) {
            map.insert(to, v);
        }
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

    fn message(start_line: &str, headers: &[(&str, &str)], body: &str) -> HttpMessage {
        HttpMessage {
            start_line: start_line.into(),
            headers: headers.iter().map(|(n, v)| ((*n).to_owned(), v.as_bytes().to_vec())).collect(),
            body: Bytes::from(body.to_owned()),
        }
    }

    fn form_request(body: &str) -> HttpMessage {
        message(
            "POST /v1/payment_intents HTTP/1.1",
            &[
                ("Authorization", "Bearer sk_kg_abcdefghijklmnop"),
                ("Content-Type", "application/x-www-form-urlencoded"),
                ("Idempotency-Key", "idem-1"),
            ],
            body,
        )
    }

    fn typed_request(content_type: Option<&str>, body: &str) -> HttpMessage {
        let headers: Vec<(&str, &str)> = content_type.map(|c| ("Content-Type", c)).into_iter().collect();
        message("POST /v1/payment_methods HTTP/1.1", &headers, body)
    }

    fn json_response(body: &str) -> HttpMessage {
        message("HTTP/1.1 200 OK", &[("content-type", "application/json")], body)
    }

    fn rendered(m: &RedactedMessage) -> String {
        serde_json::to_string(m).unwrap()
    }

    fn form_rendered(body: &str) -> String {
        rendered(&redact_message(&form_request(body), Context::default()))
    }

    /// The form pairs recorded for `body`.
    fn pairs(body: &str) -> Vec<(String, String)> {
        let r = redact_message(&form_request(body), Context::default());
        let Some(Value::Array(items)) = r.body_json else { panic!("no form pairs for {body}: {r:?}") };
        items
            .into_iter()
            .map(|p| {
                let Value::Array(kv) = p else { panic!("pair") };
                (kv[0].as_str().unwrap().to_owned(), kv[1].as_str().unwrap().to_owned())
            })
            .collect()
    }

    fn value_of(body: &str, key: &str) -> Option<String> {
        pairs(body).into_iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    #[test]
    fn authorization_cookie_and_proxy_authorization_headers_are_dropped() {
        let mut msg = form_request("amount=100");
        msg.headers.push(("Cookie".into(), b"session=abc".to_vec()));
        msg.headers.push(("Proxy-Authorization".into(), b"Basic dXNlcjpwYXNz".to_vec()));
        msg.headers.push(("X-Keygate-Token".into(), b"sk_kg_abcdefghijklmnop".to_vec()));
        let r = redact_message(&msg, Context::default());
        let names: Vec<&str> = r.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["content-type", "idempotency-key"]);
        let text = rendered(&r);
        assert!(!text.contains("abcdefghijklmnop"));
        assert!(!text.contains("session=abc"));
        assert!(!text.contains("dXNlcjpwYXNz"));
    }

    #[test]
    fn table_of_field_rules() {
        // (form body, text that must be absent, text that must be present)
        let cases: &[(&str, &str, &str)] = &[
            ("card[number]=4242424242424242", "4242424242424242", "****4242"),
            ("card[number]=4242+4242+4242+4242", "4242+4242", "****4242"),
            ("payment_method_data[card][cvc]=314&payment_method_data[type]=card", "314", "payment_method_data[type]"),
            ("card[cvc]=987&amount=100", "987", "amount"),
            ("client_secret=pi_3Mtw_secret_YrKJUKribcBjcG8HVhfZluoGH", "YrKJUKribcBjcG8HVhfZluoGH", MASK),
            ("refresh_token=rt_abcdefabcdef", "rt_abcdefabcdef", MASK),
            ("access_token=sk_live_zzzzzzzzzzzzzz", "zzzzzzzzzzzzzz", MASK),
            ("metadata[note]=key+sk_live_51Habcdefghijkl+here", "51Habcdefghijkl", "sk_live_[redacted]"),
            ("metadata[note]=sk_test_51Habcdefghijkl", "51Habcdefghijkl", "sk_test_[redacted]"),
            ("metadata[k]=rk_live_51Habcdefghijkl", "51Habcdefghijkl", "rk_live_[redacted]"),
            ("metadata[k]=rk_test_51Habcdefghijkl", "51Habcdefghijkl", "rk_test_[redacted]"),
            ("metadata[k]=whsec_abcdefghijklmnop", "abcdefghijklmnop", "whsec_[redacted]"),
            ("bank_account[account_number]=000123456789", "000123456789", MASK),
            ("amount=100000", "", "100000"),
        ];
        for (body, absent, present) in cases {
            let text = form_rendered(body);
            if !absent.is_empty() {
                assert!(!text.contains(absent), "{body}: `{absent}` survived in {text}");
            }
            assert!(text.contains(present), "{body}: `{present}` missing from {text}");
        }
    }

    // Hole 1: strings mixing ASCII and other digits.

    const MIXED: &[&str] = &["4242424242424242٤٤٤٤", "1234567890123٤٤٤٤", "٤٤٤٤1234567890123", "12٤3٤", "٤"];

    #[test]
    fn mixed_ascii_and_arabic_indic_digits_do_not_panic_and_ascii_card_digits_are_masked() {
        for s in MIXED {
            let _ = redact_text(s);
            let _ = mask_digit_runs(s);
            let _ = keep_last4(s);
        }
        assert_eq!(redact_text("4242424242424242٤٤٤٤"), "****4242٤٤٤٤");
        assert_eq!(redact_text("1234567890123٤٤٤٤"), "****0123٤٤٤٤");
        assert_eq!(keep_last4("1234567890123٤٤٤٤"), "****0123");
        assert_eq!(keep_last4("٤٤٤٤"), MASK);
        assert_eq!(redact_text("12٤3٤"), "12٤3٤");
    }

    #[test]
    fn mixed_digits_in_query_header_body_and_response_do_not_panic() {
        for s in MIXED {
            let ctx = Context::default();
            let q = format!("/v1/customers?email={s}&card[number]={s}");
            let p = redact_path(&q, ctx);
            assert!(p.starts_with("/v1/customers?"), "{p}");
            let _ = redact_start_line(&format!("GET {q} HTTP/1.1"), ctx);
            let enc: String = url::form_urlencoded::byte_serialize(s.as_bytes()).collect();
            let mut msg = form_request(&format!("metadata[x]={enc}&card[number]={enc}"));
            msg.headers.push(("User-Agent".into(), s.as_bytes().to_vec()));
            msg.headers.push(("X-Other".into(), s.as_bytes().to_vec()));
            let r = redact_message(&msg, ctx);
            assert!(r.body_json.is_some());
            let r = redact_message(&typed_request(Some("text/plain"), s), ctx);
            assert!(r.body_omitted.is_some() || r.body_json.is_some());
            let body = serde_json::json!({"description": s, "card": {"number": s}, s.to_string(): 1}).to_string();
            let r = redact_message(&json_response(&body), ctx);
            assert!(r.body_json.is_some());
        }
    }

    // Hole 2: card numbers in any writing.

    #[test]
    fn card_numbers_with_any_separators_glued_or_in_longer_runs_keep_only_their_last_4() {
        let cases: &[(&str, &str)] = &[
            ("4242424242424242", "****4242"),
            ("4242 4242 4242 4242", "****4242"),
            ("4242-4242-4242-4242", "****4242"),
            ("4242.4242.4242.4242", "****4242"),
            ("4242/4242/4242/4242", "****4242"),
            ("4242  4242  4242  4242", "****4242"),
            ("4242_4242_4242_4242", "****4242"),
            ("4242\\4242\\4242\\4242", "****4242"),
            ("4242,4242,4242,4242", "****4242"),
            ("4242\t4242\t4242\t4242", "****4242"),
            ("4242\u{a0}4242\u{a0}4242\u{a0}4242", "****4242"),
            ("4242\u{200b}4242\u{200b}4242\u{200b}4242", "****4242"),
            ("4242 -4242- 4242.,4242", "****4242"),
            ("abc4242424242424242xyz", "abc****4242xyz"),
            ("card:4242424242424241!", "card:****4241!"), // fails Luhn: masked all the same
            ("99994242424242424242123", "****2123"),      // inside a longer run
            ("1234567890123456789012345", "****2345"),
            ("123456789012", "****9012"), // 12 digits
            ("378282246310005", "****0005"),
        ];
        for (input, want) in cases {
            assert_eq!(redact_text(input), *want, "{input:?}");
        }
        // Three separators split a run (documented limit).
        assert_eq!(redact_text("424242 - 424242"), "424242 - 424242");
    }

    #[test]
    fn short_digit_runs_amounts_timestamps_and_ids_survive() {
        for s in [
            "amount=100000",
            "created: 1700000000",
            "pi_3MtwBwLkdIwHu7ix28a3tqPa",
            "acct_1032D82eZvKYlo2C",
            "12345678901",
            "2024-06-20",
            "+1 415 555 0100",
            "payment_intent requires_confirmation",
        ] {
            assert!(matches!(redact_text_cow(s), Cow::Borrowed(_)), "{s} was changed");
        }
        // Accepted false positive (documented): 13-digit millisecond timestamps.
        assert_eq!(redact_text("1700000000000"), "****0000");
        assert_eq!(form_rendered("amount=100000&created=1700000000").matches("100000").count(), 1);
    }

    #[test]
    fn json_numbers_of_12_or_more_digits_become_masked_strings() {
        let body = r#"{"amount":100000,"created":1700000000,"n":4242424242424242,"neg":-4000056655665556,
            "big":123456789012345678901234,"f":4242424242424242.0,"card":{"number":4000056655665556}}"#;
        let r = redact_message(&json_response(body), Context::default());
        let json = r.body_json.unwrap();
        assert_eq!(json["amount"], 100000);
        assert_eq!(json["created"], 1700000000);
        assert_eq!(json["n"], "****4242");
        assert_eq!(json["neg"], "-****5556");
        assert_eq!(json["card"]["number"], "****5556");
        let text = json.to_string();
        for absent in ["424242424242", "400005665566", "12345678901234567890"] {
            assert!(!text.contains(absent), "{absent} in {text}");
        }
    }

    // Hole 3: fields by meaning.

    #[test]
    fn sensitive_fields_are_masked_even_when_they_do_not_look_sensitive() {
        let masked = [
            "ssn_last_4=1234",
            "individual[ssn_last_4]=1234",
            "individual[dob][year]=1990",
            "individual[dob][day]=1",
            "individual[dob][month]=2",
            "individual[id_number]=1",
            "individual[id_number_secondary]=77",
            "individual[personal_id_number]=A1",
            "company[tax_id]=12",
            "company[vat_id]=DE1",
            "business_tax_id=9",
            "verification[document_number]=X",
            "external_account[iban]=DE89370400440532013000",
            "external_account[routing_number]=110000000",
            "external_account[account_number]=6789",
            "au_becs_debit[bsb_number]=000000",
            "bacs_debit[sort_code]=108800",
            "acss_debit[transit_number]=11000",
            "acss_debit[institution_number]=000",
            "x[branch_code]=1",
            "x[bank_code]=1",
            "x[clabe]=1",
            "card[exp_month]=12",
            "card[exp_year]=2030",
            "secret=abc",
            "api_key=abc",
            "password=hunter2",
            "id_token=x",
        ];
        for body in masked {
            let key = body.split('=').next().unwrap();
            assert_eq!(value_of(body, key).as_deref(), Some(MASK), "{body}");
        }
        assert_eq!(value_of("card[number]=4242", "card[number]").as_deref(), Some(MASK), "short card number");
        assert_eq!(value_of("card[number]=4242-4242-4242-4242", "card[number]").as_deref(), Some("****4242"));
        // `number` means a card number only under `card`.
        assert_eq!(value_of("invoice[number]=INV-0001", "invoice[number]").as_deref(), Some("INV-0001"));
    }

    #[test]
    fn cvc_track_and_pin_fields_are_dropped_in_every_shape() {
        for body in [
            "card[cvc]=1",
            "card[cvc][]=123",
            "card[cvc][0]=123",
            "card[cvc][]=123&card[cvc][]=456",
            "card[CVC]=123",
            "card[+cvc+]=123",
            "card%5Bcvc%5D=123",
            "card[cvv]=123",
            "card[cvc2]=123",
            "card[cvv2]=123",
            "card_cvc=123",
            "card[security_code]=123",
            "card_present[track2]=123",
            "card_present[track_data]=123",
            "card_present[emv_auth_data]=123",
            "card[pin]=123",
        ] {
            let p = pairs(&format!("{body}&amount=5"));
            assert_eq!(p, vec![("amount".to_owned(), "5".to_owned())], "{body}");
        }
        // A result, not a CVC.
        assert_eq!(value_of("cvc_check=pass", "cvc_check").as_deref(), Some("pass"));
    }

    #[test]
    fn sensitive_fields_in_json_at_any_depth_including_arrays_and_objects() {
        let body = r#"{"payment_method_data":{"type":"card","card":{"number":"4242 4242 4242 4242","cvc":"123",
            "exp_month":12,"exp_year":2030}},"individual":{"dob":{"day":1,"month":2,"year":1990},"ssn_last_4":"1234",
            "id_number":"000000000","Ssn":"1"},"bank":[{"iban":"DE89370400440532013000","routing_number":110000000}],
            "card_cvc":["123","456"],"nested":{"a":{"b":{"c":{"cvv":"999","account_number":["000123456789"]}}}},
            "invoice":{"number":"INV-1"},"document":{"number":"P1234"}}"#;
        let r = redact_message(&typed_request(Some("application/json"), body), Context::default());
        let j = r.body_json.unwrap();
        assert_eq!(j["payment_method_data"]["card"]["number"], "****4242");
        assert!(j["payment_method_data"]["card"].get("cvc").is_none());
        assert_eq!(j["payment_method_data"]["card"]["exp_month"], MASK);
        assert_eq!(j["individual"]["dob"], MASK);
        assert_eq!(j["individual"]["ssn_last_4"], MASK);
        assert_eq!(j["individual"]["id_number"], MASK);
        assert_eq!(j["individual"]["Ssn"], MASK);
        assert_eq!(j["bank"][0]["iban"], MASK);
        assert_eq!(j["bank"][0]["routing_number"], MASK);
        assert!(j.get("card_cvc").is_none());
        assert!(j["nested"]["a"]["b"]["c"].get("cvv").is_none());
        assert_eq!(j["nested"]["a"]["b"]["c"]["account_number"], MASK);
        assert_eq!(j["invoice"]["number"], "INV-1");
        assert_eq!(j["document"]["number"], MASK);
    }

    #[test]
    fn tax_id_values_and_oauth_codes_depend_on_the_request() {
        let ctx = Context::for_path("/v1/customers/cus_1/tax_ids");
        let r = redact_message(&form_request("type=eu_vat&value=DE123456789"), ctx);
        assert!(!rendered(&r).contains("DE123456789"));
        let r = redact_message(
            &json_response(r#"{"object":"tax_id","type":"eu_vat","value":"DE123456789"}"#),
            Context::default(),
        );
        assert!(!rendered(&r).contains("DE123456789"));
        let r = redact_message(&json_response(r#"{"object":"price","value":"kept"}"#), Context::default());
        assert!(rendered(&r).contains("kept"));

        let msg = form_request("grant_type=authorization_code&code=ac_123456789");
        let r = redact_message(&msg, Context::for_path("/oauth/token"));
        assert!(!rendered(&r).contains("ac_123456789"));
        let r = redact_message(&msg, Context::for_path("/%6Fauth/token"));
        assert!(!rendered(&r).contains("ac_123456789"));
        let r = redact_message(&json_response(r#"{"error":{"code":"card_declined"}}"#), Context::default());
        assert!(rendered(&r).contains("card_declined"));
    }

    #[test]
    fn every_table_entry_is_applied() {
        for f in SENSITIVE_FIELDS {
            let ctx = Context { oauth: true, tax_ids: true };
            let name = if f.scope == Scope::Suffix { format!("return_{}", f.name) } else { f.name.to_owned() };
            let key = match f.scope {
                Scope::Under(p) => format!("{p}[{name}]"),
                _ => format!("x[{name}]"),
            };
            let value = if f.action == Action::MaskSingleUseUrl {
                "https://connect.stripe.com/setup/e/acct_1/CANARY1234".to_owned()
            } else {
                "CANARY1234".to_owned()
            };
            if let Scope::InObject(t) = f.scope {
                let body = serde_json::json!({"object": t, name.clone(): value}).to_string();
                let r = redact_message(&json_response(&body), ctx);
                assert!(!rendered(&r).contains("CANARY1234"), "{f:?}");
                continue;
            }
            let r = redact_message(&form_request(&format!("{key}={value}")), ctx);
            assert!(!rendered(&r).contains("CANARY1234"), "{f:?}: {}", rendered(&r));
            let body = match f.scope {
                Scope::Under(p) => serde_json::json!({ p: {name: value} }),
                _ => serde_json::json!({"x": {name: value}}),
            };
            let r = redact_message(&json_response(&body.to_string()), ctx);
            assert!(!rendered(&r).contains("CANARY1234"), "{f:?}: {}", rendered(&r));
        }
    }

    #[test]
    fn single_use_urls_are_masked_and_other_urls_kept() {
        let body = r#"{"object":"account_link","url":"HTTPS://connect.stripe.com/setup/e/acct_1/abcdefgh",
            "hosted_invoice_url":"https://invoice.stripe.com/i/acct_1/live_xyz","return_url":"https://example.com/return"}"#;
        let text = rendered(&redact_message(&json_response(body), Context::default()));
        assert!(!text.contains("abcdefgh") && !text.contains("live_xyz"), "{text}");
        assert!(text.contains("https://example.com/return"));
    }

    // Hole 4: secrets of every shape, embedded anywhere.

    #[test]
    fn secrets_of_every_shape_are_masked_even_glued_to_other_text() {
        let token = "sk_kg_Ab-_cDeFgHiJkLmNoPqRsTuVwXyZ0123456789-_Q";
        let cases: &[(String, &str, &str)] = &[
            (token.to_owned(), "Ab-_cDeF", "sk_kg_[redacted]"),
            (format!("Bearer {token}."), "0123456789-_Q", "sk_kg_[redacted]."),
            ("xsk_live_51HabcdefGHIJKL".to_owned(), "51Habcdef", "xsk_live_[redacted]"),
            ("key=sk_test_51Habc-def_ghij;".to_owned(), "def_ghij", "sk_test_[redacted];"),
            ("rk_live_51Habcdefghij".to_owned(), "51Habc", "rk_live_[redacted]"),
            ("whsec_abc+/=def-_ghi".to_owned(), "abc", "whsec_[redacted]"),
            ("ek_test_YWNjdF8xMjM0NTY3ODkw".to_owned(), "YWNj", "ek_test_[redacted]"),
            ("pi_3Mtw_secret_YrKJUKribcBjcG8H".to_owned(), "YrKJUK", "pi_3Mtw_secret_[redacted]"),
            ("seti_1Mtw_secret_abc-DEF_123".to_owned(), "abc-DEF", "seti_1Mtw_secret_[redacted]"),
            ("cs_test_a1B2c3D4_secret_X9y8Z7w6".to_owned(), "X9y8Z7w6", "cs_test_a1B2c3D4_secret_[redacted]"),
            ("cuss_secret_QWERTYuiop123".to_owned(), "QWERTY", "cuss_secret_[redacted]"),
        ];
        for (input, absent, present) in cases {
            let out = redact_text(input);
            assert!(!out.contains(absent), "{input}: {out}");
            assert!(out.contains(present), "{input}: {out}");
        }
        // Publishable keys are not secret; field names are not keys.
        for kept in ["pk_live_51Habcdefghijkl", "network_transaction_id", "task_list_items"] {
            assert_eq!(redact_text(kept), kept);
        }
    }

    #[test]
    fn free_text_secrets_in_responses_and_json_keys_are_masked() {
        let body = r#"{"id":"pi_1","object":"payment_intent","client_secret":"pi_1_secret_abcdef123456",
            "nested":{"secret":"ek_test_YWNjdF8xMjM0NTY3ODkw"},
            "webhook":{"secret":"whsec_0123456789abcdef"},
            "link":{"object":"account_link","url":"https://connect.stripe.com/setup/e/acct_1/abcdefgh"},
            "description":"use sk_live_51HzzzzzzzzzzzzzQ and rk_test_51Hyyyyyyyyyy",
            "metadata":{"sk_live_51Hkkkkkkkkkkkk":"key as key"},
            "return_url":"https://example.com/return",
            "card":{"last4":"4242","cvc_check":"pass"},
            "amount":4242424242424242}"#;
        let text = rendered(&redact_message(&json_response(body), Context::default()));
        for absent in [
            "abcdef123456",
            "YWNjdF8xMjM0NTY3ODkw",
            "0123456789abcdef",
            "acct_1/abcdefgh",
            "4242424242424242",
            "zzzzzzzz",
            "yyyyyyyy",
            "kkkkkkkk",
        ] {
            assert!(!text.contains(absent), "`{absent}` survived in {text}");
        }
        assert!(text.contains("https://example.com/return"));
        assert!(text.contains("cvc_check"), "cvc_check is a result, not a CVC");
        assert!(text.contains("\"last4\":\"4242\""));
    }

    #[test]
    fn percent_encoding_does_not_hide_card_numbers_or_secrets() {
        let once: String = "4242424242424242".bytes().map(|b| format!("%{b:02X}")).collect();
        let twice = once.replace('%', "%25");
        assert_eq!(redact_text(&format!("/v1/customers/{once}")), "/v1/customers/****4242");
        assert_eq!(redact_text(&format!("x{twice}y")), "x****4242y");
        assert!(!redact_text("sk%5Flive%5F51Habcdefghijkl").contains("51Habcdef"));
        assert!(matches!(redact_text_cow("100%25 sure"), Cow::Borrowed(_)));
    }

    // Hole 5: bodies that are not strictly what they claim.

    #[test]
    fn bodies_not_strictly_form_or_json_are_not_recorded() {
        let ctx = Context::default();
        for (ct, body) in [
            (Some("text/plain"), "card[cvc]=123&amount=5"),
            (Some("text/plain"), "4242 4242 4242 4242 cvc 123"),
            (None, "a=1;card[cvc]=123"),
            (Some("application/x-www-form-urlencoded"), "a=1;card[cvc]=123"),
            (Some("application/x-www-form-urlencoded"), "a=1&card[cvc]=123 "),
            (Some("application/json"), r#"{"card":{"cvc":"123"}"#),
            (Some("application/json"), "card[cvc]=123"),
            (Some("application/octet-stream"), "card[cvc]=123"),
            (Some("multipart/form-data; boundary=x"), "--x\r\ncard[cvc]=123\r\n--x--"),
        ] {
            let r = redact_message(&typed_request(ct, body), ctx);
            assert!(r.body_json.is_none() && r.body_text.is_none(), "{ct:?} {body}: {r:?}");
            let omitted = r.body_omitted.as_deref().unwrap();
            assert!(omitted.contains(&format!("{} bytes", body.len())), "{omitted}");
            assert!(!rendered(&r).contains("123"), "{ct:?} {body}");
        }
        // Untyped strict form is form; JSON under text/plain is JSON.
        let r = redact_message(&typed_request(None, "card[cvc]=123&amount=5"), ctx);
        assert_eq!(r.body_json, Some(serde_json::json!([["amount", "5"]])));
        let r = redact_message(&typed_request(Some("text/plain"), r#"{"card":{"cvc":"123"},"a":1}"#), ctx);
        assert_eq!(r.body_json, Some(serde_json::json!({"card": {}, "a": 1})));
        // Two different content types: neither is believed.
        let mut msg = typed_request(Some("application/json"), "card[cvc]=123");
        msg.headers.push(("Content-Type".into(), b"application/x-www-form-urlencoded".to_vec()));
        let r = redact_message(&msg, ctx);
        assert!(r.body_omitted.is_some(), "{r:?}");
    }

    #[test]
    fn strict_form_grammar() {
        for ok in ["", "a=1", "a=1&b=2", "card%5Bcvc%5D=1", "a[b][]=x+y", "email=a%40b.c", "a=1,2:3/4?5$!'()*~"] {
            assert!(is_strict_form(ok.as_bytes()), "{ok}");
        }
        for bad in ["a=1;b=2", "a=1 b", "a=%zz", "a=%4", "{\"a\":1}", "a=\"x\"", "a=é", "a=1\n"] {
            assert!(!is_strict_form(bad.as_bytes()), "{bad}");
        }
    }

    // Hole 6: headers by allowlist.

    #[test]
    fn headers_are_recorded_by_allowlist() {
        let token = "sk_kg_Ab-_cDeFgHiJkLmNoPqRsTuVwXyZ0123456789-_Q";
        let user_agent = format!("curl/8 {token}");
        let authorization = format!("Bearer {token}");
        let msg = message(
            "POST /v1/charges HTTP/1.1",
            &[
                ("Stripe-Version", "2024-06-20"),
                ("Stripe-Account", "acct_123"),
                ("User-Agent", user_agent.as_str()),
                ("X-Stripe-Client-User-Agent", r#"{"bindings_version":"10.1.0","secret":"sk_live_51Habcdefghijkl"}"#),
                ("X-Debug", "rk_live_51Habcdefghijkl"),
                ("X-Api-Key", "anything-at-all"),
                ("Authorization", authorization.as_str()),
            ],
            "",
        );
        let r = redact_message(&msg, Context::default());
        let get = |n: &str| r.headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(get("stripe-version"), Some("2024-06-20"));
        assert_eq!(get("stripe-account"), Some("acct_123"));
        assert_eq!(get("user-agent"), Some("curl/8 sk_kg_[redacted]"));
        assert!(get("x-stripe-client-user-agent").unwrap().contains("10.1.0"));
        assert_eq!(get("x-debug"), Some(MASK));
        assert_eq!(get("x-api-key"), Some(MASK));
        assert_eq!(get("authorization"), None);
        let text = rendered(&r);
        for absent in ["Ab-_cDeF", "0123456789-_Q", "51Habcdef", "anything-at-all"] {
            assert!(!text.contains(absent), "{absent} in {text}");
        }
    }

    // Hole 7: paths and query strings.

    #[test]
    fn query_strings_and_paths_are_redacted() {
        let ctx = Context::default();
        let path = "/v1/payment_intents/pi_1?client_secret=pi_1_secret_zzzzzzzz&expand[]=x";
        let p = redact_path(path, ctx);
        assert!(!p.contains("zzzzzzzz"), "{p}");
        assert!(p.starts_with("/v1/payment_intents/pi_1?"));
        let line = redact_start_line(&format!("GET {path} HTTP/1.1"), ctx);
        assert!(!line.contains("zzzzzzzz"), "{line}");
        assert!(line.ends_with(" HTTP/1.1"));

        let p = redact_path("/v1/charges?api_key=sk_kg_Ab-_cDeFgHiJkLmNoPqRsTuVwXyZ0123456789-_Q&limit=3", ctx);
        assert!(!p.contains("Ab-_cDeF") && p.contains("limit=3"), "{p}");
        let p = redact_path("/v1/tokens?card[number]=4242424242424242&card[cvc]=123&card[exp_year]=2031", ctx);
        assert!(!p.contains("424242424242") && !p.contains("123") && !p.contains("2031"), "{p}");
        assert!(p.contains("4242"), "{p}");
        let p = redact_path("/v1/tokens?a=1;card[cvc]=123", ctx);
        assert_eq!(p, "/v1/tokens?[redacted]");
        let p = redact_path("/v1/customers/4242-4242-4242-4242?x#frag", ctx);
        assert_eq!(p, "/v1/customers/****4242?[redacted]");
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
        let msg = typed_request(Some("application/x-www-form-urlencoded"), "\u{0}\u{1}");
        assert!(redact_message(&msg, Context::default()).body_omitted.is_some());
    }

    #[test]
    fn secret_hint_covers_every_pattern() {
        let hint = Regex::new(SECRET_HINT_LITERALS).unwrap();
        let regexes = SECRET_REGEXES.as_ref().expect("every pattern compiles");
        assert_eq!(regexes.len(), SECRET_PATTERNS.len());
        for sample in [
            "sk_live_abcdef123",
            "rk_test_abcdef123",
            "sk_kg_abcdef-_123",
            "whsec_abcdef123",
            "ek_test_abcdef123",
            "pi_1_secret_abc",
            "cuss_secret_abc",
        ] {
            assert!(regexes.iter().any(|re| re.is_match(sample)), "{sample} is a secret");
            assert!(hint.is_match(sample), "the hint misses {sample}");
        }
        assert!(matches!(redact_text_cow("payment_intent requires_confirmation"), Cow::Borrowed(_)));
    }
}
