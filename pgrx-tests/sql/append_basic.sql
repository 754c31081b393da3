-- cqrs.append: positions, per-stream gap-free seqs, and the caller's transaction.
\set ON_ERROR_ROLLBACK on
\set SHOW_CONTEXT never
begin;
\ir install.sql

select seq, duplicate from cqrs.append('00000000-0000-0000-0000-000000000001', 'order-1', 'CREATE_ORDER', '{"user_id": "u1"}');
select seq, duplicate from cqrs.append('00000000-0000-0000-0000-000000000002', 'order-1', 'ADD_ITEM', '{"sku": "a", "qty": 2}');
select seq, duplicate from cqrs.append('00000000-0000-0000-0000-000000000003', 'order-2', 'CREATE_ORDER', '{"user_id": "u2"}');
select seq, duplicate from cqrs.append('00000000-0000-0000-0000-000000000004', 'order-1', 'SHIP_ORDER', '{}', metadata => '{"trace": "t-1"}');

-- positions grow in append order; seqs are per stream
select stream, seq, command_type, payload, metadata, position > 0 as has_position
  from cqrs.command_log order by position;
select stream, last_seq from cqrs.stream order by stream;
select count(distinct position) = count(*) as positions_unique from cqrs.command_log;

-- a command rolled back with the caller's transaction leaves no trace and no seq gap
savepoint before_rollback;
select seq from cqrs.append('00000000-0000-0000-0000-000000000005', 'order-2', 'ADD_ITEM', '{"sku": "b"}');
rollback to savepoint before_rollback;
select seq from cqrs.append('00000000-0000-0000-0000-000000000006', 'order-2', 'ADD_ITEM', '{"sku": "c"}');
select count(*) as rolled_back_rows from cqrs.command_log where command_id = '00000000-0000-0000-0000-000000000005';

-- the command and the application's own writes commit or roll back together
create table shop_orders (id text primary key);
savepoint outbox;
insert into shop_orders values ('order-3');
select seq from cqrs.append('00000000-0000-0000-0000-000000000007', 'order-3', 'CREATE_ORDER', '{}');
rollback to savepoint outbox;
select (select count(*) from shop_orders) as app_rows, (select count(*) from cqrs.command_log where stream = 'order-3') as log_rows;

-- every stream's seqs are exactly 1..n
select stream, array_agg(seq order by seq) as seqs from cqrs.command_log group by stream order by stream;

-- named arguments and the default metadata
select seq from cqrs.append(command_id => cqrs.uuid_v7(), stream => 'order-4', command_type => 'CREATE_ORDER', payload => '{}');
select metadata from cqrs.command_log where stream = 'order-4';

rollback;
