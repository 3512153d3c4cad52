//! Table-driven decisions over the fixture policies, with requests as the proxy sees them: raw
//! form bodies as the Stripe SDKs encode them, query strings, JSON bodies, headers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use keygate_policies::{
    CODE_IDEMPOTENCY_KEY_REQUIRED, CODE_POLICY_DENIED, Decision, PolicyEngine, PolicySet, QUICKSTART_RULE_ID,
    RequestFacts, Verdict,
};

fn good() -> PolicySet {
    PolicySet::load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/good")).unwrap()
}

/// A request, by default a v1 form POST with an idempotency key, test key, no Connect.
#[derive(Clone, Copy)]
struct Req {
    method: &'static str,
    path: &'static str,
    query: Option<&'static str>,
    content_type: Option<&'static str>,
    body: &'static str,
    account: Option<&'static str>,
    idempotency_key: Option<&'static str>,
    livemode: bool,
}

const fn post(path: &'static str, body: &'static str) -> Req {
    Req {
        method: "POST",
        path,
        query: None,
        content_type: Some("application/x-www-form-urlencoded"),
        body,
        account: None,
        idempotency_key: Some("idem-1"),
        livemode: false,
    }
}

const fn get(path: &'static str, query: Option<&'static str>) -> Req {
    Req { method: "GET", query, content_type: None, idempotency_key: None, ..post(path, "") }
}

impl Req {
    const fn account(self, account: &'static str) -> Req {
        Req { account: Some(account), ..self }
    }
    const fn no_idempotency_key(self) -> Req {
        Req { idempotency_key: None, ..self }
    }
    const fn live(self) -> Req {
        Req { livemode: true, ..self }
    }
    const fn content_type(self, content_type: &'static str) -> Req {
        Req { content_type: Some(content_type), ..self }
    }
    fn facts(&self) -> RequestFacts<'_> {
        RequestFacts {
            method: self.method,
            path: self.path,
            query: self.query,
            content_type: self.content_type,
            body: self.body.as_bytes(),
            stripe_account: self.account,
            stripe_context: None,
            idempotency_key: self.idempotency_key,
            livemode: self.livemode,
        }
    }
}

fn decide(engine: &PolicyEngine, service: &str, req: Req) -> Decision {
    engine.decide(service, &req.facts())
}

