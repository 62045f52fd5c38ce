-- Reconciliation on hand-made data: report imports (Adyen settlement
-- details, Redsys operations export), every discrepancy kind, healing
-- through the state machine, every bad-input error with its line, runs,
-- schedules and privileges.  The Stripe listing is in tests/test_reconcile.py.
\set VERBOSITY default
\set SHOW_CONTEXT never
\pset null '(null)'
SET timezone = 'UTC';

SELECT crmpay.add_account('ady1', 'adyen', '{"api_key": "AQE_regress_key"}', NULL,
                          '{"merchant_account": "ShopECOM", "return_url": "https://shop.example/paid"}');
-- rsys1 reconciles from imported reports only (no status queries: no network here)
SELECT crmpay.add_account('rsys1', 'redsys', '{"merchant_key": "sq7HjrUOBfKmC576ILgskD5srU870gJ7"}', NULL,
                          '{"merchant_code": "999008881", "terminal": "1", "notification_url": "https://crm.example/redsys/notify",
                            "reconcile_sources": []}');

-- CRM payments of 1 March 2024 (status as the webhooks left them)
INSERT INTO crmpay.payments (account, order_ref, amount_minor, currency, status, idempotency_key,
                             created_at, refunded_minor)
VALUES ('ady1', 'A-OK',      1000, 'EUR', 'paid', 'a1', '2024-03-01 10:00+00', 0),  -- clean
       ('ady1', 'A-LOST',    2000, 'EUR', 'open', 'a2', '2024-03-01 10:05+00', 0),  -- lost webhook
       ('ady1', 'A-NOGW',    3000, 'EUR', 'paid', 'a3', '2024-03-01 10:06+00', 0),  -- missing at gateway
       ('ady1', 'A-AMOUNT',  4000, 'EUR', 'open', 'a4', '2024-03-01 10:07+00', 0),  -- amount mismatch
       ('ady1', 'A-REFUND',  5000, 'EUR', 'paid', 'a5', '2024-03-01 10:08+00', 0),  -- refunded at gateway
       ('ady1', 'A-DUP',     6000, 'EUR', 'paid', 'a6', '2024-03-01 10:09+00', 0),  -- duplicate
       ('ady1', 'A-CUR',     7000, 'USD', 'paid', 'a7', '2024-03-01 10:10+00', 0),  -- currency mismatch
       ('ady1', 'A-FAKE',    8000, 'EUR', 'paid', 'a8', '2024-03-01 10:11+00', 0),  -- paid in CRM only
       ('ady1', 'A-OPEN',    9000, 'EUR', 'open', 'a9', '2024-03-01 10:12+00', 0),  -- nothing yet: fine
       ('ady1', 'A-OLD',     1100, 'EUR', 'open', 'a10', '2024-02-20 09:00+00', 0); -- link older than the window

