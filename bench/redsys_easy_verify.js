// bench/verify_redsys.py's third contender: redsys-easy verifying the same
// notification (its processRedirectNotification path: decode, verify,
// URL-decode the values).  usage: node redsys_easy_verify.js KEY BODY_FILE N
'use strict';
const path = require('path');
const fs = require('fs');
const { createRedsysAPI, SANDBOX_URLS } = require(path.join(__dirname, '..', 'tests', 'node', 'node_modules', 'redsys-easy'));

const [key, file, n] = process.argv.slice(2);
const raw = fs.readFileSync(file, 'utf8');
const api = createRedsysAPI({ secretKey: key, urls: SANDBOX_URLS });
const iterations = Number(n);
const t0 = process.hrtime.bigint();
for (let i = 0; i < iterations; i++) {
  // the form decoding is part of the work, as in crmpay
  const triple = Object.fromEntries(new URLSearchParams(raw));
  api.processRedirectNotification(triple);
}
const secs = Number(process.hrtime.bigint() - t0) / 1e9;
process.stdout.write(String(iterations / secs));
