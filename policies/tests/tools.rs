//! The `keygate policy check | explain | test` tools, as the CLI prints them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use keygate_policies::{ExplainError, PolicySet, Verdict, check, explain, run_tests};

fn folder(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

const LINTY: &str = r#"service: billing
stripe_key: "vault://x#y"
rules:
  - id: everything-on-intents
    effect: allow
    operation: "* /v1/payment_intents/**"
  - id: read-one-intent
    effect: allow
    operation: GET /v1/payment_intents/{intent}
  - id: typo
    effect: allow
    operation: GET /v1/custmers/{customer}
  - id: customer-by-param
    effect: allow
    operation: GET /v1/customers/{customer}
    params:
      customer: { in: [cus_1] }
  - id: amount-on-reads
    effect: allow
    operation: GET /v1/charges/{charge}
    params:
      amount: { max: 100 }
  - id: newer-endpoint
    effect: allow
    operation: GET /v1/brand_new_thing
    unknown_operations: true
"#;

#[test]
fn check_lints_probable_mistakes() {
    let dir = folder(&[("billing-service.yaml", LINTY)]);
    let report = check(dir.path());
    assert!(!report.has_errors(), "{report}");
    let warnings: Vec<String> = report.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        [
            "billing-service.yaml: service `billing` is in a file named billing-service.yaml (name the file billing.yaml so that people find it)",
            "billing-service.yaml: service `billing` has no token_hashes and no mtls_identities, so no request can use this policy (add the hash from `keygate token new --service billing`)",
            "billing-service.yaml: line 7, column 1: rule `read-one-intent` is never reached: rule `everything-on-intents` on line 4 comes first and matches every request it matches (move `read-one-intent` up, or narrow `everything-on-intents`)",
            "billing-service.yaml: line 10, column 1: rule `typo`: operation `GET /v1/custmers/{customer}` matches no Stripe operation (did you mean `GET /v1/customers/{customer}`?)",
            "billing-service.yaml: line 13, column 1: rule `customer-by-param`: `customer` is part of the path of GET /v1/customers/{customer}, not a request parameter, so the condition never sees it (put the value in the operation, e.g. `GET /v1/customers/cus_123`)",
            "billing-service.yaml: line 18, column 1: rule `amount-on-reads`: Stripe's GET and DELETE operations take no `amount`, so this condition makes the rule match nothing (remove it, or apply it to the POST operation)",
        ]
    );
    let text = report.to_string();
    assert!(
        text.ends_with(&format!("policies valid: 1 service(s) in {}, 0 error(s), 6 warning(s)", dir.path().display())),
        "{text}"
    );
}

#[test]
fn check_reports_shared_token_hashes_and_bad_test_files_as_errors() {
    let hash = "sha256:ae71f9fde2592d2f96af5ead5fd5443e03ff2c829133b545e8b03197c0ef8fe6";
    let a = format!("service: a\ntoken_hashes: [\"{hash}\"]\nstripe_key: \"v://a\"\n");
    let b = format!("service: b\ntoken_hashes: [\"{hash}\"]\nstripe_key: \"v://b\"\n");
    let dir = folder(&[("a.yaml", &a), ("b.yaml", &b), ("a.tests.yaml", "cases:\n  - name: x\n    expect: maybe\n")]);
    let report = check(dir.path());
    assert!(report.has_errors());
    let errors: Vec<String> = report.errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        errors,
        [
            format!("b.yaml: token hash {hash} is also used by service `a` in a.yaml (a token identifies one service; mint a separate token with `keygate token new --service b`)"),
            "a.tests.yaml: line 3, column 13: unknown variant `maybe`, expected one of allow, deny, would_deny (use one of the listed values)".to_owned(),
        ]
    );
    assert!(report.to_string().contains("policies NOT valid: 2 service(s)"));
}

