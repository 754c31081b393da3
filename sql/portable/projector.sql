-- pg_cqrs, portable edition: the projection engine in PL/pgSQL, with the extension edition's
-- semantics (extension/src/projector.rs and events.rs; projection/src/sequencing.rs, fold.rs):
-- per-(projection, stream) sequencing with parking, one write per read-model row per batch,
-- exactly-once checkpoints, revisions, halt or dead letter with the failing event located.
-- Each projection's declarative handlers run as one set-based statement per batch, compiled by
-- compile.sql and run as the table's owner by owner_rights.sql; no loop over events on that
-- path. The SQL functions of the projection side are in projection_api.sql.

-- ==============================================================================================
-- public: cqrs._project_batch (cqrs.project_batch, sql/core/projection.sql, fences it)
-- ==============================================================================================

-- The work of cqrs.project_batch: the fence (cqrs._fence, sql/core/projection.sql), the events
-- as the log holds them, then every projection.
create function cqrs._project_batch(events jsonb, commit_lsn pg_lsn, fencing_token bigint, projection_group text)
returns table (projection text, key text, rev bigint, doc json, deleted boolean)
language plpgsql volatile called on null input
as $$
#variable_conflict use_column
declare
    -- the caller's search_path: the owner's code may change it (see cqrs_portable._restore_search_path)
    v_search_path text := pg_catalog.current_setting('search_path');
    v_events jsonb;
begin
    perform cqrs._fence(fencing_token, commit_lsn, projection_group);
    v_events := cqrs_portable._events(events);
    return query
        select p.projection, p.key, p.rev, p.doc, p.deleted
          from cqrs_portable._project(v_events, commit_lsn, null, true, null, projection_group) p where p.kind = 'row';
    perform cqrs_portable._restore_search_path(v_search_path);
end
$$;

-- ==============================================================================================
-- internal: events, the plan of a batch, running it, bookkeeping
-- ==============================================================================================

-- The small expression helpers below carry no `set search_path`: SQL functions without one are
-- inlined into the statements that call them per event and per key (with one, each call is a
-- function call plus a save and restore of the settings). They name only built-ins, which
-- PostgreSQL finds in pg_catalog before any schema of the caller's search_path.

-- The log partition of a batch's command id (its id_time, sql/core/retention.sql); null, which
-- matches no row, for text that is not a UUID in canonical form. Read from the text itself: a
-- case-insensitive regular expression with counted repeats and the cast to uuid and back took
-- 4.7 ms per 1,000 events, this 2.1 ms (measured).
create function cqrs_portable._id_time(command_id text)
returns timestamptz
language sql immutable parallel safe
as $$
    select case when pg_catalog.length(command_id) = 36 and command_id ~ '^[0-9a-fA-F-]+$'
                     and pg_catalog.length(pg_catalog.replace(command_id, '-', '')) = 32
                     and pg_catalog.substr(command_id, 9, 1) = '-' and pg_catalog.substr(command_id, 14, 1) = '-'
                     and pg_catalog.substr(command_id, 19, 1) = '-' and pg_catalog.substr(command_id, 24, 1) = '-'
                then case when pg_catalog.substr(command_id, 15, 1) = '7'
                               and pg_catalog.substr(command_id, 20, 1) in ('8', '9', 'a', 'b', 'A', 'B')
                          then pg_catalog.to_timestamp(pg_catalog.int8(pg_catalog.textcat('x',
                                   pg_catalog.substr(command_id, 1, 8) || pg_catalog.substr(command_id, 10, 4))::bit(48)) / 1000.0::float8)
                          else '-infinity'::timestamptz end end
$$;

-- The event rows a batch carries, checked as the extension checks them (the first bad element
-- and field named, 22023), then each replaced by the log's row at its position.
create function cqrs_portable._events(events jsonb)
returns jsonb
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    v_bad text;
    v_out jsonb;
    v_missing boolean;
    v_pause float8 := 0.001;
    v_first timestamptz;
    v_last timestamptz;
