-- pg_cqrs 0.1.0 → 0.2.0 (ALTER EXTENSION pg_cqrs UPDATE TO '0.2.0').
--
-- Written by hand, like every upgrade script: the upgrade test (tests/tests/upgrade.rs) installs
-- 0.1.0, fills it, runs this script, and compares the catalog of schema cqrs with a fresh 0.2.0
-- install, naming every difference; it also checks that every row survived and still behaves.

\echo Use "ALTER EXTENSION pg_cqrs UPDATE TO '0.2.0'" to load this file. \quit

-- Which version and edition is installed: the sidecar asks this (a psql -f install of the
-- portable edition has no pg_extension row).
create function cqrs.version(out version text, out edition text)
returns record
language sql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$ select '0.2.0'::text, 'extension'::text $$;
comment on function cqrs.version() is
    'The installed pg_cqrs version and edition (extension: the compiled extension; portable: SQL and PL/pgSQL).';

-- Leadership through the projector lease, which only cqrs_projector may take (it was a session
-- advisory lock any session could take and sit on). acquire_lease stays for 0.1.0 sidecars.
alter table cqrs.projector_lease
    add column holder_pid integer,
    add column expires_at timestamptz;

create or replace function cqrs.acquire_lease(holder text default null)
returns bigint
language sql
set search_path = pg_catalog, pg_temp
as $$
    insert into cqrs.projector_lease as l (id, token, holder, acquired_at)
    values (true, 1, acquire_lease.holder, pg_catalog.now())
    on conflict (id) do update
        set token = l.token + 1, holder = excluded.holder, acquired_at = excluded.acquired_at,
            holder_pid = null, expires_at = null
    returning l.token;
$$;
comment on function cqrs.acquire_lease(text) is
    'Takes the projector lease unconditionally: returns a fencing token higher than any before; project_batch refuses older ones. Kept for sidecars of 0.1.0, which elect their leader themselves; use cqrs.try_lead.';

-- Leadership: the lease is free when nobody holds it, when it expired, or when its holder's
-- connection is gone; the holder renews it by calling again (same holder, same connection).
create function cqrs.try_lead(holder text, ttl interval default '2 s')
returns bigint
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_token bigint;
begin
    if holder is null or holder = '' then
        raise exception using errcode = '22004', message = 'holder must not be null or empty';
    end if;
    if ttl is null or ttl < interval '100 milliseconds' or ttl > interval '1 hour' then
        raise exception using errcode = '22023',
            message = format('ttl must be between 100 ms and 1 hour, not %s', coalesce(ttl::text, 'null'));
    end if;
    insert into cqrs.projector_lease as l (id, token, holder, acquired_at, holder_pid, expires_at)
    values (true, 1, try_lead.holder, pg_catalog.now(), pg_catalog.pg_backend_pid(), pg_catalog.clock_timestamp() + ttl)
    on conflict (id) do update
        set token = case when l.holder = excluded.holder and l.holder_pid = excluded.holder_pid
                         then l.token else l.token + 1 end,
            acquired_at = case when l.holder = excluded.holder and l.holder_pid = excluded.holder_pid
                               then l.acquired_at else excluded.acquired_at end,
            holder = excluded.holder,
            holder_pid = excluded.holder_pid,
            expires_at = excluded.expires_at
        where (l.holder = excluded.holder and l.holder_pid = excluded.holder_pid)
           or l.expires_at is null
           or l.expires_at < pg_catalog.clock_timestamp()
           or not exists (select from pg_catalog.pg_stat_activity a where a.pid = l.holder_pid)
    returning l.token into v_token;
    return v_token;
end
$$;
comment on function cqrs.try_lead(text, interval) is
    'Takes or renews the projector lease for holder (on this connection) and returns its fencing token; null while another live holder has it. The lease is free once it expires or its holder''s connection is gone.';

create function cqrs.release_lead(holder text)
returns boolean
language sql security definer
set search_path = pg_catalog, pg_temp
as $$
    with released as (
        update cqrs.projector_lease l set expires_at = null
         where l.holder = release_lead.holder and l.holder_pid = pg_catalog.pg_backend_pid()
        returning 1)
    select exists (select from released);
$$;
comment on function cqrs.release_lead(text) is
    'Gives the projector lease up at once (a standby takes it on its next try); true if holder held it on this connection.';