#[test]
fn decision_table() {
    use Verdict::{Allow, Deny, WouldDeny};
    // (service, request, verdict, rule)
    let table: Vec<(&str, Req, Verdict, &str)> = vec![
        // checkout: how stripe-python / stripe-node encode a payment intent.
        (
            "checkout",
            post(
                "/v1/payment_intents",
                "amount=2000&currency=usd&metadata%5Border_id%5D=A-1&automatic_payment_methods%5Benabled%5D=true",
            ),
            Allow,
            "create-intents",
        ),
        // Parameter pollution: every value must satisfy an allow rule.
        (
            "checkout",
            post("/v1/payment_intents", "amount=100&amount=9999999&currency=usd&metadata[order_id]=A-2"),
            Deny,
            "default-deny",
        ),
        (
            "checkout",
            post("/v1/payment_intents", "amount=2000&currency=usd&currency=gbp&metadata[order_id]=A-3"),
            Deny,
            "default-deny",
        ),
        // `+` is a space and `%2B` a plus: neither makes "usd" out of something else.
        (
            "checkout",
            post("/v1/payment_intents", "amount=2000&currency=us+d&metadata[order_id]=A-4"),
            Deny,
            "default-deny",
        ),
        // Upper-case currency is still usd (Stripe accepts it).
        (
            "checkout",
            post("/v1/payment_intents", "amount=2000&currency=USD&metadata[order_id]=A-5"),
            Allow,
            "create-intents",
        ),
        // Nested forbidden parameter, percent-encoded brackets.
        (
            "checkout",
            post(
                "/v1/payment_intents",
                "amount=2000&currency=usd&metadata[order_id]=A-6&payment_method_data%5Bcard%5D%5Bnumber%5D=4242424242424242",
            ),
            Deny,
            "default-deny",
        ),
        // expand in the query string of a GET, indexed form.
        (
            "checkout",
            get("/v1/payment_intents/pi_1", Some("expand%5B0%5D=latest_charge.payment_method_details")),
            Deny,
            "no-card-data-expansion",
        ),
        ("checkout", get("/v1/payment_intents/pi_1", Some("expand[]=customer")), Allow, "read-intents"),
        // A body keygate cannot read: allow rules with conditions do not match, deny rules do.
        (
            "checkout",
            post("/v1/payment_intents", "--x\r\nContent-Disposition: form-data; name=\"amount\"\r\n\r\n1\r\n--x--")
                .content_type("multipart/form-data; boundary=x"),
            Deny,
            "no-card-data-expansion",
        ),
        // Only parameters the policy looks at are read: bad bytes elsewhere change nothing.
        (
            "checkout",
            post("/v1/payment_intents", "amount=2000&currency=usd&metadata[order_id]=A-8&description=%FF"),
            Allow,
            "create-intents",
        ),
        // Invalid UTF-8 after percent-decoding.
        (
            "checkout",
            post("/v1/payment_intents", "amount=2000&currency=usd&metadata[order_id]=%FF"),
            Deny,
            "no-card-data-expansion",
        ),
        ("checkout", post("/v1/payment_intents/pi_1/confirm", "").no_idempotency_key(), Deny, "idempotency"),
        ("checkout", post("/v1/payment_intents/pi_1/confirm", ""), Allow, "confirm-or-cancel-intents"),
        ("checkout", get("/v1/customers/search", Some("query=email%3A%27a%40b.c%27")), Allow, "customers"),
        ("checkout", get("/v1/customers/cus_1", None), Allow, "customers"),
        ("checkout", get("/v1/customers/cus_1/../../payouts", None), Deny, "default-deny"),
        ("checkout", get("/v1/customers/cus_1%2F..%2F..%2Fpayouts", None), Deny, "default-deny"),
        ("checkout", get("/v1/not_an_operation", None), Deny, "default-deny"),
        (
            "checkout",
            post("/v1/payment_intents", "amount=2000&currency=usd&metadata[order_id]=A-7")
                .account("acct_1Mk7sLQ2x7aGkGx1"),
            Deny,
            "default-deny",
        ),
        // support tool: the SDK sends no Idempotency-Key unless asked; keygate injects one.
        (
            "support-tool",
            post("/v1/refunds", "charge=ch_1&amount=1500&currency=usd&reason=duplicate&metadata[ticket]=T-1")
                .no_idempotency_key(),
            Allow,
            "refund-up-to-200-usd",
        ),
        (
            "support-tool",
            post("/v1/refunds", "charge=ch_1&amount=1500&currency=usd&reason=other&metadata[ticket]=T-1"),
            Deny,
            "default-deny",
        ),
        ("support-tool", get("/v1/charges/ch_1", Some("expand[]=customer")), Allow, "look-up-customers-and-payments"),
        ("support-tool", get("/v1/charges/ch_1", Some("expand[]=source")), Deny, "default-deny"),
        // marketplace: Connect.
        (
            "marketplace",
            post("/v1/payment_intents", "amount=5000&currency=usd&application_fee_amount=100")
                .account("acct_1NbXe2Fz9wq4BnQ2"),
            Allow,
            "payments-on-own-accounts",
        ),
        (
            "marketplace",
            post("/v1/payment_intents", "amount=5000&currency=usd&application_fee_amount=100")
                .account("acct_1NbXe2Fz9wq4BnQ3"),
            Deny,
            "default-deny",
        ),
        (
            "marketplace",
            post("/v1/payouts/po_1/cancel", "").account("acct_1NbXe2Fz9wq4BnQ2"),
            Deny,
            "no-payouts-or-account-changes",
        ),
        (
            "marketplace",
            get("/v1/accounts/acct_1NbXe2Fz9wq4BnQ2/external_accounts", None),
            Deny,
            "no-payouts-or-account-changes",
        ),
        ("marketplace", get("/v1/accounts/acct_1NbXe2Fz9wq4BnQ2", None), Allow, "read-own-accounts"),
        (
            "marketplace",
            get("/v1/accounts/acct_1NbXe2Fz9wq4BnQ2", None).account("acct_1NbXe2Fz9wq4BnQ2"),
            Deny,
            "default-deny",
        ),
        ("marketplace", post("/v1/accounts", "type=express"), Allow, "create-test-accounts"),
        ("marketplace", post("/v1/accounts", "type=express").live(), Deny, "default-deny"),
        // analytics: report mode.
        ("analytics", get("/v1/charges", Some("limit=100")), Allow, "read-only"),
        ("analytics", get("/v2/core/accounts", None), Allow, "read-only"),
        ("analytics", post("/v1/refunds", "charge=ch_1"), WouldDeny, "default-deny"),
        ("analytics", get("/v1/customers/cus_1", Some("expand[]=sources")), WouldDeny, "no-card-details"),
        // Nobody's policy.
        ("payroll", get("/v1/balance", None), Deny, "unknown-service"),
    ];
    let engine = PolicyEngine::new(good());
    for (i, (service, req, verdict, rule)) in table.into_iter().enumerate() {
        let d = decide(&engine, service, req);
        assert_eq!(
            (d.verdict, d.rule.as_str()),
            (verdict, rule),
            "row {i}: {service} {} {}: {d:?}",
            req.method,
            req.path
        );
        assert_eq!(d.denial.is_some(), verdict != Allow, "row {i}");
        if let Some(denial) = &d.denial {
            assert!(denial.message.contains(rule), "row {i}: {}", denial.message);
            // Never a request value other than amount/currency in reasons and messages.
            for secret in ["4242424242424242", "T-1", "ch_1", "acct_1NbXe2Fz9wq4BnQ3", "email"] {
                assert!(
                    !d.reason.contains(secret) && !denial.message.contains(secret),
                    "row {i} leaks {secret}: {d:?}"
                );
            }
        }
    }
}