-- Adyen settlement details report: header, transactions, fees, payout
\set adyen_header 'Company Account,Merchant Account,Psp Reference,Merchant Reference,Payment Method,Creation Date,TimeZone,Type,Modification Reference,Gross Currency,Gross Debit (GC),Gross Credit (GC),Exchange Rate,Net Currency,Net Debit (NC),Net Credit (NC),Commission (NC),Markup (NC),Scheme Fees (NC),Interchange (NC),Payment Method Variant,Modification Merchant Reference,Batch Number,Reserved4,Reserved5,Reserved6,Reserved7,Reserved8,Reserved9,Reserved10'
SELECT crmpay.import_report('ady1', 'adyen_settlement_details', :'adyen_header' || E'\n' ||
$csv$Co,ShopECOM,8815000000000001,A-OK,visa,2024-03-01 11:00:00,CET,Settled,8825000000000001,EUR,,10.00,1,EUR,,9.75,,0.10,0.05,0.10,visa,,7,,,,,,,
Co,ShopECOM,8815000000000002,A-LOST,mc,2024-03-01 11:05:00,CET,Settled,8825000000000002,EUR,,20.00,1,EUR,,19.50,,0.20,0.10,0.20,mc,,7,,,,,,,
Co,ShopECOM,8815000000000004,A-AMOUNT,visa,2024-03-01 11:07:00,CET,Settled,8825000000000004,EUR,,41.00,1,EUR,,40.00,,0.50,0.20,0.30,visa,,7,,,,,,,
Co,ShopECOM,8815000000000005,A-REFUND,visa,2024-03-01 11:08:00,CET,Settled,8825000000000005,EUR,,50.00,1,EUR,,49.00,,0.50,0.20,0.30,visa,,7,,,,,,,
Co,ShopECOM,8815000000000005,A-REFUND,visa,2024-03-01 15:00:00,CET,Refunded,8825000000000015,EUR,20.00,,1,EUR,20.00,,,,,,visa,,7,,,,,,,
Co,ShopECOM,8815000000000006,A-DUP,visa,2024-03-01 11:09:00,CET,Settled,8825000000000006,EUR,,60.00,1,EUR,,59.00,,0.50,0.20,0.30,visa,,7,,,,,,,
Co,ShopECOM,8815000000000016,A-DUP,visa,2024-03-01 11:09:30,CET,Settled,8825000000000016,EUR,,60.00,1,EUR,,59.00,,0.50,0.20,0.30,visa,,7,,,,,,,
Co,ShopECOM,8815000000000007,A-CUR,visa,2024-03-01 11:10:00,CET,Settled,8825000000000007,EUR,,70.00,1,EUR,,69.00,,0.50,0.20,0.30,visa,,7,,,,,,,
Co,ShopECOM,8815000000000008,A-GHOST,visa,2024-03-01 11:11:00,CET,Settled,8825000000000008,EUR,,80.00,1,EUR,,79.00,,0.50,0.20,0.30,visa,,7,,,,,,,
Co,ShopECOM,8815000000000010,A-OLD,visa,2024-03-01 11:12:00,CET,Settled,8825000000000010,EUR,,11.00,1,EUR,,10.80,,0.10,0.05,0.05,visa,,7,,,,,,,
Co,ShopECOM,,,,2024-03-01 23:00:00,CET,Fee,Transaction Fees March 2024,,,,,EUR,5.00,,,,,,,,7,,,,,,,
Co,ShopECOM,,,,2024-03-01 23:30:00,CET,MerchantPayout,"Payout of batch 7, to NL13TEST0123456789",,,,,EUR,300.00,,,,,,,,7,,,,,,,
$csv$) AS import_id \gset
SELECT format, source, lines, records, duplicates, first_at, last_at, length(sha256) AS sha256_len
  FROM crmpay.report_imports WHERE id = :import_id;
SELECT line_no, record_type, record_ref, match_key, status, amount_minor, currency, fin_currency,
       fin_amount_minor, fee_minor, net_minor, occurred_at
  FROM crmpay.gateway_records WHERE import_id = :import_id ORDER BY line_no;

-- without healing: a report for a person, nothing changes
SELECT crmpay.reconcile('ady1', '2024-03-01 00:00+00', '2024-03-02 00:00+00') AS run1 \gset
SELECT status, mode, sources, match_on, pages_fetched, records_loaded, records_matched, payments_checked,
       discrepancies, healed, counts, totals
  FROM crmpay.reconciliation_runs WHERE id = :run1;
SELECT kind, order_ref, gateway_ref, crm_amount_minor, gateway_amount_minor, crm_currency, gateway_currency,
       crm_status, gateway_status, heal_action, healed
  FROM crmpay.reconciliation_items WHERE run_id = :run1 ORDER BY order_ref, kind;
SELECT order_ref, detail FROM crmpay.reconciliation_items WHERE run_id = :run1 ORDER BY order_ref, kind;
SELECT order_ref, status, refunded_minor FROM crmpay.payments WHERE account = 'ady1' ORDER BY order_ref;

-- with healing: exactly the lost success (also of the link older than the
-- window) and the lost refund are applied, through the state machine
SELECT crmpay.reconcile('ady1', '2024-03-01 00:00+00', '2024-03-02 00:00+00', heal => true) AS run2 \gset
SELECT kind, order_ref, heal_action, healed, changes - 'event_id' AS changes
  FROM crmpay.reconciliation_items WHERE run_id = :run2 ORDER BY order_ref, kind;
SELECT order_ref, detail FROM crmpay.reconciliation_items WHERE run_id = :run2 AND healed ORDER BY order_ref;
SELECT order_ref, status, refunded_minor, paid_at FROM crmpay.payments WHERE account = 'ady1' ORDER BY order_ref;
SELECT e.event_type, e.outcome, p.order_ref, e.old_status, e.new_status, e.http_status, e.reason
  FROM crmpay.events e JOIN crmpay.payments p ON p.id = e.payment_id
 WHERE e.account = 'ady1' ORDER BY e.id;
