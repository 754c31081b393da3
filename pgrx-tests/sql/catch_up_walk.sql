-- Catch-up on a log in daily partitions reads it stream by stream, or walks it in log order,
-- whichever reads less (cqrs._catch_up_from: null, or the position the walk starts after);
-- either way each stream's commands apply once, in order, and the read model is their fold.
\set ON_ERROR_ROLLBACK on
\set SHOW_CONTEXT never
begin;
\ir install.sql
set local timezone = 'UTC';

create function pg_temp.v7(t timestamptz) returns uuid language sql as $$
    select (pg_catalog.lpad(pg_catalog.to_hex((extract(epoch from t) * 1000)::bigint), 12, '0') || '7'
            || pg_catalog.substr(pg_catalog.replace(gen_random_uuid()::text, '-', ''), 14))::uuid
$$;

-- a month of daily partitions
do $$ declare p regclass; begin
    for p in select partition from cqrs.log_partitions() loop
        perform cqrs._disown_log_partition(p);
        execute format('drop table %s', p);
    end loop;
end $$;
select cqrs._create_log_partition('command_log_start', '-infinity',
                                  date_bin('1 day', now() - interval '30 days', '2000-01-01 00:00:00+00'));
select count(*) > 30 as partitions_made from cqrs.maintain();

-- a projection that counts each stream's commands and keeps the day of the last: out of order,
-- the day would be another
create table public.tally (stream text primary key, n int not null default 0, last_day int, rev bigint not null default 0);
select cqrs.create_projection('tally', 'public.tally', 'stream',
    '{"T": {"action": "upsert", "add": {"n": {"const": 1}}, "set": {"last_day": "$.day"}}}', backfill => false);

-- three streams with a command every day of the month, and ten short-lived streams a day; each
-- day's commands a minute or a few after its midnight (UTC, as the partitions are cut), so that
-- a run just before midnight does not spill a day's commands into the next partition
create temp table history as
    select d, s, pg_temp.v7(date_bin('1 day', now(), '2000-01-01 00:00:00+00') - d * interval '1 day'
                            + (k + 1) * interval '1 minute') as id, k
      from generate_series(29, 0, -1) d,
           lateral (select 'month-' || m as s, 0 as k from generate_series(1, 3) m
                    union all
                    select 'day-' || d || '-' || x, k from generate_series(1, 10) x, generate_series(1, 3) k) streams;
select count(*) as appended
  from (select * from history order by d desc, k, s) h,
       lateral cqrs.append(h.id, h.s, 'T', jsonb_build_object('day', h.d)) a;
select count(distinct tableoid) as partitions_used from cqrs.command_log;

-- the fold of the log, independently of any projection
create temp view fold as
    select l.stream, count(*)::int as n,
           (array_agg((l.payload ->> 'day')::int order by l.seq desc))[1] as last_day
      from cqrs.command_log l group by l.stream;

-- a new projection: nothing applied, so no position is skipped and the walk starts at the first
select cqrs._catch_up_from('tally', null, 7) as walk_after;
select count(*) as changed_rows from cqrs.catch_up('tally', 7);
select count(*) as streams, count(*) filter (where t is distinct from null) as folded_right
  from fold f left join public.tally t on t.stream = f.stream and t.n = f.n and t.last_day = f.last_day;
select projection, events_behind from cqrs.status();

-- the streams that live all month go on today: the walk starts after the first new command,
-- found once, rather than at the beginning or stream by stream in each of 30 partitions
create temp table today as
    select 'month-' || m as s, pg_temp.v7(now() + interval '1 minute' * m) as id from generate_series(1, 3) m;
select count(*) as appended from today t, lateral cqrs.append(t.id, t.s, 'T', '{"day": -1}') a;
select cqrs._catch_up_from('tally', null, 7)
     = (select min(l.position) - 1 from cqrs.command_log l join today t on t.id = l.command_id) as walk_after_first_new;
select count(*) as changed_rows from cqrs.catch_up('tally', 7);
select count(*) as streams, count(*) filter (where t is distinct from null) as folded_right
  from fold f left join public.tally t on t.stream = f.stream and t.n = f.n and t.last_day = f.last_day;

-- a short-lived stream of 29 days ago whose progress is lost (as if it had never been applied):
-- its three commands are in one partition, so reading it stream by stream costs less than
-- walking the month after it (null); they are applied again, once
delete from cqrs.projection_stream where projection = 'tally' and stream = 'day-29-1';
select cqrs._catch_up_from('tally', null, 7) as walk_after;
select count(*) as changed_rows from cqrs.catch_up('tally', 7);
select t.n, t.last_day from public.tally t where t.stream = 'day-29-1';

-- nothing behind: stream by stream finds nothing at once
select count(*) as changed_rows from cqrs.catch_up('tally', 7);
select cqrs._catch_up_from('tally', null, 7) as nothing_behind;

-- the projector may ask; readers and writers may not
set local role cqrs_projector;
select cqrs._catch_up_from('tally', null, 7) is null as projector_may;
reset role;
set local role cqrs_reader;
select cqrs._catch_up_from('tally', null, 7);
reset role;
rollback;
