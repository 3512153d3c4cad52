// The official Stripe Node SDK, pointed at keygate through its single `host` setting, runs an
// ordinary payments flow. Usage: node sdk_flow.mjs HOST PORT TOKEN
// Prints one JSON object; the Rust test asserts on it.
import { createRequire } from "node:module";
import path from "node:path";

const require = createRequire(path.join(process.env.KEYGATE_NODE_MODULES, "noop.js"));
const Stripe = require("stripe");

const [host, port, token] = process.argv.slice(2);
const stripe = new Stripe(token, { host, port: Number(port), protocol: "http", maxNetworkRetries: 0 });
const out = {};
try {
  const customer = await stripe.customers.create({ email: "node@example.com" });
  out.customer_id = customer.id;
  const method = await stripe.paymentMethods.create({
    type: "card",
    card: { number: "4242424242424242", exp_month: 12, exp_year: 2034, cvc: "123" },
  });
  const key = `kg-node-${Date.now()}-${Math.random()}`;
  const intent = await stripe.paymentIntents.create(
    { amount: 1500, currency: "eur", customer: customer.id, payment_method: method.id },
    { idempotencyKey: key },
  );
  out.intent_id = intent.id;
  const confirmed = await stripe.paymentIntents.confirm(intent.id, {}, { idempotencyKey: key + "-confirm" });
  out.intent_confirmed_status = confirmed.status;
  for (let i = 0; i < 3; i++) await stripe.customers.create({ email: `n${i}@example.com` });
  const seen = [];
  for await (const c of stripe.customers.list({ limit: 2 })) seen.push(c.id);
  out.paginated_total = seen.length;
  out.paginated_unique = new Set(seen).size;
} catch (error) {
  out.error = { type: error.type, status: error.statusCode, code: error.code, message: error.message };
}
console.log(JSON.stringify(out));
