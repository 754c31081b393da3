-- The outbox's SQL: sinks registered by a group's leader, what a sink has still to deliver (per
-- stream, in log order), its progress moved only forward and only with the group's lease, a halt
-- and its resumption.
\set ON_ERROR_ROLLBACK on
\set SHOW_CONTEXT never
begin;
\ir install.sql
select seq from cqrs.append(cqrs.uuid_v7(), 'a', 'T', '{"n": 1}');
select seq from cqrs.append(cqrs.uuid_v7(), 'b', 'T', '{"n": 2}');
select seq from cqrs.append(cqrs.uuid_v7(), 'a', 'U', '{"n": 3}');
select cqrs.try_lead('leader') as token \gset

-- registered by the leader's sidecar; names follow the group rule
select cqrs._ensure_sink('orders', 'default');
select cqrs._ensure_sink('Orders', 'default');
\echo :LAST_ERROR_SQLSTATE
select cqrs._ensure_sink('orders', 'no-such group');
\echo :LAST_ERROR_SQLSTATE
select sink, projection_group, halted, delivered, events_behind from cqrs.sink_status();

-- everything is behind, in log order, from the oldest undelivered command; after a delivery
-- only the rest, and the walk starts later
select cqrs._sink_behind_start('orders') = (select min(position) from cqrs.command_log) as starts_at_the_oldest;
select (event::jsonb) ->> 'stream' as stream, ((event::jsonb) ->> 'seq')::int as seq, (event::jsonb) ->> 'command_type' as type
  from cqrs._sink_behind('orders', cqrs._sink_behind_start('orders') - 1, 10);
select cqrs._sink_delivered('orders', :token, array['a'], array[1::bigint], null, 1, 1);
select cqrs._sink_behind_start('orders') = (select position from cqrs.command_log where stream = 'b') as starts_at_b;
select (event::jsonb) ->> 'stream' as stream, ((event::jsonb) ->> 'seq')::int as seq
  from cqrs._sink_behind('orders', cqrs._sink_behind_start('orders') - 1, 10);
-- a walk from a later position sees only what is after it; one chunk at a time
select count(*) from cqrs._sink_behind('orders', (select max(position) from cqrs.command_log), 10);
select count(*) from cqrs._sink_behind('orders', 0, 1);
select * from cqrs._sink_progress('orders', array['a', 'b', 'c']) order by 1;
-- never backwards
select cqrs._sink_delivered('orders', :token, array['a', 'b'], array[0::bigint, 1], null, 2, 1);
select * from cqrs._sink_progress('orders', array['a', 'b']) order by 1;
select delivered, checkpoint_position from cqrs.sink_status();
select cqrs._sink_behind_start('orders') = (select position from cqrs.command_log where stream = 'a' and seq = 2) as starts_at_a2;

-- a token that is not the group's lease's moves nothing
select cqrs._sink_delivered('orders', :token + 1000, array['a'], array[2::bigint], null, 3, 1);
\echo :LAST_ERROR_SQLSTATE
select * from cqrs._sink_progress('orders', array['a']);
select cqrs._sink_delivered('nope', :token, array['a'], array[2::bigint], null, 3, 1);
\echo :LAST_ERROR_SQLSTATE

-- a halt, seen in the status, cleared by resume_sink
select cqrs._sink_halt('orders', :token, 'max payload size exceeded', 3);
select sink, halted, last_error, last_error_position from cqrs.sink_status();
select cqrs.resume_sink('orders') as resumed, cqrs.resume_sink('orders') as again;
select cqrs.resume_sink('nope');
\echo :LAST_ERROR_SQLSTATE
select sink, halted, last_error from cqrs.sink_status();
rollback;
