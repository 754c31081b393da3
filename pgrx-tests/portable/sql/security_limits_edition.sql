-- The portable edition: the limits are placeholders with the same defaults (PL/pgSQL cannot
-- register typed settings, so a session could raise its own), and the projection side reads
-- JSON of any depth PostgreSQL stores: an event nested 200 deep poisons nobody.
\set ON_ERROR_ROLLBACK on
\set SHOW_CONTEXT never
set client_min_messages = error;
begin;
\ir install.sql
-- a session can raise the limit for itself here (one reason to prefer the extension edition)
set cqrs.max_json_depth = 100;
select seq from cqrs.append(cqrs.uuid_v7(), 's-1', 'ANY', (repeat('{"a":', 70) || '1' || repeat('}', 70))::jsonb);
reset cqrs.max_json_depth;
select seq from cqrs.append(cqrs.uuid_v7(), 's-1', 'ANY', (repeat('{"a":', 70) || '1' || repeat('}', 70))::jsonb);
\echo :LAST_ERROR_SQLSTATE
create table rm_halt (stream text primary key, n integer not null default 0, rev bigint not null default 0);
select cqrs.create_projection('halts', 'rm_halt', 'stream', '{"ANY": {"action": "upsert", "add": {"n": {"const": 1}}}}', backfill => false);
insert into cqrs.stream values ('deep', 1);
insert into cqrs.command_log (command_id, stream, seq, command_type, payload, metadata)
values ('00000000-0000-0000-0000-00000000dee9', 'deep', 1, 'ANY', '{}', (repeat('{"a":', 200) || '1' || repeat('}', 200))::jsonb);
select projection, key from cqrs.project_batch(
    (select jsonb_agg(to_jsonb(l) order by l.position) from cqrs.command_log l where l.stream = 'deep'), '0/10');
select projection, halted, applied from cqrs.status();
rollback;
