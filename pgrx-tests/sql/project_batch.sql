-- cqrs.project_batch: the example read models, exactly-once checkpoints and fencing.
\set ON_ERROR_ROLLBACK on
\set SHOW_CONTEXT never
begin;
\ir install.sql
\i sql/examples/orders.sql

select count(*) from (select cqrs.append(cqrs.uuid_v7(), s, t, p::jsonb) from (values
  ('order-1', 'CREATE_ORDER', '{"user_id": "u1", "currency": "EUR"}'),
  ('order-1', 'ADD_ITEM', '{"user_id": "u1", "sku": "a", "qty": 2, "price": 1.5, "amount": 3.0}'),
  ('order-2', 'CREATE_ORDER', '{"user_id": "u1", "currency": "USD"}'),
  ('order-1', 'ADD_ITEM', '{"user_id": "u1", "sku": "b", "qty": 1, "price": 10, "amount": 10}'),
  ('order-3', 'CREATE_ORDER', '{"user_id": "u2", "currency": "GBP"}'),
  ('order-1', 'SHIP_ORDER', '{"user_id": "u1", "carrier": "dhl"}'),
  ('order-3', 'CANCEL_ORDER', '{"user_id": "u2"}'),
  ('order-2', 'ADD_ITEM', '{"user_id": "u1", "sku": "c", "qty": 4, "price": 0.25, "amount": 1.00}')
) v(s, t, p)) appended;

create temp table batch as select jsonb_agg(to_jsonb(l) order by l.position) as events from cqrs.command_log l;

-- one batch: every changed row once, with its revision and the row as json
select projection, key, rev, deleted, doc::jsonb - 'opened_at' - 'closed_at' - 'last_order_at' as doc
  from cqrs.project_batch((select events from batch), '0/1000')
 order by projection, key;
select order_id, user_id, currency, status, item_count, total, carrier, closed_at is not null as closed, rev
  from shop.order_summary order by order_id;
select user_id, orders, open_orders, shipped_orders, cancelled_orders, items, spent, rev
  from shop.user_order_stats order by user_id;

-- the same batch again, with a later LSN: every event a duplicate, nothing changes
select count(*) as changed from cqrs.project_batch((select events from batch), '0/2000');
select name, checkpoint_lsn, checkpoint_position > 0 as has_position, revision, applied, duplicates
  from cqrs.projection_state order by name;

-- a batch at or below the checkpoint LSN is skipped: a deposed projector cannot apply it
select count(*) as changed from cqrs.project_batch((select events from batch), '0/1500');
select name, applied, duplicates from cqrs.projection_state order by name;

-- revisions only grow: the next change gets a higher one
select seq from cqrs.append(cqrs.uuid_v7(), 'order-2', 'SHIP_ORDER', '{"user_id": "u1", "carrier": "ups"}');
select projection, key, rev, doc::jsonb ->> 'status' as status
  from cqrs.project_batch((select jsonb_agg(to_jsonb(l)) from cqrs.command_log l where l.stream = 'order-2' and l.seq = 3), '0/3000')
 order by projection;

-- an empty batch is fine; without an LSN nothing is fenced
select count(*) from cqrs.project_batch('[]');
select count(*) from cqrs.project_batch((select events from batch));

-- malformed batches are refused with the element and field (22023), nothing applied
select * from cqrs.project_batch('{"not": "an array"}');
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.project_batch('[{"position": 1}]');
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.project_batch('[{"position": 1, "command_id": "x", "stream": "s", "seq": 0, "command_type": "T", "payload": {}, "created_at": "now"}]');
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.project_batch(null);
\echo :LAST_ERROR_SQLSTATE

-- a delete handler, and a function handler for what a mapping cannot express
create table shop.carts (cart_id text primary key, skus text[] not null default '{}', rev bigint not null default 0);
create function shop.apply_cart(event jsonb) returns setof text language sql as $$
    insert into shop.carts (cart_id, skus) values (event ->> 'stream', array[event -> 'payload' ->> 'sku'])
    on conflict (cart_id) do update set skus = shop.carts.skus || (event -> 'payload' ->> 'sku')
    returning cart_id;
$$;
select cqrs.create_projection('carts', 'shop.carts', 'cart_id',
    '{"CART_ADD": {"function": "shop.apply_cart"}, "CART_CLEAR": {"action": "delete"}}');
select count(*) from (select cqrs.append(cqrs.uuid_v7(), s, t, p::jsonb) from (values
  ('cart-1', 'CART_ADD', '{"sku": "a"}'), ('cart-1', 'CART_ADD', '{"sku": "b"}'),
  ('cart-2', 'CART_ADD', '{"sku": "c"}'), ('cart-2', 'CART_CLEAR', '{}')) v(s, t, p)) appended;
select projection, key, deleted, doc::jsonb -> 'skus' as skus
  from cqrs.project_batch((select jsonb_agg(to_jsonb(l) order by l.position) from cqrs.command_log l where l.stream like 'cart-%'))
 where projection = 'carts' order by key;
table shop.carts;

