//! `multipart/form-data` (file uploads to `files.stripe.com`), strictly, and its canonical
//! re-encoding with a boundary keygate chooses.
//!
//! Written here rather than taken from a crate: the crates that parse multipart (multer,
//! multipart) stream into handlers and accept what browsers send; keygate needs the opposite, a
//! small strict reader of a body already in memory that refuses every ambiguity (extra part
//! headers, `filename*`, quoted-pair escapes, a preamble or an epilogue), and a writer.
//!
//! Grammar: the body starts with `--boundary CRLF`; parts are separated by
//! `CRLF --boundary CRLF` and the last is followed by `CRLF --boundary--` and an optional CRLF.
//! Each part has a `Content-Disposition: form-data; name="…"` header, optionally with
//! `; filename="…"`, and optionally a `Content-Type`; names and filenames are quoted strings
//! without `"`, `\`, CR or LF; names follow the form bracket notation.

use bytes::{BufMut, Bytes, BytesMut};
use memchr::memmem;

/// More parts than this are refused.
pub const MAX_PARTS: usize = 64;

/// One part of a form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub name: String,
    pub filename: Option<String>,
    pub content_type: Option<String>,
    pub data: Bytes,
}

/// Why a multipart body cannot be read unambiguously.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MultipartError {
    #[error("the multipart boundary is empty, longer than 70 characters or has characters outside RFC 2046's set")]
    BadBoundary,
    #[error("the multipart body does not start with its boundary, or text follows its closing boundary")]
    Framing,
    #[error("a multipart part's headers are malformed (only Content-Disposition and Content-Type are accepted)")]
    PartHeaders,
    #[error("a multipart part has no `name`, or a name outside the bracket notation")]
    PartName,
    #[error("a multipart part name appears twice")]
    Duplicate,
    #[error("there are more than 64 multipart parts")]
    TooMany,
}

fn valid_boundary(b: &str) -> bool {
    !b.is_empty()
        && b.len() <= 70
        && b.bytes().all(|c| c.is_ascii_alphanumeric() || b"'()+_,-./:=?".contains(&c))
        && !b.ends_with(' ')
}

/// Parses a body with the boundary from its `Content-Type`.
pub fn parse(boundary: &str, body: &[u8]) -> Result<Vec<Part>, MultipartError> {
    if !valid_boundary(boundary) {
        return Err(MultipartError::BadBoundary);
    }
    let opening = format!("--{boundary}\r\n");
    let separator = format!("\r\n--{boundary}");
    let mut rest = body.strip_prefix(opening.as_bytes()).ok_or(MultipartError::Framing)?;
    let finder = memmem::Finder::new(separator.as_bytes());
    let mut parts = Vec::new();
    loop {
        if parts.len() >= MAX_PARTS {
            return Err(MultipartError::TooMany);
        }
        let end = finder.find(rest).ok_or(MultipartError::Framing)?;
        parts.push(parse_part(&rest[..end])?);
        let after = &rest[end + separator.len()..];
        if let Some(tail) = after.strip_prefix(b"--") {
            if tail.is_empty() || tail == b"\r\n" {
                break;
            }
            return Err(MultipartError::Framing);
        }
        rest = after.strip_prefix(b"\r\n").ok_or(MultipartError::Framing)?;
    }
    let mut names = std::collections::HashSet::new();
    if parts.iter().any(|p| !p.name.ends_with("[]") && !names.insert(p.name.clone())) {
        return Err(MultipartError::Duplicate);
    }
    Ok(parts)
}