begin
    if events is null then
        raise exception using errcode = '22004', message = 'events must not be null';
    end if;
    if jsonb_typeof(events) <> 'array' then
        raise exception using errcode = '22023',
            message = format('events must be a JSON array of command-log rows, not %s', jsonb_typeof(events));
    end if;
    with elements as (
        select e, n - 1 as i from jsonb_array_elements(events) with ordinality x(e, n)
    ), checked as (
        select i, case
            when jsonb_typeof(e) <> 'object' then ': must be a JSON object (a row of cqrs.command_log)'
            else coalesce(cqrs_portable._event_integer(e, 'seq'),
                          case when (e ->> 'seq')::numeric < 1 then '.seq: must be positive' end,
                          cqrs_portable._event_integer(e, 'position'),
                          cqrs_portable._event_string(e, 'command_id'), cqrs_portable._event_string(e, 'stream'),
                          cqrs_portable._event_string(e, 'command_type'), cqrs_portable._event_string(e, 'created_at'),
                          case when coalesce(jsonb_typeof(e -> 'payload'), 'null') = 'null' then '.payload: is missing'
                               when jsonb_typeof(e -> 'payload') <> 'object' then '.payload: must be a JSON object' end,
                          case when coalesce(jsonb_typeof(e -> 'metadata'), 'null') not in ('null', 'object')
                               then '.metadata: must be a JSON object' end)
        end as problem
          from elements
    )
    select format('events[%s]%s', i, problem) into v_bad from checked where problem is not null order by i limit 1;
    if v_bad is not null then
        raise exception using errcode = '22023', message = v_bad;
    end if;
    -- Each event must be the log's row at its position (extension/src/events.rs, from_log); what
    -- is projected is that row, whatever else the batch says. One look at the log finds the rows,
    -- the first event that is not the log's, and builds the batch from the log's rows.
    --
    -- A commit reaches the WAL, and so the slot, a moment before other sessions' snapshots see
    -- it (PostgreSQL flushes the commit record first, then marks the transaction finished): a
    -- batch streamed at once may name rows this snapshot does not see yet. Look again, with a
    -- new snapshot each time (volatile), for about a second before calling the batch forged.
    select min(cqrs_portable._id_time(e ->> 'command_id')), max(cqrs_portable._id_time(e ->> 'command_id'))
      into v_first, v_last
      from jsonb_array_elements(events) e;
    loop
        select bool_or(l.position is null),
               (array_agg(format('events[%s] is not in cqrs.command_log: no command %s of stream %s seq %s at position %s',
                                 x.n - 1, x.e ->> 'command_id', cqrs_portable._quoted(x.e ->> 'stream'), x.e ->> 'seq', x.e ->> 'position')
                          order by x.n)
                  filter (where l.position is null or l.command_id::text <> lower(x.e ->> 'command_id')
                             or l.stream <> x.e ->> 'stream' or l.seq <> (x.e ->> 'seq')::bigint))[1],
               coalesce(jsonb_agg(jsonb_build_object(
                   'position', l.position, 'command_id', l.command_id, 'stream', l.stream, 'seq', l.seq,
                   'command_type', l.command_type, 'payload', l.payload, 'metadata', l.metadata,
                   'created_at', l.created_at) order by x.n) filter (where l.position is not null), '[]')
          into v_missing, v_bad, v_out
          -- each event's position and id time computed once (a join condition is evaluated again
          -- for every partition it prunes and every row it filters)
          from (select x.e, x.n, (x.e ->> 'position')::bigint as at, cqrs_portable._id_time(x.e ->> 'command_id') as id_time
                  from jsonb_array_elements(events) with ordinality x(e, n) offset 0) x
          -- One index probe per event, fenced (`offset 0`) as in the extension (events.rs,
          -- AT_POSITIONS): joined plainly, the plan PL/pgSQL keeps for the session hashed the
          -- whole log for every batch — 6 ms of a 20-event batch at 20,000 rows, growing with the
          -- log (measured). The batch's range of id times prunes the other partitions once.
          left join lateral (
                select l.* from cqrs.command_log l
                 where l.position = x.at and l.id_time in (x.id_time, '-infinity')
                   and (l.id_time = '-infinity' or l.id_time between v_first and v_last)
                offset 0) l on true;
        exit when not coalesce(v_missing, false) or v_pause >= 0.5;
        perform pg_catalog.pg_sleep(v_pause);
        v_pause := v_pause * 2;
    end loop;
    if v_bad is not null then
        raise exception using errcode = '22023', message = v_bad,
            hint = 'A batch carries rows of cqrs.command_log as they are (the sidecar sends them from the slot).';
    end if;
    return v_out;
end
$$;