#[test]
fn decisions_carry_operation_amount_and_currency() {
    let engine = PolicyEngine::new(good());
    let d =
        decide(&engine, "checkout", post("/v1/payment_intents", "amount=60000&currency=EUR&metadata[order_id]=A-1"));
    assert_eq!(d.verdict, Verdict::Deny);
    assert_eq!(d.operation, Some("POST /v1/payment_intents"));
    assert_eq!((d.amount, d.currency.as_deref()), (Some(60000), Some("eur")));
    assert_eq!(
        d.reason,
        "no rule allows POST /v1/payment_intents; rule `create-intents` does not apply because `amount` must be at most 50000 (got 60000)"
    );
    let denial = d.denial.unwrap();
    assert_eq!((denial.status, denial.code), (403, CODE_POLICY_DENIED));
    assert_eq!(
        denial.message,
        "keygate denied this request of service checkout: no rule allows POST /v1/payment_intents; rule `create-intents` does not apply because `amount` must be at most 50000 (got 60000) (rule default-deny). If checkout needs this call, ask the owner of policy file checkout.yaml to add a rule allowing POST /v1/payment_intents."
    );

    let d = decide(&engine, "checkout", get("/v1/customers/search", None));
    assert_eq!(d.operation, Some("GET /v1/customers/search"));
    assert_eq!((d.amount, d.currency), (None, None));

    let d = decide(&engine, "checkout", get("/v1/unknown_thing", None));
    assert_eq!(d.operation, None);
    assert_eq!(d.reason, "GET to a path that matches no Stripe operation, and no rule allows unknown operations");
}

#[test]
fn explicit_deny_rules_give_their_reason() {
    let engine = PolicyEngine::new(good());
    let d = decide(&engine, "marketplace", post("/v1/payouts", "amount=100&currency=usd"));
    assert_eq!(d.rule, "no-payouts-or-account-changes");
    assert_eq!(d.reason, "payouts and changes to connected accounts are made in the Stripe Dashboard");
    assert!(d.denial.unwrap().message.ends_with(
        "If marketplace needs this call, ask the owner of policy file marketplace.yaml to change rule `no-payouts-or-account-changes`."
    ));
}

