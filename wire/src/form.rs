//! `application/x-www-form-urlencoded`, strictly: the one form parser of keygate (bodies of
//! Stripe's v1 API and every query string).
//!
//! Grammar: pairs separated by `&` (empty pairs are skipped), name and value separated by the
//! first `=` (a pair without `=` has an empty value), `+` is a space, `%XX` a byte; after
//! decoding, names and values must be UTF-8. Refused: a raw `;` (some servers split pairs on it),
//! malformed escapes, invalid UTF-8, names outside Stripe's bracket notation
//! (`base[segment][segment]…` with no `[`/`]` inside a segment and a non-empty base), control
//! characters in names, and a name sent twice unless it ends in `[]` (an array), since parsers
//! disagree on which of two values wins. A form with several faults is refused for the first of:
//! a `;`; each pair's escape, UTF-8 and name faults, in request order; the first repeated name.
//!
//! [`serialize`] writes the one canonical encoding: `A–Z a–z 0–9 - . _ ~ [ ]` as themselves,
//! every other byte as `%XX` (upper-case hex; a space is `%20`, never `+`).

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
    let mut pairs = Vec::with_capacity((memchr::memchr_iter(b'&', input).count() + 1).min(MAX_PAIRS));
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
        pairs.push((name, value));
    }
    if !repeats && let Some(at) = first_repeat(&pairs) {
        return Err(FormError::Duplicate(crate::echo_name(&pairs[at].0)));
    }
    Ok(pairs)
}

/// The index of the first pair whose name an earlier pair already had (array names, ending in
/// `[]`, may repeat). Sorting indices instead of hashing names: no copy of a name, no hasher,
/// and one small allocation for the whole form.
fn first_repeat(pairs: &[(String, String)]) -> Option<usize> {
    let mut order: Vec<usize> = (0..pairs.len()).filter(|&i| !pairs[i].0.ends_with("[]")).collect();
    // Stable: equal names keep their request order, so each run's second index is its first repeat.
    order.sort_by(|&a, &b| pairs[a].0.cmp(&pairs[b].0));
    order.windows(2).filter(|w| pairs[w[0]].0 == pairs[w[1]].0).map(|w| w[1]).min()
}

/// Percent- and `+`-decodes one name or value.
pub fn decode(raw: &[u8]) -> Result<String, FormError> {
    // Most components (every one the SDKs write without brackets or spaces) have nothing to
    // decode: validated and copied in one go.
    let Some(first) = memchr::memchr2(b'%', b'+', raw) else {
        return std::str::from_utf8(raw).map(str::to_owned).map_err(|_| FormError::NotUtf8);
    };
    let mut out = Vec::with_capacity(raw.len());
    out.extend_from_slice(&raw[..first]);
    let mut rest = &raw[first..];
    while let Some(at) = memchr::memchr2(b'%', b'+', rest) {
        out.extend_from_slice(&rest[..at]);
        if rest[at] == b'+' {
            out.push(b' ');
            rest = &rest[at + 1..];
        } else {
            let hex = rest.get(at + 1..at + 3).ok_or(FormError::BadEscape)?;
            let hi = char::from(hex[0]).to_digit(16).ok_or(FormError::BadEscape)?;
            let lo = char::from(hex[1]).to_digit(16).ok_or(FormError::BadEscape)?;
            out.push(u8::try_from(hi * 16 + lo).map_err(|_| FormError::BadEscape)?);
            rest = &rest[at + 3..];
        }
    }
    out.extend_from_slice(rest);
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

/// The bytes [`encode_into`] writes as themselves: `A–Z a–z 0–9 - . _ ~ [ ]`.
const UNRESERVED: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~' | b'[' | b']');
        b += 1;
    }
    table
};

