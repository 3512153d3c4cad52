//! `keygate policy check DIR`: validation errors plus lint warnings.
//!
//! Errors are exactly what [`PolicySet::load_dir`](crate::PolicySet::load_dir) refuses (plus
//! malformed test-case files); warnings are things that load but are probably mistakes: rules
//! that match no Stripe operation, rules that earlier rules shadow, parameter conditions that
//! cannot see the parameter, services nothing can authenticate as.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::loader::{self, Problem};
use crate::model::{Effect, HeaderCondition, KeyMode, Rule, ServicePolicy};
use crate::operations::{Operation, TemplateSegment, operations};
use crate::pattern::{OperationPattern, PatternSegment, TemplateMatch};
use crate::tools::testcases;

/// What `check` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// The folder checked.
    pub dir: PathBuf,
    /// Services that loaded.
    pub services: Vec<String>,
    /// Problems that make the folder unloadable.
    pub errors: Vec<Problem>,
    /// Probable mistakes that do not prevent loading.
    pub warnings: Vec<Problem>,
}

impl CheckReport {
    /// True when the folder would be refused (the CLI exits non-zero).
    pub fn has_errors(&self) -> bool {
        !self.errors.is_empty()
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for e in &self.errors {
            writeln!(f, "error: {e}")?;
        }
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        let verdict = if self.has_errors() { "policies NOT valid" } else { "policies valid" };
        write!(
            f,
            "{verdict}: {} service(s) in {}, {} error(s), {} warning(s)",
            self.services.len(),
            self.dir.display(),
            self.errors.len(),
            self.warnings.len()
        )
    }
}

/// Validates and lints a policy folder.
pub fn check(dir: &Path) -> CheckReport {
    let (services, mut errors) = loader::load_services(dir);
    errors.extend(loader::cross_service_problems(&services));
    errors.extend(testcases::syntax_problems(dir));
    let mut warnings = Vec::new();
    for service in &services {
        lint_service(service, &mut warnings);
    }
    CheckReport {
        dir: dir.to_path_buf(),
        services: services.iter().map(|s| s.name.clone()).collect(),
        errors,
        warnings,
    }
}

fn lint_service(service: &ServicePolicy, out: &mut Vec<Problem>) {
    let file = service.file_name();
    let warn = |out: &mut Vec<Problem>, line: u64, message: String| {
        out.push(Problem::new(&file, (line > 0).then_some((line, 1)), message));
    };
    let stem = service.file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    if !stem.is_empty() && stem != service.name {
        warn(
            out,
            0,
            format!(
                "service `{}` is in a file named {file} (name the file {}.yaml so that people find it)",
                service.name, service.name
            ),
        );
    }
    if service.token_hashes.is_empty() && service.mtls_identities.is_empty() {
        warn(
            out,
            0,
            format!(
                "service `{}` has no token_hashes and no mtls_identities, so no request can use this policy (add the hash from `keygate token new --service {}`)",
                service.name, service.name
            ),
        );
    }
    if service.rules.is_empty() {
        warn(
            out,
            0,
            format!(
                "service `{}` has no rules, so every request is denied (add rules, or remove the file)",
                service.name
            ),
        );
    }
    for (index, rule) in service.rules.iter().enumerate() {
        lint_operations(rule, out, &warn);
        lint_params(rule, out, &warn);
        if let Some(earlier) = shadowing_rule(service, index) {
            warn(
                out,
                rule.line,
                format!(
                    "rule `{}` is never reached: rule `{}` on line {} comes first and matches every request it matches (move `{}` up, or narrow `{}`)",
                    rule.id, earlier.id, earlier.line, rule.id, earlier.id
                ),
            );
        }
    }
}

fn matched_operations(rule: &Rule) -> Vec<(&'static Operation, TemplateMatch)> {
    operations()
        .iter()
        .filter_map(|op| {
            let best = rule.operations.iter().map(|p| p.match_template(op)).fold(TemplateMatch::No, |best, m| {
                match (best, m) {
                    (TemplateMatch::Yes, _) | (_, TemplateMatch::Yes) => TemplateMatch::Yes,
                    (TemplateMatch::DependsOnPath, _) | (_, TemplateMatch::DependsOnPath) => {
                        TemplateMatch::DependsOnPath
                    }
                    _ => TemplateMatch::No,
                }
            });
            (best != TemplateMatch::No).then_some((op, best))
        })
        .collect()
}

