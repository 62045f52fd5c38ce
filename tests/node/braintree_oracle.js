// Test oracle: the official braintree Node SDK's webhook code.
// Reads a JSON request on stdin, writes a JSON answer on stdout:
//   {"keys": {merchant_id, public_key, private_key},
//    "samples": [[kind, id], ...],          -> WebhookTesting.sampleNotification
//    "parse": [{bt_signature, bt_payload}],  -> WebhookNotification.parse
//    "challenge": "hex"}                      -> WebhookNotification.verify
"use strict";
const braintree = require("braintree");

async function main() {
  const input = JSON.parse(require("fs").readFileSync(0, "utf8"));
  const gateway = new braintree.BraintreeGateway({
    environment: braintree.Environment.Sandbox,
    merchantId: input.keys.merchant_id,
    publicKey: input.keys.public_key,
    privateKey: input.keys.private_key,
  });
  const out = { samples: [], parsed: [], challenge: null };
  for (const [kind, id] of input.samples || []) {
    const n = await gateway.webhookTesting.sampleNotification(kind, id);
    out.samples.push({ kind, id, bt_signature: n.bt_signature, bt_payload: n.bt_payload });
  }
  for (const d of input.parse || []) {
    try {
      const n = await gateway.webhookNotification.parse(d.bt_signature, d.bt_payload);
      out.parsed.push({ ok: true, kind: n.kind,
        transaction_id: n.transaction ? n.transaction.id : null,
        subscription_id: n.subscription ? n.subscription.id : null });
    } catch (e) {
      out.parsed.push({ ok: false, error: e.name || String(e) });
    }
  }
  if (input.challenge) {
    out.challenge = await gateway.webhookNotification.verify(input.challenge);
  }
  process.stdout.write(JSON.stringify(out));
}

main().catch((e) => { process.stderr.write(String(e.stack || e)); process.exit(1); });
