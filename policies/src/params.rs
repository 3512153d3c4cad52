//! Request parameters: v1 form bodies, v2 JSON bodies and query strings, flattened into one
//! list of `(name, value)` pairs in bracket notation.
//!
//! Names are normalised so that one condition name covers every way of writing a parameter:
//! percent-decoding and `+` as space first, then array indices and empty brackets become `[]`
//! (`items[0][price]` → `items[][price]`), and one trailing `[]` is dropped (`expand[]`,
//! `expand[0]` → `expand`). JSON objects become brackets (`{"amount":{"value":5}}` →
//! `amount[value]`).
//!
//! The engine parses with the service's `NameFilter`: only parameters that some condition
//! names (plus amount and currency) are decoded and kept, so large bodies cost little.
//!
//! Invariants: parsing never panics on any input; whatever cannot be read (invalid UTF-8 after
//! decoding, malformed JSON, an unknown body content type, too many parameters) marks the set
//! `unreadable`, and the decider treats unreadable parameters as "could be anything": allow
//! rules with parameter conditions do not match, deny rules do.

use std::borrow::Cow;

const PLAIN: u8 = 0;
const AMPERSAND: u8 = 1;
const EQUALS: u8 = 2;
const ESCAPE: u8 = 3;
const BRACKET: u8 = 4;

/// The bytes the form scanner stops at; a table keeps the per-byte work to one load and a
/// well-predicted branch.
static FORM_BYTE_CLASS: [u8; 256] = {
    let mut table = [PLAIN; 256];
    table[b'&' as usize] = AMPERSAND;
    table[b'=' as usize] = EQUALS;
    table[b'%' as usize] = ESCAPE;
    table[b'+' as usize] = ESCAPE;
    table[b'[' as usize] = BRACKET;
    table
};

/// More parameters than this and the request is treated as unreadable (fail closed).
const MAX_PARAMS: usize = 4096;

/// One `(name, value)` pair; `number` is the value as an integer, parsed once because bound
/// conditions of many rules may look at it.
#[derive(Debug, Clone)]
struct Param<'a> {
    name: Cow<'a, str>,
    value: Cow<'a, str>,
    number: Option<i64>,
}

/// Parameters of one request, borrowed from the request where no decoding was needed.
#[derive(Debug, Default, Clone)]
pub struct RequestParams<'a> {
    entries: Vec<Param<'a>>,
    unreadable: bool,
    /// Reused buffer for decoding names that may turn out not to be wanted.
    scratch: Vec<u8>,
}

/// The parameter names a policy can look at: the names of its conditions (exactly, or anything
/// nested under a `forbidden` one) and the amount and currency. The engine keeps only those,
/// so it neither decodes nor stores the rest of a body.
#[derive(Debug, Clone, Default)]
pub(crate) struct NameFilter {
    exact: Vec<String>,
    under: Vec<String>,
}

impl NameFilter {
    pub(crate) fn new(exact: impl IntoIterator<Item = String>, under: impl IntoIterator<Item = String>) -> NameFilter {
        let mut exact: Vec<String> = exact
            .into_iter()
            .chain(["amount", "currency", "amount[value]", "amount[currency]"].map(String::from))
            .collect();
        exact.sort();
        exact.dedup();
        let mut under: Vec<String> = under.into_iter().collect();
        under.sort();
        under.dedup();
        NameFilter { exact, under }
    }

    fn wants(&self, name: &str) -> bool {
        // A handful of names: a length check rejects most without comparing bytes.
        self.exact.iter().any(|n| n.len() == name.len() && n == name) || self.under.iter().any(|u| is_under(name, u))
    }
}