create function cqrs_portable._event_integer(event jsonb, field text)
returns text
language sql immutable
as $$
    select case
        when coalesce(jsonb_typeof(event -> field), 'null') = 'null' then '.' || field || ': is missing'
        when jsonb_typeof(event -> field) = 'number' and (event ->> field) ~ '^-?[0-9]+$'
             and (event ->> field)::numeric between -9223372036854775808 and 9223372036854775807 then null
        -- bigint columns may arrive as strings from JSON producers that fear 2^53
        when jsonb_typeof(event -> field) = 'string' and (event ->> field) ~ '^[+-]?[0-9]+$'
             and (event ->> field)::numeric between -9223372036854775808 and 9223372036854775807 then null
        else '.' || field || ': must be an integer'
    end
$$;

create function cqrs_portable._event_string(event jsonb, field text)
returns text
language sql immutable
as $$
    select case
        when coalesce(jsonb_typeof(event -> field), 'null') = 'null' then '.' || field || ': is missing'
        when jsonb_typeof(event -> field) <> 'string' then '.' || field || ': must be a string'
        when event ->> field = '' then '.' || field || ': must not be empty'
    end
$$;

-- "event s#3 (T, position 9)", as the extension names an event in errors.
create function cqrs_portable._describe(event jsonb)
returns text
language sql immutable
as $$ select format('event %s#%s (%s, position %s)', event ->> 'stream', event ->> 'seq', event ->> 'command_type', event ->> 'position') $$;

-- What one batch means for one projection (projection/src/sequencing.rs, set-based): per stream,
-- seq ≤ last applied is a duplicate, the run from last + 1 on is applied (released parked events
-- included, batch copies preferred), what lies beyond a gap is parked.
create function cqrs_portable._plan(name text, events jsonb, has_parked boolean,
    out apply jsonb, out park jsonb, out unpark jsonb, out progress jsonb, out duplicates bigint)
returns record
language sql stable
set search_path = pg_catalog, pg_temp
as $$
    with batch as (
        select x.e as event, x.e ->> 'stream' as stream, (x.e ->> 'seq')::bigint as seq, (x.e ->> 'position')::bigint as position,
               0 as origin, x.n as o
          from jsonb_array_elements(events) with ordinality x(e, n)
    ), in_order as (
        -- the batch in position order, no position twice: the order `apply` is in
        select coalesce(bool_and(p.position > p.before), true) as yes
          from (select b.position, pg_catalog.lag(b.position) over (order by b.o) as before from batch b) p
         where p.before is not null
    ), streams as (
        select distinct b.stream from batch b
    ), parked as (
        select k.event, k.stream, k.seq, (k.event ->> 'position')::bigint as position, 1 as origin, 0::bigint as o
          from streams s
          -- per-key probes, fenced (`offset 0`), here and in `ranked`: the plan is kept for the
          -- session, and unfenced it scanned every stream's progress for every batch (1.1 ms of
          -- a 20-event batch at 6,000 streams, growing with them; measured)
          cross join lateral (select k.event, k.stream, k.seq from cqrs.parked k
                               where k.projection = name and k.stream = s.stream offset 0) k
         where has_parked
    ), ranked as (
        -- `is_parked`: this (stream, seq) is parked already. A window, not a probe of `parked`
        -- per row: the planner cannot size a CTE, and a nested loop over it is O(batch × parked)
        select c.*, coalesce(ps.last_seq, 0) as last,
               row_number() over (partition by c.stream, c.seq order by c.origin, c.o) as copy,
               bool_or(c.origin = 1) over (partition by c.stream, c.seq) as is_parked
          from (select * from batch union all select * from parked) c
          left join lateral (select p.last_seq from cqrs.projection_stream p
                              where p.projection = name and p.stream = c.stream offset 0) ps on true
    ), firsts as (
        select r.*, r.seq = r.last + row_number() over (partition by r.stream order by r.seq) as applicable
          from ranked r where r.copy = 1 and r.seq > r.last
    )
    select
        -- every event of the batch applies, in its order (the usual case): the batch is the plan,
        -- not a copy of it aggregated again (jsonb_agg re-reads every payload: ≈ 3.5 ms per
        -- 1,000 events, measured)
        case when (select i.yes from in_order i)
                  and (select count(*) from firsts f where f.applicable and f.origin = 0) = (select count(*) from batch)
                  and not exists (select from firsts f where f.applicable and f.origin = 1)
             then events
             else (select coalesce(jsonb_agg(f.event order by f.position, f.stream collate "C", f.seq), '[]') from firsts f where f.applicable)
        end,
        (select coalesce(jsonb_agg(f.event order by f.stream collate "C", f.seq), '[]') from firsts f
          where not f.applicable and f.origin = 0 and not f.is_parked),
        -- unparked: what the progress has passed, and what applies now (from whichever copy)
        (select coalesce(jsonb_agg(jsonb_build_array(u.stream, u.seq) order by u.stream collate "C", u.seq), '[]')
           from (select r.stream, r.seq from ranked r where r.origin = 1 and r.seq <= r.last
                 union all
                 select f.stream, f.seq from firsts f where f.applicable and f.is_parked) u),
        (select coalesce(jsonb_object_agg(g.stream, g.last + g.moved), '{}')
           from (select f.stream, f.last, count(*) as moved from firsts f where f.applicable group by f.stream, f.last) g),
        (select count(*) from ranked r where r.origin = 0 and (r.seq <= r.last or r.copy > 1))
        + (select count(*) from firsts f where f.origin = 0 and not f.applicable and f.is_parked)