#[test]
fn explain_shows_decision_rule_reason_and_every_rule_considered() {
    let set = PolicySet::load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/good")).unwrap();
    let params = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>();
    let e = explain(
        &set,
        "checkout",
        "POST /v1/payment_intents",
        &params(&[("amount", "5000"), ("currency", "usd"), ("metadata[order_id]", "A-1")]),
        &params(&[("Idempotency-Key", "k")]),
        false,
    )
    .unwrap();
    assert_eq!(e.decision.verdict, Verdict::Allow);
    assert_eq!(
        e.to_string(),
        "service:   checkout (policy file checkout.yaml, mode enforce)
request:   POST /v1/payment_intents amount=5000 currency=usd metadata[order_id]=A-1
operation: POST /v1/payment_intents
decision:  allow
rule:      create-intents
reason:    allowed by rule
rules:
  no-card-data-expansion (line 18): does not apply: `expand` is not sent
  create-intents (line 25): applies"
    );

    let e = explain(&set, "marketplace", "GET /v1/accounts/acct_1OtherAccount000", &[], &[], false).unwrap();
    assert_eq!(e.decision.rule, "default-deny");
    assert!(e.to_string().contains("response:  403 keygate_policy_denied: keygate denied this request"), "{e}");
    assert!(e.to_string().ends_with("rules:     none covers this request"), "{e}");

    // Query strings and GET parameters end up in the query.
    let e = explain(
        &set,
        "checkout",
        "GET /v1/payment_intents/pi_1?expand[]=customer",
        &params(&[("expand[]", "latest_charge")]),
        &[],
        false,
    )
    .unwrap();
    assert_eq!(e.decision.rule, "read-intents");
}

#[test]
fn explain_errors_say_what_to_fix() {
    let set = PolicySet::load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/good")).unwrap();
    let err = explain(&set, "payroll", "GET /v1/balance", &[], &[], false).unwrap_err();
    assert_eq!(
        err.to_string(),
        "no policy for service `payroll` (services in this folder: analytics, checkout, marketplace, support-tool)"
    );
    assert!(matches!(explain(&set, "checkout", "/v1/balance", &[], &[], false), Err(ExplainError::BadRequest(_))));
    let err = explain(&set, "checkout", "GET /v1/balance", &[], &[("X-Forwarded-For".into(), "1".into())], false)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "header `x-forwarded-for` does not affect decisions (use Stripe-Account, Stripe-Context, Idempotency-Key or Content-Type)"
    );
}

const SMALL: &str =
    "service: small\nstripe_key: \"v://s\"\nrules:\n  - id: read\n    effect: allow\n    operation: GET /v1/balance\n";

#[test]
fn run_tests_reports_failures_with_expected_and_actual() {
    let tests = "cases:
  - name: balance is readable
    request: GET /v1/balance
    expect: allow
  - name: wrongly expects payouts to work
    request: POST /v1/payouts
    params: { amount: 5, currency: usd }
    expect: allow
    rule: read
";
    let dir = folder(&[("small.yaml", SMALL), ("small.tests.yaml", tests)]);
    let report = run_tests(dir.path());
    assert!(report.failed());
    assert_eq!(report.failures(), 1);
    assert_eq!(
        report.to_string(),
        "small.tests.yaml
  ok    balance is readable
  FAIL  wrongly expects payouts to work (line 5): expected allow, rule read, got deny by rule default-deny (403 keygate_policy_denied): no rule allows POST /v1/payouts
2 case(s): 1 passed, 1 failed"
    );
}

#[test]
fn run_tests_refuses_to_pass_without_tests_or_with_broken_ones() {
    let dir = folder(&[("small.yaml", SMALL)]);
    let report = run_tests(dir.path());
    assert!(report.failed());
    assert!(report.to_string().contains("no test files in this folder"), "{report}");

    let dir = folder(&[
        ("small.yaml", SMALL),
        (
            "small.tests.yaml",
            "cases:\n  - name: x\n    request: GET /v1/balance\n    expect: allow\n    advance: soon\n  - name: y\n    service: nobody\n    request: GET /v1/balance\n    expect: allow\n",
        ),
    ]);
    let report = run_tests(dir.path());
    assert!(report.failed());
    let problems: Vec<String> = report.problems.iter().map(ToString::to_string).collect();
    assert_eq!(
        problems,
        [
            "small.tests.yaml: line 2, column 5: case `x`: advance `soon` is not a duration (write it like `500ms`, `10s` or `1h`)",
            "small.tests.yaml: line 6, column 5: case `y` is for service `nobody`, which has no policy here (set `service:` in the file or the case)",
        ]
    );

    // Policies that do not load: their problems, no cases.
    let dir = folder(&[("small.yaml", "service: small\n"), ("small.tests.yaml", "cases: []\n")]);
    let report = run_tests(dir.path());
    assert!(report.failed());
    assert!(report.cases.is_empty());
    assert!(report.problems[0].message.starts_with("missing field `stripe_key`"), "{report}");
}
