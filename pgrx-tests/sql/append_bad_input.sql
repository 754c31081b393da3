-- Bad input to cqrs.append gets a clear error and a real SQLSTATE, never a crash.
\set ON_ERROR_ROLLBACK on
\set SHOW_CONTEXT never
begin;
\ir install.sql

select * from cqrs.append(null, 's', 'T', '{}');
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.append(cqrs.uuid_v7(), null, 'T', '{}');
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.append(cqrs.uuid_v7(), '', 'T', '{}');
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.append(cqrs.uuid_v7(), repeat('s', 257), 'T', '{}');
\echo :LAST_ERROR_SQLSTATE
-- 256 bytes is fine, and multi-byte characters count in bytes
select seq from cqrs.append(cqrs.uuid_v7(), repeat('s', 256), 'T', '{}');
select * from cqrs.append(cqrs.uuid_v7(), repeat('é', 129), 'T', '{}');
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.append(cqrs.uuid_v7(), 's', null, '{}');
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.append(cqrs.uuid_v7(), 's', '', '{}');
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.append(cqrs.uuid_v7(), 's', repeat('T', 129), '{}');
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.append(cqrs.uuid_v7(), 's', 'T', null);
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.append(cqrs.uuid_v7(), 's', 'T', '[1, 2]');
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.append(cqrs.uuid_v7(), 's', 'T', '"text"');
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.append(cqrs.uuid_v7(), 's', 'T', 'null');
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.append(cqrs.uuid_v7(), 's', 'T', '{}', metadata => null);
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.append(cqrs.uuid_v7(), 's', 'T', '{}', metadata => '[]');
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.append(cqrs.uuid_v7(), 's', 'T', '{}', -5);
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.append('not-a-uuid', 's', 'T', '{}');
\echo :LAST_ERROR_SQLSTATE
-- a large payload is fine (it is TOASTed like any jsonb)
select seq from cqrs.append(cqrs.uuid_v7(), 'big', 'T', jsonb_build_object('blob', repeat('x', 1000000)));
select pg_column_size(payload) < 1000000 as compressed from cqrs.command_log where stream = 'big';

-- nothing but the two good commands was written
select left(stream, 8) as stream_prefix, octet_length(stream) as bytes, seq from cqrs.command_log order by position;
rollback;
