-- What cqrs.append accepts is bounded (settings only a superuser changes), and an event the
-- projection side cannot read stops only the projections that handle it — never everyone.
\set ON_ERROR_ROLLBACK on
\set SHOW_CONTEXT never
set client_min_messages = error;
begin;
\ir install.sql
-- the review's reproduction: metadata nested 200 levels deep is refused at append
select * from cqrs.append(cqrs.uuid_v7(), 's-1', 'ANY', '{}', metadata => (repeat('{"a":', 200) || '1' || repeat('}', 200))::jsonb);
\echo :LAST_ERROR_SQLSTATE
-- 64 levels pass, 65 do not, through objects and arrays alike (levels as jsonpath counts them)
select seq from cqrs.append(cqrs.uuid_v7(), 's-1', 'ANY', (repeat('{"a":', 64) || '1' || repeat('}', 64))::jsonb);
select seq from cqrs.append(cqrs.uuid_v7(), 's-1', 'ANY', (repeat('{"a":', 65) || '1' || repeat('}', 65))::jsonb);
\echo :LAST_ERROR_SQLSTATE
select seq from cqrs.append(cqrs.uuid_v7(), 's-1', 'ANY', ('{"a":' || repeat('[', 65) || repeat(']', 65) || '}')::jsonb);
\echo :LAST_ERROR_SQLSTATE
select seq from cqrs.append(cqrs.uuid_v7(), 's-1', 'ANY', ('{"a":' || repeat('[', 64) || repeat(']', 64) || '}')::jsonb);
-- too large, payload and metadata
select seq from cqrs.append(cqrs.uuid_v7(), 's-1', 'ANY', jsonb_build_object('blob', repeat('x', 5000000)));
\echo :LAST_ERROR_SQLSTATE
select seq from cqrs.append(cqrs.uuid_v7(), 's-1', 'ANY', '{}', metadata => jsonb_build_object('blob', repeat('x', 70000)));
\echo :LAST_ERROR_SQLSTATE
-- append_batch applies the same limits, naming the element
select index, seq from cqrs.append_batch(jsonb_build_array(
    jsonb_build_object('command_id', cqrs.uuid_v7(), 'stream', 's-2', 'command_type', 'ANY', 'payload', '{}'::jsonb),
    jsonb_build_object('command_id', cqrs.uuid_v7(), 'stream', 's-2', 'command_type', 'ANY',
                       'payload', (repeat('{"a":', 70) || '1' || repeat('}', 70))::jsonb)));
\echo :LAST_ERROR_SQLSTATE

rollback;