impl<'a> RequestParams<'a> {
    /// Parses the query string and, according to `content_type` (form when absent on `/v1`,
    /// JSON when absent on `/v2`), the body.
    pub fn parse(path: &str, query: Option<&'a str>, content_type: Option<&str>, body: &'a [u8]) -> RequestParams<'a> {
        RequestParams::parse_with(path, query, content_type, body, None)
    }

    /// Like [`RequestParams::parse`], keeping only the parameters `filter` wants.
    pub(crate) fn parse_with(
        path: &str,
        query: Option<&'a str>,
        content_type: Option<&str>,
        body: &'a [u8],
        filter: Option<&NameFilter>,
    ) -> RequestParams<'a> {
        let mut params = RequestParams::default();
        if let Some(query) = query {
            params.add_form(query.as_bytes(), filter);
        }
        if !body.is_empty() {
            match body_kind(path, content_type) {
                BodyKind::Form => params.add_form(body, filter),
                BodyKind::Json => params.add_json(body, filter),
                BodyKind::Other => params.unreadable = true,
            }
        }
        params
    }

    /// Parses one `application/x-www-form-urlencoded` text (a body or a query string).
    pub fn parse_form(bytes: &'a [u8]) -> RequestParams<'a> {
        let mut params = RequestParams::default();
        params.add_form(bytes, None);
        params
    }

    /// True when some of the request could not be read as parameters.
    pub fn is_unreadable(&self) -> bool {
        self.unreadable
    }

    /// All `(normalised name, value)` pairs, in request order (query first).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|p| (p.name.as_ref(), p.value.as_ref()))
    }

    /// Every value of the parameter with this normalised name.
    pub fn values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s str> + 's {
        self.entries.iter().filter(move |p| p.name == name).map(|p| p.value.as_ref())
    }

    /// Every value of the parameter with this normalised name, with its integer reading.
    pub(crate) fn values_with_numbers<'s>(
        &'s self,
        name: &'s str,
    ) -> impl Iterator<Item = (&'s str, Option<i64>)> + 's {
        self.entries.iter().filter(move |p| p.name == name).map(|p| (p.value.as_ref(), p.number))
    }

    /// True when the parameter, or anything nested under it (`name[...]`), is present.
    pub fn has_under(&self, name: &str) -> bool {
        self.entries.iter().any(|p| is_under(&p.name, name))
    }

    /// The amount a money-moving request is about: `amount` (v1), or `amount[value]` (v2).
    /// When repeated, the largest, so that budgets never under-count.
    pub fn amount(&self) -> Option<i64> {
        let max_of = |name| self.values_with_numbers(name).filter_map(|(_, n)| n).max();
        max_of("amount").or_else(|| max_of("amount[value]"))
    }

    /// The currency, lower case: `currency` (v1), or `amount[currency]` (v2). `None` when absent
    /// or ambiguous (repeated with different values).
    pub fn currency(&self) -> Option<String> {
        let single = |name| {
            let mut values = self.values(name);
            let first = values.next()?;
            values.all(|v| v.eq_ignore_ascii_case(first)).then(|| first.to_ascii_lowercase())
        };
        single("currency").or_else(|| single("amount[currency]"))
    }

    fn push(&mut self, name: Cow<'a, str>, value: Cow<'a, str>) {
        self.push_normalized(normalize_name(name), value);
    }

    /// `name` is known to need no normalisation.
    fn push_normalized(&mut self, name: Cow<'a, str>, value: Cow<'a, str>) {
        if self.entries.len() >= MAX_PARAMS {
            self.unreadable = true;
            return;
        }
        let number = match value.as_bytes().first() {
            Some(b'0'..=b'9' | b'-') => value.parse::<i64>().ok(),
            _ => None,
        };
        self.entries.push(Param { name, value, number });
    }

    fn add_form(&mut self, bytes: &'a [u8], filter: Option<&NameFilter>) {
        let pairs = memchr::memchr_iter(b'&', bytes).count() + 1;
        if pairs > MAX_PARAMS {
            self.unreadable = true;
            return;
        }
        self.entries.reserve(pairs);
        match std::str::from_utf8(bytes) {
            Ok(text) => self.add_form_text(text, filter),
            // Raw non-ASCII bytes (SDKs percent-encode everything): slower, per component.
            Err(_) => self.add_form_bytes(bytes, filter),
        }
    }

    /// One pass over a UTF-8 form: `&` and `=` are ASCII, so every component is a `&str`
    /// slice; only components with `%` or `+` are decoded (and re-validated).
    fn add_form_text(&mut self, text: &'a str, filter: Option<&NameFilter>) {
        let bytes = text.as_bytes();
        let mut start = 0;
        let mut equals = None;
        let mut name_escaped = false;
        let mut name_bracketed = false;
        let mut value_escaped = false;
        for (i, b) in bytes.iter().enumerate() {
            match FORM_BYTE_CLASS[usize::from(*b)] {
                PLAIN => {}
                AMPERSAND => {
                    let needs_normalizing = name_escaped || name_bracketed;
                    self.push_component_pair(
                        text,
                        (start, equals, i),
                        [name_escaped, needs_normalizing, value_escaped],
                        filter,
                    );
                    start = i + 1;
                    equals = None;
                    name_escaped = false;
                    name_bracketed = false;
                    value_escaped = false;
                }
                EQUALS if equals.is_none() => equals = Some(i),
                ESCAPE if equals.is_none() => name_escaped = true,
                ESCAPE => value_escaped = true,
                BRACKET if equals.is_none() => name_bracketed = true,
                _ => {}
            }
        }
        let needs_normalizing = name_escaped || name_bracketed;
        self.push_component_pair(
            text,
            (start, equals, bytes.len()),
            [name_escaped, needs_normalizing, value_escaped],
            filter,
        );
    }

    fn push_component_pair(
        &mut self,
        text: &'a str,
        (start, equals, end): (usize, Option<usize>, usize),
        [name_escaped, name_needs_normalizing, value_escaped]: [bool; 3],
        filter: Option<&NameFilter>,
    ) {
        if start >= end {
            return;
        }
        let (raw_name, raw_value) = match equals {
            Some(at) => (&text[start..at], &text[at + 1..end]),
            None => (&text[start..end], ""),
        };
        let value = |escaped: bool| {
            if escaped {
                decode_component(raw_value.as_bytes()).map(|c| Cow::Owned(c.into_owned()))
            } else {
                Some(Cow::Borrowed(raw_value))
            }
        };
        if !name_escaped {
            let name =
                if name_needs_normalizing { normalize_name(Cow::Borrowed(raw_name)) } else { Cow::Borrowed(raw_name) };
            if name.is_empty() || filter.is_some_and(|f| !f.wants(&name)) {
                return;
            }
            match value(value_escaped) {
                Some(value) => self.push_normalized(name, value),
                None => self.unreadable = true,
            }
            return;
        }
        // Decode the name into the scratch buffer first: most names a policy does not look at
        // then cost no allocation.
        let mut scratch = std::mem::take(&mut self.scratch);
        decode_into(raw_name.as_bytes(), &mut scratch);
        match std::str::from_utf8(&scratch) {
            Ok(decoded) => {
                let name = normalize_name(Cow::Borrowed(decoded));
                let wanted = !name.is_empty() && filter.is_none_or(|f| f.wants(&name));
                if wanted {
                    match value(value_escaped) {
                        Some(value) => self.push_normalized(Cow::Owned(name.into_owned()), value),
                        None => self.unreadable = true,
                    }
                }
            }
            Err(_) => self.unreadable = true,
        }
        self.scratch = scratch;
    }

    fn add_form_bytes(&mut self, bytes: &'a [u8], filter: Option<&NameFilter>) {
        let mut start = 0;
        for end in memchr::memchr_iter(b'&', bytes).chain(std::iter::once(bytes.len())) {
            let pair = &bytes[start..end];
            start = end + 1;
            if pair.is_empty() {
                continue;
            }
            let (raw_name, raw_value) = match memchr::memchr(b'=', pair) {
                Some(at) => (&pair[..at], &pair[at + 1..]),
                None => (pair, &pair[pair.len()..]),
            };
            match (decode_component(raw_name), decode_component(raw_value)) {
                (Some(name), Some(value)) if !name.is_empty() => {
                    let name = normalize_name(name);
                    if filter.is_none_or(|f| f.wants(&name)) {
                        self.push_normalized(name, value);
                    }
                }
                (Some(_), Some(_)) => {}
                _ => self.unreadable = true,
            }
        }
    }

    fn add_json(&mut self, bytes: &[u8], filter: Option<&NameFilter>) {
        match serde_json::from_slice::<serde_json::Value>(bytes) {
            Ok(value) => {
                let mut prefix = String::new();
                self.flatten_json(&mut prefix, &value);
                if let Some(filter) = filter {
                    self.entries.retain(|p| filter.wants(&p.name));
                }
            }
            Err(_) => self.unreadable = true,
        }
    }

    fn flatten_json(&mut self, prefix: &mut String, value: &serde_json::Value) {
        use serde_json::Value;
        match value {
            Value::Null => {}
            Value::Bool(b) => self.push_owned(prefix, if *b { "true" } else { "false" }),
            Value::Number(n) => self.push_owned(prefix, &n.to_string()),
            Value::String(s) => self.push_owned(prefix, s),
            Value::Array(items) => {
                let len = prefix.len();
                prefix.push_str("[]");
                for item in items {
                    self.flatten_json(prefix, item);
                }
                prefix.truncate(len);
            }
            Value::Object(map) => {
                let len = prefix.len();
                for (key, item) in map {
                    if len == 0 {
                        prefix.push_str(key);
                    } else {
                        prefix.push('[');
                        prefix.push_str(key);
                        prefix.push(']');
                    }
                    self.flatten_json(prefix, item);
                    prefix.truncate(len);
                }
            }
        }
    }

    fn push_owned(&mut self, name: &str, value: &str) {
        if name.is_empty() {
            // A bare JSON scalar is not a parameter set.
            self.unreadable = true;
            return;
        }
        self.push(Cow::Owned(name.to_owned()), Cow::Owned(value.to_owned()));
    }
}

