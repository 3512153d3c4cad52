//! Rate limits, budgets and hot reload, on a manual clock: no sleeping, no timing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use keygate_policies::{
    CODE_BUDGET_EXCEEDED, CODE_RATE_LIMITED, ChargeOutcome, Decision, HeadCheck, ManualClock, PolicyEngine, PolicySet,
    RateLimitToken, RequestFacts, Verdict,
};

const PAYER: &str = r#"
service: payer
stripe_key: "vault://secret/stripe/payer#key"
mode: MODE
rate_limit: { per_second: RATE, burst: BURST }
budgets:
  usd: { max: MAX, window: 1h }
rules:
  - id: pay
    effect: allow
    operation: [POST /v1/payment_intents, POST /v1/refunds, GET /v1/balance]
"#;

fn policy_dir(mode: &str, rate: &str, burst: &str, max: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path(), mode, rate, burst, max);
    dir
}

fn write_policy(dir: &Path, mode: &str, rate: &str, burst: &str, max: &str) {
    let text = PAYER.replace("MODE", mode).replace("RATE", rate).replace("BURST", burst).replace("MAX", max);
    std::fs::write(dir.join("payer.yaml"), text).unwrap();
}

fn pay(engine: &PolicyEngine, body: &str) -> Decision {
    engine.decide(
        "payer",
        &RequestFacts {
            method: "POST",
            path: "/v1/payment_intents",
            query: None,
            content_type: Some("application/x-www-form-urlencoded"),
            body: body.as_bytes(),
            stripe_account: None,
            stripe_context: None,
            idempotency_key: Some("k"),
            livemode: false,
        },
    )
}

fn balance(engine: &PolicyEngine) -> Decision {
    engine.decide(
        "payer",
        &RequestFacts {
            method: "GET",
            path: "/v1/balance",
            query: None,
            content_type: None,
            body: b"",
            stripe_account: None,
            stripe_context: None,
            idempotency_key: None,
            livemode: false,
        },
    )
}

#[test]
fn rate_limit_is_a_token_bucket() {
    let dir = policy_dir("enforce", "2", "5", "1000000");
    let clock = ManualClock::new();
    let engine = PolicyEngine::with_manual_clock(PolicySet::load_dir(dir.path()).unwrap(), &clock);
    for i in 0..5 {
        assert_eq!(balance(&engine).verdict, Verdict::Allow, "request {i} of the burst");
    }
    let limited = balance(&engine);
    assert_eq!((limited.verdict, limited.rule.as_str()), (Verdict::Deny, "rate-limit"));
    let denial = limited.denial.unwrap();
    assert_eq!((denial.status, denial.code), (429, CODE_RATE_LIMITED));
    assert_eq!(limited.reason, "rate limit of 2/s with bursts of 5 exceeded");
    // 2 per second: one token every 500 ms.
    clock.advance(Duration::from_millis(499));
    assert_eq!(balance(&engine).verdict, Verdict::Deny);
    clock.advance(Duration::from_millis(1));
    assert_eq!(balance(&engine).verdict, Verdict::Allow);
    assert_eq!(balance(&engine).verdict, Verdict::Deny);
    // A long pause refills the bucket to its burst, no more.
    clock.advance(Duration::from_secs(3600));
    assert_eq!((0..6).filter(|_| balance(&engine).verdict == Verdict::Allow).count(), 5);
}

fn pay_after_head(engine: &PolicyEngine, body: &str, token: RateLimitToken) -> Decision {
    engine.decide_after_rate_limit(
        "payer",
        &RequestFacts {
            method: "POST",
            path: "/v1/payment_intents",
            query: None,
            content_type: Some("application/x-www-form-urlencoded"),
            body: body.as_bytes(),
            stripe_account: None,
            stripe_context: None,
            idempotency_key: Some("k"),
            livemode: false,
        },
        token,
    )
}

