// redsys-easy as an independent oracle for crmpay's Redsys signatures.
// Reads {"sign": [...], "verify": [...]} as JSON on stdin and writes the
// results as JSON on stdout:
//   sign:   {key, params}            -> redsys-easy's signed request triple
//                                       (order from DS_MERCHANT_ORDER)
//   verify: {key, triple}            -> true if redsys-easy accepts a signed
//                                       answer/notification (order from Ds_Order)
'use strict';
const { serializeAndSignJSONRequest, deserializeAndVerifyJSONResponse } = require('redsys-easy');

let input = '';
process.stdin.setEncoding('utf8');
process.stdin.on('data', (chunk) => { input += chunk; });
process.stdin.on('end', () => {
  const cases = JSON.parse(input);
  const signed = (cases.sign || []).map((c) => serializeAndSignJSONRequest(c.key, c.params));
  const verified = (cases.verify || []).map((c) => {
    try {
      deserializeAndVerifyJSONResponse(c.key, c.triple);
      return true;
    } catch (e) {
      return false;
    }
  });
  process.stdout.write(JSON.stringify({ sign: signed, verify: verified }));
});
