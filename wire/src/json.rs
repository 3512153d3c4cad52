//! JSON bodies (Stripe's v2 API), strictly: one object, no duplicate keys at any depth (parsers
//! disagree on which of two values wins), at most [`MAX_DEPTH`] levels, re-serialised compactly
//! by serde_json so that what keygate forwards is what its policy read.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// Deepest nesting accepted (serde_json's own recursion limit is 128).
pub const MAX_DEPTH: usize = 64;

/// Why a JSON body cannot be read unambiguously.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    #[error("it is not valid JSON ({0})")]
    Invalid(String),
    #[error("it is not a JSON object")]
    NotObject,
    #[error("an object has the key `{0}` twice")]
    Duplicate(String),
    #[error("it is nested deeper than 64 levels")]
    TooDeep,
}

/// A canonical JSON body: the parsed document and its compact serialisation.
#[derive(Debug, Clone, PartialEq)]
pub struct CanonicalJson {
    pub value: Value,
    pub bytes: Vec<u8>,
}

/// Parses strictly and re-serialises.
pub fn canonical(input: &[u8]) -> Result<CanonicalJson, JsonError> {
    let value = parse(input)?;
    if !value.is_object() {
        return Err(JsonError::NotObject);
    }
    let bytes = serde_json::to_vec(&value).map_err(|e| JsonError::Invalid(e.to_string()))?;
    Ok(CanonicalJson { value, bytes })
}

/// Parses a JSON document, refusing duplicate keys and deep nesting.
pub fn parse(input: &[u8]) -> Result<Value, JsonError> {
    let mut deserializer = serde_json::Deserializer::from_slice(input);
    let strict = Strict::deserialize(&mut deserializer).map_err(classify)?;
    deserializer.end().map_err(classify)?;
    if depth(&strict.0) > MAX_DEPTH {
        return Err(JsonError::TooDeep);
    }
    Ok(strict.0)
}

fn classify(error: serde_json::Error) -> JsonError {
    let text = error.to_string();
    if let Some(rest) = text.strip_prefix("duplicate key ") {
        let key = rest.split(" at line").next().unwrap_or("").trim_matches('`');
        return JsonError::Duplicate(crate::echo_name(key));
    }
    if text.starts_with("recursion limit exceeded") {
        return JsonError::TooDeep;
    }
    JsonError::Invalid(format!("{} at line {} column {}", category(&error), error.line(), error.column()))
}

fn category(error: &serde_json::Error) -> &'static str {
    match error.classify() {
        serde_json::error::Category::Io => "read error",
        serde_json::error::Category::Syntax => "syntax error",
        serde_json::error::Category::Data => "unexpected data",
        serde_json::error::Category::Eof => "unexpected end",
    }
}

fn depth(value: &Value) -> usize {
    // Iterative, so that a deep document cannot overflow the stack here.
    let mut deepest = 0;
    let mut stack = vec![(value, 1usize)];
    while let Some((v, d)) = stack.pop() {
        deepest = deepest.max(d);
        match v {
            Value::Array(items) => stack.extend(items.iter().map(|i| (i, d + 1))),
            Value::Object(map) => stack.extend(map.values().map(|i| (i, d + 1))),
            _ => {}
        }
    }
    deepest
}

/// Whether any string (key or value) in the document satisfies `pred`.
pub fn any_string(value: &Value, pred: &dyn Fn(&str) -> bool) -> bool {
    let mut stack = vec![value];
    while let Some(v) = stack.pop() {
        match v {
            Value::String(s) if pred(s) => return true,
            Value::Array(items) => stack.extend(items.iter()),
            Value::Object(map) => {
                if map.keys().any(|k| pred(k)) {
                    return true;
                }
                stack.extend(map.values());
            }
            _ => {}
        }
    }
    false
}

/// A `Value` whose deserialisation refuses duplicate keys.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Strict, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let mut map = Map::new();
        while let Some(key) = access.next_key::<String>()? {
            if map.contains_key(&key) {
                return Err(de::Error::custom(format_args!("duplicate key `{key}`")));
            }
            let Strict(value) = access.next_value()?;
            map.insert(key, value);
        }
        Ok(Value::Object(map))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn canonical_is_compact_and_strict() {
        let c = canonical(br#" { "amount" : 100 , "currency":"usd", "nested": {"a": [1, 2]} } "#).unwrap();
        assert_eq!(c.bytes, br#"{"amount":100,"currency":"usd","nested":{"a":[1,2]}}"#);
        assert_eq!(canonical(br#"{"amount":100,"amount":999999}"#).unwrap_err(), JsonError::Duplicate("amount".into()));
        assert!(matches!(canonical(br#"{"a":{"b":1,"b":2}}"#).unwrap_err(), JsonError::Duplicate(_)));
        assert_eq!(canonical(b"[1]").unwrap_err(), JsonError::NotObject);
        assert!(matches!(canonical(b"amount=1").unwrap_err(), JsonError::Invalid(_)));
        assert!(matches!(canonical(b"{} {}").unwrap_err(), JsonError::Invalid(_)));
        let deep = format!("{}{}{}", r#"{"a":"#.repeat(100), "1", "}".repeat(100));
        assert_eq!(canonical(deep.as_bytes()).unwrap_err(), JsonError::TooDeep);
        let deep = format!("{}{}{}", r#"{"a":"#.repeat(70), "1", "}".repeat(70));
        assert_eq!(canonical(deep.as_bytes()).unwrap_err(), JsonError::TooDeep);
    }
}
