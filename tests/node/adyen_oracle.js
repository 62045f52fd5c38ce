#!/usr/bin/env node
/*
 * adyen_oracle.js: the official Adyen Node library (@adyen/api-library) as a
 * test oracle for crmpay.  Reads one JSON request on stdin, writes one JSON
 * answer on stdout:
 *
 *   {"op": "sign", "key": HEX, "items": [NotificationRequestItem...]}
 *       -> ["base64 signature", ...]            (HmacValidator.calculateHmac)
 *   {"op": "validate", "key": HEX, "items": [...]}
 *       -> [true|false|"error: ...", ...]         (HmacValidator.validateHMAC)
 *   {"op": "sign_body", "key": HEX, "bodies": ["raw body", ...]}
 *       -> ["base64 signature", ...]            (calculateHmac of a string)
 *   {"op": "validate_body", "key": HEX, "bodies": [...], "signatures": [...]}
 *       -> [true|false, ...]                      (validateHMACSignature)
 *   {"op": "bench", "key": HEX, "body": "notification JSON", "seconds": S}
 *       -> {"per_second": N, "iterations": N}  JSON.parse of the body and
 *          validateHMAC of each item, as a Node webhook handler does
 */
"use strict";

const { hmacValidator: HmacValidator } = require("@adyen/api-library");

function main(request) {
    const validator = new HmacValidator();
    switch (request.op) {
        case "sign":
            return request.items.map((item) => validator.calculateHmac(item, request.key));
        case "validate":
            return request.items.map((item) => {
                try {
                    return validator.validateHMAC(item, request.key);
                } catch (e) {
                    return "error: " + e.message;
                }
            });
        case "sign_body":
            return request.bodies.map((body) => validator.calculateHmac(body, request.key));
        case "validate_body":
            return request.bodies.map((body, i) =>
                validator.validateHMACSignature(request.key, request.signatures[i], body));
        case "bench": {
            const deadline = process.hrtime.bigint() + BigInt(Math.round(request.seconds * 1e9));
            const start = process.hrtime.bigint();
            let iterations = 0;
            let valid = 0;
            while ((iterations & 255) !== 0 || process.hrtime.bigint() < deadline) {
                const notification = JSON.parse(request.body);
                let ok = true;
                for (const wrapper of notification.notificationItems) {
                    ok = validator.validateHMAC(wrapper.NotificationRequestItem, request.key) && ok;
                }
                valid += ok ? 1 : 0;
                iterations++;
            }
            const seconds = Number(process.hrtime.bigint() - start) / 1e9;
            if (valid !== iterations) {
                throw new Error("the benchmark body does not verify with the SDK");
            }
            return { per_second: iterations / seconds, iterations: iterations };
        }
        default:
            throw new Error("unknown op " + request.op);
    }
}

let input = "";
process.stdin.setEncoding("utf8");
process.stdin.on("data", (chunk) => { input += chunk; });
process.stdin.on("end", () => {
    process.stdout.write(JSON.stringify(main(JSON.parse(input))));
});
