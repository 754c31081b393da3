-- pg_cqrs, portable edition: reading read models and read-your-writes (the extension edition's
-- extension/src/projection_api.rs read_many and extension/src/waiters.rs).

create function cqrs.read_many(projection text, keys text[])
returns table (key text, rev bigint, doc json)
language plpgsql stable called on null input
as $$
#variable_conflict use_column
declare
    -- the caller's search_path: the owner's code may change it (see cqrs_portable._restore_search_path)
    v_search_path text := pg_catalog.current_setting('search_path');
    v_def record;
    v_revision bigint;
begin
    if read_many.projection is null then
        raise exception using errcode = '22004', message = 'projection must not be null';
    end if;
    if keys is null then
        raise exception using errcode = '22004', message = 'keys must not be null';
    end if;
    v_def := cqrs_portable._target(read_many.projection);
    perform cqrs_portable._may_read(read_many.projection, v_def.relid, current_user);
    select s.revision into v_revision from cqrs.projection_state s where s.name = read_many.projection;
    -- as the table's owner (extension/src/read_models.rs); a missing row has the projection's revision
    return query select r.key, coalesce(r.rev, v_revision, 0), r.doc from cqrs_portable._read(read_many.projection, keys, null) r;
    perform cqrs_portable._restore_search_path(v_search_path);
end
$$;

create function cqrs.changed_since(projection text, after bigint)
returns table (key text, rev bigint, doc json)
language plpgsql stable called on null input
as $$
#variable_conflict use_column
declare
    -- the caller's search_path: the owner's code may change it (see cqrs_portable._restore_search_path)
    v_search_path text := pg_catalog.current_setting('search_path');
    v_def record;
begin
    if changed_since.projection is null then
        raise exception using errcode = '22004', message = 'projection must not be null';
    end if;
    v_def := cqrs_portable._target(changed_since.projection);
    perform cqrs_portable._may_read(changed_since.projection, v_def.relid, current_user);
    return query select r.key, r.rev, r.doc from cqrs_portable._read(changed_since.projection, null, coalesce(after, -1)) r;
    perform cqrs_portable._restore_search_path(v_search_path);
end
$$;

-- Seconds a gap may stay unfilled before status() flags it (cqrs_portable.settings).
create function cqrs._gap_alert_seconds()
returns double precision
language sql stable
as $$ select s.gap_alert_after::double precision from cqrs_portable.settings s $$;

create function cqrs.drop_projection(name text)
returns boolean
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
    -- the read-model table is the user's and stays; its writer and reader functions go
    perform cqrs_portable._drop_owner_functions(drop_projection.name);
    delete from cqrs.projection_stream ps where ps.projection = drop_projection.name;
    delete from cqrs.parked p where p.projection = drop_projection.name;
    delete from cqrs.dead_letter d where d.projection = drop_projection.name;
    delete from cqrs.projection p where p.name = drop_projection.name;
    return found;
end
$$;

-- enable_seqscan and jit off: its lookup's plan is kept for the session, and one made while
-- cqrs.projection_stream held a page read the table whole at every check until an ANALYZE
-- (pgrx-tests/sql/lookup_scans.sql).
create function cqrs.wait_for(stream text, seq bigint, projection text, timeout interval default '5 s')
returns boolean
language plpgsql volatile strict parallel unsafe
set enable_seqscan = off
set jit = off
as $$
declare
    v_deadline timestamptz;
    v_state record;
    v_lock_timeout text := pg_catalog.current_setting('lock_timeout');
    -- seconds slept when no batch is in flight: short first, growing to 8 ms
    v_pause double precision := 0.0005;
    v_left double precision;
    v_asked timestamptz;
begin
    if seq < 1 then
        raise exception using errcode = '22023', message = pg_catalog.format('seq must be positive, not %s', seq);
    end if;
    if timeout < interval '0' then
        raise exception using errcode = '22023', message = 'timeout must not be negative';
    end if;
    if pg_catalog.current_setting('transaction_isolation') in ('repeatable read', 'serializable') then
        raise exception using errcode = '0A000',
            message = 'cqrs.wait_for needs READ COMMITTED: under REPEATABLE READ or SERIALIZABLE the transaction''s snapshot never shows the projection moving',
            hint = 'Call it in its own READ COMMITTED transaction, before the one that reads.';
    end if;
    v_deadline := pg_catalog.clock_timestamp() + timeout;
    loop
        -- each statement of a volatile function sees what committed before it (READ COMMITTED)
        select coalesce((select ps.last_seq >= wait_for.seq from cqrs.projection_stream ps
                          where ps.projection = wait_for.projection and ps.stream = wait_for.stream), false) as applied,
               s.halted, s.last_error
          into v_state
          from cqrs.projection_state s where s.name = wait_for.projection;
        if not found then
            raise exception using errcode = '42704', message = pg_catalog.format('projection %s does not exist', cqrs_portable._quoted(wait_for.projection));
        end if;
        if v_state.applied then
            return true;
        end if;
        if v_state.halted then
            -- the summary: SQLSTATE and, where safe, what it names — never a command's values
            raise exception using errcode = '55000',
                message = pg_catalog.format('projection %s is halted and will not apply %s#%s: %s', cqrs_portable._quoted(wait_for.projection),
                                            wait_for.stream, wait_for.seq, coalesce(v_state.last_error, '')),
                hint = 'See cqrs.status(); fix the cause and call cqrs.resume().';
        end if;
        v_left := extract(epoch from v_deadline - pg_catalog.clock_timestamp());
        if v_left <= 0 then
            return false;
        end if;
        -- The extension sleeps on a latch the projecting commit sets; PL/pgSQL has none. A batch
        -- in flight holds an advisory lock to its commit (cqrs_portable._project): a shared
        -- request waits for that commit, and is let go of at once (the next batch only tries the
        -- lock, so a waiter never holds up projection). With no batch in flight it is granted at
        -- once; then sleep a little, longer each time, for the next batch.
        v_asked := pg_catalog.clock_timestamp();
        begin
            perform pg_catalog.set_config('lock_timeout', (ceil(least(v_left, 0.1) * 1000))::integer || 'ms', true);
            perform pg_catalog.pg_advisory_lock_shared(1668444787, 1);
            perform pg_catalog.pg_advisory_unlock_shared(1668444787, 1);
            perform pg_catalog.set_config('lock_timeout', v_lock_timeout, true);
        exception when lock_not_available then
            -- the lock_timeout set above was undone with the block
            null;
        end;
        if pg_catalog.clock_timestamp() - v_asked > interval '200 microseconds' then
            -- waited for a batch's commit: look again at once
            v_pause := 0.0005;
        else
            perform pg_catalog.pg_sleep(least(v_pause, greatest(extract(epoch from v_deadline - pg_catalog.clock_timestamp()), 0)));
            v_pause := least(v_pause * 2, 0.008);
        end if;
    end loop;
end
$$;