fn lint_operations(rule: &Rule, out: &mut Vec<Problem>, warn: &impl Fn(&mut Vec<Problem>, u64, String)) {
    if rule.unknown_operations {
        return;
    }
    for pattern in &rule.operations {
        let matches_something = operations().iter().any(|op| pattern.match_template(op) != TemplateMatch::No);
        if matches_something {
            continue;
        }
        let hint = match closest_operation(pattern) {
            Some(op) => format!("did you mean `{}`?", op.name),
            None => "check it against the operation table, or set `unknown_operations: true` if it is a newer Stripe endpoint".to_owned(),
        };
        warn(
            out,
            rule.line,
            format!("rule `{}`: operation `{}` matches no Stripe operation ({hint})", rule.id, pattern.text),
        );
    }
}

/// The table operation whose name is closest to an exact pattern, if reasonably close.
fn closest_operation(pattern: &OperationPattern) -> Option<&'static Operation> {
    let method = pattern.method.as_deref()?;
    let wanted = pattern.text.as_str();
    operations()
        .iter()
        .filter(|op| op.method == method)
        .map(|op| (edit_distance(wanted, op.name), op))
        .filter(|(d, op)| *d <= op.name.len() / 5 + 1)
        .min_by_key(|(d, _)| *d)
        .map(|(_, op)| op)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let current = row[j + 1];
            row[j + 1] = if ca == *cb { prev } else { 1 + prev.min(row[j]).min(current) };
            prev = current;
        }
    }
    row[b.len()]
}

fn lint_params(rule: &Rule, out: &mut Vec<Problem>, warn: &impl Fn(&mut Vec<Problem>, u64, String)) {
    if rule.params.is_empty() {
        return;
    }
    let ops = matched_operations(rule);
    if ops.is_empty() {
        return;
    }
    for condition in &rule.params {
        let in_every_path =
            ops.iter().all(|(op, _)| op.segments().any(|s| s == TemplateSegment::Param(condition.name.as_str())));
        if in_every_path {
            warn(
                out,
                rule.line,
                format!(
                    "rule `{}`: `{}` is part of the path of {}, not a request parameter, so the condition never sees it (put the value in the operation, e.g. `GET /v1/customers/cus_123`)",
                    rule.id, condition.name, ops[0].0.name
                ),
            );
            continue;
        }
        let reads_only = ops.iter().all(|(op, _)| op.method == "GET" || op.method == "DELETE");
        if condition.name == "amount" && reads_only {
            warn(
                out,
                rule.line,
                format!(
                    "rule `{}`: Stripe's GET and DELETE operations take no `amount`, so this condition {} (remove it, or apply it to the POST operation)",
                    rule.id,
                    if condition.needs_presence() && rule.effect == Effect::Allow {
                        "makes the rule match nothing"
                    } else {
                        "has no effect"
                    }
                ),
            );
        }
    }
}

/// An earlier rule that matches every request `rules[index]` matches, if any.
fn shadowing_rule(service: &ServicePolicy, index: usize) -> Option<&Rule> {
    let rule = &service.rules[index];
    let rule_no = u32::try_from(index).ok()?;
    let ops: Vec<usize> = service
        .index
        .per_operation
        .iter()
        .enumerate()
        .filter(|(_, c)| c.iter().any(|c| c.rule == rule_no))
        .map(|(op, _)| op)
        .collect();
    if ops.is_empty() && !rule.unknown_operations {
        return None;
    }
    service.rules[..index].iter().enumerate().find_map(|(i, earlier)| {
        let earlier_no = u32::try_from(i).ok()?;
        let covers_known =
            ops.iter().all(|&op| service.index.per_operation[op].iter().any(|c| c.rule == earlier_no && !c.path_check));
        let covers_unknown = !rule.unknown_operations
            || (earlier.unknown_operations && earlier.operations.iter().any(matches_everything));
        (covers_known && covers_unknown && conditions_implied(earlier, rule)).then_some(earlier)
    })
}

fn matches_everything(pattern: &OperationPattern) -> bool {
    pattern.method.is_none() && pattern.segments == [PatternSegment::Rest]
}

/// Whenever `later`'s conditions hold, `earlier`'s hold too.
fn conditions_implied(earlier: &Rule, later: &Rule) -> bool {
    // Same parameter conditions hold together only with the same quantifier (allow: every
    // value; deny: some value, and unreadable parameters) or when the earlier rule is the
    // weaker deny.
    let params = earlier.params.is_empty()
        || (earlier.params == later.params && (earlier.effect == later.effect || earlier.effect == Effect::Deny));
    let header = |e: &HeaderCondition, l: &HeaderCondition| *e == HeaderCondition::Any || e == l;
    let key = earlier.key_mode == KeyMode::Any || earlier.key_mode == later.key_mode;
    params
        && header(&earlier.stripe_account, &later.stripe_account)
        && header(&earlier.stripe_context, &later.stripe_context)
        && key
}
