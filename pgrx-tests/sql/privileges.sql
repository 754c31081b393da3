-- Roles: applications append through the functions only.
\set ON_ERROR_ROLLBACK on
\set SHOW_CONTEXT never
begin;
\ir install.sql

select rolname from pg_roles where rolname like 'cqrs\_%' order by 1;

-- SECURITY DEFINER functions pin search_path
select p.oid::regprocedure as function, p.proconfig
  from pg_proc p join pg_namespace n on n.oid = p.pronamespace
 where n.nspname = 'cqrs' and p.prosecdef
 order by p.oid::regprocedure::text;

create role app_writer login in role cqrs_writer;
create role app_reader login in role cqrs_reader;
create role stranger login;

set role app_writer;
select seq from cqrs.append('44444444-4444-4444-4444-444444444444', 'p-1', 'T', '{}');
select seq from cqrs.append_batch('[{"command_id": "44444444-4444-4444-4444-444444444445", "stream": "p-1", "command_type": "T", "payload": {}}]');
-- but never the log or the sequences directly
insert into cqrs.command_log (command_id, stream, seq, command_type, payload) values (gen_random_uuid(), 'p-1', 99, 'T', '{}');
\echo :LAST_ERROR_SQLSTATE
update cqrs.stream set last_seq = 0;
\echo :LAST_ERROR_SQLSTATE
select cqrs.register_command_type('T', '{}');
\echo :LAST_ERROR_SQLSTATE
reset role;

set role app_reader;
select stream, last_seq from cqrs.stream;
select count(*) from cqrs.command_log;
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.append(cqrs.uuid_v7(), 'p-1', 'T', '{}');
\echo :LAST_ERROR_SQLSTATE
reset role;

set role stranger;
select * from cqrs.append(cqrs.uuid_v7(), 'p-1', 'T', '{}');
\echo :LAST_ERROR_SQLSTATE
delete from cqrs.command_log;
\echo :LAST_ERROR_SQLSTATE
reset role;

select stream, array_agg(seq order by seq) from cqrs.command_log group by stream;
rollback;
