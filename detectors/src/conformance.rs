//! The one conformance suite every detector runs (the [`crate::Detector`] contract): on the
//! generated history each finds its planted anomalies and cites their records; shadow mode
//! raises the same alerts marked shadow and learns the same; a save and restore halfway changes
//! nothing; arbitrary inputs never panic.

use std::sync::OnceLock;

use proptest::prelude::*;

use crate::simulate::{self, History, HistoryConfig};
use crate::{Alert, AnomaliesConfig, DetectorKind, Engine, EngineState, Input, Mode, RequestInput, WebhookInput};

fn history() -> &'static History {
    static HISTORY: OnceLock<History> = OnceLock::new();
    HISTORY.get_or_init(|| simulate::generate(&HistoryConfig::default()))
}

/// A configuration with only `kind` enabled, in `mode`.
fn only(kind: DetectorKind, mode: Mode) -> AnomaliesConfig {
    let mut c = AnomaliesConfig::default();
    c.request_rate.enabled = kind == DetectorKind::RequestRate;
    c.amount.enabled = kind == DetectorKind::Amount;
    c.refunds.enabled = kind == DetectorKind::Refunds;
    c.bursts.enabled = kind == DetectorKind::Bursts;
    c.first_seen.enabled = kind == DetectorKind::FirstSeen;
    c.webhook_surge.enabled = kind == DetectorKind::WebhookSurge;
    c.request_rate.mode = mode;
    c.amount.mode = mode;
    c.refunds.mode = mode;
    c.bursts.mode = mode;
    c.first_seen.mode = mode;
    c.webhook_surge.mode = mode;
    c
}

fn run(
    config: &AnomaliesConfig,
    inputs: &[Input],
    end_us: i64,
    state: Option<EngineState>,
) -> (Vec<Alert>, EngineState) {
    let mut engine = match state {
        Some(s) => Engine::with_state(config, s),
        None => Engine::new(config),
    };
    let mut alerts = Vec::new();
    for input in inputs {
        alerts.extend(engine.observe(input));
    }
    alerts.extend(engine.advance(end_us));
    (alerts, engine.state())
}

