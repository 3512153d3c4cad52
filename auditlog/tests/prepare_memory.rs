//! What preparing one record (redaction, serialisation, compression) takes in memory, the
//! "10 × the largest record" term of docs/deploy.md's memory formula: measured with a counting
//! allocator (`peakmem-alloc`) around `payload::prepare` for records with large Stripe-shaped JSON responses.
//! The bytes the record itself holds (its bodies) are not counted: they are in the buffer budget.
//! Measured here: 8.2 to 8.8 × for pages of 10 to 400 charges (the parsed JSON tree is most of
//! it), against the documented 10 ×.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

mod common;

use bytes::Bytes;
use keygate_auditlog::HttpMessage;
use peakmem_alloc::{INSTRUMENTED_SYSTEM, PeakMemAlloc, PeakMemAllocTrait};

/// The documented factor.
const FACTOR: usize = 10;

#[global_allocator]
static GLOBAL: &PeakMemAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

/// A page of `count` charges shaped like Stripe's (nested objects, nulls, metadata).
fn charges_page(count: usize) -> String {
    let charges: Vec<serde_json::Value> = (0..count)
        .map(|n| {
            serde_json::json!({
                "id": format!("ch_3Pq{n:020}"), "object": "charge", "amount": 1000 + n, "amount_captured": 1000 + n,
                "amount_refunded": 0, "application": null, "application_fee": null, "balance_transaction": format!("txn_{n:024}"),
                "billing_details": {"address": {"city": "Paris", "country": "FR", "line1": "1 rue de Rivoli", "line2": null,
                    "postal_code": "75001", "state": null}, "email": format!("jenny{n}@example.com"), "name": "Jenny Rosen", "phone": null},
                "captured": true, "created": 1_733_000_000 + n, "currency": "eur", "customer": format!("cus_{n:014}"),
                "description": format!("Order {n} of the autumn collection"), "disputed": false, "failure_code": null,
                "livemode": false, "metadata": {"order_id": format!("order-{n}"), "channel": "web"},
                "outcome": {"network_status": "approved_by_network", "reason": null, "risk_level": "normal",
                    "risk_score": 32, "seller_message": "Payment complete.", "type": "authorized"},
                "paid": true, "payment_intent": format!("pi_{n:024}"), "payment_method": format!("pm_{n:024}"),
                "payment_method_details": {"card": {"brand": "visa", "checks": {"address_line1_check": "pass",
                    "address_postal_code_check": "pass", "cvc_check": "pass"}, "country": "FR", "exp_month": 12,
                    "exp_year": 2030, "fingerprint": format!("fp{n:014}"), "funding": "credit", "last4": "4242",
                    "network": "visa", "three_d_secure": null}, "type": "card"},
                "receipt_email": null, "receipt_url": format!("https://pay.stripe.com/receipts/payment/{n:040}"),
                "refunded": false, "refunds": {"object": "list", "data": [], "has_more": false, "total_count": 0,
                    "url": format!("/v1/charges/ch_{n}/refunds")},
                "shipping": null, "status": "succeeded", "transfer_group": null
            })
        })
        .collect();
    serde_json::json!({"object": "list", "url": "/v1/charges", "has_more": true, "data": charges}).to_string()
}

#[test]
fn preparing_a_record_takes_at_most_ten_times_its_bodies() {
    // The thread's zstd context is made once and kept (not per record): made here first.
    keygate_auditlog::payload::prepare(&common::exchange(0), 3).expect("prepared");
    for count in [10, 100, 400] {
        let mut ex = common::exchange(count);
        let page = Bytes::from(charges_page(count));
        let size = ex.request.body.len() + page.len();
        ex.response = Some(HttpMessage {
            start_line: "HTTP/1.1 200 OK".into(),
            headers: vec![("Content-Type".into(), b"application/json".to_vec())],
            body: page,
        });
        GLOBAL.reset_peak_memory();
        let prepared = keygate_auditlog::payload::prepare(&ex, 3).expect("prepared");
        let used = GLOBAL.get_peak_memory();
        println!(
            "{count} charges, {size} bytes of bodies: {used} bytes at the peak ({:.2} ×)",
            used as f64 / size as f64
        );
        assert!(!prepared.compressed.is_empty());
        assert!(
            used <= FACTOR * size,
            "preparing a record of {size} body bytes took {used} bytes, over the documented {FACTOR} ×"
        );
    }
}
