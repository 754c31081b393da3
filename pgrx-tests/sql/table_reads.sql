\set ECHO none
-- Not a test (the schedule does not list it): \ir'd by projection_scans.sql and lookup_scans.sql
-- with :tables set to the tables to watch (besides every partition of the log), as a regclass[]
-- literal. pg_temp.count_reads_from_now() starts counting what this transaction reads of them;
-- pg_temp.read_too_much() lists each one read since by a sequential scan, or through more than
-- 50 index entries.
create temp view reads as
    select t.relid, t.seq_tup_read, coalesce(t.idx_tup_fetch, 0) as idx_tup_fetch from pg_catalog.pg_stat_xact_user_tables t
     where t.relid = any (:'tables'::regclass[])
        or t.relid in (select p.relid from pg_catalog.pg_partition_tree('cqrs.command_log') p);
create temp table reads_before (relid oid, seq_tup_read bigint, idx_tup_fetch bigint);
create function pg_temp.count_reads_from_now()
returns void
language sql as $$
    delete from pg_temp.reads_before;
    insert into pg_temp.reads_before select * from pg_temp.reads;
$$;
create function pg_temp.read_too_much()
returns table (scanned regclass, rows_read_by_sequential_scans bigint, index_entries_fetched bigint)
language sql as $$
    select a.relid::regclass, a.seq_tup_read - b.seq_tup_read, a.idx_tup_fetch - b.idx_tup_fetch
      from pg_temp.reads a join pg_temp.reads_before b using (relid)
     where a.seq_tup_read > b.seq_tup_read or a.idx_tup_fetch - b.idx_tup_fetch > 50
$$;
\set ECHO all
