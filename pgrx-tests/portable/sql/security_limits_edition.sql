-- The portable edition: the limits are one row of cqrs_portable.settings, which only the
-- installer may change (PL/pgSQL cannot declare typed settings, and a placeholder setting is any
-- session's to change), and the projection side reads JSON of any depth PostgreSQL stores: an
-- event nested 200 deep poisons nobody.
\set ON_ERROR_ROLLBACK on
\set SHOW_CONTEXT never
set client_min_messages = error;
begin;
\ir install.sql
select require_registered_types, max_payload_bytes, max_metadata_bytes, max_json_depth, gap_alert_after from cqrs_portable.settings;
-- a writer cannot lift a limit for its own session: the settings of the same names change nothing
create role limited_app in role cqrs_writer;
set role limited_app;
set cqrs.max_payload_bytes = '1000000000';
set cqrs.max_json_depth = 100;
select seq from cqrs.append(cqrs.uuid_v7(), 's-1', 'ANY', jsonb_build_object('blob', repeat('x', 6000000)));
\echo :LAST_ERROR_SQLSTATE
select seq from cqrs.append(cqrs.uuid_v7(), 's-1', 'ANY', (repeat('{"a":', 70) || '1' || repeat('}', 70))::jsonb);
\echo :LAST_ERROR_SQLSTATE
-- nor the settings row
update cqrs_portable.settings set max_payload_bytes = 1000000000;
\echo :LAST_ERROR_SQLSTATE
reset role;
-- the installer can, within the extension's ranges
set role managed_admin;
update cqrs_portable.settings set max_json_depth = 101;
\echo :LAST_ERROR_SQLSTATE
update cqrs_portable.settings set max_json_deep = 100;
\echo :LAST_ERROR_SQLSTATE
update cqrs_portable.settings set max_json_depth = 100;
reset role;
set role limited_app;
select seq from cqrs.append(cqrs.uuid_v7(), 's-1', 'ANY', (repeat('{"a":', 70) || '1' || repeat('}', 70))::jsonb);
reset role;
create table rm_halt (stream text primary key, n integer not null default 0, rev bigint not null default 0);
select cqrs.create_projection('halts', 'rm_halt', 'stream', '{"ANY": {"action": "upsert", "add": {"n": {"const": 1}}}}', backfill => false);
insert into cqrs.stream values ('deep', 1, '-infinity', '-infinity');
insert into cqrs.command_log (command_id, stream, seq, command_type, payload, metadata, id_time)
values ('00000000-0000-0000-0000-00000000dee9', 'deep', 1, 'ANY', '{}', (repeat('{"a":', 200) || '1' || repeat('}', 200))::jsonb, '-infinity');
select projection, key from cqrs.project_batch(
    (select jsonb_agg(to_jsonb(l) order by l.position) from cqrs.command_log l where l.stream = 'deep'), '0/10');
select projection, halted, applied from cqrs.status();
rollback;
