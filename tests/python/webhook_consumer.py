"""A webhook consumer as a keygate user writes it: the official Stripe Python SDK's
`stripe.Webhook.construct_event` (snapshot events) or `StripeClient.parse_event_notification`
(thin events) with the destination secret keygate gave it.

Usage: python webhook_consumer.py SECRET OUT_FILE
Prints the port it listens on (127.0.0.1, chosen by the OS) as its first line. Each verified
delivery is appended to OUT_FILE as one JSON line {"event_id", "stripe_event_id", "type",
"attempt"} (for a keygate anomaly alert also the alert's "alert_id", "service", "mode", "subject"
and "cited" event ids) and answered 200; a delivery that fails verification is recorded as {"error": ...}
and answered 400. While the file OUT_FILE + ".down" exists, every delivery is answered 503 and
not recorded (the consumer is "down").
"""

import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import stripe

SECRET, OUT = sys.argv[1], sys.argv[2]
LOCK = threading.Lock()
# Thin events are verified through a client; it makes no API call here.
CLIENT = stripe.StripeClient("sk_test_consumer_never_calls_stripe")


def record(line: dict) -> None:
    with LOCK, open(OUT, "a", encoding="utf-8") as out:
        out.write(json.dumps(line) + "\n")


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        length = int(self.headers.get("content-length", "0"))
        payload = self.rfile.read(length)
        if os.path.exists(OUT + ".down"):
            self.answer(503)
            return
        signature = self.headers.get("stripe-signature", "")
        try:
            if b'"v2.core.event"' in payload:
                notification = CLIENT.parse_event_notification(payload, signature, SECRET)
                stripe_id, event_type = notification.id, notification.type
            else:
                event = stripe.Webhook.construct_event(payload, signature, SECRET)
                stripe_id, event_type = event["id"], event["type"]
        except Exception as error:  # noqa: BLE001 (any failure is a refused delivery)
            record({"error": type(error).__name__})
            self.answer(400)
            return
        line = {
            "event_id": self.headers.get("keygate-event-id"),
            "stripe_event_id": stripe_id,
            "type": event_type,
            "attempt": self.headers.get("keygate-delivery-attempt"),
        }
        if event_type.startswith("keygate.anomaly."):
            # keygate's anomaly alerts: the alert is the event's object.
            alert = event["data"]["object"]
            line.update(
                alert_id=alert["id"],
                service=alert["service"],
                mode=alert["mode"],
                subject=alert["subject"],
                cited=list(alert["event_ids"]),
            )
        record(line)
        self.answer(200)

    def answer(self, status: int) -> None:
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:  # quiet
        pass


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
