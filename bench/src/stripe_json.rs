//! The fixed Stripe-shaped JSON the fake upstream answers: about 1.5 KiB each, the size of a
//! typical PaymentIntent or Customer object, so that the proxies copy (and keygate audits) a
//! realistic response.

/// `POST /v1/payment_intents` answer: a PaymentIntent.
pub const PAYMENT_INTENT: &str = r#"{
  "id": "pi_3PbenchKeygate0001",
  "object": "payment_intent",
  "amount": 2000,
  "amount_capturable": 0,
  "amount_details": {"tip": {}},
  "amount_received": 0,
  "application": null,
  "application_fee_amount": null,
  "automatic_payment_methods": {"allow_redirects": "always", "enabled": true},
  "canceled_at": null,
  "cancellation_reason": null,
  "capture_method": "automatic_async",
  "client_secret": "pi_3PbenchKeygate0001_secret_benchbenchbenchbench",
  "confirmation_method": "automatic",
  "created": 1767225600,
  "currency": "usd",
  "customer": "cus_PbenchKeygate01",
  "description": "Order 4242 from the keygate benchmark",
  "invoice": null,
  "last_payment_error": null,
  "latest_charge": null,
  "livemode": false,
  "metadata": {"order_id": "4242", "cart": "bench-cart-0001", "channel": "web"},
  "next_action": null,
  "on_behalf_of": null,
  "payment_method": null,
  "payment_method_configuration_details": {"id": "pmc_1PbenchKeygate0001", "parent": null},
  "payment_method_options": {
    "card": {"installments": null, "mandate_options": null, "network": null, "request_three_d_secure": "automatic"},
    "link": {"persistent_token": null}
  },
  "payment_method_types": ["card", "link"],
  "processing": null,
  "receipt_email": "jenny.rosen@example.com",
  "review": null,
  "setup_future_usage": null,
  "shipping": {
    "address": {"city": "San Francisco", "country": "US", "line1": "510 Townsend St", "line2": null, "postal_code": "94103", "state": "CA"},
    "carrier": null, "name": "Jenny Rosen", "phone": null, "tracking_number": null
  },
  "source": null,
  "statement_descriptor": null,
  "statement_descriptor_suffix": null,
  "status": "requires_payment_method",
  "transfer_data": null,
  "transfer_group": null
}
"#;

/// `GET /v1/customers/{id}` answer: a Customer.
pub const CUSTOMER: &str = r#"{
  "id": "cus_PbenchKeygate01",
  "object": "customer",
  "address": {"city": "San Francisco", "country": "US", "line1": "510 Townsend St", "line2": null, "postal_code": "94103", "state": "CA"},
  "balance": 0,
  "cash_balance": null,
  "created": 1767225600,
  "currency": "usd",
  "default_source": null,
  "delinquent": false,
  "description": "Customer of the keygate benchmark",
  "discount": null,
  "email": "jenny.rosen@example.com",
  "invoice_credit_balance": {},
  "invoice_prefix": "BENCH01",
  "invoice_settings": {
    "custom_fields": null,
    "default_payment_method": "pm_1PbenchKeygateCard01",
    "footer": null,
    "rendering_options": null
  },
  "livemode": false,
  "metadata": {"account_tier": "gold", "crm_id": "crm-000-4242", "region": "us-west", "signup_source": "checkout"},
  "name": "Jenny Rosen",
  "next_invoice_sequence": 17,
  "phone": "+14155550100",
  "preferred_locales": ["en-US", "fr-FR"],
  "shipping": {
    "address": {"city": "San Francisco", "country": "US", "line1": "510 Townsend St", "line2": "Floor 4", "postal_code": "94103", "state": "CA"},
    "name": "Jenny Rosen",
    "phone": "+14155550100"
  },
  "sources": {"object": "list", "data": [], "has_more": false, "total_count": 0, "url": "/v1/customers/cus_PbenchKeygate01/sources"},
  "subscriptions": {"object": "list", "data": [], "has_more": false, "total_count": 0, "url": "/v1/customers/cus_PbenchKeygate01/subscriptions"},
  "tax_exempt": "none",
  "tax_ids": {"object": "list", "data": [], "has_more": false, "total_count": 0, "url": "/v1/customers/cus_PbenchKeygate01/tax_ids"},
  "test_clock": null
}
"#;

/// The answer to any other path: Stripe's error shape.
pub const NOT_FOUND: &str = r#"{"error":{"type":"invalid_request_error","message":"Unrecognized request URL. The benchmark upstream serves POST /v1/payment_intents and GET /v1/customers/{id}."}}"#;

/// The answer when the injected key is missing or wrong.
pub const UNAUTHORIZED: &str = r#"{"error":{"type":"invalid_request_error","message":"Invalid API Key provided (the benchmark upstream expected the key given with --require-key)."}}"#;

/// A form body of exactly `len` bytes (at least 120) shaped like an SDK's
/// `POST /v1/payment_intents`: known parameters, then a metadata note padded to the length.
pub fn payment_intent_form(len: usize) -> String {
    let mut body = String::from(
        "amount=2000&currency=usd&customer=cus_PbenchKeygate01&payment_method_types[0]=card\
         &description=Order%204242&metadata[order_id]=4242&metadata[note]=",
    );
    while body.len() < len {
        body.push('x');
    }
    body.truncate(len.max(120));
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_stripe_sized_json() {
        for (name, text) in [("payment intent", PAYMENT_INTENT), ("customer", CUSTOMER)] {
            let value: serde_json::Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(value["id"].is_string() && value["object"].is_string(), "{name} lacks id/object");
            assert!((1300..=1800).contains(&text.len()), "{name} is {} bytes, not about 1.5 KiB", text.len());
        }
        let error: serde_json::Value = serde_json::from_str(NOT_FOUND).expect("error JSON");
        assert_eq!(error["error"]["type"], "invalid_request_error");
    }

    #[test]
    fn form_body_has_the_asked_length_and_real_parameters() {
        let body = payment_intent_form(1024);
        assert_eq!(body.len(), 1024);
        assert!(body.starts_with("amount=2000&currency=usd"));
    }
}
