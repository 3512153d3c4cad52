//! docs/policies.md quotes the fixture policies; the quotes must stay identical to the files
//! (which other tests load, lint and run), so the documentation's examples cannot rot.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

#[test]
fn documented_examples_are_the_fixture_files() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("../docs/policies.md")).unwrap();
    let mut quoted = Vec::new();
    for (at, _) in doc.match_indices("<!-- fixture: ") {
        let rest = &doc[at + "<!-- fixture: ".len()..];
        let name = &rest[..rest.find(" -->").unwrap()];
        let block = rest.split_once("```yaml\n").unwrap().1;
        let body = &block[..block.find("```").unwrap()];
        let file = std::fs::read_to_string(root.join("tests/fixtures/good").join(name))
            .unwrap_or_else(|e| panic!("docs quote {name}, which is not a fixture: {e}"));
        assert_eq!(body, file, "docs/policies.md's copy of {name} differs from the fixture");
        quoted.push(name.to_owned());
    }
    quoted.sort();
    assert_eq!(quoted, ["analytics.yaml", "checkout.yaml", "marketplace.yaml", "support-tool.yaml"]);
}

#[test]
fn every_policy_key_is_documented() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("../docs/policies.md")).unwrap();
    for key in [
        "service",
        "token_hashes",
        "mtls_identities",
        "stripe_key",
        "mode",
        "idempotency",
        "rate_limit",
        "rate_limit.per_second",
        "rate_limit.burst",
        "budgets",
        "budgets.<currency>.max",
        "budgets.<currency>.window",
        "rules",
        "id",
        "effect",
        "operation",
        "params",
        "stripe_account",
        "stripe_context",
        "key_mode",
        "unknown_operations",
        "reason",
        "min",
        "max",
        "in",
        "not_in",
        "required",
        "forbidden",
    ] {
        assert!(doc.contains(&format!("| `{key}` |")), "docs/policies.md has no table row for `{key}`");
    }
    for code in
        ["keygate_policy_denied", "keygate_rate_limited", "keygate_budget_exceeded", "keygate_idempotency_key_required"]
    {
        assert!(doc.contains(code), "{code} undocumented");
    }
    for operation in keygate_policies::MONEY_MOVING_OPERATIONS {
        assert!(doc.contains(&format!("- `{operation}`")), "money-moving {operation} undocumented");
    }
}
