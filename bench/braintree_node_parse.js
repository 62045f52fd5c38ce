// bench/verify_paypal_braintree.py: the braintree Node SDK's
// webhookNotification.parse (verify + decode + XML parse) in a loop.
// usage: node braintree_node_parse.js SDK_DIR PUBLIC PRIVATE SIG PAYLOAD_FILE ITERATIONS
"use strict";
const [sdkDir, pub, priv, sig, payloadFile, iterations] = process.argv.slice(2);
const braintree = require(sdkDir);
const payload = require("fs").readFileSync(payloadFile, "utf8");
const gateway = new braintree.BraintreeGateway({
  environment: braintree.Environment.Sandbox, merchantId: "bench", publicKey: pub, privateKey: priv,
});
(async () => {
  const n = parseInt(iterations, 10);
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < n; i++) {
    await gateway.webhookNotification.parse(sig, payload);
  }
  const secs = Number(process.hrtime.bigint() - t0) / 1e9;
  process.stdout.write((n / secs).toFixed(1) + "\n");
})().catch((e) => { process.stderr.write(String(e)); process.exit(1); });
