-- cqrs.wait_for: read-your-writes. (Waking within milliseconds of the projecting commit is
-- tested end to end with two sessions; here the answers and the errors.)
\set ON_ERROR_ROLLBACK on
\set SHOW_CONTEXT never
\ir install.sql
create table w_rm (stream text primary key, n integer not null default 0, rev bigint not null default 0);
select cqrs.create_projection('w', 'w_rm', 'stream', '{"INC": {"action": "upsert", "add": {"n": {"const": 1}}}}');
select seq from cqrs.append(cqrs.uuid_v7(), 'w-1', 'INC', '{}');
-- not projected yet: false after the timeout
select cqrs.wait_for('w-1', 1, 'w', '50 ms') as applied;
select count(*) from cqrs.project_batch((select jsonb_agg(to_jsonb(l)) from cqrs.command_log l));
select cqrs.wait_for('w-1', 1, 'w') as applied;
select cqrs.wait_for(stream => 'w-1', seq => 1, projection => 'w', timeout => '0 s') as applied_now;
-- errors
select cqrs.wait_for('w-1', 0, 'w');
\echo :LAST_ERROR_SQLSTATE
select cqrs.wait_for('w-1', 1, 'nope', '10 ms');
\echo :LAST_ERROR_SQLSTATE
select cqrs.wait_for('w-1', 1, 'w', '-1 s');
\echo :LAST_ERROR_SQLSTATE
begin isolation level repeatable read;
select cqrs.wait_for('w-1', 1, 'w', '10 ms');
\echo :LAST_ERROR_SQLSTATE
rollback;
update cqrs.projection_state set halted = true, last_error = 'boom' where name = 'w';
select cqrs.wait_for('w-1', 2, 'w', '10 ms');
\echo :LAST_ERROR_SQLSTATE
\ir uninstall.sql
drop table w_rm;
