"""Stripe traffic for the audit lake reader test: the official Stripe Python SDK, pointed at
keygate, makes a known list of requests that carry canary secrets (a card number and CVC,
secret-shaped metadata), including one that the policy denies and one with an unknown token.

Usage: python audit_lake_traffic.py BASE_URL TOKEN BAD_TOKEN CANARIES_JSON
CANARIES_JSON: {"card_number", "cvc", "metadata_secrets": [..]}.

Prints one JSON object: {"api_version", "client_secret", "requests": [...]}, one entry per HTTP
request the SDK made (it never retries here), in order, each with the `Keygate-Event-Id` keygate
answered with and what the request was: method, path, idempotency key, amount, currency, status.
Any unexpected SDK exception is printed as {"error": ...} with exit code 1.
"""

import json
import sys
import uuid

import stripe


def main() -> None:
    base, token, bad_token = sys.argv[1], sys.argv[2], sys.argv[3]
    canaries = json.loads(sys.argv[4])
    hosts = {"api": base, "files": base, "connect": base, "meter_events": base}
    client = stripe.StripeClient(token, base_addresses=hosts, max_network_retries=0)
    # Letters between groups of at most 4 hex digits: no run of 12+ digits, which the redaction
    # would mask as a possible card number.
    hexes = uuid.uuid4().hex
    run = "r" + "x".join(hexes[i : i + 4] for i in range(0, 12, 4))
    requests = []

    def record(answer, method, path, idempotency_key=None, amount=None, currency=None):
        # A StripeResponse (`.code`) or a StripeError (`.http_status`): both carry the headers.
        if isinstance(answer, stripe.StripeError):
            status = answer.http_status
        else:
            status = answer.code
        requests.append(
            {
                "event_id": next(
                    (v for n, v in (answer.headers or {}).items() if n.lower() == "keygate-event-id"), None
                ),
                "method": method,
                "path": path,
                "status": status,
                "idempotency_key": idempotency_key,
                "amount": amount,
                "currency": currency,
            }
        )

    def key(name):
        return f"kg-lake-{run}-{name}"

    out = {"api_version": stripe.api_version}
    try:
        k = key("customer")
        customer = client.v1.customers.create(
            params={
                "email": "jenny@example.com",
                "name": "Jenny Rosen",
                "metadata": {f"note{i}": s for i, s in enumerate(canaries["metadata_secrets"])},
            },
            options={"idempotency_key": k},
        )
        record(customer.last_response, "POST", "/v1/customers", k)

        k = key("method")
        method = client.v1.payment_methods.create(
            params={
                "type": "card",
                "card": {
                    "number": canaries["card_number"],
                    "exp_month": 12,
                    "exp_year": 2034,
                    "cvc": canaries["cvc"],
                },
            },
            options={"idempotency_key": k},
        )
        record(method.last_response, "POST", "/v1/payment_methods", k)

        k = key("intent")
        intent = client.v1.payment_intents.create(
            params={"amount": 2000, "currency": "usd", "customer": customer.id, "payment_method": method.id},
            options={"idempotency_key": k},
        )
        record(intent.last_response, "POST", "/v1/payment_intents", k, 2000, "usd")
        out["client_secret"] = intent.client_secret

        k = key("confirm")
        confirmed = client.v1.payment_intents.confirm(intent.id, options={"idempotency_key": k})
        record(confirmed.last_response, "POST", f"/v1/payment_intents/{intent.id}/confirm", k)

        fetched = client.v1.customers.retrieve(customer.id)
        record(fetched.last_response, "GET", f"/v1/customers/{customer.id}")

        listed = client.v1.customers.list(params={"limit": 3})
        record(listed.last_response, "GET", "/v1/customers?limit=3")

        # Refused by keygate's policy: a deny rule.
        k = key("refund")
        try:
            client.v1.refunds.create(params={"payment_intent": intent.id}, options={"idempotency_key": k})
            raise RuntimeError("the refund was not denied")
        except stripe.PermissionError as error:
            record(error, "POST", "/v1/refunds", k)

        # Refused by keygate: a token no service holds.
        stranger = stripe.StripeClient(bad_token, base_addresses=hosts, max_network_retries=0)
        try:
            stranger.v1.customers.list()
            raise RuntimeError("the unknown token was accepted")
        except stripe.AuthenticationError as error:
            record(error, "GET", "/v1/customers")
    except (stripe.StripeError, RuntimeError) as error:
        print(json.dumps({"error": f"{type(error).__name__}: {error}", "requests": requests}))
        sys.exit(1)
    out["requests"] = requests
    print(json.dumps(out))


if __name__ == "__main__":
    main()
