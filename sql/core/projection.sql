-- pg_cqrs projection side: projection definitions and state, per-(projection, stream) progress,
-- parked and dead-lettered events, status. The engine itself (create_projection,
-- project_batch, rebuild, catch_up, wait_for …) is Rust; see extension/src/projector.rs.

create sequence cqrs.projection_definition_seq;

-- What a projection may be called: 1 to 63 characters of A-Z a-z 0-9 _ . - (names end up in
-- cache keys {prefix}:{projection}:{key}, URLs and metric labels). The one SQL definition (the
-- table's check, the portable create_projection); the Rust one is projection/src/name.rs, and
-- tests/tests/names.rs checks that they agree.
create function cqrs._is_projection_name(name text)
returns boolean
language sql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$ select name ~ '^[A-Za-z0-9_.-]{1,63}$' $$;
comment on function cqrs._is_projection_name(text) is
    'Whether a text may name a projection: 1 to 63 characters of A-Z a-z 0-9 _ . -.';

-- What a projection group may be called: 1 to 40 characters of a-z 0-9 _, starting with a
-- letter (a group's sidecars stream the slot <slot>_<group>, and slot names take only these).
-- The Rust twin is projection/src/name.rs; tests/tests/names.rs checks that they agree.
create function cqrs._is_projection_group(name text)
returns boolean
language sql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$ select name ~ '^[a-z][a-z0-9_]{0,39}$' $$;
comment on function cqrs._is_projection_group(text) is
    'Whether a text may name a projection group: 1 to 40 characters of a-z 0-9 _, starting with a letter.';

-- What a projection is. The user owns the target table; pg_cqrs owns this row.
create table cqrs.projection (
    name               text        primary key,
    target             regclass    not null,
    key_column         name        not null,
    rev_column         name        not null,
    -- the handlers as given, normalised (defaults explicit, functions schema-qualified)
    handlers           jsonb       not null,
    on_error           text        not null,
    definition_version bigint      not null default pg_catalog.nextval('cqrs.projection_definition_seq'),
    created_at         timestamptz not null default pg_catalog.now(),
    -- the group whose leader projects it (see cqrs.projector_lease); moved by cqrs.move_projection
    projection_group   text        not null default 'default',
    constraint projection_target_key unique (target),
    constraint projection_group_check check (cqrs._is_projection_group(projection_group)),
    constraint projection_name_check check (cqrs._is_projection_name(name)),
    constraint projection_on_error_check check (on_error in ('halt', 'dead_letter'))
);
comment on table cqrs.projection is 'Registered read models: target table, key, handlers per command type, projection group.';
create index projection_group_idx on cqrs.projection (projection_group);

-- Where a projection is. project_batch locks these rows (in name order), which serialises
-- projectors and makes the checkpoint a fence.
create table cqrs.projection_state (
    name                text        primary key references cqrs.projection (name) on delete cascade,
    halted              boolean     not null default false,
    last_error          text,
    last_error_sqlstate text,
    last_error_at       timestamptz,
    last_error_event    jsonb,
    checkpoint_lsn      pg_lsn,
    checkpoint_position bigint,
    checkpoint_at       timestamptz,
    -- the last revision handed out; every changed row gets a higher one
    revision            bigint      not null default 0,
    applied             bigint      not null default 0,
    duplicates          bigint      not null default 0,
    dead_lettered       bigint      not null default 0,
    -- how many events are parked (recounted whenever events are parked or released): batches
    -- skip looking for parked events while it is 0
    parked              bigint      not null default 0,
    -- bumped when read-model rows change outside project_batch (rebuild, resume, retries), so
    -- that caches know to refresh
    generation          bigint      not null default 0,
    -- last_error is the summary that may be shown anywhere (SQLSTATE, and the message where it
    -- names only objects); the whole error, which may hold the command's values, is here
    last_error_detail   text
) with (fillfactor = 50);

-- How far each projection has applied each stream. No foreign key: it is written for every
-- stream of every batch; drop_projection deletes explicitly.
create table cqrs.projection_stream (
    projection text   not null,
    stream     text   not null,
    last_seq   bigint not null,
    primary key (projection, stream)
) with (fillfactor = 70);

-- Events that arrived after a gap in their stream, waiting for it to fill.
create table cqrs.parked (
    projection text        not null,
    stream     text        not null,
    seq        bigint      not null,
    event      jsonb       not null,
    parked_at  timestamptz not null default pg_catalog.now(),
    primary key (projection, stream, seq)
);

-- Events a projection with on_error = 'dead_letter' could not apply.
create table cqrs.dead_letter (
    id           bigint      generated always as identity primary key,
    projection   text        not null,
    stream       text        not null,
    seq          bigint      not null,
    command_id   uuid,
    command_type text,
    event        jsonb       not null,
    error        text        not null,
    sqlstate     text        not null,
    failed_at    timestamptz not null default pg_catalog.now(),
    retries      integer     not null default 0,
    -- error is the summary (see projection_state.last_error); the whole error is here
    error_detail text
);
create index dead_letter_projection_idx on cqrs.dead_letter (projection, id);

-- The projector leases, one per projection group: who leads the group, and a fencing token that
-- only grows. A sidecar becomes a group's leader by taking its lease (cqrs.try_lead, which only
-- cqrs_projector may call: leadership is not a lock any session could take) and passes the
-- token to every project_batch call of the group; a call with an older token — a deposed leader
-- that has not noticed yet — is refused, whatever its batch holds. The leader renews the lease
-- on its own connection; a standby takes it over when it expires or when the leader's
-- connection is gone (its backend pid no longer runs). Tokens come from one sequence, so a
-- token is never valid for two groups: a sidecar passing the wrong group is refused.
create sequence cqrs.projector_lease_token_seq;
create table cqrs.projector_lease (
    token            bigint      not null default 0,
    holder           text,
    acquired_at      timestamptz,
    -- the backend of the leader's lease connection
    holder_pid       integer,
    -- null: not held through cqrs.try_lead (released, or taken by a 0.1.0 sidecar)
    expires_at       timestamptz,
    projection_group text        not null default 'default',
    constraint projector_lease_pkey primary key (projection_group),
    constraint projector_lease_group_check check (cqrs._is_projection_group(projection_group))
);
-- no row until a group's first lease: a pre-inserted row would collide with its dumped copy on
-- restore

-- A projection group's name checked where it is given (22004, 22023).
create function cqrs._check_projection_group(projection_group text)
returns void
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
    if projection_group is null then
        raise exception using errcode = '22004', message = 'projection_group must not be null';
    end if;
    if not cqrs._is_projection_group(projection_group) then
        raise exception using errcode = '22023',
            message = format('%L is not a projection group name', projection_group),
            hint = 'A group name is 1 to 40 characters of a-z 0-9 _, starting with a letter.';
    end if;
end
$$;
comment on function cqrs._check_projection_group(text) is
    'Raises 22004 for a null projection group and 22023 for a text that cannot name one.';

create function cqrs.acquire_lease(holder text default null, projection_group text default 'default')
returns bigint
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_token bigint;
begin
    perform cqrs._check_projection_group(projection_group);
    -- locked for update first: a new token waits for the batches in flight (see cqrs._fence)
    perform from cqrs.projector_lease l where l.projection_group = acquire_lease.projection_group for update;
    insert into cqrs.projector_lease as l (projection_group, token, holder, acquired_at)
    values (acquire_lease.projection_group, pg_catalog.nextval('cqrs.projector_lease_token_seq'), acquire_lease.holder, pg_catalog.now())
    on conflict on constraint projector_lease_pkey do update
        set token = excluded.token, holder = excluded.holder, acquired_at = excluded.acquired_at,
            holder_pid = null, expires_at = null
    returning l.token into v_token;
    return v_token;
end
$$;
comment on function cqrs.acquire_lease(text, text) is
    'Takes a projection group''s lease unconditionally: returns a fencing token higher than any before; project_batch refuses older ones. Kept for sidecars of 0.1.0, which elect their leader themselves; use cqrs.try_lead.';

-- Leadership: the lease is free when nobody holds it, when it expired, or when its holder's
-- connection is gone; the holder renews it by calling again (same holder, same connection).
create function cqrs.try_lead(holder text, ttl interval default '2 s', projection_group text default 'default')
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
    perform cqrs._check_projection_group(projection_group);
    -- a renewal keeps its token; only a new holder draws one
    update cqrs.projector_lease l set expires_at = pg_catalog.clock_timestamp() + ttl
     where l.projection_group = try_lead.projection_group
       and l.holder = try_lead.holder and l.holder_pid = pg_catalog.pg_backend_pid()
    returning l.token into v_token;
    if found then
        return v_token;
    end if;
    -- a live holder keeps it (no token drawn: standbys ask every few hundred milliseconds)
    if exists (select from cqrs.projector_lease l
                where l.projection_group = try_lead.projection_group
                  and l.expires_at >= pg_catalog.clock_timestamp()
                  and exists (select from pg_catalog.pg_stat_activity a where a.pid = l.holder_pid)) then
        return null;
    end if;
    -- a takeover locks the row for update first, which waits for the batches in flight (they
    -- hold a key share lock, see cqrs._fence)
    perform from cqrs.projector_lease l where l.projection_group = try_lead.projection_group for update;
    insert into cqrs.projector_lease as l (projection_group, token, holder, acquired_at, holder_pid, expires_at)
    values (try_lead.projection_group, pg_catalog.nextval('cqrs.projector_lease_token_seq'), try_lead.holder, pg_catalog.now(),
            pg_catalog.pg_backend_pid(), pg_catalog.clock_timestamp() + ttl)
    on conflict on constraint projector_lease_pkey do update
        set token = excluded.token,
            acquired_at = excluded.acquired_at,
            holder = excluded.holder,
            holder_pid = excluded.holder_pid,
            expires_at = excluded.expires_at
        where l.expires_at is null
           or l.expires_at < pg_catalog.clock_timestamp()
           or not exists (select from pg_catalog.pg_stat_activity a where a.pid = l.holder_pid)
    returning l.token into v_token;
    return v_token;
end
$$;
comment on function cqrs.try_lead(text, interval, text) is
    'Takes or renews a projection group''s lease for holder (on this connection) and returns its fencing token; null while another live holder has it. The lease is free once it expires or its holder''s connection is gone.';

create function cqrs.release_lead(holder text, projection_group text default 'default')
returns boolean
language sql security definer
set search_path = pg_catalog, pg_temp
as $$
    with released as (
        update cqrs.projector_lease l set expires_at = null
         where l.projection_group = release_lead.projection_group
           and l.holder = release_lead.holder and l.holder_pid = pg_catalog.pg_backend_pid()
        returning 1)
    select exists (select from released);
$$;
comment on function cqrs.release_lead(text, text) is
    'Gives a projection group''s lease up at once (a standby takes it on its next try); true if holder held it on this connection.';

-- Who leads a group, for health checks: the holder and whether its lease is live.
create function cqrs.leader(projection_group text default 'default', out holder text, out token bigint, out live boolean)
returns record
language sql stable security definer
set search_path = pg_catalog, pg_temp
as $$
    select l.holder, l.token,
           l.expires_at is not null and l.expires_at >= pg_catalog.clock_timestamp()
           and exists (select from pg_catalog.pg_stat_activity a where a.pid = l.holder_pid)
      from (select true) one
      left join cqrs.projector_lease l on l.projection_group = leader.projection_group;
$$;
comment on function cqrs.leader(text) is
    'The holder of a projection group''s lease, its token, and whether the lease is live (not expired, holder connected).';

-- Every group, its projections and its leader: what an operator looks at before moving a
-- projection or starting a group's sidecars.
create function cqrs.projection_groups()
returns table (projection_group text, projections text[], holder text, token bigint, live boolean)
language sql stable security definer
set search_path = pg_catalog, pg_temp
as $$
    select g.projection_group,
           coalesce((select pg_catalog.array_agg(p.name order by p.name) from cqrs.projection p
                      where p.projection_group = g.projection_group), '{}'),
           l.holder, l.token,
           coalesce(l.expires_at is not null and l.expires_at >= pg_catalog.clock_timestamp()
                    and exists (select from pg_catalog.pg_stat_activity a where a.pid = l.holder_pid), false)
      from (select p.projection_group from cqrs.projection p
            union select l.projection_group from cqrs.projector_lease l) g
      left join cqrs.projector_lease l on l.projection_group = g.projection_group
     order by g.projection_group;
$$;
comment on function cqrs.projection_groups() is
    'Every projection group (those with projections, and those a sidecar ever led): its projections, its leader, whether the lease is live.';

-- The fence of every batch, checked by cqrs._project_batch in both editions (the Rust one calls
-- it), in SQL because it raises pg_cqrs's own SQLSTATE, QC001 (class QC: pg_cqrs; a C function
-- can raise only the codes PostgreSQL defines): a caller whose token is not the group's lease's
-- — a deposed leader, or a session that never led — is refused, and the sidecar stops
-- projecting on this code alone. A call without a token is refused while a sidecar leads the
-- group: only the leader projects its batches then (cqrs.catch_up, which reads the log itself,
-- needs no token). The key share lock on the lease row, held to the end of the transaction,
-- makes a takeover (which locks the row for update, in cqrs.try_lead and cqrs.acquire_lease) and
-- a move (cqrs.move_projection) wait for batches in flight, so after it every call with the old
-- token is refused; the leader renewing its own lease (an update of no key) does not wait for
-- its batches. A commit LSN past the server's WAL cannot be a commit's: it would make
-- projections skip the real batches below it. The SQLSTATE is also in projection/src/lib.rs
-- (FENCED_SQLSTATE), whose test reads this file.
create function cqrs._fence(fencing_token bigint, commit_lsn pg_lsn, projection_group text)
returns void
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_lease record;
    v_of text := case when projection_group = 'default' then '' else format(' of group %s', projection_group) end;