$$;

-- Progress, parked events and dead letters of a planned batch (write_bookkeeping in the
-- extension). `dead` holds [event, summary, sqlstate, whole error] each.
create function cqrs_portable._bookkeeping(name text, progress jsonb, park jsonb, unpark jsonb, dead jsonb)
returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
    insert into cqrs.projection_stream as ps (projection, stream, last_seq)
    select _bookkeeping.name, p.key, (p.value #>> '{}')::bigint from jsonb_each(progress) p
    on conflict (projection, stream) do update set last_seq = excluded.last_seq where ps.last_seq < excluded.last_seq;
    if jsonb_array_length(park) > 0 then
        insert into cqrs.parked (projection, stream, seq, event)
        select _bookkeeping.name, e ->> 'stream', (e ->> 'seq')::bigint, e from jsonb_array_elements(park) e
        on conflict (projection, stream, seq) do nothing;
    end if;
    if jsonb_array_length(unpark) > 0 then
        delete from cqrs.parked k using jsonb_array_elements(unpark) u
         where k.projection = _bookkeeping.name and k.stream = u ->> 0 and k.seq = (u ->> 1)::bigint;
    end if;
    if jsonb_array_length(park) > 0 or jsonb_array_length(unpark) > 0 then
        update cqrs.projection_state s set parked = (select count(*) from cqrs.parked p where p.projection = _bookkeeping.name) where s.name = _bookkeeping.name;
    end if;
    if jsonb_array_length(dead) > 0 then
        insert into cqrs.dead_letter (projection, stream, seq, command_id, command_type, event, error, sqlstate, error_detail)
        select _bookkeeping.name, d -> 0 ->> 'stream', (d -> 0 ->> 'seq')::bigint, (d -> 0 ->> 'command_id')::uuid, d -> 0 ->> 'command_type',
               d -> 0, d ->> 1, d ->> 2, d ->> 3
          from jsonb_array_elements(dead) with ordinality x(d, n) order by n;
    end if;
end
$$;

-- The whole error as the extension keeps it (Failure::describe): the message, and the detail
-- in parentheses. It may hold a command's values: kept where readers and logs do not reach.
create function cqrs_portable._describe_error(message text, detail text)
returns text
language sql immutable
as $$ select case when coalesce(detail, '') = '' then message else message || ' (' || detail || ')' end $$;

-- The error as it may be shown anywhere (extension/src/subtransaction.rs, summarize): its
-- SQLSTATE, with PostgreSQL's message only for the classes whose messages name objects and never
-- values (integrity constraints, rollback, access rules, resources, limits, object state,
-- operator intervention).
create function cqrs_portable._summarize_error(sqlstate text, message text)
returns text
language sql immutable
as $$
    select case when left(sqlstate, 2) in ('23', '40', '42', '53', '54', '55', '57')
                then 'SQLSTATE ' || sqlstate || ': ' || message else 'SQLSTATE ' || sqlstate end
$$;

-- "s#3 (position 9)": where an event is, without its contents (for warnings and messages).
create function cqrs_portable._locate(event jsonb)
returns text
language sql immutable
as $$ select format('%s#%s (position %s)', event ->> 'stream', event ->> 'seq', event ->> 'position') $$;

-- One projection's part of a batch, applied (run_plan in the extension): its events and
-- bookkeeping in one go; on a failure, with on_error = 'halt' the failing event is found and
-- nothing applied, with 'dead_letter' the events are applied one at a time and those that fail
-- set aside. `dead` holds [event, summary, sqlstate, whole error] of the events set aside
-- already (a resume's skip).
create function cqrs_portable._run_plan(name text, on_error text, apply jsonb, progress jsonb, park jsonb, unpark jsonb,
    dead jsonb, rev bigint, with_docs boolean, settings text[],
    out keys text[], out docs json[], out gone boolean[], out dead_letters jsonb,
    out halted boolean, out summary text, out whole text, out code text, out poison jsonb)
returns record
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    v_row record;
    v_event jsonb;
    v_message text;
    v_detail text;
    v_code text;
begin
    keys := '{}'; docs := '{}'; gone := '{}'; dead_letters := dead; halted := false;
    begin
        for v_row in select * from cqrs_portable._write(name, 'apply', apply, rev, with_docs, settings) loop
            keys := keys || v_row.key; docs := docs || v_row.doc; gone := gone || v_row.deleted;
        end loop;
        perform cqrs_portable._bookkeeping(name, progress, park, unpark, dead);
        return;
    exception when others then
        get stacked diagnostics code = returned_sqlstate, v_message = message_text, v_detail = pg_exception_detail;
        summary := cqrs_portable._summarize_error(code, v_message);
        whole := cqrs_portable._describe_error(v_message, v_detail);
    end;
    keys := '{}'; docs := '{}'; gone := '{}';
    if on_error = 'halt' then
        -- find the event that fails, then roll everything back: a halted projection keeps what it
        -- had before this batch
        begin
            for v_event in select e from jsonb_array_elements(apply) e loop
                begin
                    perform cqrs_portable._apply(name, jsonb_build_array(v_event), rev, false);
                exception when others then
                    get stacked diagnostics v_code = returned_sqlstate, v_message = message_text, v_detail = pg_exception_detail;
                    code := v_code;
                    summary := cqrs_portable._summarize_error(v_code, v_message);
                    whole := cqrs_portable._describe_error(v_message, v_detail);
                    poison := v_event;
                end;
                exit when poison is not null;
            end loop;
            raise exception using errcode = 'P0001', message = 'rolling back the search for the failing event';
        exception when others then
            null;
        end;
        halted := true;
        return;
    end if;
    -- dead_letter: apply one event at a time, set aside those that fail, go on
    begin
        for v_event in select e from jsonb_array_elements(apply) e loop
            begin
                for v_row in select * from cqrs_portable._apply(name, jsonb_build_array(v_event), rev, with_docs) loop
                    keys := keys || v_row.key; docs := docs || v_row.doc; gone := gone || v_row.deleted;
                end loop;
            exception when others then
                get stacked diagnostics v_code = returned_sqlstate, v_message = message_text, v_detail = pg_exception_detail;
                dead_letters := dead_letters || jsonb_build_array(jsonb_build_array(v_event,
                    cqrs_portable._summarize_error(v_code, v_message), v_code, cqrs_portable._describe_error(v_message, v_detail)));
            end;
        end loop;
        perform cqrs_portable._bookkeeping(name, progress, park, unpark, dead_letters);
        summary := null; whole := null; code := null;
    exception when others then
        get stacked diagnostics code = returned_sqlstate, v_message = message_text, v_detail = pg_exception_detail;
        summary := cqrs_portable._summarize_error(code, v_message);
        whole := cqrs_portable._describe_error(v_message, v_detail);
        halted := true;
        keys := '{}'; docs := '{}'; gone := '{}';
    end;
end
$$;

-- Applies events (in commit order) to every projection not halted, or only to `only_name`:
-- one row per changed read-model row ('row'), and one 'report' per projection it ran
-- (applied, dead-lettered, and the failure's summary and the event it halted on, if it did).
-- `skip` is [stream, seq, summary, sqlstate, whole error]: that event is set aside into the dead
-- letters (resume).
create function cqrs_portable._project(events jsonb, commit_lsn pg_lsn, only_name text, with_docs boolean, skip jsonb, in_group text,
    out kind text, out projection text, out key text, out rev bigint, out doc json, out deleted boolean,
    out applied bigint, out dead_lettered bigint, out failure text, out failure_event jsonb)
returns setof record
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    v_state record;
    v_plan record;
    v_run record;
    v_rev bigint;
    v_max_position bigint := (select max((e ->> 'position')::bigint) from jsonb_array_elements(events) e);
    v_dead jsonb;
    v_applicable integer;
    v_row record;
    v_any boolean := false;
    -- the session's settings, taken once for every projection of the batch (each projection's
    -- writer puts back what its owner's code changed, cqrs_portable._write)
    v_settings text[] := cqrs_portable._settings();
begin
    -- Waiters (cqrs.wait_for) queue behind this lock and wake at this transaction's commit: the
    -- portable edition's stand-in for the extension's latch. Tried, never waited for: a session
    -- holding it (any role may take advisory locks) only sends waiters back to their sleeps.
    perform pg_catalog.pg_try_advisory_xact_lock(1668444787, 1);
    for v_state in
        select s.name, s.halted, s.checkpoint_lsn, s.revision, s.parked, p.on_error
          from cqrs.projection_state s join cqrs.projection p on p.name = s.name
         where (only_name is null or s.name = only_name) and (in_group is null or p.projection_group = in_group)
         order by s.name
           for update of s
    loop
        v_any := true;
        continue when v_state.halted;
        -- already applied (a redelivery after a restart), or a deposed projector
        continue when commit_lsn is not null and v_state.checkpoint_lsn is not null and commit_lsn <= v_state.checkpoint_lsn;
        v_plan := cqrs_portable._plan(v_state.name, events, v_state.parked > 0);
        v_dead := '[]'::jsonb;
        if skip is not null then
            select jsonb_agg(jsonb_build_array(e, skip ->> 2, skip ->> 3, coalesce(skip ->> 4, skip ->> 2))) into v_dead
              from jsonb_array_elements(v_plan.apply) e
             where e ->> 'stream' = skip ->> 0 and (e ->> 'seq')::bigint = (skip ->> 1)::bigint;
            v_dead := coalesce(v_dead, '[]');
            select coalesce(jsonb_agg(e order by n), '[]') into v_plan.apply from jsonb_array_elements(v_plan.apply) with ordinality x(e, n)
             where not (e ->> 'stream' = skip ->> 0 and (e ->> 'seq')::bigint = (skip ->> 1)::bigint);
        end if;
        v_applicable := jsonb_array_length(v_plan.apply) + jsonb_array_length(v_dead);
        v_rev := v_state.revision + 1;
        v_run := cqrs_portable._run_plan(v_state.name, v_state.on_error, v_plan.apply, v_plan.progress, v_plan.park,
                                         v_plan.unpark, v_dead, v_rev, with_docs, v_settings);
        kind := 'report'; projection := v_state.name; key := null; rev := null; doc := null; deleted := null;
        if v_run.halted then
            -- the summary where readers and logs see it, the whole error where they do not
            update cqrs.projection_state s
               set halted = true, last_error = v_run.summary, last_error_sqlstate = v_run.code, last_error_at = now(),
                   last_error_event = v_run.poison, last_error_detail = v_run.whole
             where s.name = v_state.name;
            raise warning '%', format('projection %s halted%s: %s', v_state.name,
                                      coalesce(' at ' || cqrs_portable._locate(v_run.poison), ''), v_run.summary);
            applied := 0; dead_lettered := 0; failure := v_run.summary; failure_event := v_run.poison;
            return next;
            continue;
        end if;
        v_dead := v_run.dead_letters;
        update cqrs.projection_state s set
               checkpoint_lsn = greatest(s.checkpoint_lsn, commit_lsn),
               checkpoint_position = greatest(s.checkpoint_position, v_max_position),
               checkpoint_at = now(),
               revision = greatest(s.revision, case when cardinality(v_run.keys) > 0 then v_rev else s.revision end),
               applied = s.applied + (v_applicable - jsonb_array_length(v_dead)),
               duplicates = s.duplicates + v_plan.duplicates,
               dead_lettered = s.dead_lettered + jsonb_array_length(v_dead)
         where s.name = v_state.name;
        -- the changed rows: each key once, where it first changed, with its last change
        for v_row in
            select l.k, l.d, l.g
              from (select distinct on (x.k) x.k, x.d, x.g, x.n from unnest(v_run.keys, v_run.docs, v_run.gone) with ordinality x(k, d, g, n)
                     order by x.k, x.n desc) l
              join (select x.k, min(x.n) as first from unnest(v_run.keys) with ordinality x(k, n) group by x.k) f on f.k = l.k
             order by f.first
        loop
            kind := 'row'; key := v_row.k; rev := v_rev; doc := v_row.d; deleted := v_row.g;
            applied := null; dead_lettered := null; failure := null; failure_event := null;
            return next;
        end loop;
        kind := 'report'; key := null; rev := null; doc := null; deleted := null;
        applied := v_applicable - jsonb_array_length(v_dead); dead_lettered := jsonb_array_length(v_dead);
        failure := null; failure_event := null;
        return next;
    end loop;
    if only_name is not null and not v_any then
        raise exception using errcode = '42704', message = format('projection %s does not exist', cqrs_portable._quoted(only_name));
    end if;
end
$$;