SELECT (SELECT healed FROM crmpay.reconciliation_runs WHERE id = :run2) AS run_healed,
       (SELECT count(*) FROM crmpay.reconciliation_items WHERE run_id = :run2 AND healed) AS items_healed;

-- a third run finds only what a person has to look at; healing again changes nothing
SELECT crmpay.reconcile('ady1', '2024-03-01 00:00+00', '2024-03-02 00:00+00', heal => true) AS run3 \gset
SELECT kind, order_ref, healed FROM crmpay.reconciliation_items WHERE run_id = :run3 ORDER BY order_ref, kind;
SELECT count(*) AS heal_events FROM crmpay.events WHERE account = 'ady1' AND event_type = 'crmpay.reconcile.heal';

-- the same report again: every line is a duplicate, nothing new
SELECT crmpay.import_report('ady1', 'adyen_settlement', :'adyen_header' || E'\n' ||
$csv$Co,ShopECOM,8815000000000001,A-OK,visa,2024-03-01 11:00:00,CET,Settled,8825000000000001,EUR,,10.00,1,EUR,,9.75,,0.10,0.05,0.10,visa,,7,,,,,,,
$csv$) AS dup_import \gset
SELECT lines, records, duplicates FROM crmpay.report_imports WHERE id = :dup_import;

-- the per-run summary
SELECT run_id = :run1 AS first, status, records_loaded, records_matched, missing_in_crm, missing_at_gateway,
       amount_mismatch, currency_mismatch, status_mismatch, duplicate_payment, refunded_at_gateway, healed
  FROM crmpay.reconciliation_summary WHERE account = 'ady1' ORDER BY run_id;
SELECT * FROM crmpay.reconciliation_progress;

-- ---------------------------------------------------------------------
-- Bad input: a clear error naming the line, and nothing of the import kept
-- ---------------------------------------------------------------------
CREATE TEMP TABLE before AS
    SELECT (SELECT count(*) FROM crmpay.report_imports) AS imports,
           (SELECT count(*) FROM crmpay.gateway_records) AS records;
CREATE FUNCTION pg_temp.unchanged() RETURNS boolean LANGUAGE sql AS $$
    SELECT (SELECT count(*) FROM crmpay.report_imports) = imports
       AND (SELECT count(*) FROM crmpay.gateway_records) = records FROM before $$;
\set ok_line 'Co,ShopECOM,8815000000000091,B-1,visa,2024-03-02 11:00:00,CET,Settled,8825000000000091,EUR,,10.00,1,EUR,,9.75,,0.10,0.05,0.10,visa,,7,,,,,,,'
-- the file is cut short in the middle of its third line
SELECT crmpay.import_report('ady1', 'adyen_settlement_details',
    :'adyen_header' || E'\n' || :'ok_line' || E'\n' || :'ok_line' || E'\nCo,ShopECOM,8815000000000092,B-2,visa,2024-03-02 11:00');
SELECT pg_temp.unchanged();
-- a line with a field too many (an unquoted comma)
SELECT crmpay.import_report('ady1', 'adyen_settlement_details',
    :'adyen_header' || E'\n' || :'ok_line' || E'\n' ||
    'Co,ShopECOM,8815000000000093,B-3,visa,2024-03-02 11:00:00,CET,Settled,8825000000000093,EUR,,1,000.00,1,EUR,,9.75,,0.10,0.05,0.10,visa,,7,,,,,,,' || E'\n');
-- a quoted field that never ends
SELECT crmpay.import_report('ady1', 'adyen_settlement_details',
    :'adyen_header' || E'\n' || :'ok_line' || E'\n' || 'Co,"ShopECOM,8815' || E'\n');
-- a stray quote, and text after a closing quote
SELECT crmpay.import_report('ady1', 'adyen_settlement_details',
    :'adyen_header' || E'\n' || 'Co,Shop"ECOM' || E'\n');
SELECT crmpay.import_report('ady1', 'adyen_settlement_details',
    :'adyen_header' || E'\n' || '"Co"x,ShopECOM' || E'\n');
