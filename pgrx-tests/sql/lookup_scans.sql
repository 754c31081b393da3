-- An append, a wait for a command's projection and a read reach the stream, the log, the
-- progress and the read model by key, however large they grew after the session's first calls:
-- the plans a session keeps are made while the tables are small (a sequential scan is the
-- cheapest way through a table of one page), and must not scan them whole later. The same
-- hazard as projection_scans.sql, for the other paths an application calls all day.
\set ON_ERROR_ROLLBACK on
\set SHOW_CONTEXT never
begin;
\ir install.sql
create table counter (stream text primary key, n integer not null default 0, rev bigint not null default 0);
select cqrs.create_projection('counter', 'counter', 'stream', '{"INC": {"action": "upsert", "add": {"n": "$.by"}}}');
-- as autovacuum does on a fresh install: the statistics say the tables are empty
analyze cqrs.stream, cqrs.command_log, cqrs.projection_stream, counter;

-- the session's first calls, while the tables are small: the plans it keeps are made now (more
-- than five of each, past the custom plans a kept statement starts with)
do $$
begin
    for i in 0..19 loop
        perform cqrs.append(cqrs.uuid_v7(), 's' || (i % 10), 'INC', '{"by": 1}');
        -- a replay: the lookup of a command id already logged
        perform cqrs.append((select l.command_id from cqrs.command_log l order by l.position desc limit 1),
                            's' || (i % 10), 'INC', '{"by": 1}');
    end loop;
    perform cqrs.project_batch((select jsonb_agg(to_jsonb(l) order by l.position) from cqrs.command_log l));
    for i in 0..19 loop
        perform cqrs.wait_for('s' || (i % 10), 1 + i / 10, 'counter', '0 s');
        perform cqrs.read('counter', 's' || (i % 10));
        perform cqrs.read_many('counter', array['s' || (i % 10), 'nobody']);
    end loop;
end
$$;

-- then every table grows to thousands of rows
select count(*) from (select cqrs.append(cqrs.uuid_v7(), 't' || g, 'INC', '{"by": 1}') from generate_series(1, 3000) g) appended;
select count(*) as changed
  from cqrs.project_batch((select jsonb_agg(to_jsonb(l) order by l.position) from cqrs.command_log l where l.stream like 't%'));

-- What the calls read of the stream, the log (any partition), the progress and the read model:
-- no row by a sequential scan, and a few index entries per call, not the tables' thousands.
\set tables '{cqrs.stream,cqrs.projection_stream,counter}'
\ir input/sql/table_reads.sql
create function pg_temp.calls(round integer)
returns table (appended bigint, replayed bigint, applied boolean, n integer, found bigint)
language plpgsql as $$
declare
    id uuid := cqrs.uuid_v7();
begin
    return query
    select (select count(*) from (select cqrs.append(case g when round then id else cqrs.uuid_v7() end,
                                                     't' || g, 'INC', '{"by": 1}')
                                    from generate_series(round, round + 4) g) a),
           (select count(*) from (select cqrs.append(id, 't' || round, 'INC', '{"by": 1}')) a),
           cqrs.wait_for('t' || round, 1, 'counter', '0 s'),
           (select (r.doc ->> 'n')::integer from cqrs.read('counter', 't' || round) r),
           (select count(*) from cqrs.read_many('counter', array['t' || round, 't' || (round + 1), 'nobody']) r
             where r.doc is not null);
end
$$;

-- with the plans made on the small tables
select pg_temp.count_reads_from_now();
select * from pg_temp.calls(1);
select * from pg_temp.read_too_much();

-- and made again once the statistics know the tables' sizes (as autovacuum will have by now)
analyze cqrs.stream, cqrs.command_log, cqrs.projection_stream, counter;
select pg_temp.count_reads_from_now();
select * from pg_temp.calls(100);
select * from pg_temp.read_too_much();
rollback;