-- Who leads, for health checks: the holder and whether its lease is live.
create function cqrs.leader(out holder text, out token bigint, out live boolean)
returns record
language sql stable security definer
set search_path = pg_catalog, pg_temp
as $$
    select l.holder, l.token,
           l.expires_at is not null and l.expires_at >= pg_catalog.clock_timestamp()
           and exists (select from pg_catalog.pg_stat_activity a where a.pid = l.holder_pid)
      from (select true) one left join cqrs.projector_lease l on true;
$$;
comment on function cqrs.leader() is
    'The holder of the projector lease, its token, and whether the lease is live (not expired, holder connected).';


revoke execute on function cqrs.try_lead(text, interval), cqrs.release_lead(text), cqrs.leader() from public;
grant execute on function cqrs.try_lead(text, interval), cqrs.release_lead(text), cqrs.leader() to cqrs_projector;

-- Readers see where projections are, not the commands they failed on: no error texts, no
-- failed events; status() counts through a helper and shows error texts only to those who may
-- read them.
revoke select on cqrs.projection_state from cqrs_reader;
grant select (name, halted, last_error_sqlstate, last_error_at, checkpoint_lsn, checkpoint_position, checkpoint_at,
              revision, applied, duplicates, dead_lettered, parked, generation)
    on cqrs.projection_state to cqrs_reader;

-- What every projection has still to do, counted from the command log, parked events and dead
-- letters, which readers may not read: numbers only, no command data.
create function cqrs._backlog()
returns table (
    projection            text,
    events_behind         bigint,
    seconds_behind        double precision,
    parked                bigint,
    oldest_parked_seconds double precision,
    dead_letters          bigint)
language sql stable security definer
set search_path = pg_catalog, pg_temp
as $$
    with behind as (
        -- commands of each stream the projection has not applied yet
        select p.name, s.stream, s.last_seq - coalesce(ps.last_seq, 0) as missing, coalesce(ps.last_seq, 0) + 1 as next_seq
          from cqrs.projection p
          cross join cqrs.stream s
          left join cqrs.projection_stream ps on ps.projection = p.name and ps.stream = s.stream
         where s.last_seq > coalesce(ps.last_seq, 0)
    ), lag as (
        select b.name, sum(b.missing)::bigint as events,
               extract(epoch from pg_catalog.clock_timestamp() - min(l.created_at))::double precision as seconds
          from behind b
          join cqrs.command_log l on l.stream = b.stream and l.seq = b.next_seq
         group by b.name
    ), parked as (
        select pk.projection, count(*) as n, extract(epoch from pg_catalog.clock_timestamp() - min(pk.parked_at))::double precision as oldest
          from cqrs.parked pk group by pk.projection
    ), dead as (
        select d.projection, count(*) as n from cqrs.dead_letter d group by d.projection
    )
    select p.name, coalesce(lag.events, 0), coalesce(lag.seconds, 0), coalesce(parked.n, 0), parked.oldest,
           coalesce(dead.n, 0)
      from cqrs.projection p
      left join lag on lag.name = p.name
      left join parked on parked.projection = p.name
      left join dead on dead.projection = p.name;
$$;

drop function cqrs.status();
-- Security invoker, so that it shows the last error's text only to those who may read it
-- (error texts carry values of the commands: cqrs_reader sees the SQLSTATE).
create function cqrs.status()
returns table (
    projection           text,
    halted               boolean,
    last_error           text,
    last_error_sqlstate  text,
    last_error_at        timestamptz,
    checkpoint_lsn       pg_lsn,
    checkpoint_position  bigint,
    checkpoint_at        timestamptz,
    events_behind        bigint,
    seconds_behind       double precision,
    parked               bigint,
    oldest_parked_seconds double precision,
    gap_alert            boolean,
    dead_letters         bigint,
    applied              bigint,
    duplicates           bigint,
    revision             bigint,
    generation           bigint)
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
begin
    return query execute pg_catalog.format(
        'select st.name, st.halted, %s, st.last_error_sqlstate, st.last_error_at,
                st.checkpoint_lsn, st.checkpoint_position, st.checkpoint_at,
                b.events_behind, b.seconds_behind, b.parked, b.oldest_parked_seconds,
                coalesce(b.oldest_parked_seconds > cqrs._gap_alert_seconds(), false),
                b.dead_letters, st.applied, st.duplicates, st.revision, st.generation
           from cqrs.projection_state st
           join cqrs._backlog() b on b.projection = st.name
          order by st.name',
        case when pg_catalog.has_column_privilege('cqrs.projection_state', 'last_error', 'select')
             then 'st.last_error' else 'null::text' end);
end
$$;
comment on function cqrs.status() is
    'Per projection: halted and why, checkpoint, events and seconds behind the log, parked events and the age of the oldest (gap_alert past cqrs.gap_alert_after seconds), dead letters.';
