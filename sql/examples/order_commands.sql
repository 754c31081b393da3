-- JSON Schemas of the example order commands (sql/examples/orders.sql projects them):
--   psql -f sql/examples/order_commands.sql            (after create extension pg_cqrs)
--
-- Bound every value a projection stores to what its column holds: a command whose amount
-- overflows numeric(14,2) would otherwise be accepted and then halt order_summary (or land in
-- its dead letters). Here qty ≤ 1,000 and amount ≤ 1,000,000.00 keep item_count (integer), total
-- (numeric(14,2)) and spent (numeric(16,2)) far from overflowing for any realistic order.
-- The demo and the benchmarks register these same schemas (bench/src/workload.rs reads this file).

select cqrs.register_command_type('CREATE_ORDER', $schema$
{"type": "object", "required": ["user_id", "currency"],
 "properties": {"user_id": {"type": "string", "minLength": 1, "maxLength": 64},
                "currency": {"type": "string", "enum": ["EUR", "USD", "GBP"]}},
 "additionalProperties": false}
$schema$);

select cqrs.register_command_type('ADD_ITEM', $schema$
{"type": "object", "required": ["user_id", "sku", "qty", "price", "amount"],
 "properties": {"user_id": {"type": "string", "maxLength": 64},
                "sku": {"type": "string", "minLength": 1, "maxLength": 64},
                "qty": {"type": "integer", "minimum": 1, "maximum": 1000},
                "price": {"type": "number", "minimum": 0, "maximum": 1000000},
                "amount": {"type": "number", "minimum": 0, "maximum": 1000000}},
 "additionalProperties": false}
$schema$);

select cqrs.register_command_type('SHIP_ORDER', $schema$
{"type": "object", "required": ["user_id", "carrier"],
 "properties": {"user_id": {"type": "string", "maxLength": 64}, "carrier": {"type": "string", "maxLength": 64}},
 "additionalProperties": false}
$schema$);

select cqrs.register_command_type('CANCEL_ORDER', $schema$
{"type": "object", "required": ["user_id"],
 "properties": {"user_id": {"type": "string", "maxLength": 64}, "reason": {"type": "string", "maxLength": 500}},
 "additionalProperties": false}
$schema$);
