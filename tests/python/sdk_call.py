"""One call through the official Stripe Python SDK; prints the result or the SDK's exception.

Usage: python sdk_call.py BASE_URL TOKEN RESOURCE METHOD [JSON_PARAMS] [JSON_OPTIONS]
e.g.   python sdk_call.py http://127.0.0.1:8080 sk_kg_… payment_intents create '{"amount": 500, "currency": "usd"}'
"""

import json
import sys

import stripe


def main() -> None:
    base, token, resource, method = sys.argv[1:5]
    params = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
    options = json.loads(sys.argv[6]) if len(sys.argv) > 6 else {}
    client = stripe.StripeClient(
        token,
        base_addresses={"api": base, "files": base, "connect": base, "meter_events": base},
        max_network_retries=0,
    )
    target = client.v1
    for part in resource.split("."):
        target = getattr(target, part)
    try:
        result = getattr(target, method)(params=params, options=options)
        print(json.dumps({"ok": True, "id": getattr(result, "id", None), "object": getattr(result, "object", None)}))
    except stripe.StripeError as error:
        print(
            json.dumps(
                {
                    "ok": False,
                    "class": type(error).__name__,
                    "status": error.http_status,
                    "code": error.code or ((error.json_body or {}).get("error") or {}).get("code"),
                    "message": error.user_message or str(error),
                }
            )
        )


if __name__ == "__main__":
    main()