-- a column crmpay does not know, a missing one, a repeated one
SELECT crmpay.import_report('ady1', 'adyen_settlement_details',
    replace(:'adyen_header', 'Exchange Rate', 'Exchange Rates') || E'\n' || :'ok_line' || E'\n');
SELECT crmpay.import_report('ady1', 'adyen_settlement_details',
    replace(:'adyen_header', 'Type,', '') || E'\n');
SELECT crmpay.import_report('ady1', 'adyen_settlement_details',
    replace(:'adyen_header', 'Reserved10', 'Batch Number') || E'\n');
-- an unknown currency, amounts that do not parse, more decimals than EUR has
SELECT crmpay.import_report('ady1', 'adyen_settlement_details',
    :'adyen_header' || E'\n' || :'ok_line' || E'\n' || replace(:'ok_line', ',EUR,,10.00', ',EUX,,10.00') || E'\n');
SELECT crmpay.import_report('ady1', 'adyen_settlement_details',
    :'adyen_header' || E'\n' || replace(:'ok_line', ',10.00,', ',10.0O,') || E'\n');
SELECT crmpay.import_report('ady1', 'adyen_settlement_details',
    :'adyen_header' || E'\n' || replace(:'ok_line', ',9.75,', ',9.755,') || E'\n');
SELECT crmpay.import_report('ady1', 'adyen_settlement_details',
    :'adyen_header' || E'\n' || replace(:'ok_line', ',0.10,0.05', ',0.10,.05') || E'\n');
-- a bad date, an unknown time zone, an unknown record type
SELECT crmpay.import_report('ady1', 'adyen_settlement_details',
    :'adyen_header' || E'\n' || replace(:'ok_line', '2024-03-02 11:00:00', '2024-02-30 11:00:00') || E'\n');
SELECT crmpay.import_report('ady1', 'adyen_settlement_details',
    :'adyen_header' || E'\n' || replace(:'ok_line', '2024-03-02 11:00:00', '02/03/2024 11:00') || E'\n');
SELECT crmpay.import_report('ady1', 'adyen_settlement_details',
    :'adyen_header' || E'\n' || replace(:'ok_line', ',CET,', ',Mars/Olympus,') || E'\n');
-- a zone name works as well as an abbreviation
SELECT crmpay.import_report('ady1', 'adyen_settlement_details',
    :'adyen_header' || E'\n' || replace(replace(:'ok_line', ',CET,', ',Europe/Amsterdam,'), '8825000000000091', '8825000000000099') || E'\n') AS zone_import \gset
SELECT occurred_at FROM crmpay.gateway_records WHERE import_id = :zone_import;
SELECT crmpay.remove_report(:zone_import), crmpay.remove_report(:zone_import);
SELECT crmpay.import_report('ady1', 'adyen_settlement_details',
    :'adyen_header' || E'\n' || replace(:'ok_line', ',Settled,', ',Setled,') || E'\n');
-- a settled line without its merchant reference
SELECT crmpay.import_report('ady1', 'adyen_settlement_details',
    :'adyen_header' || E'\n' || replace(:'ok_line', ',B-1,', ',,') || E'\n');
-- an empty report, an unknown format, a format of another gateway
SELECT crmpay.import_report('ady1', 'adyen_settlement_details', '');
SELECT crmpay.import_report('ady1', 'adyen_payments_accounting', :'adyen_header');
SELECT crmpay.import_report('ady1', 'redsys_operations', :'adyen_header');
SELECT crmpay.import_report('nobody', 'adyen_settlement_details', :'adyen_header');
SELECT crmpay.import_report('ady1', 'adyen_settlement_details', NULL);
SELECT pg_temp.unchanged();

-- ---------------------------------------------------------------------
-- Redsys: the back-office export (semicolons, Spanish headers and
-- decimals, CRLF, a trailing delimiter); matched on gateway_ref (Ds_Order)
-- ---------------------------------------------------------------------
INSERT INTO crmpay.payments (account, order_ref, amount_minor, currency, status, idempotency_key,
                             created_at, gateway_ref, refunded_minor)
