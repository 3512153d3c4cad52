//! `keygate policy check|explain|test` on the policies crate's fixture folders, through the real
//! binary, the way a team runs them in its CI.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::Command;

use keygate_tests::keygate::keygate_bin;

fn fixtures(name: &str) -> String {
    format!("{}/../policies/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn keygate(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(keygate_bin()).args(args).output().expect("run keygate");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn check_passes_good_policies_and_fails_broken_ones_with_the_place() {
    let (code, stdout, _) = keygate(&["policy", "check", &fixtures("good")]);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("0 error(s)"), "{stdout}");
    let (code, stdout, _) = keygate(&["policy", "check", &fixtures("broken/shared-token-hash")]);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("token"), "{stdout}");
}

#[test]
fn test_runs_the_cases_written_next_to_the_policies() {
    let (code, stdout, _) = keygate(&["policy", "test", &fixtures("good")]);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("0 failed"), "{stdout}");
}

#[test]
fn explain_prints_the_decision_and_the_rule() {
    let good = fixtures("good");
    let (code, stdout, stderr) = keygate(&[
        "policy",
        "explain",
        "--policies",
        &good,
        "--service",
        "checkout",
        "POST /v1/payment_intents",
        "amount=5000",
        "currency=usd",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("decision:  deny"), "{stdout}");
    assert!(stdout.contains("rule:      default-deny"), "{stdout}");
    let (code, _, stderr) =
        keygate(&["policy", "explain", "--policies", &good, "--service", "nobody", "GET /v1/balance"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("nobody"), "{stderr}");
}