#[test]
fn the_rate_limit_token_is_taken_once_from_the_head() {
    let dir = policy_dir("enforce", "1", "2", "1000000");
    let clock = ManualClock::new();
    let engine = PolicyEngine::with_manual_clock(PolicySet::load_dir(dir.path()).unwrap(), &clock);
    // Two tokens in the bucket: two heads take them, and their decisions take no more.
    for i in 0..2 {
        let check = engine.rate_limit_from_head("payer", "POST", "/v1/payment_intents");
        assert_eq!(check, HeadCheck::Continue(RateLimitToken::Taken), "head {i}");
        let decision = pay_after_head(&engine, "amount=10&currency=usd", RateLimitToken::Taken);
        assert_eq!(decision.verdict, Verdict::Allow, "request {i}");
    }
    // The third head is refused with the decision `decide` would have made, body unread.
    let HeadCheck::Refuse(refused) = engine.rate_limit_from_head("payer", "POST", "/v1/payment_intents") else {
        panic!("the head over the rate limit is not refused");
    };
    assert_eq!((refused.verdict, refused.rule.as_str()), (Verdict::Deny, "rate-limit"));
    assert_eq!(refused.operation, Some("POST /v1/payment_intents"));
    assert_eq!((refused.amount, refused.currency.as_deref()), (None, None));
    let denial = refused.denial.unwrap();
    assert_eq!((denial.status, denial.code), (429, CODE_RATE_LIMITED));
    assert_eq!(refused.reason, "rate limit of 1/s with bursts of 2 exceeded");
    assert!(denial.message.contains("service payer"), "{}", denial.message);
    // Refused heads charge no budget.
    assert_eq!(engine.budget_spent("payer", "usd"), Some(20));
    // A token comes back after a second: the head takes it, `decide` would find none.
    clock.advance(Duration::from_secs(1));
    assert_eq!(engine.rate_limit_from_head("payer", "GET", "/v1/balance"), HeadCheck::Continue(RateLimitToken::Taken));
    assert_eq!(balance(&engine).rule, "rate-limit");
    // An unknown service is refused from the head too.
    let HeadCheck::Refuse(unknown) = engine.rate_limit_from_head("nobody", "GET", "/v1/balance") else {
        panic!("an unknown service is not refused from the head");
    };
    assert_eq!((unknown.verdict, unknown.rule.as_str()), (Verdict::Deny, "unknown-service"));
}

#[test]
fn report_mode_heads_over_the_rate_limit_go_on_and_are_reported() {
    let dir = policy_dir("report", "1", "1", "1000000");
    let engine = PolicyEngine::with_manual_clock(PolicySet::load_dir(dir.path()).unwrap(), &ManualClock::new());
    let first = engine.rate_limit_from_head("payer", "POST", "/v1/payment_intents");
    assert_eq!(first, HeadCheck::Continue(RateLimitToken::Taken));
    let second = engine.rate_limit_from_head("payer", "POST", "/v1/payment_intents");
    assert_eq!(second, HeadCheck::Continue(RateLimitToken::Exceeded));
    let decision = pay_after_head(&engine, "amount=10&currency=usd", RateLimitToken::Exceeded);
    assert_eq!((decision.verdict, decision.rule.as_str()), (Verdict::WouldDeny, "rate-limit"));
    // The money still moves in report mode.
    assert_eq!(engine.budget_spent("payer", "usd"), Some(10));
}

#[test]
fn budget_stops_spending_at_the_ceiling_and_recovers_after_the_window() {
    let dir = policy_dir("enforce", "1000", "1000", "10000");
    let clock = ManualClock::new();
    let engine = PolicyEngine::with_manual_clock(PolicySet::load_dir(dir.path()).unwrap(), &clock);
    assert_eq!(pay(&engine, "amount=6000&currency=usd").verdict, Verdict::Allow);
    assert_eq!(pay(&engine, "amount=4000&currency=usd").verdict, Verdict::Allow);
    assert_eq!(engine.budget_spent("payer", "usd"), Some(10000));

    let over = pay(&engine, "amount=1&currency=usd");
    assert_eq!((over.verdict, over.rule.as_str()), (Verdict::Deny, "budget:usd"));
    assert_eq!(over.reason, "usd budget of 10000 per 1h would be exceeded: 10000 spent, this request 1");
    let denial = over.denial.unwrap();
    assert_eq!((denial.status, denial.code), (403, CODE_BUDGET_EXCEEDED));
    // Denied requests do not count.
    assert_eq!(engine.budget_spent("payer", "usd"), Some(10000));
    // Other currencies have no budget here (rules decide which currencies are allowed).
    assert_eq!(pay(&engine, "amount=99999&currency=eur").verdict, Verdict::Allow);
    // Reads are not money.
    assert_eq!(balance(&engine).verdict, Verdict::Allow);

    clock.advance(Duration::from_secs(3600));
    // Within at most 1/60 of the window after that, the early spending has rolled off.
    clock.advance(Duration::from_secs(60));
    assert_eq!(engine.budget_spent("payer", "usd"), Some(0));
    assert_eq!(pay(&engine, "amount=10000&currency=usd").verdict, Verdict::Allow);
}

