//! `keygate policy test DIR`: runs the test cases written next to the policies.
//!
//! Test files are `NAME.tests.yaml` (or `.tests.yml`) in the policy folder. Each file gets its
//! own engine on a manual clock that only `advance` moves, so rate-limit and budget cases are
//! deterministic: cases of one file run in order and share counters, as requests of one
//! keygate instance would.
//!
//! ```yaml
//! service: checkout              # default for the cases; default: the file name before .tests
//! cases:
//!   - name: small intents in usd are allowed
//!     request: POST /v1/payment_intents
//!     params: { amount: 5000, currency: usd, "expand[]": [customer] }
//!     headers: { Idempotency-Key: k1 }
//!     livemode: false            # is the service's key a live key; default false
//!     advance: 10s               # move the test clock before this case; default 0
//!     repeat: 1                  # send it this many times, check the last; default 1
//!     every: 1s                  # with repeat: advance the clock this much between sends
//!     expect: allow              # allow | deny | would_deny
//!     rule: allow-small-intents  # optional: the rule that must decide
//!     code: keygate_policy_denied  # optional: the denial code
//!     status: 403                # optional: the denial status
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde_saphyr::Spanned;

use crate::engine::{PolicyEngine, Verdict};
use crate::loader::{self, Problem};
use crate::schema::Scalar;
use crate::set::PolicySet;
use crate::tools::explain::DescribedRequest;
use keygate_limits::ManualClock;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTestFile {
    #[serde(default)]
    service: Option<String>,
    cases: Vec<Spanned<RawCase>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCase {
    name: String,
    #[serde(default)]
    service: Option<String>,
    request: String,
    #[serde(default)]
    params: BTreeMap<String, ScalarOrList>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    livemode: bool,
    #[serde(default)]
    advance: Option<String>,
    #[serde(default)]
    repeat: Option<u32>,
    #[serde(default)]
    every: Option<String>,
    expect: Expected,
    #[serde(default)]
    rule: Option<String>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    status: Option<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Expected {
    Allow,
    Deny,
    WouldDeny,
}

impl Expected {
    fn verdict(self) -> Verdict {
        match self {
            Expected::Allow => Verdict::Allow,
            Expected::Deny => Verdict::Deny,
            Expected::WouldDeny => Verdict::WouldDeny,
        }
    }
}

/// `amount: 5000` or `"expand[]": [customer, invoice]`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ScalarOrList(Vec<String>);

impl<'de> Deserialize<'de> for ScalarOrList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ScalarOrList;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a value or a list of values")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ScalarOrList, E> {
                Ok(ScalarOrList(vec![v.to_owned()]))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ScalarOrList, E> {
                Ok(ScalarOrList(vec![v.to_string()]))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ScalarOrList, E> {
                Ok(ScalarOrList(vec![v.to_string()]))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<ScalarOrList, E> {
                Ok(ScalarOrList(vec![v.to_string()]))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<ScalarOrList, E> {
                Ok(ScalarOrList(vec![v.to_string()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ScalarOrList, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<Scalar>()? {
                    items.push(item.0);
                }
                Ok(ScalarOrList(items))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// The outcome of one test case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseResult {
    /// Test file name.
    pub file: String,
    /// Line of the case.
    pub line: u64,
    /// The case's `name`.
    pub name: String,
    /// Whether the decision was as expected.
    pub passed: bool,
    /// What was decided: `allow by rule x: reason`.
    pub actual: String,
    /// What was expected, when it failed.
    pub expected: String,
}

/// What `run_tests` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestReport {
    /// The folder.
    pub dir: PathBuf,
    /// Problems that stopped cases from running: policy load errors, malformed test files.
    pub problems: Vec<Problem>,
    /// Every case that ran, in file and case order.
    pub cases: Vec<CaseResult>,
}

impl TestReport {
    /// True when a case failed or something stopped cases from running (exit non-zero).
    pub fn failed(&self) -> bool {
        !self.problems.is_empty() || self.cases.iter().any(|c| !c.passed)
    }

    /// Number of failed cases.
    pub fn failures(&self) -> usize {
        self.cases.iter().filter(|c| !c.passed).count()
    }
}

impl fmt::Display for TestReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut file = "";
        for case in &self.cases {
            if case.file != file {
                file = &case.file;
                writeln!(f, "{file}")?;
            }
            if case.passed {
                writeln!(f, "  ok    {}", case.name)?;
            } else {
                writeln!(
                    f,
                    "  FAIL  {} (line {}): expected {}, got {}",
                    case.name, case.line, case.expected, case.actual
                )?;
            }
        }
        for problem in &self.problems {
            writeln!(f, "error: {problem}")?;
        }
        write!(
            f,
            "{} case(s): {} passed, {} failed{}",
            self.cases.len(),
            self.cases.len() - self.failures(),
            self.failures(),
            if self.problems.is_empty() { String::new() } else { format!(", {} error(s)", self.problems.len()) }
        )
    }
}

fn test_files(dir: &Path) -> Result<Vec<PathBuf>, Problem> {
    loader::list_files(dir, |name| name.ends_with(".tests.yaml") || name.ends_with(".tests.yml"))
}

fn parse_test_file(path: &Path) -> Result<RawTestFile, Problem> {
    let file = loader::display_name(path);
    let text = loader::read_text(path)?;
    serde_saphyr::from_str::<RawTestFile>(&text).map_err(|e| loader::yaml_problem(&file, &e))
}

/// Malformed test files (for `check`).
pub(crate) fn syntax_problems(dir: &Path) -> Vec<Problem> {
    match test_files(dir) {
        Ok(files) => files.iter().filter_map(|path| parse_test_file(path).err()).collect(),
        Err(problem) => vec![problem],
    }
}

/// Loads the policies of `dir` and runs every `*.tests.yaml` case in it.
pub fn run_tests(dir: &Path) -> TestReport {
    let mut report = TestReport { dir: dir.to_path_buf(), problems: Vec::new(), cases: Vec::new() };
    let set = match PolicySet::load_dir(dir) {
        Ok(set) => set,
        Err(e) => {
            report.problems = e.problems;
            return report;
        }
    };
    let files = match test_files(dir) {
        Ok(files) => files,
        Err(problem) => {
            report.problems.push(problem);
            return report;
        }
    };
    if files.is_empty() {
        report.problems.push(Problem::new(
            &dir.display().to_string(),
            None,
            "no test files in this folder (write cases in NAME.tests.yaml next to the policies; docs/policies.md shows the format)".to_owned(),
        ));
    }
    for path in files {
        let file = loader::display_name(&path);
        match parse_test_file(&path) {
            Ok(raw) => run_file(&set, &file, raw, &mut report),
            Err(problem) => report.problems.push(problem),
        }
    }
    report
}

fn run_file(set: &PolicySet, file: &str, raw: RawTestFile, report: &mut TestReport) {
    let clock = ManualClock::new();
    let engine = PolicyEngine::with_manual_clock(set.clone(), &clock);
    let default_service = raw
        .service
        .clone()
        .unwrap_or_else(|| file.trim_end_matches(".tests.yaml").trim_end_matches(".tests.yml").to_owned());
    for spanned in raw.cases {
        let line = spanned.referenced.line();
        let case = spanned.value;
        let service = case.service.clone().unwrap_or_else(|| default_service.clone());
        let problem = |message: String| Problem::new(file, Some((line, spanned.referenced.column())), message);
        if set.service(&service).is_none() {
            report.problems.push(problem(format!(
                "case `{}` is for service `{service}`, which has no policy here (set `service:` in the file or the case)",
                case.name
            )));
            continue;
        }
        let duration = |field: &str, text: &Option<String>| -> Result<Duration, String> {
            match text {
                None => Ok(Duration::ZERO),
                Some(text) => humantime::parse_duration(text.trim()).map_err(|_| {
                    format!(
                        "case `{}`: {field} `{text}` is not a duration (write it like `500ms`, `10s` or `1h`)",
                        case.name
                    )
                }),
            }
        };
        let (advance, every) = match (duration("advance", &case.advance), duration("every", &case.every)) {
            (Ok(a), Ok(e)) => (a, e),
            (Err(m), _) | (_, Err(m)) => {
                report.problems.push(problem(m));
                continue;
            }
        };
        clock.advance(advance);
        let params: Vec<(String, String)> =
            case.params.iter().flat_map(|(k, values)| values.0.iter().map(move |v| (k.clone(), v.clone()))).collect();
        let headers: Vec<(String, String)> = case.headers.clone().into_iter().collect();
        let described = match DescribedRequest::build(&case.request, &params, &headers, case.livemode) {
            Ok(d) => d,
            Err(message) => {
                report.problems.push(problem(format!("case `{}`: {message}", case.name)));
                continue;
            }
        };
        let facts = described.facts();
        let repeat = case.repeat.unwrap_or(1).max(1);
        let mut decision = engine.decide(&service, &facts);
        for _ in 1..repeat {
            clock.advance(every);
            decision = engine.decide(&service, &facts);
        }
        let mut mismatches = Vec::new();
        if decision.verdict != case.expect.verdict() {
            mismatches.push(case.expect.verdict().as_str().to_owned());
        }
        if let Some(rule) = &case.rule
            && *rule != decision.rule
        {
            mismatches.push(format!("rule {rule}"));
        }
        let denial = decision.denial.as_ref();
        if let Some(code) = &case.code
            && denial.is_none_or(|d| d.code != code)
        {
            mismatches.push(format!("code {code}"));
        }
        if let Some(status) = case.status
            && denial.is_none_or(|d| d.status != status)
        {
            mismatches.push(format!("status {status}"));
        }
        let actual = match denial {
            Some(d) => format!(
                "{} by rule {} ({} {}): {}",
                decision.verdict.as_str(),
                decision.rule,
                d.status,
                d.code,
                decision.reason
            ),
            None => format!("{} by rule {}: {}", decision.verdict.as_str(), decision.rule, decision.reason),
        };
        report.cases.push(CaseResult {
            file: file.to_owned(),
            line,
            name: case.name,
            passed: mismatches.is_empty(),
            actual,
            expected: mismatches.join(", "),
        });
    }
}
