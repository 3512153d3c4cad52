"""Every request shape the official Stripe Python SDK sends, through keygate to a recording fake.

Usage: python sdk_shapes.py BASE_URL TOKEN
Prints one JSON line per call: {"call", "outcome": "ok" | "stripe_error" | "client_error", "code"}.
A `stripe_error` with a `keygate_…` code means keygate refused what the SDK sent; a
`client_error` is the SDK failing to read the fake's canned answer, after keygate forwarded it.
"""

import io
import json
import sys

import stripe


def main() -> None:
    base, token = sys.argv[1:3]
    client = stripe.StripeClient(
        token,
        base_addresses={"api": base, "files": base, "connect": base, "meter_events": base},
        max_network_retries=0,
    )
    v1 = client.v1
    calls = [
        ("customers.create", lambda: v1.customers.create(params={
            "email": "jenny+sdk@example.com",
            "name": "Jörg Ünïcode & Sons; \"quoted\"",
            "metadata": {"order id": "A-1/2", "note": "50% off=yes"},
            "preferred_locales": ["de-DE", "en"],
        })),
        ("customers.list", lambda: v1.customers.list(params={"limit": 3, "created": {"gte": 1700000000}, "expand": ["data.default_source"]})),
        ("customers.search", lambda: v1.customers.search(params={"query": "email:'jenny@example.com' AND metadata['k']:'v'"})),
        ("customers.retrieve", lambda: v1.customers.retrieve("cus_Sdk123", params={"expand": ["default_source"]})),
        ("customers.update", lambda: v1.customers.update("cus_Sdk123", params={"metadata": {"k": ""}, "description": "line1\nline2"})),
        ("customers.delete", lambda: v1.customers.delete("cus_Sdk123")),
        ("payment_intents.create", lambda: v1.payment_intents.create(
            params={"amount": 1999, "currency": "usd", "payment_method_types": ["card"], "metadata": {"a": "b"}},
            options={"idempotency_key": "sdk-shapes-1", "stripe_account": "acct_1SdkConnected", "stripe_version": "2025-07-30.basil"},
        )),
        ("payment_intents.confirm", lambda: v1.payment_intents.confirm("pi_Sdk123")),
        ("coupons.retrieve (user-chosen id)", lambda: v1.coupons.retrieve("SUMMER-25_off")),
        ("files.create (multipart)", lambda: v1.files.create(params={
            "purpose": "dispute_evidence",
            "file": io.BytesIO(b"%PDF-1.4\r\n--not-a-boundary\r\n%%EOF"),
        })),
        ("v2.billing.meter_events.create (JSON)", lambda: client.v2.billing.meter_events.create(params={
            "event_name": "api_calls",
            "payload": {"stripe_customer_id": "cus_Sdk123", "value": "25"},
        })),
    ]
    for name, call in calls:
        try:
            call()
            print(json.dumps({"call": name, "outcome": "ok"}))
        except stripe.StripeError as error:
            code = error.code or ((error.json_body or {}).get("error") or {}).get("code")
            print(json.dumps({"call": name, "outcome": "stripe_error", "code": code, "message": str(error)}))
        except Exception as error:  # the SDK could not read the fake's canned answer
            print(json.dumps({"call": name, "outcome": "client_error", "code": type(error).__name__}))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