enum BodyKind {
    Form,
    Json,
    Other,
}

fn body_kind(path: &str, content_type: Option<&str>) -> BodyKind {
    let Some(content_type) = content_type else {
        return if path.starts_with("/v2/") { BodyKind::Json } else { BodyKind::Form };
    };
    let essence = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    if essence == "application/x-www-form-urlencoded" {
        BodyKind::Form
    } else if essence == "application/json" || essence.ends_with("+json") {
        BodyKind::Json
    } else {
        BodyKind::Other
    }
}

/// `+` as space, then percent-decoding, then UTF-8. `None` if the result is not UTF-8.
/// Borrows when there is nothing to decode (the common case for names and values); one pass.
fn decode_component(raw: &[u8]) -> Option<Cow<'_, str>> {
    if memchr::memchr2(b'%', b'+', raw).is_none() {
        return std::str::from_utf8(raw).ok().map(Cow::Borrowed);
    }
    let mut out = Vec::with_capacity(raw.len());
    decode_into(raw, &mut out);
    String::from_utf8(out).ok().map(Cow::Owned)
}

/// `+` as space and percent-decoding into `out` (cleared first); no UTF-8 check.
fn decode_into(raw: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(raw.len());
    let mut rest = raw;
    while let Some(at) = memchr::memchr2(b'%', b'+', rest) {
        out.extend_from_slice(&rest[..at]);
        if rest[at] == b'+' {
            out.push(b' ');
            rest = &rest[at + 1..];
            continue;
        }
        match (rest.get(at + 1).and_then(hex_value), rest.get(at + 2).and_then(hex_value)) {
            (Some(hi), Some(lo)) => {
                out.push(hi << 4 | lo);
                rest = &rest[at + 3..];
            }
            // A `%` not followed by two hex digits stays as it is.
            _ => {
                out.push(b'%');
                rest = &rest[at + 1..];
            }
        }
    }
    out.extend_from_slice(rest);
}

