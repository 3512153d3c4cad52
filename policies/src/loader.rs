//! Loading a policy folder: read every `*.yaml` / `*.yml` file (one service each), validate it,
//! and compile it into a [`PolicySet`].
//!
//! Invariants:
//! - All problems of the whole folder are collected and reported together, each as
//!   `file: line L, column C: what is wrong (what to do)`; a folder with any problem yields no
//!   set at all (a half-loaded folder would silently drop services).
//! - Never panics, whatever the files contain.
//! - Skipped: hidden files (`.x.yaml`, and Kubernetes ConfigMap `..data` links), test-case files
//!   (`*.tests.yaml`, see [`crate::testcases`]), and anything that is not a regular file.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_saphyr::{Location, Spanned};

use crate::model::{
    Budget, Effect, HeaderCondition, IdempotencyMode, KeyMode, Mode, ParamCondition, RateLimit, Rule, ServicePolicy,
};
use crate::params::normalize_name;
use crate::pattern::OperationPattern;
use crate::schema::{RawHeaderCondition, RawParamCondition, RawPolicy, RawRule};
use crate::set::PolicySet;

/// Policy files larger than this are refused (a policy is a few kilobytes).
const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// Rule ids keygate uses for its own decisions; policies cannot reuse them.
pub(crate) const RESERVED_RULE_IDS: &[&str] = &["default-deny", "rate-limit", "idempotency", "unknown-service"];

/// One problem found in a policy folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// File name (or the folder, for folder-level problems).
    pub file: String,
    /// 1-based line and column, when known.
    pub location: Option<(u64, u64)>,
    /// What is wrong, and in parentheses what to do.
    pub message: String,
}