begin
    perform cqrs._check_projection_group(projection_group);
    select l.token, l.holder,
           l.expires_at is not null and l.expires_at >= pg_catalog.clock_timestamp()
           and exists (select from pg_catalog.pg_stat_activity a where a.pid = l.holder_pid) as live
      into v_lease
      from cqrs.projector_lease l
     where l.projection_group = _fence.projection_group
       for key share;
    if fencing_token is null then
        if v_lease.live then
            raise exception using errcode = 'QC001',
                message = format('%s leads the projection%s (lease token %s): a batch without its fencing token is refused',
                                 coalesce(v_lease.holder, 'a sidecar'), v_of, v_lease.token),
                hint = 'Only the leading sidecar projects batches; cqrs.catch_up() projects from the log without one.';
        end if;
    elsif fencing_token < coalesce(v_lease.token, 0) then
        raise exception using errcode = 'QC001',
            message = format('this projector''s lease%s (token %s) was taken over by a newer one (token %s)', v_of, fencing_token, v_lease.token),
            hint = 'Another sidecar leads now; this one must stop projecting.';
    elsif fencing_token <> coalesce(v_lease.token, 0) then
        raise exception using errcode = 'QC001',
            message = format('fencing token %s is not the projector lease''s%s (%s)', fencing_token, v_of,
                             coalesce('token ' || v_lease.token, 'no lease was ever taken')),
            hint = 'Take the lease with cqrs.try_lead() (with the same projection_group) and pass the token it returns.';
    end if;
    if commit_lsn > pg_catalog.pg_current_wal_insert_lsn() then
        raise exception using errcode = '22023',
            message = format('commit_lsn %s is past the end of the server''s WAL', commit_lsn),
            hint = 'Pass the commit LSN of the transaction that ends the batch, or null.';
    end if;
