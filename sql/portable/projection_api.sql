-- pg_cqrs, portable edition: the SQL functions of the projection side, with the extension
-- edition's signatures, results, SQLSTATEs and messages (extension/src/projection_api.rs):
-- create_projection, catch_up, resume, retry_dead_letters, rebuild. Their comments and grants
-- are in sql/core/api.sql, shared with the extension edition.

-- ==============================================================================================
-- public
-- ==============================================================================================

create function cqrs.catch_up(name text default null, chunk integer default 10000)
returns table (projection text, key text, rev bigint, doc json, deleted boolean)
language plpgsql volatile called on null input
as $$
#variable_conflict use_column
declare
    -- the caller's search_path: the owner's code may change it (see cqrs_portable._restore_search_path)
    v_search_path text := pg_catalog.current_setting('search_path');
    v_name text;
    v_row record;
    v_upto bigint;
    -- an array, appended in place (a jsonb array would be copied at every append)
    v_rows jsonb[] := '{}'::jsonb[];
begin
    if chunk is not null and chunk not between 1 and 1000000 then
        raise exception using errcode = '22023', message = format('chunk must be between 1 and 1000000, not %s', chunk);
    end if;
    -- up to the end of the log as it is now: under a steady stream of commands a catch-up would
    -- otherwise chase the end (holding the projection's state row, and a move both leases)
    v_upto := (select coalesce(pg_catalog.max(l.position), 0) from cqrs.command_log l);
    for v_name in select s.name from cqrs.projection_state s where (catch_up.name is null or s.name = catch_up.name) and not s.halted order by s.name loop
        for v_row in select * from cqrs_portable._catch_up_one(v_name, coalesce(chunk, 10000), true, null, v_upto) loop
            if v_row.halted is null then
                v_rows := v_rows || jsonb_build_object('projection', v_row.projection, 'key', v_row.key,
                                                      'rev', v_row.rev, 'doc', v_row.doc, 'deleted', v_row.deleted);
            elsif v_row.halted <> '' then
                raise warning '%', format('catch-up of %s stopped: %s', v_name, v_row.halted);
            end if;
        end loop;
    end loop;
    perform cqrs_portable._restore_search_path(v_search_path);
    return query select * from cqrs_portable._changes(v_rows);
end
$$;

create function cqrs.resume(name text, skip boolean default false)
returns table (projection text, key text, rev bigint, doc json, deleted boolean)
language plpgsql volatile called on null input
as $$
#variable_conflict use_column
declare
    -- the caller's search_path: the owner's code may change it (see cqrs_portable._restore_search_path)
    v_search_path text := pg_catalog.current_setting('search_path');
    v_state record;
    v_skip jsonb;
    v_row record;
    -- an array, appended in place (a jsonb array would be copied at every append)
    v_rows jsonb[] := '{}'::jsonb[];
begin
    if resume.name is null then
        raise exception using errcode = '22004', message = 'name must not be null';
    end if;
    if skip is null then
        raise exception using errcode = '22004', message = 'skip must not be null';
    end if;
    if skip then
        -- the way out of a halt on an event that cannot be applied as it is: set it aside into
        -- the dead letters, with its error, as the catch-up below reaches it
        select s.halted, s.last_error_event, s.last_error, s.last_error_sqlstate, s.last_error_detail into v_state
          from cqrs.projection_state s where s.name = resume.name for update;
        if not found then
            raise exception using errcode = '42704', message = format('projection %s does not exist', cqrs_portable._quoted(resume.name));
        end if;
        if not v_state.halted then
            raise exception using errcode = '55000',
                message = format('projection %s is not halted: there is no failed event to skip', cqrs_portable._quoted(resume.name));
        end if;
        if v_state.last_error_event is null then
            raise exception using errcode = '55000',
                message = format('projection %s halted without a known failing event: nothing to skip', cqrs_portable._quoted(resume.name)),
                hint = 'See cqrs.status() for the error; fix it, then call cqrs.resume(name).';
        end if;
        v_skip := jsonb_build_array(v_state.last_error_event ->> 'stream', (v_state.last_error_event ->> 'seq')::bigint,
                                    coalesce(v_state.last_error, ''), coalesce(v_state.last_error_sqlstate, 'XX000'),
                                    coalesce(v_state.last_error_detail, v_state.last_error, ''));
    end if;
    update cqrs.projection_state s
       set halted = false, last_error = null, last_error_sqlstate = null, last_error_at = null, last_error_event = null,
           last_error_detail = null, generation = s.generation + 1
     where s.name = resume.name;
    if not found then
        raise exception using errcode = '42704', message = format('projection %s does not exist', cqrs_portable._quoted(resume.name));
    end if;
    -- up to the end of the log as it is now (the state row is locked: the batches after it apply
    -- the projection again)
    for v_row in select * from cqrs_portable._catch_up_one(resume.name, 10000, true, v_skip,
                                                           (select coalesce(pg_catalog.max(l.position), 0) from cqrs.command_log l)) loop
        if v_row.halted is null then
            v_rows := v_rows || jsonb_build_object('projection', v_row.projection, 'key', v_row.key,
                                                  'rev', v_row.rev, 'doc', v_row.doc, 'deleted', v_row.deleted);
        elsif v_row.halted <> '' then
            if v_skip is not null then
                raise notice '%', format('projection %s: skipped %s#%s into cqrs.dead_letter; cqrs.retry_dead_letters(''%s'') applies it once the cause is fixed',
                                         resume.name, v_skip ->> 0, v_skip ->> 1, resume.name);
                v_skip := null;
            end if;
            raise warning '%', format('projection %s halted again: %s', resume.name, v_row.halted);
        end if;
    end loop;
    if v_skip is not null then
        raise notice '%', format('projection %s: skipped %s#%s into cqrs.dead_letter; cqrs.retry_dead_letters(''%s'') applies it once the cause is fixed',
                                 resume.name, v_skip ->> 0, v_skip ->> 1, resume.name);
    end if;
    perform cqrs_portable._restore_search_path(v_search_path);
    return query select * from cqrs_portable._changes(v_rows);
end
$$;

create function cqrs.retry_dead_letters(name text)
returns table (projection text, key text, rev bigint, doc json, deleted boolean)
language plpgsql volatile called on null input
as $$
#variable_conflict use_column
declare
    -- the caller's search_path: the owner's code may change it (see cqrs_portable._restore_search_path)
    v_search_path text := pg_catalog.current_setting('search_path');
    v_rev bigint;
    v_letter record;
    v_row record;
    -- an array, appended in place (a jsonb array would be copied at every append)
    v_rows jsonb[] := '{}'::jsonb[];
    v_letter_rows jsonb[];
    v_changed jsonb;
    v_sqlstate text;
    v_message text;
    v_detail text;
begin
    if retry_dead_letters.name is null then
        raise exception using errcode = '22004', message = 'name must not be null';
    end if;
    select s.revision + 1 into v_rev from cqrs.projection_state s where s.name = retry_dead_letters.name for update;
    if not found then
        raise exception using errcode = '42704', message = format('projection %s does not exist', cqrs_portable._quoted(retry_dead_letters.name));
    end if;
    perform cqrs_portable._target(retry_dead_letters.name);
    for v_letter in select d.id, d.event from cqrs.dead_letter d where d.projection = retry_dead_letters.name order by d.id for update loop
        begin
            v_letter_rows := '{}'::jsonb[];
            for v_row in select * from cqrs_portable._apply(retry_dead_letters.name, jsonb_build_array(v_letter.event), v_rev, true) loop
                v_letter_rows := v_letter_rows || jsonb_build_object('projection', retry_dead_letters.name, 'key', v_row.key,
                                                                    'rev', v_rev, 'doc', v_row.doc, 'deleted', v_row.deleted);
            end loop;
            delete from cqrs.dead_letter d where d.id = v_letter.id;
            foreach v_changed in array v_letter_rows loop
                v_rows := v_rows || v_changed;
            end loop;
        exception when others then
            get stacked diagnostics v_sqlstate = returned_sqlstate, v_message = message_text, v_detail = pg_exception_detail;
            update cqrs.dead_letter d set retries = d.retries + 1, error = cqrs_portable._summarize_error(v_sqlstate, v_message),
                   sqlstate = v_sqlstate, error_detail = cqrs_portable._describe_error(v_message, v_detail), failed_at = now()
             where d.id = v_letter.id;
        end;
    end loop;
    update cqrs.projection_state s set revision = greatest(s.revision, v_rev), generation = s.generation + 1
     where s.name = retry_dead_letters.name;
    perform cqrs_portable._restore_search_path(v_search_path);
    return query select * from cqrs_portable._changes(v_rows);
end
$$;

create function cqrs.rebuild(name text, chunk integer default 10000)
returns table (events bigint, seconds double precision, events_per_second double precision)
language plpgsql volatile strict
as $$
#variable_conflict use_column
declare
    -- the caller's search_path: the owner's code may change it (see cqrs_portable._restore_search_path)
    v_search_path text := pg_catalog.current_setting('search_path');
    v_started timestamptz := clock_timestamp();
    v_last_notice timestamptz := clock_timestamp();
    v_total bigint;
    v_done bigint := 0;
    v_cursor bigint := 0;
    v_batch jsonb;
    v_row record;
    v_seconds double precision;
    v_message text;
    v_sqlstate text;
begin
    if chunk not between 1 and 1000000 then
        raise exception using errcode = '22023', message = format('chunk must be between 1 and 1000000, not %s', chunk);
    end if;
    -- a log that retention cut no longer holds the first commands: refused, not half rebuilt
    perform cqrs._check_log_whole('a rebuild of ' || rebuild.name);
    update cqrs.projection_state s
       set halted = false, last_error = null, last_error_sqlstate = null, last_error_at = null, last_error_event = null,
           last_error_detail = null, applied = 0, duplicates = 0, dead_lettered = 0
     where s.name = rebuild.name;
    if not found then
        raise exception using errcode = '42704', message = format('projection %s does not exist', cqrs_portable._quoted(rebuild.name));
    end if;
    begin
        -- as the table's owner, like every write of it: its delete triggers fire
        perform cqrs_portable._write(rebuild.name, 'clear', null, null, false);
    exception when others then
        get stacked diagnostics v_message = message_text, v_sqlstate = returned_sqlstate;
        raise exception using errcode = '55000',
            message = format('rebuild of %s could not empty its read model: %s', rebuild.name, cqrs_portable._summarize_error(v_sqlstate, v_message));
    end;
    delete from cqrs.projection_stream ps where ps.projection = rebuild.name;
    delete from cqrs.parked p where p.projection = rebuild.name;
    select count(*) into v_total from cqrs.command_log;
    loop
        select coalesce(jsonb_agg(c.doc order by c.n), '[]'), max(c.position) into v_batch, v_cursor
          from (select r.doc, r.n, r.position, sum(r.bytes) over (order by r.n rows unbounded preceding) as running
                  from (select jsonb_build_object('position', l.position, 'command_id', l.command_id, 'stream', l.stream,
                                                  'seq', l.seq, 'command_type', l.command_type, 'payload', l.payload,
                                                  'metadata', l.metadata, 'created_at', l.created_at) as doc,
                               row_number() over (order by l.position) as n, l.position,
                               pg_column_size(l.payload) + pg_column_size(l.metadata) as bytes
                          from (select * from cqrs.command_log l where l.position > v_cursor order by l.position limit chunk) l) r) c
         where c.n = 1 or c.running <= 64 * 1024 * 1024;
        exit when jsonb_array_length(v_batch) = 0;
        for v_row in select * from cqrs_portable._project(v_batch, null, rebuild.name, false, null, null) p where p.kind = 'report' loop
            if v_row.failure is not null then
                raise exception using errcode = '55000',
                    message = format('rebuild of %s stopped%s: %s', rebuild.name,
                                     coalesce(format(' at %s#%s (position %s)', v_row.failure_event ->> 'stream', v_row.failure_event ->> 'seq',
                                                     v_row.failure_event ->> 'position'), ''), v_row.failure),
                    hint = 'The rebuild was rolled back and the read model left as it was. Fix the handlers or the data (or use on_error => ''dead_letter'').';
            end if;
        end loop;
        v_done := v_done + jsonb_array_length(v_batch);
        if clock_timestamp() - v_last_notice >= interval '1 s' then
            v_seconds := extract(epoch from clock_timestamp() - v_started);
            raise notice '%', format('rebuild %s: %s/%s events (%s%%), %s events/s', rebuild.name, v_done, v_total,
                                     round(100.0 * v_done / greatest(v_total, 1)), round(v_done / greatest(v_seconds, 1e-9)));
            v_last_notice := clock_timestamp();
        end if;
    end loop;
    -- commands committed while we ran, below our cursor
    for v_row in select * from cqrs_portable._catch_up_one(rebuild.name, chunk, false, null, null) where halted is not null loop
        if v_row.halted <> '' then
            raise exception using errcode = '55000', message = format('rebuild of %s stopped: %s', rebuild.name, v_row.halted);
        end if;
        v_done := v_done + v_row.events;
    end loop;
    update cqrs.projection_state s set generation = s.generation + 1 where s.name = rebuild.name;
    v_seconds := extract(epoch from clock_timestamp() - v_started);
    raise notice '%', format('rebuild %s: done, %s events in %s s', rebuild.name, v_done, round(v_seconds::numeric, 1));
    perform cqrs_portable._restore_search_path(v_search_path);
    events := v_done;
    seconds := v_seconds;
    events_per_second := v_done / greatest(v_seconds, 1e-9);
    return next;
end
$$;

-- The name rule (cqrs._is_projection_name, which PUBLIC may not execute) checked for whoever the
-- DBA lets call create_projection: as the installer, on a name only.
create function cqrs_portable._check_projection_name(name text)
returns void
language plpgsql immutable security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    if not cqrs._is_projection_name(name) then
        raise exception using errcode = '22023',
            message = format('projection name %s must be 1 to 63 characters of A-Z a-z 0-9 _ . -', cqrs_portable._quoted(name)),
            hint = 'Names appear in cache keys and metric labels.';
    end if;
end
$$;

create function cqrs.create_projection(
    name text,
    target regclass,
    key_column text,
    handlers jsonb,
    on_error text default 'halt',
    rev_column text default 'rev',
    backfill boolean default true)
returns void
language plpgsql volatile called on null input
as $$
declare
    -- the caller's search_path: the owner's code may change it (see cqrs_portable._restore_search_path)
    v_search_path text := pg_catalog.current_setting('search_path');
    v_spec jsonb;
    v_existing text;
    v_row record;
    v_message text;
    v_type text;
begin
    if create_projection.name is null then raise exception using errcode = '22004', message = 'name must not be null'; end if;
    if target is null then raise exception using errcode = '22004', message = 'target must not be null'; end if;
    if key_column is null then raise exception using errcode = '22004', message = 'key_column must not be null'; end if;
    if handlers is null then raise exception using errcode = '22004', message = 'handlers must not be null'; end if;
    if on_error is null then raise exception using errcode = '22004', message = 'on_error must not be null'; end if;
    if rev_column is null then raise exception using errcode = '22004', message = 'rev_column must not be null'; end if;
    if backfill is null then raise exception using errcode = '22004', message = 'backfill must not be null'; end if;
    perform cqrs_portable._check_projection_name(create_projection.name);
    if on_error not in ('halt', 'dead_letter') then
        raise exception using errcode = '22023', message = format('on_error must be ''halt'' or ''dead_letter'', not %s', cqrs_portable._quoted(on_error));
    end if;
    v_spec := cqrs_portable._spec(handlers);
    perform cqrs_portable._check_owner(target);
    if exists (select from cqrs.projection p where p.name = create_projection.name) then
        raise exception using errcode = '42710', message = format('projection %s already exists', cqrs_portable._quoted(create_projection.name)),
            hint = 'Drop it first with cqrs.drop_projection(), or choose another name.';
    end if;
    select p.name into v_existing from cqrs.projection p where p.target = create_projection.target;
    if found then
        raise exception using errcode = '42710', message = format('that table is already the read model of projection %s', cqrs_portable._quoted(v_existing));
    end if;
    -- Registered first (one transaction: a failed check below undoes it), so that the checks can
    -- probe casts through the writer function, as the table's owner.
    insert into cqrs.projection (name, target, key_column, rev_column, handlers, on_error)
    values (create_projection.name, target, key_column, rev_column, v_spec, on_error);
    insert into cqrs.projection_state (name) values (create_projection.name);
    perform cqrs_portable._make_owner_functions(create_projection.name, target);
    -- handler functions resolve with the caller's search_path, as the extension resolves them
    v_spec := cqrs_portable._check_definition(create_projection.name, target, key_column, rev_column, v_spec,
        (select coalesce(jsonb_object_agg(f, pg_catalog.to_regprocedure(f || '(jsonb)')::oid), '{}')
           from (select distinct h ->> 'function' as f from jsonb_each(v_spec) e, jsonb_array_elements(e.value) h
                  where h ? 'function') fs));
    update cqrs.projection p set handlers = v_spec where p.name = create_projection.name;
    -- the projector reads the read model to fill and repair caches (as its owner, through the
    -- reader function, which lets only roles that may select from it): select, nothing more
    begin
        execute format('grant usage on schema %I to cqrs_projector; grant select on %s to cqrs_projector',
                       (select n.nspname from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace where c.oid = target),
                       (cqrs_portable._target(create_projection.name)).target);
    exception when others then
        get stacked diagnostics v_message = message_text;
        raise notice '%', format('could not grant cqrs_projector select on %s (%s); grant it yourself, and select to the roles that read it',
                                 (cqrs_portable._target(create_projection.name)).target, v_message);
    end;
    -- a handler of a type that is not registered, while such commands are refused, never runs
    if (select s.require_registered_types from cqrs_portable.settings s) then
        for v_type in select t from jsonb_object_keys(v_spec) t
                       where not exists (select from cqrs.command_type c where c.command_type = t) order by t collate "C" loop
            raise warning '%', format('handlers.%s: command type %s is not registered and cqrs.require_registered_types refuses its commands: this handler runs only once it is registered',
                                      v_type, cqrs_portable._quoted(v_type));
        end loop;
    end if;
    if backfill then
        -- a log that retention cut no longer holds the first commands: refused, not half
        -- backfilled (after the checks of who may make the table a read model)
        perform cqrs._check_log_whole(format('the backfill of projection %s', create_projection.name), true);
        for v_row in select * from cqrs_portable._catch_up_one(create_projection.name, 10000, false, null, null) where halted is not null and halted <> '' loop
            raise exception using errcode = '55000',
                message = format('backfilling projection %s failed: %s', cqrs_portable._quoted(create_projection.name), v_row.halted),
                hint = 'Nothing was registered. Fix the handlers (or use on_error => ''dead_letter'') and try again.';
        end loop;
    else
        insert into cqrs.projection_stream (projection, stream, last_seq)
        select create_projection.name, s.stream, s.last_seq from cqrs.stream s;
        -- the checkpoint too, so that cqrs.progress() does not count the log it skipped
        update cqrs.projection_state s set checkpoint_position = (select max(l.position) from cqrs.command_log l)
         where s.name = create_projection.name;
    end if;
    perform cqrs_portable._restore_search_path(v_search_path);
end
$$;

-- ==============================================================================================
-- internal
-- ==============================================================================================

-- The commands projection `name` has not applied, in log order, at most `chunk`, up to position
-- `upto` (null: all): walking the log after position `walk`, or stream by stream when it is null
-- (cqrs._catch_up_from says which reads less; events.rs in the extension). Planned as the
-- extension plans it (prepared::index_plans): index lookups whatever the statistics say — left
-- to itself the planner sorted everything after the walk's start for each chunk (measured: 20
-- times slower on a year of partitions). Only these reads run so; owner code never does.
create function cqrs_portable._unapplied(name text, walk bigint, upto bigint, chunk integer)
returns setof cqrs.command_log
language plpgsql stable
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set enable_bitmapscan = off
set enable_hashjoin = off
set enable_mergejoin = off
set jit = off
as $$
begin
    if walk is null then
        return query
            select l.*
              from cqrs.stream s
              left join cqrs.projection_stream ps on ps.projection = _unapplied.name and ps.stream = s.stream
              cross join lateral (select * from cqrs.command_log l
                                   where l.stream = s.stream and l.seq > coalesce(ps.last_seq, 0)
                                     and l.id_time between s.min_id_time and s.max_id_time
                                     and (upto is null or l.position <= upto)
                                   order by l.seq limit chunk) l
             where s.last_seq > coalesce(ps.last_seq, 0)
             order by l.position limit chunk;
    else
        -- each stream's commands come in seq order (its positions grow with its seq); its
        -- progress is looked up per command (a join read all of the projection's progress)
        return query
            select l.*
              from cqrs.command_log l
             where l.position > walk and (upto is null or l.position <= upto)
               and l.seq > coalesce((select ps.last_seq from cqrs.projection_stream ps
                                      where ps.projection = _unapplied.name and ps.stream = l.stream), 0)
             order by l.position limit chunk;
    end if;
end
$$;

-- Every command projection `name` has not applied yet, in log order, `chunk` at a time (and
-- about 64 MiB); returns the changed rows, and how it ended in `halted` ('' when caught up).
-- upto: the last log position to apply (null: until nothing is left, commands committed meanwhile
-- included — create_projection's backfill and rebuild)
create function cqrs_portable._catch_up_one(name text, chunk integer, with_docs boolean, skip jsonb, upto bigint,
    out projection text, out key text, out rev bigint, out doc json, out deleted boolean, out events bigint, out halted text)
returns setof record
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    v_batch jsonb;
    v_row record;
    v_total bigint := 0;
    v_progressed bigint;
    v_reported boolean;
    -- walking the log in position order after v_walk; null: stream by stream (as in the
    -- extension: cqrs._catch_up_from says which reads less)
    v_walk bigint := cqrs._catch_up_from(_catch_up_one.name, upto, chunk);
    v_looked_again boolean := false;
    v_last bigint;
begin
    loop
        select coalesce(jsonb_agg(c.doc order by c.n), '[]'), max(c.position) into v_batch, v_last
          from (select r.doc, r.n, r.position, sum(r.bytes) over (order by r.n rows unbounded preceding) as running
                  from (select jsonb_build_object('position', l.position, 'command_id', l.command_id, 'stream', l.stream,
                                                  'seq', l.seq, 'command_type', l.command_type, 'payload', l.payload,
                                                  'metadata', l.metadata, 'created_at', l.created_at) as doc,
                               row_number() over (order by l.position) as n, l.position,
                               pg_column_size(l.payload) + pg_column_size(l.metadata) as bytes
                          from cqrs_portable._unapplied(_catch_up_one.name, v_walk, upto, chunk) l) r) c
         where c.n = 1 or c.running <= 64 * 1024 * 1024;
        if jsonb_array_length(v_batch) = 0 then
            -- a walk passes a command that commits after it went by (its position was taken
            -- earlier): up to the log's end at the start, that is the next call's, as stream by
            -- stream; a catch-up of everything looks once more
            if v_walk is not null and not v_looked_again and upto is null then
                v_looked_again := true;
                v_walk := cqrs._catch_up_from(_catch_up_one.name, upto, chunk);
                continue;
            end if;
            events := v_total; halted := '';
            projection := null; key := null; rev := null; doc := null; deleted := null;
            return next;
            return;
        end if;
        v_looked_again := false;
        if v_walk is not null then
            v_walk := v_last;
        end if;
        v_reported := false;
        v_progressed := 0;
        for v_row in select * from cqrs_portable._project(v_batch, null, _catch_up_one.name, with_docs, skip, null) loop
            if v_row.kind = 'row' then
                projection := v_row.projection; key := v_row.key; rev := v_row.rev; doc := v_row.doc; deleted := v_row.deleted;
                events := null; halted := null;
                return next;
            else
                v_reported := true;
                if v_row.failure is not null then
                    projection := null; key := null; rev := null; doc := null; deleted := null;
                    events := v_total;
                    halted := v_row.failure || coalesce(format(' at %s#%s', v_row.failure_event ->> 'stream', v_row.failure_event ->> 'seq'), '');
                    return next;
                    return;
                end if;
                v_progressed := v_row.applied + v_row.dead_lettered;
            end if;
        end loop;
        if not v_reported then
            projection := null; key := null; rev := null; doc := null; deleted := null;
            events := v_total; halted := 'the projection is halted';
            return next;
            return;
        end if;
        v_total := v_total + v_progressed;
        if v_progressed = 0 then
            -- nothing applicable (only parked events): stop rather than loop
            projection := null; key := null; rev := null; doc := null; deleted := null;
            events := v_total; halted := '';
            return next;
            return;
        end if;
    end loop;
end
$$;

-- The changed rows of several calls, each (projection, key) once: where it first changed, with
-- its last change (Changes in the extension).
create function cqrs_portable._changes(rows jsonb[])
returns table (projection text, key text, rev bigint, doc json, deleted boolean)
language sql immutable
set search_path = pg_catalog, pg_temp
as $$
    select l.r ->> 'projection', l.r ->> 'key', (l.r ->> 'rev')::bigint, (l.r -> 'doc')::json, (l.r ->> 'deleted')::boolean
      from (select distinct on (x.r ->> 'projection', x.r ->> 'key') x.r, x.n
              from unnest(rows) with ordinality x(r, n)
             order by x.r ->> 'projection', x.r ->> 'key', x.n desc) l
      join (select x.r ->> 'projection' as p, x.r ->> 'key' as k, min(x.n) as first
              from unnest(rows) with ordinality x(r, n) group by 1, 2) f
        on f.p = l.r ->> 'projection' and f.k = l.r ->> 'key'
     order by f.first
$$;