#[test]
fn budget_never_forgets_spending_before_the_window_ends() {
    let dir = policy_dir("enforce", "1000", "1000", "10000");
    let clock = ManualClock::new();
    let engine = PolicyEngine::with_manual_clock(PolicySet::load_dir(dir.path()).unwrap(), &clock);
    clock.advance(Duration::from_secs(7 * 3600 + 1234));
    assert_eq!(pay(&engine, "amount=10000&currency=usd").verdict, Verdict::Allow);
    // Step through the whole hour: the spending must stay counted the entire time.
    for _ in 0..3599 {
        clock.advance(Duration::from_secs(1));
        assert_eq!(engine.budget_spent("payer", "usd"), Some(10000));
    }
}

#[test]
fn money_moving_requests_without_amount_or_currency_are_refused_under_a_budget() {
    let dir = policy_dir("enforce", "1000", "1000", "10000");
    let engine = PolicyEngine::new(PolicySet::load_dir(dir.path()).unwrap());
    let d = engine.decide(
        "payer",
        &RequestFacts {
            method: "POST",
            path: "/v1/refunds",
            query: None,
            content_type: None,
            body: b"charge=ch_1",
            stripe_account: None,
            stripe_context: None,
            idempotency_key: Some("k"),
            livemode: false,
        },
    );
    assert_eq!((d.verdict, d.rule.as_str()), (Verdict::Deny, "budget:unpriced"));
    assert_eq!(d.denial.unwrap().code, CODE_BUDGET_EXCEEDED);
}

#[test]
fn report_mode_counts_money_that_moves_and_records_would_deny() {
    let dir = policy_dir("report", "1", "1", "100");
    let clock = ManualClock::new();
    let engine = PolicyEngine::with_manual_clock(PolicySet::load_dir(dir.path()).unwrap(), &clock);
    assert_eq!(pay(&engine, "amount=80&currency=usd").verdict, Verdict::Allow);
    clock.advance(Duration::from_secs(1));
    let over = pay(&engine, "amount=80&currency=usd");
    assert_eq!((over.verdict, over.rule.as_str()), (Verdict::WouldDeny, "budget:usd"));
    assert_eq!(engine.budget_spent("payer", "usd"), Some(160));
    // Rate limited (no time passed) and over budget: the first failing check is reported, and
    // the money still counts.
    let both = pay(&engine, "amount=10&currency=usd");
    assert_eq!((both.verdict, both.rule.as_str()), (Verdict::WouldDeny, "rate-limit"));
    assert_eq!(engine.budget_spent("payer", "usd"), Some(170));
}

#[test]
fn concurrent_spending_never_exceeds_the_budget() {
    let dir = policy_dir("enforce", "1000000", "1000000", "100000");
    let engine = Arc::new(PolicyEngine::new(PolicySet::load_dir(dir.path()).unwrap()));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let engine = Arc::clone(&engine);
            std::thread::spawn(move || {
                (0..500).filter(|_| pay(&engine, "amount=70&currency=usd").verdict == Verdict::Allow).count()
            })
        })
        .collect();
    let allowed: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    // 100000 / 70 = 1428 payments fit, exactly, whatever the interleaving.
    assert_eq!(allowed, 1428);
    assert_eq!(engine.budget_spent("payer", "usd"), Some(1428 * 70));
}