/// Appends the canonical encoding of `text`.
pub fn encode_into(out: &mut String, text: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let bytes = text.as_bytes();
    out.reserve(bytes.len());
    // Runs of unreserved bytes are copied whole. A run is ASCII and follows either the start or
    // an escaped byte after which an ASCII byte begins a character, so its bounds are character
    // boundaries and `get` always finds it.
    let mut run = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if UNRESERVED[usize::from(b)] {
            continue;
        }
        out.push_str(text.get(run..i).unwrap_or_default());
        out.push('%');
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 15)]));
        run = i + 1;
    }
    if run < bytes.len() {
        out.push_str(text.get(run..).unwrap_or_default());
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

    /// The grammar of the module docs written the straightforward way (byte by byte, a hash set
    /// of names), against which the fast paths are checked.
    mod reference {
        use super::super::{FormError, MAX_PAIRS, is_bracket_name};

        pub fn decode(raw: &[u8]) -> Result<String, FormError> {
            let mut out = Vec::new();
            let mut i = 0;
            while i < raw.len() {
                match raw[i] {
                    b'+' => out.push(b' '),
                    b'%' => {
                        let hex = raw.get(i + 1..i + 3).ok_or(FormError::BadEscape)?;
                        let text = std::str::from_utf8(hex).map_err(|_| FormError::BadEscape)?;
                        if !text.bytes().all(|b| b.is_ascii_hexdigit()) {
                            return Err(FormError::BadEscape);
                        }
                        out.push(u8::from_str_radix(text, 16).map_err(|_| FormError::BadEscape)?);
                        i += 2;
                    }
                    b => out.push(b),
                }
                i += 1;
            }
            String::from_utf8(out).map_err(|_| FormError::NotUtf8)
        }

        pub fn encode(text: &str) -> String {
            text.bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || b"-._~[]".contains(&b) {
                        char::from(b).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect()
        }

        pub fn parse(input: &[u8]) -> Result<Vec<(String, String)>, FormError> {
            if input.contains(&b';') {
                return Err(FormError::Semicolon);
            }
            let mut pairs: Vec<(String, String)> = Vec::new();
            for piece in input.split(|&b| b == b'&').filter(|p| !p.is_empty()) {
                if pairs.len() >= MAX_PAIRS {
                    return Err(FormError::TooMany);
                }
                let (name, value) = match piece.iter().position(|&b| b == b'=') {
                    Some(i) => (&piece[..i], &piece[i + 1..]),
                    None => (piece, &b""[..]),
                };
                let (name, value) = (decode(name)?, decode(value)?);
                if !is_bracket_name(&name) {
                    return Err(FormError::BadName);
                }
                pairs.push((name, value));
            }
            let mut seen = std::collections::HashSet::new();
            for (name, _) in &pairs {
                if !name.ends_with("[]") && !seen.insert(name.clone()) {
                    return Err(FormError::Duplicate(crate::echo_name(name)));
                }
            }
            Ok(pairs)
        }
    }

    /// Form-ish bytes: names, brackets, escapes (good and bad), `+`, `=`, `&`, `;`, UTF-8 and not.
    fn formish() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let atom = prop_oneof![
            Just(b"a".to_vec()),
            Just(b"amount".to_vec()),
            Just(b"card[number]".to_vec()),
            Just(b"x[]".to_vec()),
            Just(b"[".to_vec()),
            Just(b"]".to_vec()),
            Just(b"=".to_vec()),
            Just(b"&".to_vec()),
            Just(b"+".to_vec()),
            Just(b";".to_vec()),
            Just(b"%".to_vec()),
            Just(b"%41".to_vec()),
            Just(b"%5B".to_vec()),
            Just(b"%c3%a9".to_vec()),
            Just(b"%C3".to_vec()),
            Just(b"%zz".to_vec()),
            Just(b"%0".to_vec()),
            Just("é".as_bytes().to_vec()),
            Just(vec![0xff]),
            Just(vec![0x01]),
            any::<u8>().prop_map(|b| vec![b]),
        ];
        proptest::collection::vec(atom, 0..24).prop_map(|atoms| atoms.concat())
    }

    proptest::proptest! {
        #[test]
        fn the_fast_paths_read_and_write_exactly_what_the_reference_does(input in formish(), text in proptest::arbitrary::any::<String>()) {
            proptest::prop_assert_eq!(decode(&input), reference::decode(&input));
            proptest::prop_assert_eq!(parse(&input), reference::parse(&input));
            let mut out = String::from("prefix=");
            encode_into(&mut out, &text);
            proptest::prop_assert_eq!(out, format!("prefix={}", reference::encode(&text)));
        }
    }

    #[test]
    fn the_first_repeat_in_request_order_is_named() {
        assert_eq!(parse(b"b=1&a=1&c=1&a=2&b=2"), Err(FormError::Duplicate("a".into())));
        assert_eq!(parse(b"x[]=1&x[]=2&y=1&y=2"), Err(FormError::Duplicate("y".into())));
        assert!(parse_repeated(b"y=1&y=2").is_ok());
    }

    #[test]
    fn serialisation_round_trips() {
        let pairs = vec![("metadata[k v]".to_owned(), "é&=+;%\u{661}".to_owned())];
        assert_eq!(parse(serialize(&pairs).as_bytes()).unwrap(), pairs);
    }
}
