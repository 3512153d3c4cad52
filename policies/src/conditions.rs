//! Evaluating one rule's conditions against a request.
//!
//! Quantifiers are chosen so that a policy fails safe: an allow rule's parameter condition must
//! hold for *every* value of the parameter (`expand=a&expand=b`, `amount=1&amount=99999`), a
//! deny rule's for *any* value. When parameters cannot be read, allow rules with parameter
//! conditions do not match and deny rules with parameter conditions do.
//!
//! Failures are small values; they are turned into text only when a denial needs a reason.

use crate::engine::{LazyParams, RequestFacts};
use crate::model::{Effect, HeaderCondition, KeyMode, ParamCondition, Rule};

/// Why a rule's conditions did not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    KeyMode,
    StripeAccount,
    StripeContext,
    Unreadable,
    /// The parameter condition at this index of `rule.params`.
    Param(usize, ParamFailure),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ParamFailure {
    Missing,
    Forbidden,
    NotANumber,
    BelowMin,
    AboveMax,
    NotAllowed,
    Denied,
}

/// Do `rule`'s conditions (everything but the operation) hold for this request?
pub(crate) fn evaluate(rule: &Rule, facts: &RequestFacts<'_>, params: &mut LazyParams<'_>) -> Result<(), Failure> {
    let key_ok = match rule.key_mode {
        KeyMode::Any => true,
        KeyMode::Live => facts.livemode,
        KeyMode::Test => !facts.livemode,
    };
    if !key_ok {
        return Err(Failure::KeyMode);
    }
    if !rule.stripe_account.matches(facts.stripe_account) {
        return Err(Failure::StripeAccount);
    }
    if !rule.stripe_context.matches(facts.stripe_context) {
        return Err(Failure::StripeContext);
    }
    if rule.params.is_empty() {
        return Ok(());
    }
    let params = params.get();
    if params.is_unreadable() {
        return match rule.effect {
            Effect::Allow => Err(Failure::Unreadable),
            Effect::Deny => Ok(()),
        };
    }
    for (i, condition) in rule.params.iter().enumerate() {
        let outcome = match rule.effect {
            Effect::Allow => holds_for_every_value(condition, params),
            Effect::Deny => holds_for_some_value(condition, params),
        };
        outcome.map_err(|f| Failure::Param(i, f))?;
    }
    Ok(())
}

fn holds_for_every_value(c: &ParamCondition, params: &crate::params::RequestParams<'_>) -> Result<(), ParamFailure> {
    if c.forbidden {
        return if params.has_under(&c.name) { Err(ParamFailure::Forbidden) } else { Ok(()) };
    }
    let mut seen = false;
    for (value, number) in params.values_with_numbers(&c.name) {
        seen = true;
        check_value(c, value, number)?;
    }
    if !seen && c.needs_presence() {
        return Err(ParamFailure::Missing);
    }
    Ok(())
}

fn holds_for_some_value(c: &ParamCondition, params: &crate::params::RequestParams<'_>) -> Result<(), ParamFailure> {
    if c.forbidden {
        return if params.has_under(&c.name) { Err(ParamFailure::Forbidden) } else { Ok(()) };
    }
    let mut first_failure = None;
    for (value, number) in params.values_with_numbers(&c.name) {
        match check_value(c, value, number) {
            Ok(()) => return Ok(()),
            Err(f) => {
                first_failure.get_or_insert(f);
            }
        }
    }
    match first_failure {
        Some(f) => Err(f),
        // Absent: a `required` / value condition does not hold; a `not_in`-only condition
        // has no value outside the list either.
        None => Err(ParamFailure::Missing),
    }
}

fn check_value(c: &ParamCondition, value: &str, number: Option<i64>) -> Result<(), ParamFailure> {
    if c.min.is_some() || c.max.is_some() {
        let Some(number) = number else {
            return Err(ParamFailure::NotANumber);
        };
        if c.min.is_some_and(|min| number < min) {
            return Err(ParamFailure::BelowMin);
        }
        if c.max.is_some_and(|max| number > max) {
            return Err(ParamFailure::AboveMax);
        }
    }
    if let Some(allowed) = &c.allowed
        && !allowed.iter().any(|pattern| glob_match(pattern, value))
    {
        return Err(ParamFailure::NotAllowed);
    }
    if c.denied.iter().any(|pattern| glob_match(pattern, value)) {
        return Err(ParamFailure::Denied);
    }
    Ok(())
}

