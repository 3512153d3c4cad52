//! Secret sources: each turns a reference into a [`Secret`] with one I/O round trip, no caching.
//!
//! Invariants: a source never returns an empty or non-UTF-8 value, and its errors never carry
//! the value (shape errors describe the shape, not the content). Values are moved, not copied,
//! into [`SecretValue`]; buffers that are rejected are zeroed.

pub(crate) mod aws;
pub(crate) mod local;
pub(crate) mod tls;
pub(crate) mod vault;

use zeroize::Zeroize;

use crate::error::SecretError;
use crate::reference::SecretRef;
use crate::value::SecretValue;

/// Turns raw bytes into a secret value: valid UTF-8 and not blank, or an error naming `reference`.
pub(crate) fn text_value(reference: &SecretRef, bytes: Vec<u8>) -> Result<SecretValue, SecretError> {
    match String::from_utf8(bytes) {
        Ok(text) => non_empty(reference, text),
        Err(e) => {
            e.into_bytes().zeroize();
            Err(SecretError::NotUtf8 { reference: reference.to_string() })
        }
    }
}

/// Wraps `text`, or rejects it (zeroed) when it is empty or only whitespace.
pub(crate) fn non_empty(reference: &SecretRef, mut text: String) -> Result<SecretValue, SecretError> {
    if text.trim().is_empty() {
        text.zeroize();
        return Err(SecretError::Empty { reference: reference.to_string() });
    }
    Ok(SecretValue::new(text))
}

/// Takes `field` out of a JSON object; the field must hold a string.
pub(crate) fn take_field(
    reference: &SecretRef,
    mut object: serde_json::Map<String, serde_json::Value>,
    field: &str,
) -> Result<SecretValue, SecretError> {
    match object.remove(field) {
        Some(serde_json::Value::String(text)) => non_empty(reference, text),
        Some(other) => Err(SecretError::BadValue {
            reference: reference.to_string(),
            detail: format!("field `{field}` holds a JSON {}, not a string", json_kind(&other)),
        }),
        None => {
            let mut available: Vec<String> = object.keys().cloned().collect();
            available.sort();
            Err(SecretError::MissingField { reference: reference.to_string(), field: field.to_owned(), available })
        }
    }
}

/// Parses secret text as a JSON object (for `aws-sm://…#field`), without echoing content.
pub(crate) fn json_object(
    reference: &SecretRef,
    text: &str,
    field: &str,
) -> Result<serde_json::Map<String, serde_json::Value>, SecretError> {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(object)) => Ok(object),
        Ok(other) => Err(SecretError::BadValue {
            reference: reference.to_string(),
            detail: format!(
                "the secret holds a JSON {}, not an object, so it has no field `{field}`",
                json_kind(&other)
            ),
        }),
        // serde_json's syntax errors name only positions, but say nothing more to be safe.
        Err(e) => Err(SecretError::BadValue {
            reference: reference.to_string(),
            detail: format!(
                "the secret is not a JSON object (invalid JSON at line {} column {}), so it has no field `{field}`; drop `#{field}` to use the whole string",
                e.line(),
                e.column()
            ),
        }),
    }
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}
