//! The YAML shape of a policy file, as deserialised by serde-saphyr before validation.
//!
//! Every struct denies unknown fields so that a typo is an error, not a silently ignored
//! condition. Values that later checks may complain about are `Spanned`, so problems point at a
//! line and column. Validation and compilation into [`crate::model`] live in [`crate::loader`].

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde_saphyr::Spanned;

use crate::model::{Effect, IdempotencyMode, KeyMode, Mode};

/// A whole policy file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPolicy {
    pub service: Spanned<String>,
    #[serde(default)]
    pub token_hashes: Vec<Spanned<String>>,
    #[serde(default)]
    pub mtls_identities: Vec<Spanned<String>>,
    pub stripe_key: Spanned<String>,
    #[serde(default)]
    pub mode: Option<Mode>,
    #[serde(default)]
    pub idempotency: Option<IdempotencyMode>,
    #[serde(default)]
    pub rate_limit: Option<Spanned<RawRateLimit>>,
    #[serde(default)]
    pub budgets: BTreeMap<String, Spanned<RawBudget>>,
    #[serde(default)]
    pub rules: Vec<Spanned<RawRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRateLimit {
    pub per_second: f64,
    #[serde(default)]
    pub burst: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBudget {
    pub max: i64,
    pub window: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRule {
    pub id: Spanned<String>,
    pub effect: Effect,
    pub operation: Spanned<OneOrMany>,
    #[serde(default)]
    pub params: BTreeMap<String, Spanned<RawParamCondition>>,
    #[serde(default)]
    pub stripe_account: Option<Spanned<RawHeaderCondition>>,
    #[serde(default)]
    pub stripe_context: Option<Spanned<RawHeaderCondition>>,
    #[serde(default)]
    pub key_mode: Option<KeyMode>,
    #[serde(default)]
    pub unknown_operations: bool,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawParamCondition {
    #[serde(default)]
    pub min: Option<i64>,
    #[serde(default)]
    pub max: Option<i64>,
    #[serde(default, rename = "in")]
    pub allowed: Option<Vec<Scalar>>,
    #[serde(default)]
    pub not_in: Option<Vec<Scalar>>,
    #[serde(default)]
    pub required: bool,
    #[serde(default)]
    pub forbidden: bool,
}

/// A YAML scalar read as text, so that `in: [1, 2]` and `in: ["1", "2"]` mean the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Scalar(pub String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;
        impl Visitor<'_> for ScalarVisitor {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
        }
        deserializer.deserialize_any(ScalarVisitor)
    }
}

/// `operation: POST /v1/x` or `operation: [POST /v1/x, GET /v1/y]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OneOrMany(pub Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct OneOrManyVisitor;
        impl<'de> Visitor<'de> for OneOrManyVisitor {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an operation `METHOD /path` or a list of them")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![v.to_owned()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<String>()? {
                    items.push(item);
                }
                Ok(OneOrMany(items))
            }
        }
        deserializer.deserialize_any(OneOrManyVisitor)
    }
}

/// `stripe_account: none | any | acct_x | [none, acct_x, acct_y]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RawHeaderCondition {
    Keyword(String),
    List(Vec<String>),
}

impl<'de> Deserialize<'de> for RawHeaderCondition {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct HeaderVisitor;
        impl<'de> Visitor<'de> for HeaderVisitor {
            type Value = RawHeaderCondition;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`none`, `any`, or a list of allowed values (which may include `none`)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawHeaderCondition, E> {
                Ok(RawHeaderCondition::Keyword(v.to_owned()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawHeaderCondition, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<String>()? {
                    items.push(item);
                }
                Ok(RawHeaderCondition::List(items))
            }
        }
        deserializer.deserialize_any(HeaderVisitor)
    }
}
