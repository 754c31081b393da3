-- Retention: the command log in partitions by the time in its command ids; partitions made ahead;
-- old ones removed whole, never past what a projection or a sink has not checkpointed; after
-- that, sequences and expected_seq go on, a retry inside the horizon is a duplicate and one
-- outside it is refused (55000), a rebuild is refused (55000) rather than half done.
\set ON_ERROR_ROLLBACK on
\set SHOW_CONTEXT never
begin;
\ir install.sql
set local timezone = 'UTC';

-- a UUIDv7 of a given time (what a client's clock made then)
create function pg_temp.v7(t timestamptz) returns uuid language sql as $$
    select (pg_catalog.lpad(pg_catalog.to_hex((extract(epoch from t) * 1000)::bigint), 12, '0') || '7'
            || pg_catalog.substr(pg_catalog.replace(gen_random_uuid()::text, '-', ''), 14))::uuid
$$;

-- the time in an id: UUIDv7 only, to the millisecond; other ids have none
select cqrs.command_time('0193a0b4-1c2d-7e3f-8a4b-5c6d7e8f9a0b') as v7_time,
       cqrs.command_time('0193a0b4-1c2d-4e3f-8a4b-5c6d7e8f9a0b') as v4_time,
       cqrs.command_time('0193a0b4-1c2d-7e3f-ca4b-5c6d7e8f9a0b') as bad_variant_time,
       cqrs.command_time(pg_temp.v7('2026-03-04 05:06:07.089+00')) as made_time;

-- a new log has no partition (CREATE EXTENSION makes none: a restore from pg_dump brings its
-- own); the first append makes them, as cqrs.maintain() does
select count(*) as partitions, (select log_to from cqrs.retention) as log_to from cqrs.log_partitions();
savepoint first_append;
select seq as first_seq from cqrs.append(pg_temp.v7(now()), 'first', 'PLACED', '{}');
select count(*) - 1 = (select premake + 1 from cqrs.retention) as made_by_the_append from cqrs.log_partitions();
rollback to savepoint first_append;
select pg_catalog.setval(pg_catalog.pg_get_serial_sequence('cqrs.command_log', 'position'), 1, false) as position_reset;
select count(*) - 1 = (select premake + 1 from cqrs.retention) as made_by_maintain from cqrs.maintain();
-- the first partition takes every earlier time and every id without one, then one partition a
-- day up to retention.premake days ahead
select p.partition::text like 'cqrs.command_log_%' as named, p.lower_bound = '-infinity' as first_is_open
  from cqrs.log_partitions() p order by p.lower_bound limit 1;
select count(*) - 1 = (select premake + 1 from cqrs.retention) as days_ahead,
       max(upper_bound) = (select log_to from cqrs.retention) as log_to_recorded
  from cqrs.log_partitions();
-- maintain() is idempotent within a day
select count(*) as made_again from cqrs.maintain();

-- a month of history, one partition a day: the first partition ends 30 days ago
do $$ declare p regclass; begin
    for p in select partition from cqrs.log_partitions() loop
        perform cqrs._disown_log_partition(p);
        execute format('drop table %s', p);
    end loop;
end $$;
select cqrs._create_log_partition('command_log_start', '-infinity',
                                  date_bin('1 day', now() - interval '30 days', '2000-01-01 00:00:00+00'));
select count(*) as made, count(*) filter (where action = 'created') as created from cqrs.maintain();
select count(*) as partitions from cqrs.log_partitions();

-- commands on every day of it, three streams one command a day
create temp table history as
  select d, s, pg_temp.v7(now() - d * interval '1 day') as id
    from generate_series(29, 0, -1) d, generate_series(1, 3) s;
select count(*) as appended
  from (select * from history order by d desc, s) h, lateral cqrs.append(h.id, 'order-' || h.s, 'PLACED', jsonb_build_object('day', h.d)) a;
select count(distinct tableoid) as partitions_used, count(*) filter (where l.id_time <> cqrs.command_time(l.command_id)) as misplaced
  from cqrs.command_log l;

-- a projection (backfilled: at the end of the log) and a sink that has delivered nothing
create table public.order_days (stream text primary key, days integer not null default 0, rev bigint not null default 0);
select cqrs.create_projection('order_days', 'public.order_days', 'stream',
    '{"PLACED": {"action": "upsert", "add": {"days": {"const": 1}}}}');
select cqrs._ensure_sink('audit', 'default');
-- a command appended now with an id without a time sits in the first partition, and holds it
-- (and so every later one: what is left of the log stays whole from its horizon on)
savepoint untimed;
select position as untimed_position from cqrs.append(gen_random_uuid(), 'order-9', 'PLACED', '{}') \gset
select p.lower_bound as untimed_partition_from, l.id_time
  from cqrs.command_log l join cqrs.log_partitions() p on p.partition = l.tableoid where l.position = :untimed_position;
select action, commands, regexp_replace(reason, 'appended at .*\(', 'appended at … (') as reason
  from cqrs.archive_before(now() - interval '7 days');
rollback to savepoint untimed;

-- the sink holds retention back: the empty partitions leave, the first with a command it has
-- not delivered stays and says why
select action, commands, reason from cqrs.archive_before(now() - interval '7 days');
update cqrs.sink set checkpoint_position = (select max(position) from cqrs.command_log) where name = 'audit';
-- so does a reader of the log of its own (cqrs.hold_log), until it reads on or is released
select cqrs.hold_log('cdc', 0);
select action, commands, reason from cqrs.archive_before(now() - interval '7 days');
-- the same removal planned for DETACH … CONCURRENTLY, as statements for psql's \gexec (which
-- cannot run in this test's transaction): nothing while cdc holds, then a detach and a finish
-- for each partition that may go
-- (its notice, which names the partition it keeps, is left out: it holds a date)
set local client_min_messages = warning;
select count(*) as statements from cqrs.archive_before_concurrently(now() - interval '7 days');
reset client_min_messages;
select cqrs.hold_log('cdc', (select max(position) from cqrs.command_log));
select count(*) as statements,
       count(*) filter (where statement ~ '^alter table cqrs\.command_log detach partition cqrs\.command_log_[0-9]{8} concurrently$') as detaches,
       count(*) filter (where statement ~ '^select \* from cqrs\.archive_detached\(''cqrs\.command_log_[0-9]{8}'', ') as finishes
  from cqrs.archive_before_concurrently(now() - interval '7 days');
-- the finish refuses a partition the detach has not taken off the log
do $$ begin
    perform cqrs.archive_detached(p.partition, p.lower_bound, p.upper_bound, now() - interval '7 days')
       from cqrs.log_partitions() p order by p.lower_bound limit 1;
exception when others then
    declare v_hint text; begin
        get stacked diagnostics v_hint = pg_exception_hint;
        raise notice '% % / %', sqlstate, regexp_replace(sqlerrm, '[0-9]{8}', 'YYYYMMDD'), regexp_replace(v_hint, '[0-9]{8}', 'YYYYMMDD');
    end;
end $$;
select cqrs.release_log('cdc') as released, cqrs.release_log('cdc') as released_again;
select cqrs.hold_log('', 0);
\echo :LAST_ERROR_SQLSTATE
select cqrs.hold_log('cdc', -1);
\echo :LAST_ERROR_SQLSTATE

-- refused: a time to come
select * from cqrs.archive_before(now() + interval '1 day');
\echo :LAST_ERROR_SQLSTATE

-- the rest of what is older than 7 days leaves, oldest first, into the archive schema
-- (an archive schema that is not there is refused before anything moves)
update cqrs.retention set archive_schema = 'cqrs_archive';
select count(*) from cqrs.archive_before(now() - interval '7 days');
\echo :LAST_ERROR_SQLSTATE
create schema cqrs_archive;
-- (granted to whoever owns pg_cqrs's functions: the superuser, or the portable edition's installer)
do $$ begin
    execute format('grant create on schema cqrs_archive to %I',
                   (select p.proowner::regrole::text from pg_proc p where p.oid = 'cqrs.archive_before(timestamptz, interval)'::regprocedure));
end $$;
select max(position) as expect_removed_through from cqrs.command_log
 where id_time < date_bin('1 day', now() - interval '7 days', '2000-01-01 00:00:00+00') \gset
select action, count(*) as partitions, sum(commands) as commands
  from cqrs.archive_before(now() - interval '7 days') group by action;
select count(*) as archived_tables from pg_tables where schemaname = 'cqrs_archive';
select cqrs.idempotency_horizon() = date_bin('1 day', now() - interval '7 days', '2000-01-01 00:00:00+00') as horizon_is_seven_days,
       (select min(lower_bound) from cqrs.log_partitions()) = cqrs.idempotency_horizon() as horizon_is_the_oldest_partition,
       removed_through = :expect_removed_through as removed_through_recorded
  from cqrs.retention;
select count(*) as kept, min((payload ->> 'day')::int) as newest_day, max((payload ->> 'day')::int) as oldest_day from cqrs.command_log;

-- a reader of the log cannot start before what is left, nor a new projection backfill from it
select cqrs.hold_log('late', 0);
\echo :LAST_ERROR_SQLSTATE
create table public.late_days (stream text primary key, days integer not null default 0, rev bigint not null default 0);
select cqrs.create_projection('late_days', 'public.late_days', 'stream',
    '{"PLACED": {"action": "upsert", "add": {"days": {"const": 1}}}}');
\echo :LAST_ERROR_SQLSTATE
select cqrs.create_projection('late_days', 'public.late_days', 'stream',
    '{"PLACED": {"action": "upsert", "add": {"days": {"const": 1}}}}', backfill => false);
select count(*) as late_rows from public.late_days;

-- a stream's sequence goes on, and expected_seq checks against it
select seq from cqrs.append(cqrs.uuid_v7(), 'order-1', 'PLACED', '{"day": -1}', expected_seq => 30);
select seq from cqrs.append(cqrs.uuid_v7(), 'order-1', 'PLACED', '{"day": -1}', expected_seq => 30);
\echo :LAST_ERROR_SQLSTATE

-- a retry inside the horizon is a duplicate; one outside it is refused, not appended again
select a.duplicate, a.seq from history h, lateral cqrs.append(h.id, 'order-1', 'PLACED', '{"day": 3}') a
 where h.d = 3 and h.s = 1;
do $$ begin
    perform cqrs.append(h.id, 'order-1', 'PLACED', '{"day": 20}') from history h where h.d = 20 and h.s = 1;
exception when others then
    raise notice '% %', sqlstate, regexp_replace(sqlerrm, '[0-9a-f-]{36}', '<id>');
end $$;
-- an id without a time has no partition left: refused
do $$ begin
    perform cqrs.append(gen_random_uuid(), 'order-1', 'PLACED', '{}');
exception when others then
    raise notice '% %', sqlstate, regexp_replace(sqlerrm, '[0-9a-f-]{36}', '<id>');
end $$;
-- an id from beyond the partitions made ahead
do $$ begin
    perform cqrs.append(pg_temp.v7(now() + interval '1 year'), 'order-1', 'PLACED', '{}');
exception when others then
    raise notice '% %', sqlstate, regexp_replace(sqlerrm, '[0-9a-f-]{36}', '<id>');
end $$;
select count(*) filter (where (payload ->> 'day')::int >= 8) as old_commands_again from cqrs.command_log;

-- the projection goes on; a rebuild is refused rather than half done
select count(*) as projected from cqrs.catch_up('order_days');
select projection, events_behind, parked, halted from cqrs.status();
select * from cqrs.rebuild('order_days');
\echo :LAST_ERROR_SQLSTATE
do $$ begin
    perform cqrs.rebuild('order_days');
exception when others then
    declare v_hint text; begin
        get stacked diagnostics v_hint = pg_exception_hint;
        raise notice '% / %', regexp_replace(sqlerrm, 'position [0-9]+', 'position N'), v_hint;
    end;
end $$;

-- dropped when no archive schema is set; maintain() applies retention.keep
update cqrs.retention set archive_schema = null, keep = interval '5 days';
select action, count(*) as partitions, sum(commands) as commands from cqrs.maintain() group by action;
select count(*) as kept, max((payload ->> 'day')::int) as oldest_day from cqrs.command_log;
select count(*) as archived_tables from pg_tables where schemaname = 'cqrs_archive';

-- settings are checked (the row's values are left out: they hold today's date)
do $$
declare
    v_change text;
    v_constraint text;
begin
    foreach v_change in array array['partition_interval = interval ''1 month''', 'partition_interval = interval ''90 minutes''',
                                    'keep = interval ''1 hour''', 'premake = 0'] loop
        begin
            execute 'update cqrs.retention set ' || v_change;
            raise notice '%: accepted', v_change;
        exception when check_violation then
            get stacked diagnostics v_constraint = constraint_name;
            raise notice '%: % (%)', v_change, sqlstate, v_constraint;
        end;
    end loop;
end $$;
rollback;
