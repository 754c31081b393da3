-- Per-(projection, stream) sequence validation: duplicates are skipped, a gap parks events
-- until it fills, and status shows what is parked and for how long.
\set ON_ERROR_ROLLBACK on
\set SHOW_CONTEXT never
begin;
\ir install.sql
create table counter (stream text primary key, n integer not null default 0, last_seq bigint, rev bigint not null default 0);
select cqrs.create_projection('counter', 'counter', 'stream',
    '{"INC": {"action": "upsert", "add": {"n": "$.by"}, "set": {"last_seq": {"field": "seq"}}}}');
select count(*) from (select cqrs.append(cqrs.uuid_v7(), 'c', 'INC', jsonb_build_object('by', g)) from generate_series(1, 5) g) appended;
create temp table ev as select l.seq, to_jsonb(l) as e from cqrs.command_log l;

-- seq 1 and 2 apply; 4 and 5 arrive before 3: parked
select key, doc::jsonb ->> 'n' as n from cqrs.project_batch((select jsonb_agg(e order by seq) from ev where seq in (1, 2)));
select count(*) as changed from cqrs.project_batch((select jsonb_agg(e order by seq) from ev where seq in (4, 5)));
select stream, seq from cqrs.parked order by seq;
select projection, parked, gap_alert, events_behind from cqrs.status();
select n, last_seq from counter;

-- a gap older than cqrs.gap_alert_after (seconds) raises the alert in status
call pg_temp.cqrs_set('gap_alert_after', '0');
select projection, parked, gap_alert from cqrs.status();
call pg_temp.cqrs_set('gap_alert_after', '60');

-- seq 3 fills the gap: 3, 4, 5 apply in order, nothing stays parked
select key, doc::jsonb ->> 'n' as n, doc::jsonb ->> 'last_seq' as last_seq from cqrs.project_batch((select jsonb_agg(e) from ev where seq = 3));
select count(*) as parked from cqrs.parked;
select n, last_seq from counter;

-- everything again, reordered: all duplicates
select count(*) as changed from cqrs.project_batch((select jsonb_agg(e order by seq desc) from ev));
select name, applied, duplicates, parked from cqrs.projection_state;

-- within one batch, a stream's events apply in seq order whatever their order in the batch
select count(*) from (select cqrs.append(cqrs.uuid_v7(), 'd', 'INC', jsonb_build_object('by', g)) from generate_series(1, 3) g) appended;
select key, doc::jsonb ->> 'n' as n, doc::jsonb ->> 'last_seq' as last_seq
  from cqrs.project_batch((select jsonb_agg(to_jsonb(l) order by l.seq desc) from cqrs.command_log l where l.stream = 'd'));
select projection, events_behind, parked from cqrs.status();
rollback;