#[test]
fn idempotency_modes() {
    let engine = PolicyEngine::new(good());
    // require
    let d = decide(&engine, "checkout", post("/v1/customers", "email=a%40b.c").no_idempotency_key());
    assert_eq!((d.verdict, d.rule.as_str()), (Verdict::Deny, "idempotency"));
    let denial = d.denial.unwrap();
    assert_eq!((denial.status, denial.code), (400, CODE_IDEMPOTENCY_KEY_REQUIRED));
    assert!(!d.inject_idempotency_key);
    // inject: only for POSTs that lack one and go through
    let refund = "charge=ch_1&amount=100&currency=usd&reason=duplicate&metadata[ticket]=T-9";
    assert!(decide(&engine, "support-tool", post("/v1/refunds", refund).no_idempotency_key()).inject_idempotency_key);
    assert!(!decide(&engine, "support-tool", post("/v1/refunds", refund)).inject_idempotency_key);
    assert!(!decide(&engine, "support-tool", get("/v1/refunds", None)).inject_idempotency_key);
    let denied = decide(&engine, "support-tool", post("/v1/charges", "amount=1&currency=usd").no_idempotency_key());
    assert_eq!(denied.verdict, Verdict::Deny);
    assert!(!denied.inject_idempotency_key);
}

#[test]
fn report_mode_records_what_enforce_would_deny() {
    let engine = PolicyEngine::new(good());
    let d = decide(&engine, "analytics", post("/v1/refunds", "charge=ch_1&amount=100&currency=usd"));
    assert_eq!(d.verdict, Verdict::WouldDeny);
    assert_eq!(d.verdict.as_str(), "would_deny");
    assert!(d.verdict.forwards());
    let denial = d.denial.unwrap();
    assert_eq!(denial.code, CODE_POLICY_DENIED);
    assert!(denial.message.starts_with("keygate would deny this request of service analytics:"), "{}", denial.message);
}

#[test]
fn lookups_by_token_hash_and_identity() {
    let set = good();
    let by_hash = |h: &str| set.service_by_token_hash(h).map(|s| s.name.as_str());
    assert_eq!(by_hash("sha256:ae71f9fde2592d2f96af5ead5fd5443e03ff2c829133b545e8b03197c0ef8fe6"), Some("checkout"));
    // Both of the marketplace's tokens (rotation).
    assert_eq!(by_hash("sha256:31700920a17f2ca88583b66bda18baeb938bc8c037abda3d194b8e659cfc1510"), Some("marketplace"));
    assert_eq!(by_hash("sha256:b95cd6c775b87c978ced4790c82f8538c90110a7119d598ac42262e7d6c04a26"), Some("marketplace"));
    assert_eq!(by_hash("sha256:0000000000000000000000000000000000000000000000000000000000000000"), None);
    let by_identity = |i: &str| set.service_by_identity(i).map(|s| s.name.as_str());
    assert_eq!(by_identity("spiffe://shop.example/ns/data/sa/analytics"), Some("analytics"));
    assert_eq!(by_identity("dns:analytics.data.svc.cluster.local"), Some("analytics"));
    assert_eq!(by_identity("dns:checkout.shop.svc.cluster.local"), None);
    let checkout = set.service("checkout").unwrap();
    assert_eq!(checkout.stripe_key, "vault://secret/stripe/checkout#api_key");
    assert_eq!(checkout.file_name(), "checkout.yaml");
}

