-- A writer can make a projection halt (a value that overflows its column); the operator's way
-- out loses nothing silently: resume(skip => true) moves the failed event into the dead
-- letters, with its error, and the projection goes on. Bounds in the command's JSON Schema that
-- match the column types keep such commands out in the first place.
\set ON_ERROR_ROLLBACK on
\set SHOW_CONTEXT never
set client_min_messages = notice;
begin;
\ir install.sql
set client_min_messages = error;
\i sql/examples/orders.sql
set client_min_messages = notice;

select seq from cqrs.append('00000000-0000-0000-0000-0000000000a1', 'order-1', 'CREATE_ORDER', '{"user_id": "u1", "currency": "EUR"}');
select seq from cqrs.append('00000000-0000-0000-0000-0000000000a2', 'order-1', 'ADD_ITEM', '{"user_id": "u1", "sku": "a", "qty": 1, "price": 1, "amount": 1e12}');
select seq from cqrs.append('00000000-0000-0000-0000-0000000000a3', 'order-1', 'ADD_ITEM', '{"user_id": "u1", "sku": "b", "qty": 2, "price": 2.5, "amount": 5}');
set client_min_messages = error;
select count(*) from cqrs.project_batch((select jsonb_agg(to_jsonb(l) order by l.position) from cqrs.command_log l), '0/10');
-- order_summary (numeric(14,2)) halted on the overflow; user_order_stats (numeric(16,2)) took it
select projection, halted, last_error_sqlstate, last_error from cqrs.status();
-- resuming replays it and halts again
select count(*) from cqrs.resume('order_summary');
select name, halted, last_error_event ->> 'seq' as failed_seq from cqrs.projection_state where name = 'order_summary';
set client_min_messages = notice;
-- resume skipping it: into the dead letters with its error, and the projection goes on
select projection, key, doc::jsonb ->> 'total' as total from cqrs.resume('order_summary', skip => true);
select projection, halted, events_behind, dead_letters from cqrs.status() where projection = 'order_summary';
select projection, stream, seq, sqlstate, error, event -> 'payload' ->> 'amount' as amount from cqrs.dead_letter;
select order_id, item_count, total from shop.order_summary;
-- nothing to skip when the projection is not halted
select count(*) from cqrs.resume('order_summary', skip => true);
\echo :LAST_ERROR_SQLSTATE
select count(*) from cqrs.resume('order_summary', skip => null);
\echo :LAST_ERROR_SQLSTATE

-- with the example schemas, such a command never gets in
set client_min_messages = error;
\i sql/examples/order_commands.sql
set client_min_messages = notice;
select seq from cqrs.append(cqrs.uuid_v7(), 'order-1', 'ADD_ITEM', '{"user_id": "u1", "sku": "a", "qty": 1, "price": 1, "amount": 1e12}');
\echo :LAST_ERROR_SQLSTATE
rollback;