revoke execute on function cqrs.status(), cqrs.progress(), cqrs._backlog(), cqrs._gap_alert_seconds() from public;
grant execute on function cqrs.status(), cqrs._backlog(), cqrs._gap_alert_seconds() to cqrs_reader, cqrs_projector;

-- resume can skip the event it halted on into the dead letters
drop function cqrs.resume(text);
create function cqrs.resume(name text, skip boolean default false)
returns table (projection text, key text, rev bigint, doc json, deleted boolean)
language c volatile called on null input
as 'MODULE_PATHNAME', 'cqrs_resume';
comment on function cqrs.resume(text, boolean) is
    'Clears a halted projection''s error and catches it up with the log; with skip => true the event it halted on goes to cqrs.dead_letter first (with its error), so that the projection moves past it.';

comment on function cqrs.rebuild(text, integer) is
    'Empties a read model and replays the whole log into it in one transaction (readers keep the old rows until it commits); returns events, seconds and rate.';
comment on function cqrs.wait_for(text, bigint, text, interval) is
    'Read-your-writes: true as soon as command seq of stream is applied to the projection, false after timeout.';
comment on function cqrs.uuid_v7() is 'A new time-ordered UUID (version 7), for command ids.';

-- Nothing is left to PUBLIC that is not meant for everyone; routine operations need no superuser.
revoke execute on function cqrs._check_name(text, text, integer), cqrs._command_type_changed(),
    cqrs._check_json_schema(jsonb), cqrs.resume(text, boolean), cqrs.rebuild(text, integer),
    cqrs.wait_for(text, bigint, text, interval)
    from public;
grant execute on function cqrs.resume(text, boolean), cqrs.retry_dead_letters(text), cqrs.rebuild(text, integer)
    to cqrs_projector;
grant execute on function cqrs.wait_for(text, bigint, text, interval) to cqrs_reader, cqrs_projector;

-- Read models are written as their owner now, not by the projector's rights: it keeps select
-- (to fill and repair caches) and loses the rest on every table registered so far.
-- It reads them through their schema: usage on it, which 0.1.0 left to the operator.
do $revoke$
declare
    v_target regclass;
    v_schema name;
begin
    for v_target, v_schema in select p.target, n.nspname from cqrs.projection p
                                join pg_catalog.pg_class c on c.oid = p.target
                                join pg_catalog.pg_namespace n on n.oid = c.relnamespace loop
        execute pg_catalog.format('revoke insert, update, delete on %s from cqrs_projector', v_target);
        execute pg_catalog.format('grant usage on schema %I to cqrs_projector', v_schema);
    end loop;
end
$revoke$;

-- cqrs._check_name: no SET clause (see sql/core/command.sql); its callers pin search_path.
alter function cqrs._check_name(text, text, integer) reset search_path;

-- The fencing check moves into SQL so that a deposed leader gets pg_cqrs's own SQLSTATE, QC001
-- (see sql/core/projection.sql); the C function keeps its symbol under a new name.
create function cqrs._project_batch(events jsonb, commit_lsn pg_lsn, fencing_token bigint)
returns table (projection text, key text, rev bigint, doc json, deleted boolean)
language c volatile called on null input
as 'MODULE_PATHNAME', 'cqrs_project_batch';
comment on function cqrs._project_batch(jsonb, pg_lsn, bigint) is
    'The work of cqrs.project_batch without its fencing check; call cqrs.project_batch.';
revoke execute on function cqrs._project_batch(jsonb, pg_lsn, bigint) from public;
grant execute on function cqrs._project_batch(jsonb, pg_lsn, bigint) to cqrs_projector;
create or replace function cqrs.project_batch(events jsonb, commit_lsn pg_lsn default null, fencing_token bigint default null)
returns table (projection text, key text, rev bigint, doc json, deleted boolean)
language plpgsql volatile called on null input
set search_path = pg_catalog, pg_temp
as $$
declare
    v_current bigint;
begin
    if fencing_token is not null then
        v_current := coalesce((select l.token from cqrs.projector_lease l for share), 0);
        if fencing_token < v_current then
            raise exception using errcode = 'QC001',
                message = format('this projector''s lease (token %s) was taken over by a newer one (token %s)', fencing_token, v_current),
                hint = 'Another sidecar leads now; this one must stop projecting.';
        end if;
    end if;
    return query select b.projection, b.key, b.rev, b.doc, b.deleted
                   from cqrs._project_batch(events, commit_lsn, fencing_token) b;
end
$$;