#[test]
fn quickstart_allows_everything_for_its_one_service() {
    let hash = "sha256:ae71f9fde2592d2f96af5ead5fd5443e03ff2c829133b545e8b03197c0ef8fe6";
    let set = PolicySet::quickstart_allow_all("quickstart", hash, "env://STRIPE_SECRET_KEY");
    assert_eq!(set.service_by_token_hash(hash).unwrap().name, "quickstart");
    let engine = PolicyEngine::new(set);
    for req in [
        post("/v1/payouts", "amount=999999999&currency=usd").no_idempotency_key(),
        get("/v1/some_future_endpoint/x", None),
        post("/v2/core/accounts", "{}").content_type("application/json").account("acct_1"),
        get("/v1/accounts", None).live(),
    ] {
        let d = decide(&engine, "quickstart", req);
        assert_eq!((d.verdict, d.rule.as_str()), (Verdict::Allow, QUICKSTART_RULE_ID), "{} {}", req.method, req.path);
        assert!(!d.inject_idempotency_key);
    }
    // Abnormal paths stay denied even here.
    let d = decide(&engine, "quickstart", get("/v1/customers/../payouts", None));
    assert_eq!(d.verdict, Verdict::Deny);
    assert_eq!(decide(&engine, "someone-else", get("/v1/balance", None)).rule, "unknown-service");
}

#[test]
fn v2_json_bodies_and_path_literals() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("treasury.yaml"),
        r#"
service: treasury
stripe_key: "vault://x#y"
rules:
  - id: meter-api-calls
    effect: allow
    operation: POST /v2/billing/meter_events
    params:
      event_name: { in: [api_calls] }
      "payload[value]": { min: 1, max: 1000 }
  - id: small-outbound-payments
    effect: allow
    operation: "POST /v2/money_management/**"
    unknown_operations: true
    params:
      "amount[value]": { max: 10000 }
      "amount[currency]": { in: [usd] }
      "metadata[purpose]": { in: ["supplier-*"] }
  - id: one-customer
    effect: allow
    operation: GET /v1/customers/cus_Special
"#,
    )
    .unwrap();
    let engine = PolicyEngine::new(PolicySet::load_dir(dir.path()).unwrap());
    let json = |body: &'static str| {
        post("/v2/money_management/outbound_payments", body).content_type("application/json; charset=utf-8")
    };
    let ok = json(r#"{"amount":{"value":5000,"currency":"usd"},"metadata":{"purpose":"supplier-42"}}"#);
    let d = decide(&engine, "treasury", ok);
    assert_eq!((d.verdict, d.rule.as_str()), (Verdict::Allow, "small-outbound-payments"), "{d:?}");
    assert_eq!((d.amount, d.currency.as_deref()), (Some(5000), Some("usd")));
    let too_much = json(r#"{"amount":{"value":50000,"currency":"usd"},"metadata":{"purpose":"supplier-42"}}"#);
    assert_eq!(decide(&engine, "treasury", too_much).verdict, Verdict::Deny);
    let wrong_purpose = json(r#"{"amount":{"value":5,"currency":"usd"},"metadata":{"purpose":"payroll"}}"#);
    assert_eq!(decide(&engine, "treasury", wrong_purpose).verdict, Verdict::Deny);
    assert_eq!(decide(&engine, "treasury", json("{not json")).verdict, Verdict::Deny);

    let meter = |body: &'static str| post("/v2/billing/meter_events", body).content_type("application/json");
    let d = decide(
        &engine,
        "treasury",
        meter(r#"{"event_name":"api_calls","payload":{"stripe_customer_id":"cus_1","value":"25"}}"#),
    );
    assert_eq!(
        (d.verdict, d.rule.as_str(), d.operation),
        (Verdict::Allow, "meter-api-calls", Some("POST /v2/billing/meter_events"))
    );
    let d = decide(&engine, "treasury", meter(r#"{"event_name":"api_calls","payload":{"value":"5000"}}"#));
    assert_eq!(d.verdict, Verdict::Deny);
    // v2 bodies are JSON even without a Content-Type.
    let d = engine.decide(
        "treasury",
        &RequestFacts { content_type: None, ..meter(r#"{"event_name":"api_calls","payload":{"value":3}}"#).facts() },
    );
    assert_eq!(d.verdict, Verdict::Allow, "{d:?}");

    assert_eq!(decide(&engine, "treasury", get("/v1/customers/cus_Special", None)).rule, "one-customer");
    assert_eq!(decide(&engine, "treasury", get("/v1/customers/cus_Other", None)).rule, "default-deny");
}

#[test]
fn engine_is_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<PolicyEngine>();
    assert_send_sync::<PolicySet>();
}