fn hex_value(b: &u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Array indices and empty brackets become `[]`; one trailing `[]` is dropped. Allocates only
/// when an index has to be rewritten.
pub fn normalize_name<'a>(name: Cow<'a, str>) -> Cow<'a, str> {
    if !name.contains('[') {
        return name;
    }
    let name = if has_numeric_index(&name) { Cow::Owned(rewrite_indices(&name)) } else { name };
    match name {
        Cow::Borrowed(s) => Cow::Borrowed(s.strip_suffix("[]").unwrap_or(s)),
        Cow::Owned(mut s) => {
            if s.ends_with("[]") {
                s.truncate(s.len() - 2);
            }
            Cow::Owned(s)
        }
    }
}

fn has_numeric_index(name: &str) -> bool {
    let bytes = name.as_bytes();
    let mut i = 0;
    while let Some(open) = bytes[i..].iter().position(|b| *b == b'[') {
        let digits_start = i + open + 1;
        let digits = bytes[digits_start..].iter().take_while(|c| c.is_ascii_digit()).count();
        if digits > 0 && bytes.get(digits_start + digits) == Some(&b']') {
            return true;
        }
        i = digits_start;
    }
    false
}

fn rewrite_indices(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut rest = name;
    while let Some(open) = rest.find('[') {
        out.push_str(&rest[..=open]);
        rest = &rest[open + 1..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits > 0 && rest.as_bytes().get(digits) == Some(&b']') {
            rest = &rest[digits..];
        }
    }
    out.push_str(rest);
    out
}

/// `key` is `name` itself or nested under it (`name[...]`).
pub(crate) fn is_under(key: &str, name: &str) -> bool {
    key.strip_prefix(name).is_some_and(|rest| rest.is_empty() || rest.starts_with('['))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(params: &RequestParams<'_>) -> Vec<(String, String)> {
        params.iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
    }

    fn p(k: &str, v: &str) -> (String, String) {
        (k.to_owned(), v.to_owned())
    }

    #[test]
    fn form_bracket_notation_and_decoding() {
        let body = b"amount=2000&currency=usd&metadata%5Border_id%5D=A+1%2F2&items[0][price]=price_1&expand[]=customer&expand%5B%5D=latest_charge";
        let params = RequestParams::parse("/v1/payment_intents", None, None, body);
        assert!(!params.is_unreadable());
        assert_eq!(
            pairs(&params),
            vec![
                p("amount", "2000"),
                p("currency", "usd"),
                p("metadata[order_id]", "A 1/2"),
                p("items[][price]", "price_1"),
                p("expand", "customer"),
                p("expand", "latest_charge"),
            ]
        );
        assert_eq!(params.amount(), Some(2000));
        assert_eq!(params.currency().as_deref(), Some("usd"));
    }

    #[test]
    fn json_v2_bodies_flatten_to_brackets() {
        let body = br#"{"amount":{"value":1500,"currency":"EUR"},"include":["a","b"],"x":null,"ok":true}"#;
        let params =
            RequestParams::parse("/v2/money_management/outbound_payments", None, Some("application/json"), body);
        assert!(!params.is_unreadable());
        assert_eq!(
            pairs(&params),
            vec![
                p("amount[currency]", "EUR"),
                p("amount[value]", "1500"),
                p("include", "a"),
                p("include", "b"),
                p("ok", "true"),
            ]
        );
        assert_eq!(params.amount(), Some(1500));
        assert_eq!(params.currency().as_deref(), Some("eur"));
    }

    #[test]
    fn query_and_body_are_both_read() {
        let params = RequestParams::parse(
            "/v1/customers",
            Some("limit=3&email=a%40b.c"),
            Some("application/x-www-form-urlencoded; charset=utf-8"),
            b"name=x",
        );
        assert_eq!(pairs(&params), vec![p("limit", "3"), p("email", "a@b.c"), p("name", "x")]);
    }

    #[test]
    fn stray_percent_signs_stay() {
        let params = RequestParams::parse_form(b"a=100%25&b=%zz&c=%4&d=%e2%82%ac");
        assert_eq!(pairs(&params), vec![p("a", "100%"), p("b", "%zz"), p("c", "%4"), p("d", "€")]);
    }

    #[test]
    fn unreadable_inputs_are_flagged() {
        assert!(RequestParams::parse_form(b"a=%FF").is_unreadable());
        assert!(RequestParams::parse("/v2/x", None, None, b"{not json").is_unreadable());
        assert!(RequestParams::parse("/v1/files", None, Some("multipart/form-data"), b"x").is_unreadable());
        assert!(!RequestParams::parse("/v1/files", None, Some("multipart/form-data"), b"").is_unreadable());
    }

    #[test]
    fn repeated_amounts_count_the_largest_and_mixed_currencies_are_ambiguous() {
        let params = RequestParams::parse_form(b"amount=1&amount=90000&currency=usd&currency=eur");
        assert_eq!(params.amount(), Some(90000));
        assert_eq!(params.currency(), None);
    }

    #[test]
    fn names_are_normalised() {
        for (raw, want) in [
            ("expand[]", "expand"),
            ("expand[3]", "expand"),
            ("items[12][price_data][unit_amount]", "items[][price_data][unit_amount]"),
            ("a[b][]", "a[b]"),
            ("a[1x]", "a[1x]"),
            ("[", "["),
        ] {
            assert_eq!(normalize_name(Cow::Borrowed(raw)), want, "{raw}");
        }
    }
}