VALUES ('rsys1', 'R-OK',     6000, 'EUR', 'paid',     'r1', '2026-04-23 10:00+00', '260400000001', 0),
       ('rsys1', 'R-LOST',   3000, 'EUR', 'open',     'r2', '2026-04-23 10:01+00', '260400000002', 0),
       ('rsys1', 'R-DENIED', 6000, 'EUR', 'failed',   'r3', '2026-04-23 10:02+00', '260400000003', 0),
       ('rsys1', 'R-REFUND', 123456, 'EUR', 'paid',   'r4', '2026-04-23 10:03+00', '260400000004', 0),
       ('rsys1', 'R-AMOUNT', 6000, 'EUR', 'paid',     'r5', '2026-04-23 10:04+00', '260400000005', 0),
       ('rsys1', 'R-UNFIN',  6000, 'EUR', 'paid',     'r6', '2026-04-23 10:05+00', '260400000006', 0),
       ('rsys1', 'R-NOGW',   6000, 'EUR', 'paid',     'r7', '2026-04-23 10:06+00', '260400000007', 0),
       ('rsys1', 'R-DUP',    6000, 'EUR', 'paid',     'r8', '2026-04-23 10:07+00', '260400000008', 0),
       ('rsys1', 'R-CUR',    6000, 'EUR', 'paid',     'r9', '2026-04-23 10:08+00', '260400000009', 0),
       ('rsys1', 'R-PREAUTH', 2500, 'EUR', 'open',    'r10', '2026-04-23 10:09+00', '260400000010', 0);
SELECT crmpay.import_report('rsys1', 'redsys_operations', replace(
$csv$Fecha;Hora;Tipo operación;Cód. pedido;Resultado operación y código;Importe;Moneda;Importe Euros;Tipo de pago;Tipo pago original;N.º tarjeta;Titular;
23/04/2026;14:18:59;Autorización;260400000001;Autorizada 741936;60,00;EUR;60,00;Challenge Visa;;415006******2715;;
23/04/2026;14:20:00;Autorización;260400000002;Autorizada 741937;30.00;978;30.00;Challenge Visa;;415006******2715;;
23/04/2026;14:21:00;Autorización;260400000003;Denegada 0190;60,00;EUR;60,00;Challenge MasterCard;;549928******9138;;
23/04/2026;14:22:00;Autorización;260400000004;Autorizada 111111;1.234,56;EUR;1.234,56;Challenge Visa;;415006******2715;;
24/04/2026;09:00:00;Devolución;260400000004;Autorizada 252927;234,56;EUR;234,56;Challenge Visa;;415006******2715;;
23/04/2026;14:23:00;Autorización;260400000005;Autorizada 222222;65,00;EUR;65,00;Challenge Visa;;415006******2715;;
23/04/2026;14:24:00;Autorización;260400000006;Sin finalizar 9998;60,00;EUR;60,00;;;;;
23/04/2026;14:25:00;Autorización;260400000008;Autorizada 333333;60,00;EUR;60,00;Challenge Visa;;415006******2715;;
23/04/2026;14:26:00;Pago;260400000008;Autorizada 333334;60,00;EUR;60,00;Bizum;;;;
23/04/2026;14:27:00;Autorización;260400000009;Autorizada 444444;60,00;USD;60,00;Challenge Visa;;415006******2715;;
23/04/2026;14:28:00;Autorización;269900000099;Autorizada 555555;15,00;EUR;15,00;Challenge Visa;;415006******2715;;
23/04/2026;14:29:00;Preautorización;260400000010;Autorizada 666666;25,00;EUR;25,00;Challenge Visa;;415006******2715;;
$csv$, E'\n', E'\r\n')) AS rimport \gset
SELECT lines, records, duplicates, first_at, last_at FROM crmpay.report_imports WHERE id = :rimport;
SELECT line_no, record_type, match_key, status, gateway_status, amount_minor, currency, fin_amount_minor, occurred_at
  FROM crmpay.gateway_records WHERE import_id = :rimport ORDER BY line_no;
SELECT crmpay.reconcile('rsys1', '2026-04-23 00:00+00', '2026-04-24 00:00+00', heal => true) AS rrun \gset
SELECT status, match_on, sources, records_loaded, records_matched, payments_checked, counts, totals
  FROM crmpay.reconciliation_runs WHERE id = :rrun;
SELECT kind, order_ref, gateway_ref, crm_amount_minor, gateway_amount_minor, crm_status, gateway_status, healed
  FROM crmpay.reconciliation_items WHERE run_id = :rrun ORDER BY gateway_ref, kind;
