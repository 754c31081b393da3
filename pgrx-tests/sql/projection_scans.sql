-- A batch reaches the command log and each stream's progress by key, however large they grew
-- after the session's first batches: the plans a session keeps are made while the tables are
-- small, and must not scan them later (the portable edition's hashed the whole log and every
-- stream's progress for each batch; the extension's progress update, planned on a handful of
-- rows, compared each stream of a batch with every stream of the projection).
\set ON_ERROR_ROLLBACK on
\set SHOW_CONTEXT never
begin;
\ir install.sql
create table counter (stream text primary key, n integer not null default 0, rev bigint not null default 0);
select cqrs.create_projection('counter', 'counter', 'stream', '{"INC": {"action": "upsert", "add": {"n": "$.by"}}}');
-- as autovacuum does on a fresh install: the statistics say the tables are empty
analyze cqrs.projection_stream, cqrs.command_log;

-- the session's first batches, while both tables are small: the plans it keeps are made now
-- (a first event of ten streams, then a second: new streams' progress, then known streams')
select count(*) from (select cqrs.append(cqrs.uuid_v7(), 's' || (g % 10), 'INC', '{"by": 1}') from generate_series(0, 19) g) appended;
do $$
begin
    for i in 1..20 loop
        perform cqrs.project_batch((select jsonb_agg(to_jsonb(l)) from cqrs.command_log l
                                     where l.stream = 's' || (i % 10) and l.seq = 1 + (i - 1) / 10));
    end loop;
end
$$;

-- then the log and the progress grow to thousands of rows
select count(*) from (select cqrs.append(cqrs.uuid_v7(), 't' || g, 'INC', '{"by": 1}') from generate_series(1, 3000) g) appended;
select count(*) as changed
  from cqrs.project_batch((select jsonb_agg(to_jsonb(l) order by l.position) from cqrs.command_log l where l.stream like 't%'));
select count(*) from (select cqrs.append(cqrs.uuid_v7(), 't' || g, 'INC', jsonb_build_object('by', s)) from generate_series(1, 5) g, generate_series(2, 3) s) appended;
create temp table batch as
    select l.seq, jsonb_agg(to_jsonb(l) order by l.position) as events from cqrs.command_log l where l.stream like 't%' and l.seq > 1 group by l.seq;

-- What a batch of five read of the log (any partition) and of the progress: no row by a
-- sequential scan (the first partition is empty here: a scan of it reads nothing, and is what
-- the planner picks), and about one index entry per event, not the projection's thousands.
\set tables '{cqrs.projection_stream,counter}'
\ir input/sql/table_reads.sql

-- The read model's rows: the extension finds each once by key (its probe) and writes it at the
-- row the probe returned, not through the key's index a second time (it did, before 1989e28);
-- the portable edition probes twice (its fold's existence check, its update).
create function pg_temp.read_model_fetches_within_bound()
returns boolean
language sql as $$
    select (a.idx_tup_fetch - b.idx_tup_fetch) <= 5 * case v.edition when 'extension' then 1 else 2 end
      from pg_temp.reads a join pg_temp.reads_before b using (relid), cqrs.version() v
     where a.relid = 'counter'::regclass
$$;

-- with the plans made on the small tables
select pg_temp.count_reads_from_now();
select count(*) as changed from cqrs.project_batch((select events from batch where seq = 2));
select * from pg_temp.read_too_much();
select pg_temp.read_model_fetches_within_bound();

-- and made again once the statistics know the tables' sizes (as autovacuum will have by now)
analyze cqrs.projection_stream, cqrs.command_log;
select pg_temp.count_reads_from_now();
select count(*) as changed from cqrs.project_batch((select events from batch where seq = 3));
select * from pg_temp.read_too_much();
select pg_temp.read_model_fetches_within_bound();
select stream, n from counter where stream in ('s1', 't1', 't5') order by stream;
rollback;