fn conformance(kind: DetectorKind) {
    let h = history();
    let (alerts, state) = run(&only(kind, Mode::Alert), &h.inputs, h.end_us, None);
    assert!(alerts.iter().all(|a| a.detector == kind && a.mode == Mode::Alert));
    let e = simulate::evaluate(h, &alerts);
    let mine: Vec<_> = h.planted.iter().filter(|p| p.detector == kind).map(|p| p.name.clone()).collect();
    assert!(!mine.is_empty(), "the history plants nothing for {kind}");
    for (name, hit) in &e.found {
        if mine.contains(name) {
            assert!(hit, "{kind} missed the planted {name}");
        }
    }
    for a in &alerts {
        assert!(!a.expected.is_empty() && !a.observed.is_empty(), "{a:?}");
        assert!(a.window_start_us <= a.window_end_us, "{a:?}");
        let silence = a.detector == DetectorKind::RequestRate && a.observed.contains("silence");
        assert!(silence || !a.event_ids.is_empty(), "an alert without records: {a:?}");
    }

    // Shadow mode: the same alerts, marked shadow; the same learning; nothing raised.
    let (shadow, shadow_state) = run(&only(kind, Mode::Shadow), &h.inputs, h.end_us, None);
    assert!(shadow.iter().all(|a| a.mode == Mode::Shadow), "shadow mode raised an alert");
    let unshadowed: Vec<Alert> = shadow.into_iter().map(|a| Alert { mode: Mode::Alert, ..a }).collect();
    assert_eq!(unshadowed, alerts);
    assert_eq!(shadow_state, state);

    // A restart halfway through, through the state file, changes nothing.
    let half = h.inputs.len() / 2;
    let config = only(kind, Mode::Alert);
    let mut engine = Engine::new(&config);
    let mut first: Vec<Alert> = Vec::new();
    for input in &h.inputs[..half] {
        first.extend(engine.observe(input));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("anomalies-state.json");
    engine.state().save(&path).unwrap();
    drop(engine);
    let restored = EngineState::load(&path).unwrap().unwrap();
    let (second, restored_state) = run(&config, &h.inputs[half..], h.end_us, Some(restored));
    first.extend(second);
    assert_eq!(first, alerts, "{kind}: a restart changed the alerts");
    assert_eq!(restored_state, state);
}

#[test]
fn request_rate_conforms() {
    conformance(DetectorKind::RequestRate);
}

#[test]
fn amount_conforms() {
    conformance(DetectorKind::Amount);
}

#[test]
fn refunds_conforms() {
    conformance(DetectorKind::Refunds);
}

#[test]
fn bursts_conforms() {
    conformance(DetectorKind::Bursts);
}

#[test]
fn first_seen_conforms() {
    conformance(DetectorKind::FirstSeen);
}

#[test]
fn webhook_surge_conforms() {
    conformance(DetectorKind::WebhookSurge);
}

#[test]
fn a_missing_state_file_is_none_and_a_foreign_one_is_refused_with_advice() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    assert!(EngineState::load(&path).unwrap().is_none());
    std::fs::write(&path, br#"{"version": 99}"#).unwrap();
    let e = EngineState::load(&path).unwrap_err().to_string();
    assert!(e.contains("version") && e.contains("move it aside"), "{e}");
    std::fs::write(&path, b"not json").unwrap();
    assert!(EngineState::load(&path).is_err());
    // No temporary file is left behind by a save.
    EngineState::default().save(&path).unwrap();
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

fn arb_input() -> impl Strategy<Value = Input> {
    let request = (
        any::<i64>(),
        prop::sample::select(vec!["a", "b", ""]),
        prop::option::of(prop::sample::select(vec!["POST /v1/refunds", "POST /v1/charges", "GET /v1/x"])),
        any::<u16>(),
        prop::option::of(Just("keygate_rate_limited")),
        any::<bool>(),
        prop::option::of(any::<i64>()),
        prop::option::of(prop::sample::select(vec!["usd", "eur"])),
        prop::option::of(prop::sample::select(vec!["acct_1", "acct_2"])),
        prop::option::of(any::<bool>()),
    )
        .prop_map(|(at, s, op, status, refusal, upstream, amount, currency, account, live)| {
            Input::Request(RequestInput {
                event_id: format!("e{at}"),
                at_us: at,
                service: s.to_owned(),
                operation: op.map(str::to_owned),
                status,
                refusal: refusal.map(str::to_owned),
                upstream_error: upstream,
                amount,
                currency: currency.map(str::to_owned),
                stripe_account: account.map(str::to_owned),
                livemode: live,
            })
        });
    let webhook = (any::<i64>(), prop::sample::select(vec!["charge.dispute.created", "payout.failed", "x"])).prop_map(
        |(at, t)| {
            Input::Webhook(WebhookInput {
                event_id: format!("evt_{at}"),
                at_us: at,
                service: "a".into(),
                event_type: t.into(),
                livemode: None,
            })
        },
    );
    prop_oneof![request, webhook]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any inputs, in any order, at any time (the ends of i64 included), with any amounts: no
    /// panic, and the state still round-trips through its file format.
    #[test]
    fn arbitrary_inputs_never_panic_and_state_round_trips(
        mut inputs in prop::collection::vec(arb_input(), 0..200),
        sorted in any::<bool>(),
        tiny in any::<bool>(),
    ) {
        if sorted {
            inputs.sort_by_key(Input::at_us);
        }
        let mut config = AnomaliesConfig::default();
        if tiny {
            config.max_series = 1;
            config.first_seen.max_values = 1;
            config.first_seen.learn_for = std::time::Duration::ZERO;
            config.amount.min_samples = 10;
        }
        let mut engine = Engine::new(&config);
        for input in &inputs {
            for alert in engine.observe(input) {
                prop_assert!(alert.event_ids.len() <= 20);
            }
        }
        let _ = engine.advance(i64::MAX);
        let state = engine.state();
        let json = serde_json::to_string(&state).unwrap();
        let back: EngineState = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(back, state);
    }

    /// The amount detector stays quiet on log-normal amounts of any spread and median, and flags
    /// one 100× the median once it has learned.
    #[test]
    fn amounts_clean_noise_quiet_and_100x_flagged(seed in any::<u64>(), median in 500.0f64..100_000.0, sigma in 0.2f64..0.7) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut engine = Engine::new(&only(DetectorKind::Amount, Mode::Alert));
        let mut normal = || {
            let u1: f64 = rng.random::<f64>().max(1e-300);
            let u2: f64 = rng.random();
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        };
        let input = |i: i64, amount: i64| Input::Request(RequestInput {
            event_id: format!("e{i}"),
            at_us: i * 1_000_000,
            service: "s".into(),
            operation: Some("POST /v1/charges".into()),
            status: 200,
            refusal: None,
            upstream_error: false,
            amount: Some(amount),
            currency: Some("usd".into()),
            stripe_account: None,
            livemode: Some(true),
        });
        let mut raised = 0;
        for i in 0..1000 {
            // Clipped at 4σ: the property is about the noise, not about the rare true outlier.
            let z = normal().clamp(-4.0, 4.0);
            raised += engine.observe(&input(i, (median * (sigma * z).exp()).round().max(1.0) as i64)).len();
        }
        prop_assert_eq!(raised, 0);
        let big = engine.observe(&input(1000, (median * 100.0) as i64));
        prop_assert_eq!(big.len(), 1);
        prop_assert_eq!(&big[0].event_ids, &vec!["e1000".to_owned()]);
    }
}
