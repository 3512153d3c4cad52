// Every request shape the official Stripe Node SDK sends, through keygate to a recording fake.
// Usage: node sdk_shapes.mjs HOST PORT TOKEN. Prints one JSON line per call:
// {"call", "outcome": "ok" | "stripe_error" | "client_error", "code"}; a `stripe_error` with a
// `keygate_…` code means keygate refused what the SDK sent.
import { createRequire } from "node:module";
import path from "node:path";

const require = createRequire(path.join(process.env.KEYGATE_NODE_MODULES, "noop.js"));
const Stripe = require("stripe");

const [host, port, token] = process.argv.slice(2);
const stripe = new Stripe(token, { host, port: Number(port), protocol: "http", maxNetworkRetries: 0 });
const calls = [
  ["customers.create", () => stripe.customers.create({
    email: "jenny+node@example.com",
    name: "Jörg Ünïcode & Sons; \"quoted\"",
    metadata: { "order id": "A-1/2", note: "50% off=yes" },
    preferred_locales: ["de-DE", "en"],
  })],
  ["customers.list", () => stripe.customers.list({ limit: 3, created: { gte: 1700000000 }, expand: ["data.default_source"] })],
  ["customers.search", () => stripe.customers.search({ query: "email:'jenny@example.com' AND metadata['k']:'v'" })],
  ["customers.retrieve", () => stripe.customers.retrieve("cus_Node123", { expand: ["default_source"] })],
  ["customers.update", () => stripe.customers.update("cus_Node123", { metadata: { k: "" }, description: "line1\nline2" })],
  ["customers.del", () => stripe.customers.del("cus_Node123")],
  ["paymentIntents.create", () => stripe.paymentIntents.create(
    { amount: 1999, currency: "usd", payment_method_types: ["card"], metadata: { a: "b" } },
    { idempotencyKey: "node-shapes-1", stripeAccount: "acct_1NodeConnected", apiVersion: "2025-07-30.basil" },
  )],
  ["paymentIntents.confirm", () => stripe.paymentIntents.confirm("pi_Node123")],
  ["coupons.retrieve (user-chosen id)", () => stripe.coupons.retrieve("SUMMER-25_off")],
  ["files.create (multipart)", () => stripe.files.create({
    purpose: "dispute_evidence",
    file: { data: Buffer.from("%PDF-1.4\r\n--not-a-boundary\r\n%%EOF"), name: "evidence.pdf", type: "application/pdf" },
  })],
  ["v2.billing.meterEvents.create (JSON)", () => stripe.v2.billing.meterEvents.create({
    event_name: "api_calls",
    payload: { stripe_customer_id: "cus_Node123", value: "25" },
  })],
];
for (const [name, call] of calls) {
  try {
    await call();
    console.log(JSON.stringify({ call: name, outcome: "ok" }));
  } catch (error) {
    if (error && error.type && String(error.type).startsWith("Stripe")) {
      console.log(JSON.stringify({ call: name, outcome: "stripe_error", code: error.code || null, message: error.message }));
    } else {
      console.log(JSON.stringify({ call: name, outcome: "client_error", code: String(error && error.name) }));
    }
  }
}
