-- The extension edition: the limits are typed settings only a superuser changes, and an event
-- the projector's JSON parser cannot read (nested deeper than it recurses) is a poison event of
-- the projections that handle it, never of everyone.
\set ON_ERROR_ROLLBACK on
\set SHOW_CONTEXT never
set client_min_messages = error;
begin;
\ir install.sql
show cqrs.max_json_depth;
show cqrs.max_payload_bytes;
show cqrs.max_metadata_bytes;

-- the limits are the DBA's: an application cannot raise them, and depth stops at 100
create role limited_app in role cqrs_writer;
set role limited_app;
set cqrs.max_json_depth = 100;
\echo :LAST_ERROR_SQLSTATE
reset role;
set cqrs.max_json_depth = 101;
\echo :LAST_ERROR_SQLSTATE
set cqrs.max_json_depth = 100;
select seq from cqrs.append(cqrs.uuid_v7(), 's-1', 'ANY', (repeat('{"a":', 70) || '1' || repeat('}', 70))::jsonb);
reset cqrs.max_json_depth;

-- An event nested 200 levels deep, written into the log before the limit existed: a poison
-- event of the projections that handle its type (halted, or dead-lettered); a projection that
-- does not handle it goes on, and so does the rest of the batch for the dead-lettering one.
create table rm_halt (stream text primary key, n integer not null default 0, rev bigint not null default 0);
create table rm_dead (stream text primary key, n integer not null default 0, rev bigint not null default 0);
create table rm_other (stream text primary key, n integer not null default 0, rev bigint not null default 0);
select cqrs.create_projection('halts', 'rm_halt', 'stream', '{"ANY": {"action": "upsert", "add": {"n": {"const": 1}}}}', backfill => false);
select cqrs.create_projection('dead_letters', 'rm_dead', 'stream', '{"ANY": {"action": "upsert", "add": {"n": {"const": 1}}}}', on_error => 'dead_letter', backfill => false);
select cqrs.create_projection('ignores', 'rm_other', 'stream', '{"OTHER": {"action": "upsert", "add": {"n": {"const": 1}}}}', backfill => false);
insert into cqrs.stream values ('deep', 1, '-infinity', '-infinity');
insert into cqrs.command_log (command_id, stream, seq, command_type, payload, metadata, id_time)
values ('00000000-0000-0000-0000-00000000dee9', 'deep', 1, 'ANY', '{}', (repeat('{"a":', 200) || '1' || repeat('}', 200))::jsonb, '-infinity');
select seq from cqrs.append(cqrs.uuid_v7(), 'fine', 'ANY', '{}');
select seq from cqrs.append(cqrs.uuid_v7(), 'other', 'OTHER', '{}');
select projection, key from cqrs.project_batch(
    (select jsonb_agg(to_jsonb(l) order by l.position) from cqrs.command_log l where l.stream in ('deep', 'fine', 'other')), '0/10')
 order by 1, 2;
select projection, halted, last_error_sqlstate, last_error, applied, dead_letters from cqrs.status();
-- the failed event is kept whole, where the operator looks
select projection, stream, seq, sqlstate, jsonb_path_exists(event, 'lax $.**{200}') as whole from cqrs.dead_letter;
select name, jsonb_path_exists(last_error_event, 'lax $.**{200}') as whole from cqrs.projection_state where halted;
-- catch_up reads the log the same way
select projection, key from cqrs.catch_up() order by 1, 2;
rollback;
