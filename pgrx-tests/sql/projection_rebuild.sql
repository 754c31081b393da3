-- cqrs.rebuild replays the whole log into a read model; cqrs.catch_up applies what a
-- projection has not applied yet; backfill at creation.
\set ON_ERROR_ROLLBACK on
\set SHOW_CONTEXT never
set client_min_messages = warning;
begin;
\ir install.sql
create table totals (stream text primary key, total integer not null default 0, events integer not null default 0, rev bigint not null default 0);
select count(*) from (select cqrs.append(cqrs.uuid_v7(), 's' || (g % 7), 'ADD', jsonb_build_object('n', g)) from generate_series(1, 500) g) appended;

-- backfill (the default) projects the log as it is
select cqrs.create_projection('totals', 'totals', 'stream', '{"ADD": {"action": "upsert", "add": {"total": "$.n", "events": {"const": 1}}}}');
create temp table expected as
  select stream, sum((payload ->> 'n')::int) as total, count(*) as events from cqrs.command_log group by stream;
select count(*) as mismatches from expected e full join totals t using (stream)
 where e.total is distinct from t.total or e.events is distinct from t.events;

-- damage the read model, then rebuild: the same result, every row with a newer revision
update totals set total = -1;
select max(rev) as rev_before from totals \gset
select events, seconds >= 0 as timed from cqrs.rebuild('totals', chunk => 64);
select count(*) as mismatches from expected e full join totals t using (stream)
 where e.total is distinct from t.total or e.events is distinct from t.events;
select bool_and(rev > :rev_before) as newer_revisions from totals;
select projection, events_behind, parked, halted, generation from cqrs.status();

-- catch_up applies what a projection missed (here: commands appended without projecting)
select count(*) from (select cqrs.append(cqrs.uuid_v7(), 'late', 'ADD', '{"n": 5}') from generate_series(1, 3)) appended;
select projection, events_behind from cqrs.status();
select projection, events_behind, seconds_behind > 0 as waiting from cqrs.progress();
select projection, key, doc::jsonb ->> 'total' as total from cqrs.catch_up('totals');
select projection, events_behind from cqrs.status();
select count(*) as nothing_left from cqrs.catch_up();
select projection, events_behind, seconds_behind from cqrs.progress();

-- backfill => false starts at the end of the log
create table from_now (stream text primary key, events integer not null default 0, rev bigint not null default 0);
select cqrs.create_projection('from_now', 'from_now', 'stream', '{"ADD": {"action": "upsert", "add": {"events": {"const": 1}}}}', backfill => false);
select count(*) as rows, (select events_behind from cqrs.status() where projection = 'from_now') as behind from from_now;
select events_behind as progress_behind from cqrs.progress() where projection = 'from_now';

-- bad arguments
select * from cqrs.rebuild('nope');
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.rebuild('totals', chunk => 0);
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.resume('nope');
\echo :LAST_ERROR_SQLSTATE
rollback;