SELECT order_ref, status, refunded_minor FROM crmpay.payments WHERE account = 'rsys1' ORDER BY order_ref;
-- the refund of 24 April: a window that includes it heals it too
SELECT crmpay.reconcile('rsys1', '2026-04-23 00:00+00', '2026-04-25 00:00+00', heal => true) AS rrun2 \gset
SELECT kind, order_ref, healed, changes - 'event_id' AS changes
  FROM crmpay.reconciliation_items WHERE run_id = :rrun2 AND kind = 'refunded_at_gateway';

-- Redsys bad input
UPDATE before SET imports = (SELECT count(*) FROM crmpay.report_imports),
                  records = (SELECT count(*) FROM crmpay.gateway_records);
\set redsys_header 'Fecha;Hora;Tipo operación;Cód. pedido;Resultado operación y código;Importe;Moneda'
SELECT crmpay.import_report('rsys1', 'redsys_csv', :'redsys_header' || E'\n' ||
    E'23/04/2026;14:18:59;Autorización;260400000001;Autorizada 741936;60,00;EUR\n' ||
    E'31/04/2026;14:18:59;Autorización;260400000001;Autorizada 741936;60,00;EUR\n');
SELECT crmpay.import_report('rsys1', 'redsys_csv', :'redsys_header' || E'\n' ||
    E'23/04/2026;14:18:59;Autorización;260400000001;Autorizada 741936;1.23,45;EUR\n');
SELECT crmpay.import_report('rsys1', 'redsys_csv', :'redsys_header' || E'\n' ||
    E'23/04/2026;14:18:59;Autorización;260400000001;Autorizada 741936;60,00;XTS9\n');
SELECT crmpay.import_report('rsys1', 'redsys_csv', :'redsys_header' || E'\n' ||
    E'23/04/2026;14:18:59;Reserva;260400000001;Autorizada 741936;60,00;EUR\n');
SELECT crmpay.import_report('rsys1', 'redsys_csv', :'redsys_header' || E'\n' ||
    E'23/04/2026;14:18:59;Autorización;260400000001;Quizás;60,00;EUR\n');
SELECT crmpay.import_report('rsys1', 'redsys_csv', :'redsys_header' || E'\n' ||
    E'23/04/2026;25:18:59;Autorización;260400000001;Autorizada 1;60,00;EUR\n');
SELECT crmpay.import_report('rsys1', 'redsys_csv', replace(:'redsys_header', 'Cód. pedido', 'Pedido web'));
SELECT crmpay.import_report('rsys1', 'redsys_csv', :'redsys_header' || E'\n' ||
    E'23/04/2026;14:18:59;Autorización;260400000001;Autorizada 1;60,00\n');
SELECT pg_temp.unchanged();

-- ---------------------------------------------------------------------
-- Runs: bad requests, one at a time per account, step by step
-- ---------------------------------------------------------------------
SELECT crmpay.reconcile('nobody', now() - interval '1 day');
SELECT crmpay.reconcile('ady1', '2024-03-02', '2024-03-01');
SELECT crmpay.reconcile('ady1', '2022-03-01', '2024-03-01');
SELECT crmpay.reconcile('ady1', '2025-01-01', '2025-01-02');
SELECT crmpay.reconcile('ady1', NULL);
-- a report-only account needs no gateway call: CALL works anywhere
\o /dev/null
CALL crmpay.reconcile_in_steps('ady1', '2024-03-01 00:00+00', '2024-03-02 00:00+00', false, NULL);
\o
SELECT mode, status, phase, discrepancies, counts, fetch_state
  FROM crmpay.reconciliation_runs WHERE account = 'ady1' ORDER BY id DESC LIMIT 1;
BEGIN;
CALL crmpay.reconcile_in_steps('ady1', '2024-03-01 00:00+00', '2024-03-02 00:00+00', false, NULL);
ROLLBACK;
-- a step-by-step run whose session is gone does not block the account
INSERT INTO crmpay.reconciliation_runs (account, provider, window_start, window_end, margin, match_on,
                                        heal, mode, pid)
VALUES ('ady1', 'adyen', '2024-03-01', '2024-03-02', '0', 'order_ref', false, 'stepwise', 0);
SELECT crmpay.reconcile('ady1', '2024-03-01 00:00+00', '2024-03-02 00:00+00') IS NOT NULL AS ran;
SELECT status, error FROM crmpay.reconciliation_runs WHERE pid = 0;
-- a live one does
INSERT INTO crmpay.reconciliation_runs (account, provider, window_start, window_end, margin, match_on,
                                        heal, mode)