-- a row that owner code moved after the batch's keys were looked up is still written, once:
-- deleting one tally touches the others (its trigger, run as the table's owner), and the add to
-- a touched tally in the same batch lands on the row as the trigger left it; the rows returned
-- (what the sidecar caches) are the rows as the batch left them, touched included
create table shop.tallies (tally_id text primary key, n integer not null default 0,
                           touched integer not null default 0, rev bigint not null default 0);
create function shop.touch_tallies() returns trigger language plpgsql as $$
begin
    update shop.tallies set touched = touched + 1 where tally_id <> old.tally_id;
    return old;
end
$$;
create trigger touch_tallies after delete on shop.tallies for each row execute function shop.touch_tallies();
select cqrs.create_projection('tallies', 'shop.tallies', 'tally_id',
    '{"TALLY_ADD": {"action": "upsert", "add": {"n": "$.n"}}, "TALLY_DROP": {"action": "delete"}}');
select count(*) from (select cqrs.append(cqrs.uuid_v7(), s, t, p::jsonb) from (values
  ('tally-a', 'TALLY_ADD', '{"n": 1}'), ('tally-b', 'TALLY_ADD', '{"n": 1}'), ('tally-c', 'TALLY_ADD', '{"n": 1}')) v(s, t, p)) appended;
select count(*) as changed
  from cqrs.project_batch((select jsonb_agg(to_jsonb(l) order by l.position) from cqrs.command_log l where l.stream like 'tally-%'))
 where projection = 'tallies';
select count(*) from (select cqrs.append(cqrs.uuid_v7(), s, t, p::jsonb) from (values
  ('tally-a', 'TALLY_DROP', '{}'), ('tally-b', 'TALLY_ADD', '{"n": 5}'), ('tally-c', 'TALLY_ADD', '{"n": 2}')) v(s, t, p)) appended;
select projection, key, deleted, (doc::jsonb ->> 'n')::int as n, (doc::jsonb ->> 'touched')::int as touched
  from cqrs.project_batch((select jsonb_agg(to_jsonb(l) order by l.position) from cqrs.command_log l
                            where l.stream like 'tally-%' and l.seq = 2))
 where projection = 'tallies' order by key;
select tally_id, n, touched from shop.tallies order by tally_id;

-- an AFTER UPDATE trigger that changes other rows of the batch's own update (it fires when the
-- statement ends): the rows returned are the rows as the batch left them, not as RETURNING saw
-- them (the cache would keep the older row)
create table shop.ranks (rank_id text primary key, n integer not null default 0,
                         leader boolean not null default false, rev bigint not null default 0);
create function shop.crown() returns trigger language plpgsql as $$
begin
    update shop.ranks set leader = (rank_id = (select r.rank_id from shop.ranks r order by r.n desc, r.rank_id limit 1));
    return null;
end
$$;
create trigger crown after update on shop.ranks for each row when (old.n is distinct from new.n)
    execute function shop.crown();
select cqrs.create_projection('ranks', 'shop.ranks', 'rank_id', '{"RANK_ADD": {"action": "upsert", "add": {"n": "$.n"}}}');
select count(*) from (select cqrs.append(cqrs.uuid_v7(), s, t, p::jsonb) from (values
  ('rank-a', 'RANK_ADD', '{"n": 3}'), ('rank-b', 'RANK_ADD', '{"n": 1}'), ('rank-c', 'RANK_ADD', '{"n": 1}')) v(s, t, p)) appended;
select count(*) as changed
  from cqrs.project_batch((select jsonb_agg(to_jsonb(l) order by l.position) from cqrs.command_log l where l.stream like 'rank-%'))
 where projection = 'ranks';
select count(*) from (select cqrs.append(cqrs.uuid_v7(), s, t, p::jsonb) from (values
  ('rank-b', 'RANK_ADD', '{"n": 5}'), ('rank-c', 'RANK_ADD', '{"n": 1}')) v(s, t, p)) appended;
select projection, key, (doc::jsonb ->> 'n')::int as n, (doc::jsonb ->> 'leader')::boolean as leader
  from cqrs.project_batch((select jsonb_agg(to_jsonb(l) order by l.position) from cqrs.command_log l
                            where l.stream like 'rank-%' and l.seq = 2))
 where projection = 'ranks' order by key;
select rank_id, n, leader from shop.ranks order by rank_id;

-- a row its own BEFORE trigger leaves alone stays so, and the trigger runs once
create table shop.guarded (guarded_id text primary key, n integer not null default 0, rev bigint not null default 0);
create table shop.guard_log (guarded_id text not null, n integer not null);
create function shop.guard() returns trigger language plpgsql as $$
begin
    insert into shop.guard_log values (old.guarded_id, new.n);
    return case when new.n > 10 then null else new end;
end
$$;
create trigger guard before update on shop.guarded for each row execute function shop.guard();
select cqrs.create_projection('guarded', 'shop.guarded', 'guarded_id', '{"GUARD_ADD": {"action": "upsert", "add": {"n": "$.n"}}}');
select count(*) from (select cqrs.append(cqrs.uuid_v7(), s, t, p::jsonb) from (values
  ('guard-a', 'GUARD_ADD', '{"n": 1}'), ('guard-b', 'GUARD_ADD', '{"n": 1}')) v(s, t, p)) appended;
select count(*) as changed
  from cqrs.project_batch((select jsonb_agg(to_jsonb(l) order by l.position) from cqrs.command_log l where l.stream like 'guard-%'))
 where projection = 'guarded';
select count(*) from (select cqrs.append(cqrs.uuid_v7(), s, t, p::jsonb) from (values
  ('guard-a', 'GUARD_ADD', '{"n": 20}'), ('guard-b', 'GUARD_ADD', '{"n": 2}')) v(s, t, p)) appended;
select projection, key, (doc::jsonb ->> 'n')::int as n
  from cqrs.project_batch((select jsonb_agg(to_jsonb(l) order by l.position) from cqrs.command_log l
                            where l.stream like 'guard-%' and l.seq = 2))
 where projection = 'guarded' order by key;
select guarded_id, n from shop.guarded order by guarded_id;
select guarded_id, n from shop.guard_log order by guarded_id, n;
rollback;