fn parse_part(raw: &[u8]) -> Result<Part, MultipartError> {
    let split = memmem::find(raw, b"\r\n\r\n").ok_or(MultipartError::PartHeaders)?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| MultipartError::PartHeaders)?;
    let data = Bytes::copy_from_slice(&raw[split + 4..]);
    let mut disposition = None;
    let mut content_type = None;
    for line in head.split("\r\n") {
        let (name, value) = line.split_once(':').ok_or(MultipartError::PartHeaders)?;
        let value = value.trim();
        if !value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(MultipartError::PartHeaders);
        }
        if name.eq_ignore_ascii_case("content-disposition") && disposition.is_none() {
            disposition = Some(value);
        } else if name.eq_ignore_ascii_case("content-type") && content_type.is_none() {
            content_type = Some(value.to_owned());
        } else {
            return Err(MultipartError::PartHeaders);
        }
    }
    let disposition = disposition.ok_or(MultipartError::PartHeaders)?;
    let mut fields = disposition.split(';').map(str::trim);
    if !fields.next().is_some_and(|f| f.eq_ignore_ascii_case("form-data")) {
        return Err(MultipartError::PartHeaders);
    }
    let mut name = None;
    let mut filename = None;
    for field in fields {
        let (key, value) = field.split_once('=').ok_or(MultipartError::PartHeaders)?;
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .filter(|v| !v.contains(['"', '\\']))
            .ok_or(MultipartError::PartHeaders)?;
        match key.trim() {
            "name" if name.is_none() => name = Some(value.to_owned()),
            "filename" if filename.is_none() => filename = Some(value.to_owned()),
            _ => return Err(MultipartError::PartHeaders),
        }
    }
    let name = name.filter(|n| crate::form::is_bracket_name(n)).ok_or(MultipartError::PartName)?;
    Ok(Part { name, filename, content_type, data })
}

/// The canonical encoding: a fresh random boundary that occurs in no part, one
/// `Content-Disposition` and an optional `Content-Type` per part. Returns the `Content-Type`
/// header value and the body.
pub fn serialize(parts: &[Part]) -> (String, Bytes) {
    let boundary = loop {
        let candidate = format!("keygate-{:032x}", rand::random::<u128>());
        if !parts.iter().any(|p| memmem::find(&p.data, candidate.as_bytes()).is_some()) {
            break candidate;
        }
    };
    let mut out = BytesMut::with_capacity(parts.iter().map(|p| p.data.len() + 160).sum());
    for part in parts {
        out.put_slice(b"--");
        out.put_slice(boundary.as_bytes());
        out.put_slice(b"\r\nContent-Disposition: form-data; name=\"");
        out.put_slice(part.name.as_bytes());
        out.put_slice(b"\"");
        if let Some(filename) = &part.filename {
            out.put_slice(b"; filename=\"");
            out.put_slice(filename.as_bytes());
            out.put_slice(b"\"");
        }
        out.put_slice(b"\r\n");
        if let Some(content_type) = &part.content_type {
            out.put_slice(b"Content-Type: ");
            out.put_slice(content_type.as_bytes());
            out.put_slice(b"\r\n");
        }
        out.put_slice(b"\r\n");
        out.put_slice(&part.data);
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"--");
    out.put_slice(boundary.as_bytes());
    out.put_slice(b"--\r\n");
    (format!("multipart/form-data; boundary={boundary}"), out.freeze())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const BODY: &[u8] = b"--xyz\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\ndispute_evidence\r\n--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.pdf\"\r\nContent-Type: application/pdf\r\n\r\n%PDF-1.4 \r\n--x\r\n--xyz--\r\n";

    #[test]
    fn parses_and_reencodes() {
        let parts = parse("xyz", BODY).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].name, "purpose");
        assert_eq!(&parts[0].data[..], b"dispute_evidence");
        assert_eq!(parts[1].filename.as_deref(), Some("a.pdf"));
        assert_eq!(&parts[1].data[..], b"%PDF-1.4 \r\n--x");
        let (content_type, body) = serialize(&parts);
        let boundary = content_type.strip_prefix("multipart/form-data; boundary=").unwrap();
        assert_eq!(parse(boundary, &body).unwrap(), parts);
    }

    #[test]
    fn refuses_ambiguity() {
        let preamble = [b"junk\r\n".as_slice(), BODY].concat();
        assert_eq!(parse("xyz", &preamble), Err(MultipartError::Framing));
        let epilogue = [BODY, b"more"].concat();
        assert_eq!(parse("xyz", &epilogue), Err(MultipartError::Framing));
        let extra =
            b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\nContent-Transfer-Encoding: base64\r\n\r\nx\r\n--b--";
        assert_eq!(parse("b", extra), Err(MultipartError::PartHeaders));
        let star = b"--b\r\nContent-Disposition: form-data; name=\"a\"; filename*=UTF-8''x\r\n\r\nx\r\n--b--";
        assert_eq!(parse("b", star), Err(MultipartError::PartHeaders));
        let dup = b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nx\r\n--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\ny\r\n--b--";
        assert_eq!(parse("b", dup), Err(MultipartError::Duplicate));
        assert_eq!(parse("", BODY), Err(MultipartError::BadBoundary));
    }
}
