//! decide() on a 200-rule policy with parameter conditions, form parsing included.
//!
//! The policy spreads 200 rules over the table's POST operations; 24 of them cover
//! `POST /v1/payment_intents` (a deny rule on `expand` for every operation first, then 22 allow
//! rules whose conditions fail, then the one that matches), all with parameter conditions, plus
//! a rate limit and a budget, so the measured path is the expensive one.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use keygate_policies::params::RequestParams;
use keygate_policies::{PolicyEngine, PolicySet, RequestFacts, Verdict, match_operation, operations};

fn policy_text() -> String {
    let mut text = String::from(
        "service: bench\nstripe_key: \"vault://x#y\"\nidempotency: require\nrate_limit: { per_second: 1000000, burst: 1000000000 }\nbudgets:\n  usd: { max: 9000000000000000000, window: 24h }\nrules:\n",
    );
    text.push_str(
        "  - id: no-card-expansion\n    effect: deny\n    operation: \"* /v1/**\"\n    params:\n      expand: { in: [\"*payment_method*\", \"*source*\", \"*card*\"] }\n",
    );
    for i in 0..22 {
        text.push_str(&format!(
            "  - id: intents-{i}\n    effect: allow\n    operation: POST /v1/payment_intents\n    params:\n      amount: {{ min: 1, max: {max} }}\n      currency: {{ in: [jpy, chf] }}\n      \"metadata[order_id]\": {{ required: true }}\n",
            max = 1000 + i
        ));
    }
    text.push_str(
        "  - id: intents-ok\n    effect: allow\n    operation: POST /v1/payment_intents\n    params:\n      amount: { min: 50, max: 50000 }\n      currency: { in: [usd, eur] }\n      \"metadata[order_id]\": { required: true }\n      payment_method_data: { forbidden: true }\n      expand: { not_in: [\"*payment_method*\"] }\n",
    );
    let posts: Vec<&str> = operations()
        .iter()
        .filter(|op| op.method == "POST" && op.template != "/v1/payment_intents")
        .map(|op| op.name)
        .collect();
    for i in 0..176 {
        let op = posts[i % posts.len()];
        text.push_str(&format!(
            "  - id: other-{i}\n    effect: allow\n    operation: \"{op}\"\n    params:\n      amount: {{ max: {i} }}\n      \"metadata[team]\": {{ in: [a, b, c] }}\n"
        ));
    }
    text
}

fn engine() -> PolicyEngine {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bench.yaml"), policy_text()).unwrap();
    let set = PolicySet::load_dir(dir.path()).unwrap();
    assert_eq!(set.service("bench").unwrap().rules.len(), 200);
    PolicyEngine::new(set)
}

/// What stripe-node sends for a typical payment intent.
const ALLOWED_BODY: &[u8] = b"amount=2000&currency=usd&automatic_payment_methods%5Benabled%5D=true&customer=cus_NffrFeUfNV2Hib&description=Order%20A-1001&metadata%5Border_id%5D=A-1001&metadata%5Bcart%5D=7f3a&receipt_email=jenny.rosen%40example.com&expand%5B0%5D=customer";

const DENIED_BODY: &[u8] = b"amount=2000000&currency=usd&automatic_payment_methods%5Benabled%5D=true&customer=cus_NffrFeUfNV2Hib&metadata%5Border_id%5D=A-1001";

fn facts(body: &'static [u8]) -> RequestFacts<'static> {
    RequestFacts {
        method: "POST",
        path: "/v1/payment_intents",
        query: None,
        content_type: Some("application/x-www-form-urlencoded"),
        body,
        stripe_account: None,
        stripe_context: None,
        idempotency_key: Some("6735b5a1-bc1e-4a7d-a6d2-1c1f0f6e8d3b"),
        livemode: false,
    }
}

fn bench(c: &mut Criterion) {
    let engine = engine();
    let allowed = facts(ALLOWED_BODY);
    assert_eq!(engine.decide("bench", &allowed).rule, "intents-ok");
    c.bench_function("decide/200 rules/allow after 23 candidate rules", |b| {
        b.iter(|| engine.decide(black_box("bench"), black_box(&allowed)))
    });

    let denied = facts(DENIED_BODY);
    assert_eq!(engine.decide("bench", &denied).verdict, Verdict::Deny);
    c.bench_function("decide/200 rules/default deny with reason", |b| {
        b.iter(|| engine.decide(black_box("bench"), black_box(&denied)))
    });

    let read = RequestFacts {
        method: "GET",
        path: "/v1/customers/cus_NffrFeUfNV2Hib",
        body: b"",
        content_type: None,
        ..allowed
    };
    c.bench_function("decide/200 rules/GET denied, no body", |b| {
        b.iter(|| engine.decide(black_box("bench"), black_box(&read)))
    });

    c.bench_function("params/parse a 10-parameter form body", |b| {
        b.iter(|| {
            let params = RequestParams::parse_form(black_box(ALLOWED_BODY));
            (params.amount(), params.iter().count())
        })
    });

    c.bench_function("match_operation/GET /v1/customers/search", |b| {
        b.iter(|| match_operation(black_box("GET"), black_box("/v1/customers/search")))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