end
$$;
comment on function cqrs._fence(bigint, pg_lsn, text) is
    'The fence of cqrs.project_batch: QC001 unless the fencing token is the projection group''s lease''s (or, without one, unless no sidecar leads the group); 22023 for a commit LSN past the WAL or a bad group name.';

-- (PL/pgSQL, not SQL: cqrs._project_batch is the edition's and does not exist yet here. No `set
-- search_path`, on purpose: the portable edition puts back the caller's search_path when the
-- owner's code changed it, and must see the caller's, not this function's; the body names only
-- schema-qualified objects.) Two signatures, not one with a defaulted group: the three-argument
-- one is the default group's and the one sidecars of 0.2.0 look for at start (a sidecar that
-- restarts between the extension's upgrade and its own must still start); the group is the
-- fourth argument, without a default, so no call can match both.
create function cqrs.project_batch(events jsonb, commit_lsn pg_lsn, fencing_token bigint, projection_group text)
returns table (projection text, key text, rev bigint, doc json, deleted boolean)
language plpgsql volatile called on null input
as $$
begin
    return query select b.projection, b.key, b.rev, b.doc, b.deleted
                   from cqrs._project_batch(events, commit_lsn, fencing_token, projection_group) b;
end
$$;
comment on function cqrs.project_batch(jsonb, pg_lsn, bigint, text) is
    'Applies an ordered batch of command-log rows to every projection of a projection group, exactly once, in one transaction; returns every read-model row it changed. A batch at or below a projection''s checkpoint LSN is skipped; a fencing_token other than the group''s lease''s is refused.';
revoke execute on function cqrs.project_batch(jsonb, pg_lsn, bigint, text) from public;
grant execute on function cqrs.project_batch(jsonb, pg_lsn, bigint, text) to cqrs_projector;

create function cqrs.project_batch(events jsonb, commit_lsn pg_lsn default null, fencing_token bigint default null)
returns table (projection text, key text, rev bigint, doc json, deleted boolean)
language plpgsql volatile called on null input
as $$
begin
    return query select b.projection, b.key, b.rev, b.doc, b.deleted
                   from cqrs._project_batch(events, commit_lsn, fencing_token, 'default') b;
end
$$;
comment on function cqrs.project_batch(jsonb, pg_lsn, bigint) is
    'cqrs.project_batch of the default projection group (every projection until one is moved).';
revoke execute on function cqrs.project_batch(jsonb, pg_lsn, bigint) from public;
grant execute on function cqrs.project_batch(jsonb, pg_lsn, bigint) to cqrs_projector;

-- Moving a projection to another group, with nothing lost or doubled: the leases of both groups
-- are locked for update (waiting for their batches in flight and holding off new ones until the
-- move commits), the projection's state row too; then it changes group and catches up from the
-- log in the same transaction. What the new group's slot streams after that either is past the
-- projection's checkpoint and applied once (per-stream sequencing drops what the catch-up
-- already applied) or at or below it and skipped. The catch-up does not move the checkpoint LSN
-- (it cannot know which commits its snapshot missed), so nothing is skipped that was not
-- applied. The generation is bumped: the group's leader resyncs the projection's cache.
-- SECURITY DEFINER (cqrs_projector may not change cqrs.projection); the catch-up, which runs
-- owner code, is cqrs.move_projection's, as its caller.
create function cqrs._assign_group(name text, to_group text)
returns text
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_from text;
begin
    if name is null then
        raise exception using errcode = '22004', message = 'name must not be null';
    end if;
    perform cqrs._check_projection_group(to_group);
    select p.projection_group into v_from from cqrs.projection p where p.name = _assign_group.name;
    if not found then
        raise exception using errcode = '42704', message = format('projection %s does not exist', pg_catalog.quote_ident(name)),
            hint = 'See select name, projection_group from cqrs.projection.';
    end if;
    -- both leases in name order (two moves the other way round do not deadlock)
    perform from cqrs.projector_lease l where l.projection_group in (v_from, to_group)
     order by l.projection_group for update;
    perform from cqrs.projection_state s where s.name = _assign_group.name for update;
    update cqrs.projection p set projection_group = to_group where p.name = _assign_group.name;
    update cqrs.projection_state s set generation = s.generation + 1 where s.name = _assign_group.name;
    return v_from;
end
$$;
comment on function cqrs._assign_group(text, text) is
    'The catalog part of cqrs.move_projection: locks both groups'' leases and the projection''s state, changes its group; returns the group it left.';
revoke execute on function cqrs._assign_group(text, text) from public;
grant execute on function cqrs._assign_group(text, text) to cqrs_projector;

create function cqrs.move_projection(name text, to_group text)
returns table (projection text, key text, rev bigint, doc json, deleted boolean)
language plpgsql volatile called on null input
as $$
declare
    v_from text := cqrs._assign_group(name, to_group);
begin
    if v_from = to_group then
        return;
    end if;
    return query select c.projection, c.key, c.rev, c.doc, c.deleted from cqrs.catch_up(name) c;
end
$$;
comment on function cqrs.move_projection(text, text) is
    'Moves a projection to another projection group (whose leader projects it from then on) and catches it up from the log, in one transaction: nothing is lost or applied twice. Returns the rows the catch-up changed.';
revoke execute on function cqrs.move_projection(text, text) from public;
grant execute on function cqrs.move_projection(text, text) to cqrs_projector;

-- Creates the publication the sidecar streams (on cqrs.command_log only) if it is missing.
-- Creating a publication for a table requires owning it, hence SECURITY DEFINER.
create function cqrs.ensure_publication(name text)
returns boolean
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    if name is null or name !~ '^[a-z_][a-z0-9_]{0,62}$' then
        raise exception using errcode = '22023',
            message = format('publication name %L must be a lowercase SQL identifier', name);
    end if;
    if exists (select from pg_catalog.pg_publication p where p.pubname = ensure_publication.name) then
        -- the log is partitioned (sql/core/retention.sql): its rows must be published as the
        -- partitioned table's, which the sidecar decodes, not as each partition's
        if not exists (select from pg_catalog.pg_publication_tables t
                        where t.pubname = ensure_publication.name
                          and t.schemaname = 'cqrs' and t.tablename = 'command_log')
           or not (select p.pubviaroot from pg_catalog.pg_publication p where p.pubname = ensure_publication.name) then
            raise exception using errcode = '55000',
                message = format('publication %s exists but does not publish cqrs.command_log through its partitioned table', name),
                hint = format('alter publication %I add table cqrs.command_log; alter publication %I set (publish_via_partition_root = true);',
                              name, name);
        end if;
        return false;
    end if;
    execute format('create publication %I for table cqrs.command_log with (publish = ''insert'', publish_via_partition_root = true)', name);
    return true;
end
$$;
comment on function cqrs.ensure_publication(text) is
    'Creates the publication of cqrs.command_log (inserts only) when missing; true if it created it.';

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
        select p.name, s.stream, s.last_seq - coalesce(ps.last_seq, 0) as missing, coalesce(ps.last_seq, 0) + 1 as next_seq,
               s.min_id_time, s.max_id_time
          from cqrs.projection p
          cross join cqrs.stream s
          left join cqrs.projection_stream ps on ps.projection = p.name and ps.stream = s.stream
         where s.last_seq > coalesce(ps.last_seq, 0)
    ), lag as (
        select b.name, sum(b.missing)::bigint as events,
               extract(epoch from pg_catalog.clock_timestamp() - min(l.created_at))::double precision as seconds
          from behind b
          join cqrs.command_log l on l.stream = b.stream and l.seq = b.next_seq
                                 and l.id_time between b.min_id_time and b.max_id_time
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
comment on function cqrs._backlog() is
    'Per projection, the commands it has still to apply and the age of the oldest, its parked events and their oldest age, its dead letters: numbers only, for cqrs.status().';

-- Security invoker, so that it shows the last error only to those who may read it (its summary,
-- which carries no command values: readers and projectors).
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

-- Lag per projection in time independent of the number of streams, for monitoring that polls
-- every few seconds: cqrs.status() compares every stream with the projection's progress (exact,
-- but seconds with millions of streams); this counts the commands after the checkpoint through
-- the log's primary key. Commands committed out of position order near the checkpoint can be
-- miscounted for a moment; parked events show in `parked`.
create function cqrs.progress()
returns table (
    projection     text,
    halted         boolean,
    events_behind  bigint,
    seconds_behind double precision,
    parked         bigint,
    dead_letters   bigint,
    applied        bigint,
    duplicates     bigint,
    dead_lettered  bigint,
    revision       bigint,
    generation     bigint)
language sql stable security definer
set search_path = pg_catalog, pg_temp
as $$
    select st.name, st.halted, behind.events, coalesce(behind.seconds, 0),
           (select count(*) from cqrs.parked pk where pk.projection = st.name),
           (select count(*) from cqrs.dead_letter d where d.projection = st.name),
           st.applied, st.duplicates, st.dead_lettered, st.revision, st.generation
      from cqrs.projection_state st
      cross join lateral (
          select count(*)::bigint as events,
                 extract(epoch from pg_catalog.clock_timestamp() - min(l.created_at))::double precision as seconds
            from cqrs.command_log l
           where l.position > coalesce(st.checkpoint_position, 0)) behind
     order by st.name;
$$;
comment on function cqrs.progress() is
    'Per projection: halted, commands after the checkpoint and the age of the oldest, parked, dead letters — cheap at any number of streams (cqrs.status() is exact per stream).';

-- Privileges. Projection functions run with the caller's rights (a user function handler must
-- never run as the extension owner); cqrs_projector gets what projecting needs.
revoke all on cqrs.projection, cqrs.projection_state, cqrs.projection_stream, cqrs.parked, cqrs.dead_letter,
    cqrs.projector_lease from public;
revoke all on sequence cqrs.projection_definition_seq, cqrs.dead_letter_id_seq, cqrs.projector_lease_token_seq from public;
grant select, insert, update, delete on cqrs.projection_state, cqrs.projection_stream, cqrs.parked,
    cqrs.dead_letter to cqrs_projector;
-- the lease changes only through its functions (try_lead, release_lead, acquire_lease)
grant select on cqrs.projection, cqrs.projector_lease to cqrs_projector;
-- readers see where projections are and why one halted (the summary), not the commands they
-- failed on nor the whole error (which can hold their values)
-- (and so do writers: an application reads its own writes — cqrs.wait_for, cqrs.read — which
-- look at the catalog)
grant select on cqrs.projection, cqrs.projection_stream to cqrs_reader, cqrs_writer;
grant select (name, halted, last_error, last_error_sqlstate, last_error_at, checkpoint_lsn, checkpoint_position, checkpoint_at,
              revision, applied, duplicates, dead_lettered, parked, generation)
    on cqrs.projection_state to cqrs_reader, cqrs_writer;
grant usage on sequence cqrs.dead_letter_id_seq to cqrs_projector;
revoke execute on function cqrs.acquire_lease(text, text), cqrs.ensure_publication(text), cqrs.try_lead(text, interval, text),
    cqrs.release_lead(text, text), cqrs.leader(text) from public;
grant execute on function cqrs.acquire_lease(text, text), cqrs.ensure_publication(text), cqrs.try_lead(text, interval, text),
    cqrs.release_lead(text, text), cqrs.leader(text) to cqrs_projector;
revoke execute on function cqrs._is_projection_name(text), cqrs._is_projection_group(text),
    cqrs._check_projection_group(text) from public;
revoke execute on function cqrs.projection_groups() from public;
grant execute on function cqrs.projection_groups() to cqrs_reader, cqrs_projector;
revoke execute on function cqrs.status(), cqrs.progress(), cqrs._backlog() from public;
grant execute on function cqrs.status(), cqrs.progress(), cqrs._backlog()
    to cqrs_reader, cqrs_projector;
revoke execute on function cqrs._fence(bigint, pg_lsn, text) from public;
grant execute on function cqrs._fence(bigint, pg_lsn, text) to cqrs_projector;

-- Extension tables are not dumped by pg_dump unless marked; these hold user data.
select pg_catalog.pg_extension_config_dump('cqrs.projection', '');
select pg_catalog.pg_extension_config_dump('cqrs.projection_state', '');
select pg_catalog.pg_extension_config_dump('cqrs.projection_stream', '');
select pg_catalog.pg_extension_config_dump('cqrs.parked', '');
select pg_catalog.pg_extension_config_dump('cqrs.dead_letter', '');
select pg_catalog.pg_extension_config_dump('cqrs.projection_definition_seq', '');
select pg_catalog.pg_extension_config_dump('cqrs.projector_lease', '');
select pg_catalog.pg_extension_config_dump('cqrs.projector_lease_token_seq', '');
select pg_catalog.pg_extension_config_dump('cqrs.dead_letter_id_seq', '');
