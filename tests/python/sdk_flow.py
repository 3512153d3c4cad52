"""The official Stripe Python SDK, pointed at keygate, runs an ordinary payments flow.

Usage: python sdk_flow.py BASE_URL TOKEN
Prints one JSON object with what the SDK got back; the Rust test asserts on it. Any SDK exception
is printed as {"error": {...}} with the SDK's exception class, status and Stripe error fields.
"""

import json
import sys
import uuid

import stripe


def main() -> None:
    base, token = sys.argv[1], sys.argv[2]
    client = stripe.StripeClient(
        token,
        base_addresses={"api": base, "files": base, "connect": base, "meter_events": base},
        max_network_retries=0,
    )
    out = {}
    try:
        customer = client.v1.customers.create(
            params={"email": "jenny@example.com", "name": "Jenny Rosen"}
        )
        out["customer_id"] = customer.id
        out["customer_email"] = customer.email

        method = client.v1.payment_methods.create(
            params={
                "type": "card",
                "card": {"number": "4242424242424242", "exp_month": 12, "exp_year": 2034, "cvc": "123"},
            }
        )
        idempotency_key = f"kg-e2e-{uuid.uuid4()}"
        intent = client.v1.payment_intents.create(
            params={
                "amount": 2000,
                "currency": "usd",
                "customer": customer.id,
                "payment_method": method.id,
            },
            options={"idempotency_key": idempotency_key},
        )
        out["intent_id"] = intent.id
        out["intent_created_status"] = intent.status
        confirmed = client.v1.payment_intents.confirm(
            intent.id, options={"idempotency_key": idempotency_key + "-confirm"}
        )
        out["intent_confirmed_status"] = confirmed.status
        out["idempotency_key"] = idempotency_key

        for i in range(4):
            client.v1.customers.create(params={"email": f"page{i}@example.com"})
        first = client.v1.customers.list(params={"limit": 2})
        out["first_page_size"] = len(first.data)
        out["first_page_has_more"] = first.has_more
        seen = [c.id for c in client.v1.customers.list(params={"limit": 2}).auto_paging_iter()]
        out["paginated_total"] = len(seen)
        out["paginated_unique"] = len(set(seen))
    except stripe.StripeError as error:
        out["error"] = {
            "class": type(error).__name__,
            "status": error.http_status,
            "code": error.code or ((error.json_body or {}).get("error") or {}).get("code"),
            "message": error.user_message or str(error),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
