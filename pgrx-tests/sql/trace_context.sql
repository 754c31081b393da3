-- The W3C trace context a command carries in its metadata: kept with the command as given,
-- refused with 22023 when malformed (the same rule and words in both editions), and a replay
-- keeps the original's.
\set ON_ERROR_ROLLBACK on
\set SHOW_CONTEXT never
begin;
\ir install.sql

-- kept as given, beside the application's own metadata
select seq, duplicate from cqrs.append('00000000-0000-4000-8000-000000000001', 'order-1', 'Placed', '{}',
    metadata => '{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "tracestate": "rojo=00f067aa0ba902b7", "user": "u1"}');
select metadata ->> 'traceparent' as traceparent, metadata ->> 'tracestate' as tracestate, metadata ->> 'user' as "user"
  from cqrs.command_log where command_id = '00000000-0000-4000-8000-000000000001';
-- a later version may carry more fields; an unsampled one is kept too
select seq from cqrs.append(cqrs.uuid_v7(), 'order-1', 'Paid', '{}',
    metadata => '{"traceparent": "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-later"}');

-- a replay with another trace answers as a duplicate and keeps the original's trace context
select seq, duplicate from cqrs.append('00000000-0000-4000-8000-000000000001', 'order-1', 'Placed', '{}',
    metadata => '{"traceparent": "00-11111111111111111111111111111111-2222222222222222-01"}');
select metadata ->> 'traceparent' as traceparent from cqrs.command_log
 where command_id = '00000000-0000-4000-8000-000000000001';
-- which the replaying application can look up, to link its span to the original's
select * from cqrs.trace_context('00000000-0000-4000-8000-000000000001');
select count(*) from cqrs.trace_context('00000000-0000-4000-8000-0000000000ff');
-- a writer may (it sees the two keys only), a role granted nothing may not
create role trace_writer in role cqrs_writer;
create role trace_nobody;
set role trace_writer;
select traceparent from cqrs.trace_context('00000000-0000-4000-8000-000000000001');
reset role;
set role trace_nobody;
select * from cqrs.trace_context('00000000-0000-4000-8000-000000000001');
\echo :LAST_ERROR_SQLSTATE
reset role;

-- malformed: each rule, never echoing the value
select * from cqrs.append(cqrs.uuid_v7(), 'order-2', 'Placed', '{}', metadata => '{"traceparent": 42}');
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.append(cqrs.uuid_v7(), 'order-2', 'Placed', '{}', metadata => '{"traceparent": "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01"}');
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.append(cqrs.uuid_v7(), 'order-2', 'Placed', '{}', metadata => '{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more"}');
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.append(cqrs.uuid_v7(), 'order-2', 'Placed', '{}', metadata => '{"traceparent": "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}');
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.append(cqrs.uuid_v7(), 'order-2', 'Placed', '{}', metadata => '{"traceparent": "00-00000000000000000000000000000000-00f067aa0ba902b7-01"}');
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.append(cqrs.uuid_v7(), 'order-2', 'Placed', '{}', metadata => '{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"}');
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.append(cqrs.uuid_v7(), 'order-2', 'Placed', '{}', metadata => '{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7"}');
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.append(cqrs.uuid_v7(), 'order-2', 'Placed', '{}',
    metadata => jsonb_build_object('traceparent', '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01', 'tracestate', repeat('a', 513)));
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.append(cqrs.uuid_v7(), 'order-2', 'Placed', '{}', metadata => '{"tracestate": "rojo=é"}');
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.append(cqrs.uuid_v7(), 'order-2', 'Placed', '{}', metadata => '{"tracestate": ["rojo"]}');
\echo :LAST_ERROR_SQLSTATE
-- and in a batch, naming the element
select index, seq from cqrs.append_batch(jsonb_build_array(
    jsonb_build_object('command_id', cqrs.uuid_v7(), 'stream', 'order-3', 'command_type', 'Placed', 'payload', '{}'::jsonb,
                       'metadata', jsonb_build_object('traceparent', '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01')),
    jsonb_build_object('command_id', cqrs.uuid_v7(), 'stream', 'order-3', 'command_type', 'Paid', 'payload', '{}'::jsonb,
                       'metadata', jsonb_build_object('traceparent', 'not-a-traceparent'))));
\echo :LAST_ERROR_SQLSTATE
-- nothing of the refused commands was appended
select count(*) from cqrs.command_log where stream in ('order-2', 'order-3');

rollback;
