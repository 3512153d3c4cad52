//! `application/x-www-form-urlencoded`, strictly: the one form parser of keygate (bodies of
//! Stripe's v1 API and every query string).
//!
//! Grammar: pairs separated by `&` (empty pairs are skipped), name and value separated by the
//! first `=` (a pair without `=` has an empty value), `+` is a space, `%XX` a byte; after
//! decoding, names and values must be UTF-8. Refused: a raw `;` (some servers split pairs on it),
//! malformed escapes, invalid UTF-8, names outside Stripe's bracket notation
//! (`base[segment][segment]…` with no `[`/`]` inside a segment and a non-empty base), control
//! characters in names, and a name sent twice unless it ends in `[]` (an array), since parsers
//! disagree on which of two values wins.
//!
//! [`serialize`] writes the one canonical encoding: `A–Z a–z 0–9 - . _ ~ [ ]` as themselves,
//! every other byte as `%XX` (upper-case hex; a space is `%20`, never `+`).

use std::collections::HashSet;

/// More pairs than this are refused (Stripe's own limits are far lower).
pub const MAX_PAIRS: usize = 4096;

/// Why a form cannot be read unambiguously.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormError {
    #[error("a raw `;` appears (some servers split parameters on it); percent-encode it as %3B")]
    Semicolon,
    #[error("a percent-escape is malformed (`%` must be followed by two hex digits)")]
    BadEscape,
    #[error("a name or value is not UTF-8 once decoded")]
    NotUtf8,
    #[error("a parameter name is not in Stripe's bracket notation (`name[key][key]`)")]
    BadName,
    #[error("the parameter `{0}` appears twice (only array names ending in `[]` may repeat)")]
    Duplicate(String),
    #[error("there are more than 4096 parameters")]
    TooMany,
}

/// Parses a form into its decoded `(name, value)` pairs, in order.
pub fn parse(input: &[u8]) -> Result<Vec<(String, String)>, FormError> {
    parse_with(input, false)
}

/// Like [`parse`], but names may repeat (Stripe's v2 API writes arrays in query strings as
/// repeated names: `include=a&include=b`).
pub fn parse_repeated(input: &[u8]) -> Result<Vec<(String, String)>, FormError> {
    parse_with(input, true)
}

fn parse_with(input: &[u8], repeats: bool) -> Result<Vec<(String, String)>, FormError> {
    if memchr::memchr(b';', input).is_some() {
        return Err(FormError::Semicolon);
    }
    let mut pairs = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    for piece in input.split(|&b| b == b'&') {
        if piece.is_empty() {
            continue;
        }
        if pairs.len() >= MAX_PAIRS {
            return Err(FormError::TooMany);
        }
        let (name, value) = match memchr::memchr(b'=', piece) {
            Some(i) => (&piece[..i], &piece[i + 1..]),
            None => (piece, &b""[..]),
        };
        let name = decode(name)?;
        let value = decode(value)?;
        if !is_bracket_name(&name) {
            return Err(FormError::BadName);
        }
        if !repeats && !name.ends_with("[]") && !seen.insert(name.clone()) {
            return Err(FormError::Duplicate(crate::echo_name(&name)));
        }
        pairs.push((name, value));
    }
    Ok(pairs)
}

/// Percent- and `+`-decodes one name or value.
pub fn decode(raw: &[u8]) -> Result<String, FormError> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' => {
                let hex = raw.get(i + 1..i + 3).ok_or(FormError::BadEscape)?;
                let hi = char::from(hex[0]).to_digit(16).ok_or(FormError::BadEscape)?;
                let lo = char::from(hex[1]).to_digit(16).ok_or(FormError::BadEscape)?;
                out.push(u8::try_from(hi * 16 + lo).map_err(|_| FormError::BadEscape)?);
                i += 3;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| FormError::NotUtf8)
}

/// `base` followed by zero or more `[segment]`, no brackets inside a segment, no control
/// characters anywhere, a non-empty base.
pub fn is_bracket_name(name: &str) -> bool {
    if name.chars().any(char::is_control) {
        return false;
    }
    let (base, mut rest) = match name.find('[') {
        Some(i) => (&name[..i], &name[i..]),
        None => (name, ""),
    };
    if base.is_empty() || base.contains(']') {
        return false;
    }
    while !rest.is_empty() {
        let Some(inner) = rest.strip_prefix('[') else { return false };
        let Some(close) = inner.find(']') else { return false };
        if inner[..close].contains('[') {
            return false;
        }
        rest = &inner[close + 1..];
    }
    true
}

/// Appends the canonical encoding of `text`.
pub fn encode_into(out: &mut String, text: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in text.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'[' | b']') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
    }
}

/// The canonical encoding of a list of pairs.
pub fn serialize(pairs: &[(String, String)]) -> String {
    let mut out = String::with_capacity(pairs.iter().map(|(n, v)| n.len() + v.len() + 2).sum());
    for (i, (name, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        encode_into(&mut out, name);
        out.push('=');
        encode_into(&mut out, value);
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn reads_what_the_sdks_send() {
        let pairs = parse(b"amount=2000&currency=usd&payment_method_types%5B0%5D=card&metadata[order]=A+1%26").unwrap();
        assert_eq!(
            pairs,
            [
                ("amount".into(), "2000".into()),
                ("currency".into(), "usd".into()),
                ("payment_method_types[0]".into(), "card".into()),
                ("metadata[order]".into(), "A 1&".into())
            ]
        );
        assert_eq!(serialize(&pairs), "amount=2000&currency=usd&payment_method_types[0]=card&metadata[order]=A%201%26");
        assert_eq!(parse(b"expand[]=a&expand[]=b&&flag").unwrap().len(), 3);
    }

    #[test]
    fn refuses_what_parsers_read_differently() {
        assert_eq!(parse(b"a=1;card[cvc]=123"), Err(FormError::Semicolon));
        assert_eq!(parse(b"amount=1&amount=999999"), Err(FormError::Duplicate("amount".into())));
        assert_eq!(parse(b"amount=1&%61mount=2"), Err(FormError::Duplicate("amount".into())));
        assert_eq!(parse(b"a=%zz"), Err(FormError::BadEscape));
        assert_eq!(parse(b"a=%4"), Err(FormError::BadEscape));
        assert_eq!(parse(b"a=%ff"), Err(FormError::NotUtf8));
        for name in ["card[cvc", "card]cvc", "[x]", "a[b[c]]", "a[b]c", "a%00"] {
            assert_eq!(parse(format!("{name}=1").as_bytes()), Err(FormError::BadName), "{name}");
        }
    }

    #[test]
    fn serialisation_round_trips() {
        let pairs = vec![("metadata[k v]".to_owned(), "é&=+;%\u{661}".to_owned())];
        assert_eq!(parse(serialize(&pairs).as_bytes()).unwrap(), pairs);
    }
}