impl Problem {
    pub(crate) fn new(file: &str, location: Option<(u64, u64)>, message: String) -> Problem {
        Problem { file: file.to_owned(), location, message }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.location {
            Some((line, column)) => write!(f, "{}: line {line}, column {column}: {}", self.file, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

/// A policy folder that cannot be loaded; lists every problem, one per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyLoadError {
    /// Every problem found, in file order.
    pub problems: Vec<Problem>,
}

impl fmt::Display for PolicyLoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

fn loc(location: &Location) -> Option<(u64, u64)> {
    (*location != Location::UNKNOWN).then(|| (location.line(), location.column()))
}

fn at<T>(spanned: &Spanned<T>) -> Option<(u64, u64)> {
    loc(&spanned.referenced)
}

/// The policy files of a folder, sorted by name; a problem if the folder cannot be listed.
pub(crate) fn policy_files(dir: &Path) -> Result<Vec<PathBuf>, Problem> {
    list_files(dir, |name| {
        (name.ends_with(".yaml") || name.ends_with(".yml"))
            && !name.ends_with(".tests.yaml")
            && !name.ends_with(".tests.yml")
    })
}

pub(crate) fn list_files(dir: &Path, wanted: impl Fn(&str) -> bool) -> Result<Vec<PathBuf>, Problem> {
    let folder = dir.display().to_string();
    let entries = std::fs::read_dir(dir).map_err(|e| {
        Problem::new(&folder, None, format!("cannot read the policy folder: {e} (check the path and its permissions)"))
    })?;
    let mut files = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.starts_with('.') || !wanted(name) {
            continue;
        }
        if std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

pub(crate) fn display_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string())
}

/// Reads a file as UTF-8 text, refusing huge files.
pub(crate) fn read_text(path: &Path) -> Result<String, Problem> {
    let file = display_name(path);
    let too_big = std::fs::metadata(path).is_ok_and(|m| m.len() > MAX_FILE_BYTES);
    if too_big {
        return Err(Problem::new(
            &file,
            None,
            format!(
                "file is larger than {MAX_FILE_BYTES} bytes (a policy file is a few kilobytes; is this the right file?)"
            ),
        ));
    }
    let bytes = std::fs::read(path)
        .map_err(|e| Problem::new(&file, None, format!("cannot read the file: {e} (check its permissions)")))?;
    String::from_utf8(bytes).map_err(|e| {
        Problem::new(
            &file,
            None,
            format!(
                "file is not UTF-8 text (invalid byte at offset {}; save it as UTF-8)",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

/// Turns a serde-saphyr error into a problem with its location.
pub(crate) fn yaml_problem(file: &str, err: &serde_saphyr::Error) -> Problem {
    let message = serde_saphyr::UserMessageFormatter;
    let text = serde_saphyr::MessageFormatter::format_message(&message, err.without_snippet());
    let location = err.location().and_then(|l| loc(&l));
    Problem::new(file, location, yaml_hint(text.trim()))
}

/// Adds what to do to serde's messages where a hint helps.
fn yaml_hint(message: &str) -> String {
    if message.contains("unknown field") {
        format!("{message} (check the spelling; docs/policies.md lists every key)")
    } else if message.contains("missing field") {
        format!("{message} (add it; docs/policies.md lists the required keys)")
    } else if message.contains("flow") {
        format!(
            "{message} (inside `[...]` or `{{...}}`, quote values that contain braces, e.g. \"GET /v1/customers/{{customer}}\")"
        )
    } else if message.contains("alias") || message.contains("anchor") {
        format!("{message} (quote values that start with `*`, e.g. \"* /v1/**\")")
    } else if message.contains("unexpected end of file") {
        format!("{message} (the file is empty or cut short; a policy needs at least `service:` and `stripe_key:`)")
    } else if message.contains("null is not allowed") {
        format!("{message} (give this key a value, or remove it)")
    } else if message.contains("expected mapping") {
        format!("{message} (a policy file is a YAML mapping of keys such as `service:`, `stripe_key:` and `rules:`)")
    } else if message.contains("unknown variant") {
        format!("{message} (use one of the listed values)")
    } else {
        format!("{message} (fix the YAML at this place)")
    }
}

/// Loads, validates and compiles every policy file of `dir`.
pub(crate) fn load_dir(dir: &Path) -> Result<PolicySet, PolicyLoadError> {
    let (services, mut problems) = load_services(dir);
    problems.extend(cross_service_problems(&services));
    if !problems.is_empty() {
        return Err(PolicyLoadError { problems });
    }
    PolicySet::from_services(services).map_err(|problems| PolicyLoadError { problems })
}

/// Every service that compiled, and every problem found (folder-level and per file).
pub(crate) fn load_services(dir: &Path) -> (Vec<ServicePolicy>, Vec<Problem>) {
    let mut problems = Vec::new();
    let files = match policy_files(dir) {
        Ok(files) => files,
        Err(problem) => return (Vec::new(), vec![problem]),
    };
    if files.is_empty() {
        problems.push(Problem::new(
            &dir.display().to_string(),
            None,
            "no policy files in this folder (write one file per service, for example checkout.yaml; test cases go in checkout.tests.yaml)".to_owned(),
        ));
    }
    let mut services = Vec::new();
    for path in files {
        let file = display_name(&path);
        let text = match read_text(&path) {
            Ok(text) => text,
            Err(problem) => {
                problems.push(problem);
                continue;
            }
        };
        match parse_policy(&file, &text) {
            Ok(mut service) => {
                service.file = path;
                services.push(service);
            }
            Err(mut found) => problems.append(&mut found),
        }
    }
    (services, problems)
}

/// Problems that involve more than one file: duplicate service names, shared identities.
pub(crate) fn cross_service_problems(services: &[ServicePolicy]) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut names: HashMap<&str, &ServicePolicy> = HashMap::new();
    let mut tokens: HashMap<&str, &ServicePolicy> = HashMap::new();
    let mut identities: HashMap<&str, &ServicePolicy> = HashMap::new();
    for service in services {
        let file = service.file_name();
        if let Some(first) = names.insert(&service.name, service) {
            problems.push(Problem::new(
                &file,
                None,
                format!(
                    "service `{}` is also defined in {} (each service has exactly one policy file; rename one of them)",
                    service.name,
                    first.file_name()
                ),
            ));
        }
        for hash in &service.token_hashes {
            if let Some(first) = tokens.insert(hash, service)
                && first.name != service.name
            {
                problems.push(Problem::new(
                    &file,
                    None,
                    format!(
                        "token hash {hash} is also used by service `{}` in {} (a token identifies one service; mint a separate token with `keygate token new --service {}`)",
                        first.name,
                        first.file_name(),
                        service.name
                    ),
                ));
            }
        }
        for identity in &service.mtls_identities {
            if let Some(first) = identities.insert(identity, service)
                && first.name != service.name
            {
                problems.push(Problem::new(
                    &file,
                    None,
                    format!(
                        "mTLS identity `{identity}` is also used by service `{}` in {} (a client certificate identifies one service; give each service its own identity)",
                        first.name,
                        first.file_name()
                    ),
                ));
            }
        }
    }
    problems
}

/// Parses and validates one policy file's text; `file` names it in problems. Cross-service
/// checks (duplicate names, shared token hashes) need the whole folder: use
/// [`PolicySet::load_dir`].
pub fn parse_policy_text(file: &str, text: &str) -> Result<ServicePolicy, PolicyLoadError> {
    parse_policy(file, text).map_err(|problems| PolicyLoadError { problems })
}

pub(crate) fn parse_policy(file: &str, text: &str) -> Result<ServicePolicy, Vec<Problem>> {
    let raw: RawPolicy = match serde_saphyr::from_str(text) {
        Ok(raw) => raw,
        Err(err) => return Err(vec![yaml_problem(file, &err)]),
    };
    compile(file, raw)
}

struct Checker<'a> {
    file: &'a str,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn error(&mut self, location: Option<(u64, u64)>, message: String) {
        self.problems.push(Problem::new(self.file, location, message));
    }
}

fn compile(file: &str, raw: RawPolicy) -> Result<ServicePolicy, Vec<Problem>> {
    let mut c = Checker { file, problems: Vec::new() };
    let name = raw.service.value.trim().to_owned();
    if !is_valid_service_name(&name) {
        c.error(
            at(&raw.service),
            format!("service name `{name}` is not valid (use 1 to 64 lower-case letters, digits, `-` or `_`, starting with a letter or digit)"),
        );
    }
    let mut token_hashes: Vec<String> = Vec::new();
    for hash in &raw.token_hashes {
        let value = hash.value.trim();
        if !is_valid_token_hash(value) {
            c.error(
                at(hash),
                "token hash is not `sha256:` followed by 64 lower-case hex digits (copy the hash printed by `keygate token new`, never the token itself)".to_owned(),
            );
        } else if token_hashes.iter().any(|h| h == value) {
            c.error(at(hash), format!("token hash {value} is listed twice (remove the duplicate)"));
        } else {
            token_hashes.push(value.to_owned());
        }
    }
    let mut mtls_identities: Vec<String> = Vec::new();
    for identity in &raw.mtls_identities {
        let value = identity.value.trim();
        if !is_valid_identity(value) {
            c.error(
                at(identity),
                format!("mTLS identity `{value}` is not a URI SAN (`spiffe://trust-domain/path`) or a DNS SAN written `dns:name` (write it in one of these forms)"),
            );
        } else if mtls_identities.iter().any(|i| i == value) {
            c.error(at(identity), format!("mTLS identity `{value}` is listed twice (remove the duplicate)"));
        } else {
            mtls_identities.push(value.to_owned());
        }
    }
    let stripe_key = raw.stripe_key.value.trim().to_owned();
    if stripe_key.is_empty() {
        c.error(
            at(&raw.stripe_key),
            "stripe_key is empty (give the secret reference of this service's Stripe key, for example a Vault path; never the key itself)".to_owned(),
        );
    } else if looks_like_stripe_secret(&stripe_key) {
        c.error(
            at(&raw.stripe_key),
            "stripe_key looks like a Stripe secret key itself (put the key in Vault or AWS Secrets Manager and write its reference here)".to_owned(),
        );
    }
    let rate_limit = raw.rate_limit.as_ref().and_then(|r| compile_rate_limit(&mut c, r));
    let budgets = compile_budgets(&mut c, &raw.budgets);
    let mut rules: Vec<Rule> = Vec::new();
    for raw_rule in &raw.rules {
        if let Some(rule) = compile_rule(&mut c, raw_rule) {
            if let Some(first) = rules.iter().find(|r| r.id == rule.id) {
                c.error(
                    at(&raw_rule.value.id),
                    format!(
                        "rule id `{}` is already used on line {} (give every rule its own id)",
                        rule.id, first.line
                    ),
                );
            }
            rules.push(rule);
        }
    }
    if !c.problems.is_empty() {
        return Err(c.problems);
    }
    Ok(ServicePolicy {
        name,
        file: PathBuf::from(file),
        token_hashes,
        mtls_identities,
        stripe_key,
        mode: raw.mode.unwrap_or(Mode::Enforce),
        idempotency: raw.idempotency.unwrap_or(IdempotencyMode::Off),
        rate_limit,
        budgets,
        rules,
        index: Default::default(),
        names: Default::default(),
    }
    .with_index())
}

fn compile_rate_limit(c: &mut Checker<'_>, raw: &Spanned<crate::schema::RawRateLimit>) -> Option<RateLimit> {
    let per_second = raw.value.per_second;
    if !(per_second.is_finite() && per_second > 0.0 && per_second <= 1_000_000.0) {
        c.error(
            at(raw),
            format!("rate_limit.per_second is {per_second} (use a number of requests per second above 0 and at most 1000000, for example 0.5 or 20)"),
        );
    }
    let per_second_ok = per_second.is_finite() && per_second > 0.0 && per_second <= 1_000_000.0;
    let burst = match raw.value.burst {
        Some(0) => {
            c.error(
                at(raw),
                "rate_limit.burst is 0 (use at least 1; it is how many requests may arrive at once)".to_owned(),
            );
            return None;
        }
        Some(burst) => burst,
        // Default burst: one second's worth, at least one request.
        None => per_second.ceil().clamp(1.0, f64::from(u32::MAX)) as u32,
    };
    if !per_second_ok {
        return None;
    }
    Some(RateLimit { per_second, burst })
}

fn compile_budgets(c: &mut Checker<'_>, raw: &BTreeMap<String, Spanned<crate::schema::RawBudget>>) -> Vec<Budget> {
    let mut budgets = Vec::new();
    for (currency, budget) in raw {
        let mut ok = true;
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_lowercase()) {
            c.error(
                at(budget),
                format!("budget currency `{currency}` is not a lower-case three-letter ISO code (write it like `usd` or `eur`)"),
            );
            ok = false;
        }
        if budget.value.max <= 0 {
            c.error(
                at(budget),
                format!("budgets.{currency}.max is {} (use a positive amount in the currency's smallest unit, e.g. 100000 for 1000.00 USD)", budget.value.max),
            );
            ok = false;
        }
        let window = match humantime::parse_duration(budget.value.window.trim()) {
            Ok(w) if w >= Duration::from_secs(1) && w <= Duration::from_secs(366 * 24 * 3600) => Some(w),
            _ => {
                c.error(
                    at(budget),
                    format!("budgets.{currency}.window `{}` is not a duration between 1s and 366d (write it like `1h`, `24h` or `30d`)", budget.value.window),
                );
                None
            }
        };
        if let (true, Some(window)) = (ok, window) {
            budgets.push(Budget { currency: currency.clone(), max: budget.value.max, window });
        }
    }
    budgets
}

fn compile_rule(c: &mut Checker<'_>, spanned: &Spanned<RawRule>) -> Option<Rule> {
    let raw = &spanned.value;
    let before = c.problems.len();
    let id = raw.id.value.trim().to_owned();
    if !is_valid_rule_id(&id) {
        c.error(
            at(&raw.id),
            format!("rule id `{id}` is not valid (use 1 to 64 letters, digits, `-`, `_`, `.` or `:`)"),
        );
    } else if RESERVED_RULE_IDS.contains(&id.as_str()) || id.starts_with("budget:") {
        c.error(at(&raw.id), format!("rule id `{id}` is reserved for keygate's own decisions (choose another id)"));
    }
    let mut operations = Vec::new();
    if raw.operation.value.0.is_empty() {
        c.error(
            at(&raw.operation),
            format!(
                "rule `{id}` has an empty operation list (name at least one operation, e.g. `POST /v1/payment_intents`)"
            ),
        );
    }
    for text in &raw.operation.value.0 {
        match OperationPattern::parse(text) {
            Ok(pattern) => operations.push(pattern),
            Err(message) => c.error(at(&raw.operation), format!("rule `{id}`: {message}")),
        }
    }
    let mut params = Vec::new();
    for (name, condition) in &raw.params {
        if let Some(p) = compile_param(c, &id, name, condition) {
            params.push(p);
        }
    }
    let stripe_account = compile_header(c, &id, raw.effect, "stripe_account", raw.stripe_account.as_ref());
    let stripe_context = compile_header(c, &id, raw.effect, "stripe_context", raw.stripe_context.as_ref());
    if c.problems.len() != before {
        return None;
    }
    Some(Rule {
        id,
        effect: raw.effect,
        operations,
        params,
        stripe_account,
        stripe_context,
        key_mode: raw.key_mode.unwrap_or(KeyMode::Any),
        unknown_operations: raw.unknown_operations,
        reason: raw.reason.as_ref().map(|r| r.trim().to_owned()).filter(|r| !r.is_empty()),
        line: spanned.referenced.line(),
    })
}

fn compile_param(
    c: &mut Checker<'_>,
    rule: &str,
    raw_name: &str,
    spanned: &Spanned<RawParamCondition>,
) -> Option<ParamCondition> {
    let raw = &spanned.value;
    let where_ = at(spanned);
    let name = normalize_name(raw_name.trim().into()).into_owned();
    if !is_valid_param_name(&name) {
        c.error(
            where_,
            format!("rule `{rule}`: parameter name `{raw_name}` is not valid (write it as Stripe does, e.g. `amount`, `metadata[order_id]`, `items[][price]`, `expand`)"),
        );
        return None;
    }
    let has_value_condition = raw.min.is_some() || raw.max.is_some() || raw.allowed.is_some() || raw.not_in.is_some();
    if !has_value_condition && !raw.required && !raw.forbidden {
        c.error(
            where_,
            format!("rule `{rule}`: parameter `{name}` has no condition (give at least one of min, max, in, not_in, required, forbidden)"),
        );
        return None;
    }
    if raw.forbidden && (has_value_condition || raw.required) {
        c.error(
            where_,
            format!("rule `{rule}`: parameter `{name}` is forbidden and also has other conditions (a forbidden parameter cannot have values; keep only `forbidden: true`)"),
        );
        return None;
    }
    if let (Some(min), Some(max)) = (raw.min, raw.max)
        && min > max
    {
        c.error(where_, format!("rule `{rule}`: parameter `{name}` has min {min} above max {max} (swap them)"));
        return None;
    }
    if raw.allowed.as_ref().is_some_and(Vec::is_empty) {
        c.error(
            where_,
            format!("rule `{rule}`: parameter `{name}` has an empty `in` list, which no value can satisfy (list the allowed values, or use `forbidden: true`)"),
        );
        return None;
    }
    let values = |list: &Option<Vec<crate::schema::Scalar>>| {
        list.as_ref().map(|v| v.iter().map(|s| s.0.clone()).collect::<Vec<_>>())
    };
    Some(ParamCondition {
        name,
        min: raw.min,
        max: raw.max,
        allowed: values(&raw.allowed),
        denied: values(&raw.not_in).unwrap_or_default(),
        required: raw.required,
        forbidden: raw.forbidden,
    })
}

fn compile_header(
    c: &mut Checker<'_>,
    rule: &str,
    effect: Effect,
    key: &str,
    raw: Option<&Spanned<RawHeaderCondition>>,
) -> HeaderCondition {
    // Unset, the condition fails safe: an allow rule does not reach connected accounts, a deny
    // rule denies with or without the header.
    let Some(raw) = raw else {
        return match effect {
            Effect::Allow => HeaderCondition::Absent,
            Effect::Deny => HeaderCondition::Any,
        };
    };
    match &raw.value {
        RawHeaderCondition::Keyword(k) if k == "none" => HeaderCondition::Absent,
        RawHeaderCondition::Keyword(k) if k == "any" => HeaderCondition::Any,
        RawHeaderCondition::Keyword(k) if !k.trim().is_empty() => {
            HeaderCondition::OneOf { values: vec![k.trim().to_owned()], allow_absent: false }
        }
        RawHeaderCondition::Keyword(_) => {
            c.error(
                at(raw),
                format!("rule `{rule}`: {key} is empty (write `none`, `any`, or a list of allowed values)"),
            );
            HeaderCondition::Absent
        }
        RawHeaderCondition::List(items) => {
            let mut values = Vec::new();
            let mut allow_absent = false;
            for item in items {
                match item.trim() {
                    "none" => allow_absent = true,
                    "any" | "" => c.error(
                        at(raw),
                        format!("rule `{rule}`: {key} list contains `{item}` (a list holds allowed values and optionally `none`; write `{key}: any` on its own to allow everything)"),
                    ),
                    v => values.push(v.to_owned()),
                }
            }
            if items.is_empty() {
                c.error(
                    at(raw),
                    format!("rule `{rule}`: {key} is an empty list (write `none` to require the header to be absent)"),
                );
            }
            if values.is_empty() { HeaderCondition::Absent } else { HeaderCondition::OneOf { values, allow_absent } }
        }
    }
}

fn is_valid_service_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
}

fn is_valid_rule_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// `sha256:` and 64 lower-case hex digits.
pub fn is_valid_token_hash(hash: &str) -> bool {
    hash.strip_prefix("sha256:")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

fn is_valid_identity(identity: &str) -> bool {
    if identity.chars().any(char::is_whitespace) {
        return false;
    }
    if let Some(dns) = identity.strip_prefix("dns:") {
        return !dns.is_empty() && !dns.contains('/');
    }
    identity.split_once("://").is_some_and(|(scheme, rest)| !scheme.is_empty() && !rest.is_empty())
}

fn is_valid_param_name(name: &str) -> bool {
    let Some(first) = name.split('[').next() else {
        return false;
    };
    if first.is_empty() || name.contains(char::is_whitespace) {
        return false;
    }
    // Every `[` closes before the next opens, and nothing trails a `]` but another `[`.
    let mut rest = &name[first.len()..];
    while !rest.is_empty() {
        let Some(inner) = rest.strip_prefix('[') else {
            return false;
        };
        let Some(close) = inner.find(']') else {
            return false;
        };
        if inner[..close].contains('[') {
            return false;
        }
        rest = &inner[close + 1..];
    }
    true
}

/// Real Stripe secrets must never sit in a policy file.
fn looks_like_stripe_secret(value: &str) -> bool {
    ["sk_live_", "sk_test_", "rk_live_", "rk_test_"].iter().any(|p| value.starts_with(p))
}
