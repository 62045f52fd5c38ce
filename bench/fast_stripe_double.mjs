// A minimal, fast Stripe double for the outbox throughput benchmark.
//
// tests/doubles/stripe_double.py is the faithful double (one Python process,
// a thread per connection); at about 1,000 requests a second it is slower
// than the worker it would measure.  This one implements only what the
// benchmark exercises, with the same wire format: POST
// /v1/checkout/sessions with "Authorization: Bearer <key>", a form body and
// an Idempotency-Key (same key and body: the stored answer is replayed; a
// key still in flight: 409), answering after a fixed latency from Node's
// event loop over HTTPS keep-alive connections.
//
//   node bench/fast_stripe_double.mjs --cert C --key K --api-key sk_test_x \
//        [--port 0] [--latency-ms 20]
// prints "ready https://127.0.0.1:PORT" once listening.
//   GET /_double/stats -> {"requests", "sessions_created", "replays",
//        "conflicts", "keys", "max_objects_per_key"}
//   POST /_double/reset
import { createServer } from "node:https";
import { readFileSync } from "node:fs";
import { randomBytes } from "node:crypto";

const args = Object.fromEntries(
  process.argv.slice(2).reduce((pairs, arg, i, all) => {
    if (arg.startsWith("--")) pairs.push([arg.slice(2), all[i + 1]]);
    return pairs;
  }, []),
);
const latencyMs = Number(args["latency-ms"] ?? 20);
const apiKey = args["api-key"];

let stats;
let idempotency; // key -> {state: "running" | "done", body, payload}
let perKey; // key -> objects created
function reset() {
  stats = { requests: 0, sessions_created: 0, replays: 0, conflicts: 0 };
  idempotency = new Map();
  perKey = new Map();
}
reset();

function send(res, status, obj) {
  const body = JSON.stringify(obj);
  res.writeHead(status, {
    "Content-Type": "application/json",
    "Content-Length": Buffer.byteLength(body),
    "Request-Id": "req_" + randomBytes(7).toString("hex"),
  });
  res.end(body);
}

function stripeError(res, status, message, type = "invalid_request_error") {
  send(res, status, { error: { message, type } });
}

const server = createServer(
  { cert: readFileSync(args.cert), key: readFileSync(args.key), keepAliveTimeout: 120000 },
  (req, res) => {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => handle(req, res, Buffer.concat(chunks).toString("utf8")));
  },
);
server.headersTimeout = 130000;
server.keepAliveTimeout = 120000;

function handle(req, res, body) {
  const url = req.url;
  if (url === "/_double/stats") {
    let max = 0;
    for (const n of perKey.values()) max = Math.max(max, n);
    return send(res, 200, { ...stats, keys: perKey.size, max_objects_per_key: max });
  }
  if (url === "/_double/reset" && req.method === "POST") {
    reset();
    return send(res, 200, { ok: true });
  }
  stats.requests++;
  if (req.method !== "POST" || url !== "/v1/checkout/sessions")
    return stripeError(res, 404, `Unrecognized request URL (${req.method}: ${url}).`);
  if (req.headers.authorization !== `Bearer ${apiKey}`)
    return stripeError(res, 401, "Invalid API Key provided");
  const params = new URLSearchParams(body);
  for (const required of ["mode", "success_url", "line_items[0][price_data][currency]"])
    if (!params.has(required)) return stripeError(res, 400, `Missing required param: ${required}.`);
  const key = req.headers["idempotency-key"];
  if (key !== undefined) {
    const seen = idempotency.get(key);
    if (seen?.state === "done") {
      if (seen.body !== body)
        return stripeError(res, 400, "Keys for idempotent requests can only be used with the same parameters they were first used with.", "idempotency_error");
      stats.replays++;
      return setTimeout(() => send(res, 200, seen.payload), latencyMs);
    }
    if (seen?.state === "running") {
      stats.conflicts++;
      return stripeError(res, 409, "There is currently another in-progress request using this Stripe-Idempotency-Key.");
    }
    idempotency.set(key, { state: "running" });
  }
  setTimeout(() => {
    const id = "cs_test_" + randomBytes(24).toString("hex");
    const payload = {
      id,
      object: "checkout.session",
      amount_total: Number(params.get("line_items[0][price_data][unit_amount]")),
      client_reference_id: params.get("client_reference_id"),
      currency: params.get("line_items[0][price_data][currency]"),
      customer_email: params.get("customer_email"),
      expires_at: Math.floor(Date.now() / 1000) + 86400,
      mode: "payment",
      payment_status: "unpaid",
      status: "open",
      success_url: params.get("success_url"),
      url: `${baseUrl}/c/pay/${id}`,
    };
    stats.sessions_created++;
    if (key !== undefined) {
      perKey.set(key, (perKey.get(key) ?? 0) + 1);
      idempotency.set(key, { state: "done", body, payload });
    }
    send(res, 200, payload);
  }, latencyMs);
}

let baseUrl;
server.listen(Number(args.port ?? 0), "127.0.0.1", () => {
  baseUrl = `https://127.0.0.1:${server.address().port}`;
  console.log(`ready ${baseUrl}`);
});
