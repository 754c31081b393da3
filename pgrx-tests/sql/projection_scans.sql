-- A batch reaches the command log and each stream's progress by index, however large they grew
-- after the session's first batches: the plans a session keeps are made while the tables are
-- small, and must not scan them later (the portable edition's did: it hashed the whole log and
-- every stream's progress for each batch, so a batch cost more as the log grew).
\set ON_ERROR_ROLLBACK on
\set SHOW_CONTEXT never
begin;
\ir install.sql
create table counter (stream text primary key, n integer not null default 0, rev bigint not null default 0);
select cqrs.create_projection('counter', 'counter', 'stream', '{"INC": {"action": "upsert", "add": {"n": "$.by"}}}');

-- the session's first batches, while both tables are small: the plans it keeps are made now
select count(*) from (select cqrs.append(cqrs.uuid_v7(), 's' || g, 'INC', '{"by": 1}') from generate_series(1, 10) g) appended;
do $$
begin
    for i in 1..10 loop
        perform cqrs.project_batch((select jsonb_agg(to_jsonb(l)) from cqrs.command_log l where l.stream = 's' || i));
    end loop;
end
$$;

-- then the log and the progress grow to thousands of rows
select count(*) from (select cqrs.append(cqrs.uuid_v7(), 't' || g, 'INC', '{"by": 1}') from generate_series(1, 3000) g) appended;
select count(*) as changed
  from cqrs.project_batch((select jsonb_agg(to_jsonb(l) order by l.position) from cqrs.command_log l where l.stream like 't%'));
select count(*) from (select cqrs.append(cqrs.uuid_v7(), 't' || g, 'INC', '{"by": 2}') from generate_series(1, 5) g) appended;
-- as autovacuum would have by now
analyze cqrs.projection_stream, cqrs.command_log;
create temp table batch as
    select jsonb_agg(to_jsonb(l) order by l.position) as events from cqrs.command_log l where l.stream like 't%' and l.seq = 2;

-- a batch of five: no sequential scan reads a row of the log (any partition) or of the progress
-- (the first partition is empty here: a scan of it reads nothing and is what the planner picks)
create temp view scans as
    select t.relid, t.seq_tup_read from pg_catalog.pg_stat_xact_user_tables t
     where t.relid = 'cqrs.projection_stream'::regclass
        or t.relid in (select p.relid from pg_catalog.pg_partition_tree('cqrs.command_log') p);
create temp table scans_before as select * from scans;
select count(*) as changed from cqrs.project_batch((select events from batch));
select a.relid::regclass as scanned, a.seq_tup_read - b.seq_tup_read as rows_read_by_sequential_scans
  from scans a join scans_before b using (relid) where a.seq_tup_read > b.seq_tup_read;
select n from counter where stream in ('t1', 't5') order by stream;
rollback;