#[test]
fn hot_reload_keeps_state_of_services_that_remain() {
    let dir = policy_dir("enforce", "1", "2", "1000");
    let clock = ManualClock::new();
    let engine = PolicyEngine::with_manual_clock(PolicySet::load_dir(dir.path()).unwrap(), &clock);
    assert_eq!(pay(&engine, "amount=900&currency=usd").verdict, Verdict::Allow);
    assert_eq!(balance(&engine).verdict, Verdict::Allow);
    assert_eq!(balance(&engine).verdict, Verdict::Deny); // bucket empty

    // Same configuration reloaded: bucket still empty, spending still there.
    engine.replace(PolicySet::load_dir(dir.path()).unwrap());
    assert_eq!(balance(&engine).rule, "rate-limit");
    assert_eq!(engine.budget_spent("payer", "usd"), Some(900));

    // Budget raised: spending carries over to the new ceiling.
    write_policy(dir.path(), "enforce", "1", "2", "2000");
    let raised = PolicySet::load_dir(dir.path()).unwrap();
    engine.replace(raised.clone());
    assert!(engine.policies().ptr_eq(&raised));
    clock.advance(Duration::from_secs(1));
    assert_eq!(pay(&engine, "amount=1100&currency=usd").verdict, Verdict::Allow);
    assert_eq!(engine.budget_spent("payer", "usd"), Some(2000));

    // New rate limit: a new bucket, full.
    write_policy(dir.path(), "enforce", "10", "3", "2000");
    engine.replace(PolicySet::load_dir(dir.path()).unwrap());
    assert_eq!((0..4).filter(|_| balance(&engine).verdict == Verdict::Allow).count(), 3);

    // Service removed, then back: money spent in the window still counts (counts are kept by
    // service, currency and window, as in the proxy's limit store, not by policy snapshot).
    let other = tempfile::tempdir().unwrap();
    std::fs::write(other.path().join("other.yaml"), "service: other\nstripe_key: \"vault://x#y\"\n").unwrap();
    engine.replace(PolicySet::load_dir(other.path()).unwrap());
    assert_eq!(balance(&engine).rule, "unknown-service");
    engine.replace(PolicySet::load_dir(dir.path()).unwrap());
    assert_eq!(engine.budget_spent("payer", "usd"), Some(2000));
    // A changed window is another budget, which starts afresh.
    std::fs::write(
        dir.path().join("payer.yaml"),
        PAYER
            .replace("MODE", "enforce")
            .replace("RATE", "10")
            .replace("BURST", "3")
            .replace("MAX", "2000")
            .replace("window: 1h", "window: 2h"),
    )
    .unwrap();
    engine.replace(PolicySet::load_dir(dir.path()).unwrap());
    assert_eq!(engine.budget_spent("payer", "usd"), Some(0));
}

#[test]
fn evaluate_names_the_charge_and_apply_charge_turns_the_store_answer_into_the_decision() {
    let dir = policy_dir("enforce", "1000", "1000", "100");
    let engine = PolicyEngine::new(PolicySet::load_dir(dir.path()).unwrap());
    let facts = RequestFacts {
        method: "POST",
        path: "/v1/payment_intents",
        query: None,
        content_type: Some("application/x-www-form-urlencoded"),
        body: b"amount=80&currency=usd",
        stripe_account: None,
        stripe_context: None,
        idempotency_key: Some("k"),
        livemode: false,
    };
    let evaluated = engine.evaluate("payer", &facts, RateLimitToken::Taken);
    assert_eq!(evaluated.verdict, Verdict::Allow);
    let charge = evaluated.charge.clone().expect("a money-moving request under a budget names its charge");
    assert_eq!(
        (charge.key.service.as_str(), charge.key.currency.as_str(), charge.max, charge.amount, charge.force),
        ("payer", "usd", 100, 80, false)
    );
    assert_eq!(charge.key.window, Duration::from_secs(3600));
    // evaluate charges nothing itself.
    assert_eq!(engine.budget_spent("payer", "usd"), Some(0));
    // Within budget: the decision stands, the charge is consumed.
    let fits = ChargeOutcome { spent_before: 0, exceeded: false, charge: None };
    let allowed = engine.apply_charge("payer", evaluated.clone(), &fits);
    assert_eq!((allowed.verdict, allowed.charge), (Verdict::Allow, None));
    // Over: the same denial the in-memory decide gives.
    let over = ChargeOutcome { spent_before: 30, exceeded: true, charge: None };
    let denied = engine.apply_charge("payer", evaluated, &over);
    assert_eq!((denied.verdict, denied.rule.as_str()), (Verdict::Deny, "budget:usd"));
    assert_eq!(denied.reason, "usd budget of 100 per 1h would be exceeded: 30 spent, this request 80");
    assert_eq!(denied.denial.unwrap().code, CODE_BUDGET_EXCEEDED);
    // Reads name no charge.
    assert_eq!(
        engine
            .evaluate(
                "payer",
                &RequestFacts { method: "GET", path: "/v1/balance", body: b"", content_type: None, ..facts },
                RateLimitToken::Taken
            )
            .charge,
        None
    );
}
