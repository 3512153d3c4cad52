// Posts Stripe webhook events to keygate's ingress, each signed with the official Stripe Node
// SDK's test helper (`stripe.webhooks.generateTestHeaderString`), as Stripe would.
// Usage: node webhook_sender.mjs < SPEC.json   Prints one JSON object; the Rust test asserts on it.
//
// SPEC: {"url": "http://127.0.0.1:PORT/webhooks/stripe/main", "cases": [CASE…]} posts each case
// once, in order. CASE: {"payload": "<event JSON>", "secret": "whsec_…", "timestamp": <unix s>?,
// "header": "sign" | "none" | "v0only" | "raw", "raw": "<header>"?, "body": "<sent instead>"?,
// "secrets": ["whsec_…", …]? (one v1 per secret, as Stripe sends while a secret rolls),
// "headers": {name: value}? (extra request headers)}.
// Output: {"results": [{"status": 200, "body": "…"}, …]}.
//
// Or SPEC: {"url", "flood": {"count": N, "secret", "concurrency", "deadline_ms", "types": [...],
// "prefix": "evt_…", "until_file"?: PATH, "pace_ms"?: MS}}: N distinct events posted concurrently,
// each retried on any non-2xx or connection error (like Stripe, but within seconds) until a 2xx or
// the deadline. With `until_file`, workers go on posting new events after the first N until that
// file exists (so that a caller's fault rounds all happen under traffic, however fast the machine);
// `pace_ms` is each worker's pause after each event. Output:
// {"acked": ["evt_…", …], "unacked": [...], "attempts": <total posts>}.
import { existsSync } from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";

const require = createRequire(path.join(process.env.KEYGATE_NODE_MODULES, "noop.js"));
const Stripe = require("stripe");
const stripe = new Stripe("sk_test_unused");

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const spec = JSON.parse(Buffer.concat(chunks).toString("utf8"));

function signed(payload, secret, timestamp) {
  return stripe.webhooks.generateTestHeaderString({ payload, secret, timestamp });
}

async function post(url, body, header, extra = {}) {
  const headers = { "content-type": "application/json; charset=utf-8", "user-agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)", ...extra };
  if (header !== null) headers["stripe-signature"] = header;
  const response = await fetch(url, { method: "POST", headers, body, signal: AbortSignal.timeout(5000) });
  return { status: response.status, body: await response.text() };
}

function headerFor(c) {
  const now = Math.floor(Date.now() / 1000);
  const timestamp = c.timestamp ?? now;
  switch (c.header ?? "sign") {
    case "none":
      return null;
    case "raw":
      return c.raw;
    case "v0only":
      return signed(c.payload, c.secret, timestamp).replace("v1=", "v0=");
    default: {
      const secrets = c.secrets ?? [c.secret];
      const parts = secrets.map((s) => signed(c.payload, s, timestamp).split(",")[1]);
      return `t=${timestamp},${parts.join(",")}`;
    }
  }
}

if (spec.cases) {
  const results = [];
  for (const c of spec.cases) {
    try {
      results.push(await post(spec.url, c.body ?? c.payload, headerFor(c), c.headers ?? {}));
    } catch (error) {
      results.push({ status: 0, body: String(error) });
    }
  }
  console.log(JSON.stringify({ results }));
} else {
  const f = spec.flood;
  const deadline = Date.now() + f.deadline_ms;
  const types = f.types ?? ["invoice.paid"];
  const acked = [];
  const unacked = [];
  let attempts = 0;
  let next = 0;
  const more = () => next < f.count || (f.until_file !== undefined && !existsSync(f.until_file) && Date.now() < deadline);
  async function worker() {
    while (more()) {
      const i = next++;
      const id = `${f.prefix}${i}`;
      const payload = JSON.stringify({ id, object: "event", type: types[i % types.length], created: Math.floor(Date.now() / 1000), livemode: false, api_version: "2024-06-20", data: { object: { id: `in_${i}`, object: "invoice" } } });
      let done = false;
      let delay = 20;
      while (!done && Date.now() < deadline) {
        attempts++;
        try {
          // Every retry is signed anew, as Stripe does.
          const r = await post(spec.url, payload, headerFor({ payload, secret: f.secret }));
          if (r.status >= 200 && r.status < 300) done = true;
        } catch (_) {
          // Connection refused or reset while keygate restarts: retry.
        }
        if (!done) {
          await new Promise((resolve) => setTimeout(resolve, delay));
          delay = Math.min(delay * 2, 250);
        }
      }
      (done ? acked : unacked).push(id);
      if (f.pace_ms) await new Promise((resolve) => setTimeout(resolve, f.pace_ms));
    }
  }
  await Promise.all(Array.from({ length: f.concurrency }, worker));
  console.log(JSON.stringify({ acked, unacked, attempts }));
}