VALUES ('ady1', 'adyen', '2024-03-01', '2024-03-02', '0', 'order_ref', false, 'stepwise');
SELECT crmpay.reconcile('ady1', '2024-03-01 00:00+00', '2024-03-02 00:00+00');
DELETE FROM crmpay.reconciliation_runs WHERE status = 'running';

-- ---------------------------------------------------------------------
-- Schedules: one call per account; run_due_reconciliations runs them
-- ---------------------------------------------------------------------
SELECT crmpay.schedule_reconciliation('ady1', '1 day', '2 days', starting => '2024-03-02 01:00+00') AS sched \gset
SELECT crmpay.schedule_reconciliation('ady1', '1 day', '1 day', heal => false, lag => '1 hour',
                                      starting => '2024-03-02 01:00+00') = :sched AS replaced;
SELECT account, every, window_length, lag, heal, enabled, next_run_at FROM crmpay.reconciliation_schedules;
SELECT crmpay.schedule_reconciliation('ady1', '30 seconds', '1 day');
SELECT crmpay.schedule_reconciliation('ady1', '1 day', '400 days');
SELECT crmpay.schedule_reconciliation('nobody', '1 day', '1 day');
-- due since 2024 with a window no report covers: it cannot start, and says why
SET client_min_messages = error;
SELECT count(*) AS runs FROM crmpay.run_due_reconciliations();
RESET client_min_messages;
SELECT next_run_at > now() AS next_in_future, next_run_at - date_trunc('day', next_run_at) AS at_time,
       last_run_id, last_error LIKE 'nothing tells what gateway "adyen" took between %' AS why
  FROM crmpay.reconciliation_schedules;
-- a lag that puts the window on 1 March 2024, which the report covers
SELECT crmpay.schedule_reconciliation('ady1', '1 day', '1 day',
                                      lag => date_trunc('second', now()) - '2024-03-02 00:00+00') = :sched AS same;
SELECT count(*) AS runs FROM crmpay.run_due_reconciliations();
SELECT r.schedule_id = :sched AS by_schedule, r.status, r.heal, r.window_end - r.window_start AS window_length,
       r.window_end BETWEEN '2024-03-02 00:00+00' AND '2024-03-02 00:01+00' AS window_end_ok, r.discrepancies,
       s.next_run_at > now() AS next_in_future, s.last_run_id = r.id AS recorded, s.last_error
  FROM crmpay.reconciliation_runs r JOIN crmpay.reconciliation_schedules s ON s.id = r.schedule_id;
SELECT count(*) AS runs_again FROM crmpay.run_due_reconciliations();
SELECT crmpay.unschedule_reconciliation('ady1'), crmpay.unschedule_reconciliation('ady1');
SELECT crmpay.prune_reconciliations('0');

-- ---------------------------------------------------------------------
-- Privileges: reconciliation is for crmpay_admin
-- ---------------------------------------------------------------------
CREATE ROLE regress_recon_app LOGIN IN ROLE crmpay_app;
CREATE ROLE regress_recon_admin LOGIN IN ROLE crmpay_admin;
SET ROLE regress_recon_app;
SELECT crmpay.reconcile('ady1', '2024-03-01 00:00+00', '2024-03-02 00:00+00');
SELECT count(*) FROM crmpay.reconciliation_items;
RESET ROLE;
SET ROLE regress_recon_admin;
SELECT crmpay.reconcile('ady1', '2024-03-01 00:00+00', '2024-03-02 00:00+00') IS NOT NULL AS admin_ran;
SELECT count(*) > 0 AS admin_reads FROM crmpay.reconciliation_items;
SELECT count(*) AS running FROM crmpay.reconciliation_progress;
SELECT crmpay._reconcile_match(1);
\o /dev/null
CALL crmpay.reconcile_in_steps('ady1', '2024-03-01 00:00+00', '2024-03-02 00:00+00', false, NULL);
\o
SELECT mode, status FROM crmpay.reconciliation_runs ORDER BY id DESC LIMIT 1;
RESET ROLE;
DROP ROLE regress_recon_app, regress_recon_admin;
