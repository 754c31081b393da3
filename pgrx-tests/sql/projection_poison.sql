-- A handler that fails: with on_error = 'halt' the projection stops (and only it: others go
-- on), keeping what it had before the batch; with 'dead_letter' the event is set aside and
-- the projection goes on. Either way the error and the event are kept for the operator.
\set ON_ERROR_ROLLBACK on
\set SHOW_CONTEXT never
set client_min_messages = error;
begin;
\ir install.sql
create table strict_rm (stream text primary key, amount integer not null, rev bigint not null default 0);
create table lenient_rm (stream text primary key, amount integer not null, rev bigint not null default 0);
create table healthy_rm (stream text primary key, seen integer not null default 0, rev bigint not null default 0);
select cqrs.create_projection('strict', 'strict_rm', 'stream', '{"PAY": {"action": "upsert", "set": {"amount": "$.amount"}}}');
select cqrs.create_projection('lenient', 'lenient_rm', 'stream', '{"PAY": {"action": "upsert", "set": {"amount": "$.amount"}}}', on_error => 'dead_letter');
select cqrs.create_projection('healthy', 'healthy_rm', 'stream', '{"PAY": {"action": "upsert", "add": {"seen": {"const": 1}}}}');

-- the second command's amount does not fit an integer
select count(*) from (select cqrs.append(cqrs.uuid_v7(), s, 'PAY', p::jsonb) from (values
  ('a', '{"amount": 10}'), ('b', '{"amount": "lots"}'), ('c', '{"amount": 30}')) v(s, p)) appended;
select projection, key from cqrs.project_batch((select jsonb_agg(to_jsonb(l) order by l.position) from cqrs.command_log l), '0/10')
 order by projection, key;

-- strict halted with nothing applied; lenient dead-lettered b and applied a and c; healthy is untouched by either
select projection, halted, last_error_sqlstate, last_error, dead_letters, events_behind from cqrs.status();
-- cqrs.progress() (what the sidecar polls: counted from the checkpoint) agrees
select projection, halted, events_behind, seconds_behind > 0 as waiting, parked, dead_letters, dead_lettered from cqrs.progress();
select name, last_error_event ->> 'stream' as poison_stream, last_error_event ->> 'seq' as poison_seq from cqrs.projection_state where halted;
select (select count(*) from strict_rm) as strict_rows, (select count(*) from lenient_rm) as lenient_rows, (select count(*) from healthy_rm) as healthy_rows;
select projection, stream, seq, sqlstate, error, event -> 'payload' as payload from cqrs.dead_letter;

-- a halted projection ignores later batches
select seq from cqrs.append(cqrs.uuid_v7(), 'd', 'PAY', '{"amount": 40}');
select projection, key from cqrs.project_batch((select jsonb_agg(to_jsonb(l)) from cqrs.command_log l where l.stream = 'd'), '0/20') order by projection;
select count(*) as strict_rows from strict_rm;

-- resume: still failing → halted again, the event named
select count(*) from cqrs.resume('strict');
select name, halted, last_error_event ->> 'stream' as poison_stream from cqrs.projection_state where name = 'strict';

-- fix the read model (the amount may be text now) and resume: it catches up from the log
alter table strict_rm alter column amount type text;
select projection, key, doc::jsonb ->> 'amount' as amount from cqrs.resume('strict') order by key;
select projection, halted, events_behind, generation from cqrs.status() where projection = 'strict';

-- the same fix lets the dead letter through
alter table lenient_rm alter column amount type text;
select projection, key, doc::jsonb ->> 'amount' as amount from cqrs.retry_dead_letters('lenient');
select count(*) as dead_letters from cqrs.dead_letter;
select stream, amount from lenient_rm order by stream;

-- a missing key is a poison event too
create table keyed_rm (id text primary key, rev bigint not null default 0);
select cqrs.create_projection('keyed', 'keyed_rm', 'id', '{"KEYED": {"action": "upsert", "key": "$.id"}}', on_error => 'dead_letter', backfill => false);
select seq from cqrs.append(cqrs.uuid_v7(), 'e', 'KEYED', '{}');
select count(*) from cqrs.project_batch((select jsonb_agg(to_jsonb(l)) from cqrs.command_log l where l.stream = 'e'));
select projection, stream, sqlstate, error from cqrs.dead_letter;

-- backfilling a projection whose handlers fail on the log registers nothing
create table broken_rm (stream text primary key, amount integer, rev bigint not null default 0);
select cqrs.create_projection('broken', 'broken_rm', 'stream', '{"PAY": {"action": "upsert", "set": {"amount": "$.amount"}}}');
\echo :LAST_ERROR_SQLSTATE
select count(*) from cqrs.projection where name = 'broken';
rollback;