/// ASCII case-insensitive match where `*` in `pattern` matches any run of characters.
pub(crate) fn glob_match(pattern: &str, value: &str) -> bool {
    let (p, v) = (pattern.as_bytes(), value.as_bytes());
    if !p.contains(&b'*') {
        return p.eq_ignore_ascii_case(v);
    }
    // Iterative wildcard matching with single backtrack point: linear in practice, never
    // recursive.
    let (mut pi, mut vi) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while vi < v.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, vi));
            pi += 1;
        } else if pi < p.len() && p[pi].eq_ignore_ascii_case(&v[vi]) {
            pi += 1;
            vi += 1;
        } else if let Some((sp, sv)) = star {
            pi = sp + 1;
            vi = sv + 1;
            star = Some((sp, sv + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|b| *b == b'*')
}

/// A one-line, human explanation of a failure. Echoes a request value only for `amount` and
/// `currency`.
pub(crate) fn describe(rule: &Rule, failure: Failure, params: Option<&crate::params::RequestParams<'_>>) -> String {
    match failure {
        Failure::KeyMode => match rule.key_mode {
            KeyMode::Live => "it applies only when the service uses its live key".to_owned(),
            _ => "it applies only when the service uses its test key".to_owned(),
        },
        Failure::StripeAccount => describe_header("Stripe-Account", &rule.stripe_account),
        Failure::StripeContext => describe_header("Stripe-Context", &rule.stripe_context),
        Failure::Unreadable => {
            "the request parameters could not be read (unsupported body type or malformed encoding)".to_owned()
        }
        Failure::Param(i, f) => {
            let Some(c) = rule.params.get(i) else {
                return "a parameter condition does not hold".to_owned();
            };
            let name = &c.name;
            if rule.effect == Effect::Deny {
                return match f {
                    ParamFailure::Missing => format!("`{name}` is not sent"),
                    ParamFailure::Forbidden => format!("`{name}` is sent"),
                    _ => format!("no `{name}` value meets its condition"),
                };
            }
            let echo = if name == "amount" || name == "currency" {
                params
                    .and_then(|p| p.values(name).next().map(str::to_owned))
                    .map(|v| format!(" (got {v})"))
                    .unwrap_or_default()
            } else {
                String::new()
            };
            match f {
                ParamFailure::Missing => format!("`{name}` is required"),
                ParamFailure::Forbidden => format!("`{name}` must not be sent"),
                ParamFailure::NotANumber => format!("`{name}` must be a whole number"),
                ParamFailure::BelowMin => {
                    format!("`{name}` must be at least {}{echo}", c.min.unwrap_or_default())
                }
                ParamFailure::AboveMax => {
                    format!("`{name}` must be at most {}{echo}", c.max.unwrap_or_default())
                }
                ParamFailure::NotAllowed => {
                    format!("`{name}` must be one of {}{echo}", c.allowed.as_deref().unwrap_or_default().join(", "))
                }
                ParamFailure::Denied => {
                    format!("`{name}` must not be any of {}{echo}", c.denied.join(", "))
                }
            }
        }
    }
}

fn describe_header(header: &str, condition: &HeaderCondition) -> String {
    match condition {
        HeaderCondition::Absent => format!("it does not allow a {header} header"),
        HeaderCondition::Any => format!("its {header} condition does not hold"),
        HeaderCondition::OneOf { allow_absent: true, .. } => {
            format!("{header} must be absent or one of the accounts it lists")
        }
        HeaderCondition::OneOf { .. } => format!("{header} must be one of the accounts it lists"),
    }
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        assert!(glob_match("usd", "USD"));
        assert!(glob_match("*payment_method*", "latest_charge.payment_method_details"));
        assert!(glob_match("data.*", "data.source"));
        assert!(!glob_match("data.*", "customer"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("a*b", "ac"));
        assert!(glob_match("a*b*c", "aXbYbZc"));
    }
}
