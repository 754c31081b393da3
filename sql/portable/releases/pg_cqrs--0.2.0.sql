-- pg_cqrs 0.2.0, portable edition: the psql install script of the 0.2.0 release, frozen. Never edit it.
-- Built by scripts/portable.sh at commit 97eed5d (the 0.2.0 release); the portable upgrade test
-- installs it, fills it and upgrades it with sql/portable/upgrades/.

-- pg_cqrs 0.2.0, portable edition (SQL and PL/pgSQL), built by scripts/portable.sh.
-- Install into a database, as its owner with CREATEROLE (the RDS / Cloud SQL / Azure admin
-- user; no superuser needed), in one transaction:
--   psql -v ON_ERROR_STOP=1 -1 -f pg_cqrs.sql "postgres://admin@host/app"
\set ON_ERROR_STOP on
set client_min_messages = warning;
do $guard$
begin
    if pg_catalog.to_regprocedure('cqrs.version()') is not null then
        raise exception using errcode = '42710',
            message = pg_catalog.format('pg_cqrs %s (%s edition) is already installed in this database; this script installs %s only where there is none',
                                        (select v.version from cqrs.version() v), (select v.edition from cqrs.version() v), '0.2.0'),
            hint = 'Nothing was changed. Upgrades ship as their own scripts (see the README, Managed PostgreSQL).';
    end if;
    if pg_catalog.to_regnamespace('cqrs') is not null then
        raise exception using errcode = '42P06', message = 'schema cqrs exists already and is not pg_cqrs',
            hint = 'Nothing was changed. Drop or rename that schema first.';
    end if;
end
$guard$;
-- pg_cqrs body begins
create schema cqrs;
-- Helpers of the portable edition only (schema cqrs holds exactly what the extension edition's
-- schema holds: the conformance suite compares them).
create schema cqrs_portable;
comment on schema cqrs_portable is 'pg_cqrs portable edition: internal helpers of the PL/pgSQL engine.';

-- ---- sql/core/command.sql ----
-- pg_cqrs command side: the command log, per-stream sequences, command types and append.
--
-- Plain SQL and PL/pgSQL wherever Rust does not earn its place, so that a portable edition for
-- managed Postgres can share it. cqrs.append() itself is C (Rust): it is the hot path, and the
-- JSON Schema validation it performs needs Rust anyway; see extension/src/append.rs.

-- Roles are cluster-wide and survive DROP EXTENSION, so create them only when missing.
do $roles$
begin
    if not exists (select from pg_catalog.pg_roles where rolname = 'cqrs_writer') then
        create role cqrs_writer nologin;
    end if;
    if not exists (select from pg_catalog.pg_roles where rolname = 'cqrs_reader') then
        create role cqrs_reader nologin;
    end if;
    if not exists (select from pg_catalog.pg_roles where rolname = 'cqrs_projector') then
        create role cqrs_projector nologin;
    end if;
end
$roles$;

create table cqrs.command_log (
    position     bigint generated always as identity primary key,
    command_id   uuid        not null,
    stream       text        not null,
    seq          bigint      not null,
    command_type text        not null,
    payload      jsonb       not null,
    metadata     jsonb       not null default '{}',
    created_at   timestamptz not null default pg_catalog.now(),
    constraint command_log_command_id_key unique (command_id),
    constraint command_log_stream_seq_key unique (stream, seq),
    constraint command_log_seq_check check (seq > 0)
);
comment on table cqrs.command_log is
    'Append-only log of accepted commands. Write it only through cqrs.append()/cqrs.append_batch().';

-- One row per stream holding its last sequence number. The row lock taken when a command is
-- appended is what makes each stream's sequence gap-free and commit-ordered. fillfactor leaves
-- room on each page so the constant last_seq updates stay HOT (no index writes). The table is
-- deliberately minimal (no timestamps, no CHECK): it is updated by every append, and each CHECK
-- is re-compiled on every statement execution.
create table cqrs.stream (
    stream   text   primary key,
    last_seq bigint not null
) with (fillfactor = 70);
comment on table cqrs.stream is 'Last sequence number of every stream in cqrs.command_log.';

create sequence cqrs.command_type_version_seq;

create table cqrs.command_type (
    command_type  text        primary key,
    json_schema   jsonb       not null,
    -- bumped on every (re-)registration; backends cache compiled schemas by (type, version)
    version       bigint      not null default pg_catalog.nextval('cqrs.command_type_version_seq'),
    registered_at timestamptz not null default pg_catalog.now()
);
comment on table cqrs.command_type is 'JSON Schemas that payloads of each command type must satisfy.';

-- Identifier rules shared by append and register_command_type. NULL → 22004, empty → 22023,
-- too long → 22001.
-- No `set search_path` (as for the portable edition's validator helpers, see
-- sql/portable/json_schema.sql): only SECURITY DEFINER functions with a pinned search_path call
-- it, and the SET clause cost the portable cqrs.append, which calls it twice, about 15 %.
create function cqrs._check_name(what text, value text, max_bytes integer)
returns void
language plpgsql immutable parallel safe
as $$
begin
    if value is null then
        raise exception using errcode = '22004', message = format('%s must not be null', what);
    end if;
    if value = '' then
        raise exception using errcode = '22023', message = format('%s must not be empty', what);
    end if;
    if octet_length(value) > max_bytes then
        raise exception using
            errcode = '22001',
            message = format('%s is %s bytes long; the limit is %s bytes', what, octet_length(value), max_bytes);
    end if;
end
$$;

create function cqrs.register_command_type(command_type text, json_schema jsonb)
returns bigint
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_version bigint;
begin
    perform cqrs._check_name('command_type', register_command_type.command_type, 128);
    if json_schema is null then
        raise exception using errcode = '22004', message = 'json_schema must not be null';
    end if;
    -- compiles the schema in Rust; an invalid schema raises 22023 naming the problem
    perform cqrs._check_json_schema(json_schema);
    insert into cqrs.command_type as t (command_type, json_schema)
    values (register_command_type.command_type, register_command_type.json_schema)
    on conflict on constraint command_type_pkey do update
        set json_schema = excluded.json_schema,
            version = pg_catalog.nextval('cqrs.command_type_version_seq'),
            registered_at = pg_catalog.now()
    returning t.version into v_version;
    return v_version;
end
$$;
comment on function cqrs.register_command_type(text, jsonb) is
    'Registers (or replaces) the JSON Schema that payloads of a command type must satisfy; returns its version.';

create function cqrs.unregister_command_type(command_type text)
returns boolean
language sql security definer
set search_path = pg_catalog, pg_temp
as $$
    with gone as (
        delete from cqrs.command_type t where t.command_type = unregister_command_type.command_type returning 1
    )
    select exists (select from gone);
$$;

create function cqrs.append_batch(commands jsonb)
returns table (index integer, command_id uuid, "position" bigint, seq bigint, duplicate boolean)
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_item jsonb;
    v_index integer := 0;
    v_key text;
    v_expected bigint;
    v_row record;
    v_state text;
    v_message text;
    v_detail text;
    v_hint text;
begin
    if commands is null then
        raise exception using errcode = '22004', message = 'commands must not be null';
    end if;
    if jsonb_typeof(commands) <> 'array' then
        raise exception using errcode = '22023',
            message = format('commands must be a JSON array of command objects, not %s', jsonb_typeof(commands));
    end if;

    -- Validate the shape of every element before appending anything, so a malformed batch is
    -- refused with the index of the first bad element.
    for v_item in select e from jsonb_array_elements(commands) e loop
        if jsonb_typeof(v_item) <> 'object' then
            raise exception using errcode = '22023',
                message = format('commands[%s] must be a JSON object, not %s', v_index, jsonb_typeof(v_item));
        end if;
        for v_key in select k from jsonb_object_keys(v_item) k loop
            if v_key not in ('command_id', 'stream', 'command_type', 'payload', 'expected_seq', 'metadata') then
                raise exception using errcode = '22023',
                    message = format('commands[%s] has unknown key %L', v_index, v_key),
                    hint = 'Allowed keys: command_id, stream, command_type, payload, expected_seq, metadata.';
            end if;
        end loop;
        if jsonb_typeof(v_item -> 'command_id') is distinct from 'string'
           or (v_item ->> 'command_id') !~* '^\{?[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}\}?$' then
            raise exception using errcode = case when coalesce(jsonb_typeof(v_item -> 'command_id'), 'null') = 'null'
                                                 then '22004' else '22P02' end,
                message = format('commands[%s].command_id must be a UUID string', v_index);
        end if;
        if jsonb_typeof(v_item -> 'stream') is distinct from 'string' then
            raise exception using errcode = case when coalesce(jsonb_typeof(v_item -> 'stream'), 'null') = 'null'
                                                 then '22004' else '22023' end,
                message = format('commands[%s].stream must be a string', v_index);
        end if;
        if jsonb_typeof(v_item -> 'command_type') is distinct from 'string' then
            raise exception using errcode = case when coalesce(jsonb_typeof(v_item -> 'command_type'), 'null') = 'null'
                                                 then '22004' else '22023' end,
                message = format('commands[%s].command_type must be a string', v_index);
        end if;
        if coalesce(jsonb_typeof(v_item -> 'expected_seq'), 'null') not in ('null', 'number')
           or (jsonb_typeof(v_item -> 'expected_seq') = 'number'
               and (v_item ->> 'expected_seq') !~ '^-?[0-9]{1,18}$') then
            raise exception using errcode = '22023',
                message = format('commands[%s].expected_seq must be null or an integer', v_index);
        end if;
        v_index := v_index + 1;
    end loop;

    v_index := 0;
    begin
        for v_item in select e from jsonb_array_elements(commands) e loop
            v_expected := case when jsonb_typeof(v_item -> 'expected_seq') = 'number'
                               then (v_item ->> 'expected_seq')::bigint end;
            select a.position, a.seq, a.duplicate into v_row
              from cqrs.append(
                       (v_item ->> 'command_id')::uuid,
                       v_item ->> 'stream',
                       v_item ->> 'command_type',
                       v_item -> 'payload',
                       v_expected,
                       coalesce(v_item -> 'metadata', '{}'::jsonb)) a;
            index := v_index;
            command_id := (v_item ->> 'command_id')::uuid;
            "position" := v_row.position;
            seq := v_row.seq;
            duplicate := v_row.duplicate;
            return next;
            v_index := v_index + 1;
        end loop;
    exception when others then
        -- name the element that failed, keep its SQLSTATE
        get stacked diagnostics v_state = returned_sqlstate, v_message = message_text,
                                v_detail = pg_exception_detail, v_hint = pg_exception_hint;
        v_message := format('commands[%s]: %s', v_index, v_message);
        if coalesce(v_detail, '') <> '' and coalesce(v_hint, '') <> '' then
            raise exception using errcode = v_state, message = v_message, detail = v_detail, hint = v_hint;
        elsif coalesce(v_detail, '') <> '' then
            raise exception using errcode = v_state, message = v_message, detail = v_detail;
        elsif coalesce(v_hint, '') <> '' then
            raise exception using errcode = v_state, message = v_message, hint = v_hint;
        else
            raise exception using errcode = v_state, message = v_message;
        end if;
    end;
end
$$;
comment on function cqrs.append_batch(jsonb) is
    'Appends an array of commands atomically with the rules of cqrs.append(); one row per command, in order.';

-- Privileges: applications append through the functions only.
revoke all on all tables in schema cqrs from public;
revoke all on all sequences in schema cqrs from public;
grant usage on schema cqrs to cqrs_writer, cqrs_reader, cqrs_projector;
revoke execute on function cqrs._check_name(text, text, integer) from public;
revoke execute on function cqrs.append_batch(jsonb) from public;
revoke execute on function cqrs.register_command_type(text, jsonb) from public;
revoke execute on function cqrs.unregister_command_type(text) from public;
grant execute on function cqrs.append_batch(jsonb) to cqrs_writer;
grant select on cqrs.stream, cqrs.command_type to cqrs_reader, cqrs_projector;
grant select on cqrs.command_log to cqrs_projector;

-- Extension tables are not dumped by pg_dump unless marked; these hold user data.

-- ---- sql/core/projection.sql ----
-- pg_cqrs projection side: projection definitions and state, per-(projection, stream) progress,
-- parked and dead-lettered events, status. The engine itself (create_projection,
-- project_batch, rebuild, catch_up, wait_for …) is Rust; see extension/src/projector.rs.

create sequence cqrs.projection_definition_seq;

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
    constraint projection_target_key unique (target),
    -- names end up in cache keys ({prefix}:{projection}:{key}) and metric labels
    constraint projection_name_check check (name ~ '^[A-Za-z0-9_.-]{1,63}$'),
    constraint projection_on_error_check check (on_error in ('halt', 'dead_letter'))
);
comment on table cqrs.projection is 'Registered read models: target table, key, handlers per command type.';

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
    generation          bigint      not null default 0
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
    retries      integer     not null default 0
);
create index dead_letter_projection_idx on cqrs.dead_letter (projection, id);

-- The projector lease: who leads, and a fencing token that only grows. A sidecar becomes leader
-- by taking the lease (cqrs.try_lead, which only cqrs_projector may call: leadership is not a
-- lock any session could take) and passes the token to every project_batch call; a call with an
-- older token — a deposed leader that has not noticed yet — is refused, whatever its batch
-- holds. The leader renews the lease on its own connection; a standby takes it over when it
-- expires or when the leader's connection is gone (its backend pid no longer runs).
create table cqrs.projector_lease (
    id          boolean     primary key default true check (id),
    token       bigint      not null default 0,
    holder      text,
    acquired_at timestamptz,
    -- the backend of the leader's lease connection
    holder_pid  integer,
    -- null: not held through cqrs.try_lead (released, or taken by a 0.1.0 sidecar)
    expires_at  timestamptz
);
-- no row until the first lease: a pre-inserted row would collide with its dumped copy on restore

create function cqrs.acquire_lease(holder text default null)
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

-- The fencing check of cqrs.project_batch, in SQL for both editions because it raises pg_cqrs's
-- own SQLSTATE, QC001 (class QC: pg_cqrs; a C function can raise only the codes PostgreSQL
-- defines): a caller whose token is older than the lease is a deposed leader, and the sidecar
-- stops projecting on this code alone. cqrs._project_batch (Rust, or PL/pgSQL in the portable
-- edition) does the work. The share lock on the lease row, held to the end of the transaction,
-- makes cqrs.try_lead wait for batches in flight, so after a takeover every call with the old
-- token is refused. The SQLSTATE is also in projection/src/lib.rs (FENCED_SQLSTATE), whose test
-- reads this file.
create function cqrs.project_batch(events jsonb, commit_lsn pg_lsn default null, fencing_token bigint default null)
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
        if not exists (select from pg_catalog.pg_publication_tables t
                        where t.pubname = ensure_publication.name
                          and t.schemaname = 'cqrs' and t.tablename = 'command_log') then
            raise exception using errcode = '55000',
                message = format('publication %s exists but does not publish cqrs.command_log', name),
                hint = format('alter publication %I add table cqrs.command_log;', name);
        end if;
        return false;
    end if;
    execute format('create publication %I for table cqrs.command_log with (publish = ''insert'')', name);
    return true;
end
$$;
comment on function cqrs.ensure_publication(text) is
    'Creates the publication of cqrs.command_log (inserts only) when missing; true if it created it.';

create function cqrs.drop_projection(name text)
returns boolean
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
    -- the read-model table is the user's and stays
    delete from cqrs.projection_stream ps where ps.projection = drop_projection.name;
    delete from cqrs.parked p where p.projection = drop_projection.name;
    delete from cqrs.dead_letter d where d.projection = drop_projection.name;
    delete from cqrs.projection p where p.name = drop_projection.name;
    return found;
end
$$;
comment on function cqrs.drop_projection(text) is
    'Unregisters a projection (its progress, parked events and dead letters too); the read-model table stays.';

-- Seconds a gap may stay unfilled before status() flags it.
create function cqrs._gap_alert_seconds()
returns double precision
language sql stable
as $$ select coalesce(nullif(pg_catalog.current_setting('cqrs.gap_alert_after', true), ''), '60')::double precision $$;

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

-- Rows of a projection's read model with a revision above `after` (every row for -1): what a
-- cache that holds everything up to `after` is missing. It scans the read model, so it is for
-- warming a cache and for repairing one after a crash, not for the hot path.
create function cqrs.changed_since(projection text, after bigint)
returns table (key text, rev bigint, doc json)
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    def record;
begin
    select p.target, p.key_column, p.rev_column into def
      from cqrs.projection p where p.name = changed_since.projection;
    if not found then
        raise exception 'projection % does not exist', changed_since.projection
            using errcode = '42704', hint = 'cqrs.status() lists the projections.';
    end if;
    return query execute format(
        'select t.%1$I::text, t.%2$I::bigint, pg_catalog.row_to_json(t) from %3$s t where t.%2$I > $1',
        def.key_column, def.rev_column, def.target)
        using coalesce(after, -1);
end
$$;
comment on function cqrs.changed_since(text, bigint) is
    'Read-model rows of a projection whose revision is above the given one (all rows for -1), as (key, rev, doc): for warming and repairing caches. Scans the read model.';

-- Privileges. Projection functions run with the caller's rights (a user function handler must
-- never run as the extension owner); cqrs_projector gets what projecting needs.
revoke all on all tables in schema cqrs from public;
revoke all on all sequences in schema cqrs from public;
grant select, insert, update, delete on cqrs.projection_state, cqrs.projection_stream, cqrs.parked,
    cqrs.dead_letter to cqrs_projector;
grant select on cqrs.projection, cqrs.projector_lease to cqrs_projector;
grant insert, update on cqrs.projector_lease to cqrs_projector;
-- readers see where projections are, not the commands they failed on (error texts carry values)
grant select on cqrs.projection, cqrs.projection_stream to cqrs_reader;
grant select (name, halted, last_error_sqlstate, last_error_at, checkpoint_lsn, checkpoint_position, checkpoint_at,
              revision, applied, duplicates, dead_lettered, parked, generation)
    on cqrs.projection_state to cqrs_reader;
grant usage on sequence cqrs.dead_letter_id_seq to cqrs_projector;
revoke execute on function cqrs.drop_projection(text) from public;
revoke execute on function cqrs.acquire_lease(text), cqrs.ensure_publication(text), cqrs.try_lead(text, interval),
    cqrs.release_lead(text), cqrs.leader() from public;
grant execute on function cqrs.acquire_lease(text), cqrs.ensure_publication(text), cqrs.try_lead(text, interval),
    cqrs.release_lead(text), cqrs.leader() to cqrs_projector;
revoke execute on function cqrs.status(), cqrs.progress(), cqrs._backlog(), cqrs._gap_alert_seconds() from public;
grant execute on function cqrs.status(), cqrs.progress(), cqrs._backlog(), cqrs._gap_alert_seconds()
    to cqrs_reader, cqrs_projector;
revoke execute on function cqrs.changed_since(text, bigint) from public;
grant execute on function cqrs.changed_since(text, bigint) to cqrs_reader, cqrs_projector;

-- Extension tables are not dumped by pg_dump unless marked; these hold user data.

-- ---- sql/portable/command.sql ----
-- pg_cqrs, portable edition: the command side. PL/pgSQL twins of what the extension edition
-- implements in Rust (extension/src/append.rs, uuid_v7.rs, command_limits.rs): the same
-- signatures, results, SQLSTATEs and messages. scripts/portable.sh assembles the edition.

create function cqrs.version(out version text, out edition text)
returns record
language sql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$ select '0.2.0'::text, 'portable'::text $$;

-- The extension edition invalidates each backend's cache of compiled schemas here; this
-- edition caches nothing across statements, so there is nothing to do.
create function cqrs._command_type_changed()
returns trigger
language plpgsql
as $$ begin return null; end $$;

-- Time-ordered UUIDs (RFC 9562 version 7): 48 bits of Unix milliseconds, 12 bits that count up
-- within a millisecond in this session (so ids made in sequence sort in sequence), then random
-- bits. The counter lives in a session setting, the only state a PL/pgSQL function can keep.
create function cqrs.uuid_v7()
returns uuid
language plpgsql volatile strict parallel safe
as $$
declare
    v_ms bigint := floor(extract(epoch from pg_catalog.clock_timestamp()) * 1000)::bigint;
    v_last text := pg_catalog.current_setting('cqrs.uuid_v7_last', true);
    v_last_ms bigint;
    v_counter integer := 0;
    v_bytes bytea := pg_catalog.uuid_send(pg_catalog.gen_random_uuid());
begin
    if v_last is not null and v_last <> '' then
        v_last_ms := pg_catalog.split_part(v_last, ':', 1)::bigint;
        if v_ms <= v_last_ms then
            v_counter := pg_catalog.split_part(v_last, ':', 2)::integer + 1;
            v_ms := v_last_ms;
            if v_counter > 4095 then
                -- 4,096 ids in one millisecond: borrow the next millisecond
                v_ms := v_ms + 1;
                v_counter := 0;
            end if;
        end if;
    end if;
    perform pg_catalog.set_config('cqrs.uuid_v7_last', v_ms::text || ':' || v_counter::text, false);
    for i in 0..5 loop
        v_bytes := pg_catalog.set_byte(v_bytes, i, ((v_ms >> (40 - 8 * i)) & 255)::integer);
    end loop;
    v_bytes := pg_catalog.set_byte(v_bytes, 6, (x'70'::integer | (v_counter >> 8)));
    v_bytes := pg_catalog.set_byte(v_bytes, 7, (v_counter & 255));
    v_bytes := pg_catalog.set_byte(v_bytes, 8, (x'80'::integer | (pg_catalog.get_byte(v_bytes, 8) & x'3f'::integer)));
    return pg_catalog.encode(v_bytes, 'hex')::uuid;
end
$$;

-- A name as Rust's {:?} prints it (the extension edition's messages quote names that way):
-- double quotes, with quotes, backslashes and control characters escaped.
create function cqrs_portable._quoted(value text)
returns text
language sql immutable strict parallel safe
set search_path = pg_catalog, pg_temp
as $$
    select '"' || pg_catalog.string_agg(
        case
            when c = '"' then '\"'
            when c = '\' then '\\'
            when c = E'\n' then '\n'
            when c = E'\r' then '\r'
            when c = E'\t' then '\t'
            when pg_catalog.ascii(c) < 32 or pg_catalog.ascii(c) = 127
                then '\u{' || pg_catalog.to_hex(pg_catalog.ascii(c)) || '}'
            else c
        end, '' order by n) || '"'
      from pg_catalog.regexp_split_to_table(value, '') with ordinality as t(c, n);
$$;

-- An integer setting of pg_cqrs (a placeholder here: only the extension edition can register
-- typed settings that applications cannot change). No `set search_path` here nor on
-- _check_limits, on purpose: see the note at the top of json_schema.sql (this one also stays
-- inlinable into its callers' queries).
create function cqrs_portable._setting(name text, fallback integer)
returns integer
language sql stable parallel safe
as $$ select coalesce(nullif(pg_catalog.current_setting(name, true), '')::integer, fallback) $$;

-- The size and nesting limits of cqrs.append (see extension/src/command_limits.rs): a document
-- larger than its setting, or with a value below level cqrs.max_json_depth (levels as jsonpath
-- counts them), is refused with 54000.
create function cqrs_portable._check_limits(what text, doc jsonb)
returns void
language plpgsql stable
as $$
declare
    v_setting text := case what when 'payload' then 'cqrs.max_payload_bytes' else 'cqrs.max_metadata_bytes' end;
    v_max_bytes integer := cqrs_portable._setting(v_setting, case what when 'payload' then 4194304 else 65536 end);
    v_max_depth integer := cqrs_portable._setting('cqrs.max_json_depth', 64);
    v_compressed boolean := pg_catalog.pg_column_compression(doc) is not null;
    -- the size of the jsonb as stored uncompressed (a compressed argument is copied to measure it)
    v_bytes integer := case when v_compressed then pg_catalog.pg_column_size(doc || '{}'::jsonb)
                            else pg_catalog.pg_column_size(doc) end;
begin
    if v_bytes > v_max_bytes then
        raise exception using errcode = '54000',
            message = format('%s is larger than %s (%s bytes)', what, v_setting, v_max_bytes),
            hint = format('Keep large documents elsewhere and put a reference in the command, or raise the limit: alter database … set %s = …; (superuser).', v_setting);
    end if;
    -- every level below the root costs at least 8 bytes of jsonb (a container header and its
    -- entry in the parent), so a smaller document cannot be too deep: skip the walk
    if (v_bytes > 8 * v_max_depth or v_compressed)
       and pg_catalog.jsonb_path_exists(doc, format('lax $.**{%s to last}', v_max_depth + 1)::jsonpath) then
        raise exception using errcode = '54000',
            message = format('%s nests deeper than cqrs.max_json_depth (%s levels)', what, v_max_depth),
            hint = 'Flatten the document; projections read at most cqrs.max_json_depth levels.';
    end if;
end
$$;

create function cqrs.append(
    command_id uuid,
    stream text,
    command_type text,
    payload jsonb,
    expected_seq bigint default null,
    metadata jsonb default '{}',
    out "position" bigint,
    out seq bigint,
    out duplicate boolean)
returns record
language plpgsql volatile called on null input
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_existing record;
    v_differs text[] := '{}'::text[];
    v_what text[] := '{}'::text[];
    v_version bigint;
    v_schema jsonb;
    v_violations text[];
begin
    if command_id is null then
        raise exception using errcode = '22004', message = 'command_id must not be null';
    end if;
    perform cqrs._check_name('stream', append.stream, 256);
    perform cqrs._check_name('command_type', append.command_type, 128);
    if payload is null then
        raise exception using errcode = '22004', message = 'payload must not be null';
    end if;
    if jsonb_typeof(payload) <> 'object' then
        raise exception using errcode = '22023', message = format('payload must be a JSON object, not %s', jsonb_typeof(payload));
    end if;
    perform cqrs_portable._check_limits('payload', payload);
    if expected_seq < 0 then
        raise exception using errcode = '22023',
            message = format('expected_seq must be null, 0 (new stream) or a positive seq, not %s', expected_seq);
    end if;
    if metadata is null then
        raise exception using errcode = '22004', message = 'metadata must not be null', hint = 'Omit metadata or pass ''{}''.';
    end if;
    if jsonb_typeof(metadata) <> 'object' then
        raise exception using errcode = '22023', message = format('metadata must be a JSON object, not %s', jsonb_typeof(metadata));
    end if;
    perform cqrs_portable._check_limits('metadata', metadata);

    -- One statement on the happy path, as in the extension: bump the stream's seq under its row
    -- lock and insert the command; no row means a new stream or a command_id that exists.
    for pass in 1..2 loop
        with bumped as (
            update cqrs.stream s set last_seq = s.last_seq + 1 where s.stream = append.stream returning s.last_seq
        )
        insert into cqrs.command_log as l (command_id, stream, seq, command_type, payload, metadata)
        select append.command_id, append.stream, b.last_seq, append.command_type, append.payload, append.metadata
          from bumped b
        on conflict on constraint command_log_command_id_key do nothing
        returning l.position, l.seq into "position", seq;
        exit when found;
        if exists (select from cqrs.command_log l where l.command_id = append.command_id) then
            -- give back the seq this call took, if it took one (see GIVE_BACK_SEQ in append.rs)
            update cqrs.stream s set last_seq = s.last_seq - 1
             where s.stream = append.stream
               and s.last_seq > (select coalesce(max(l.seq), 0) from cqrs.command_log l where l.stream = append.stream);
            select l.position, l.seq, l.stream, l.command_type, l.payload = append.payload as same_payload
              into v_existing from cqrs.command_log l where l.command_id = append.command_id;
            if v_existing.stream is distinct from append.stream then
                v_differs := v_differs || format('stream %s (was %s)', cqrs_portable._quoted(append.stream), cqrs_portable._quoted(v_existing.stream));
                v_what := v_what || 'stream'::text;
            end if;
            if v_existing.command_type is distinct from append.command_type then
                v_differs := v_differs || format('command_type %s (was %s)', cqrs_portable._quoted(append.command_type), cqrs_portable._quoted(v_existing.command_type));
                v_what := v_what || 'command_type'::text;
            end if;
            if not v_existing.same_payload then
                v_differs := v_differs || 'payload'::text;
                v_what := v_what || 'payload'::text;
            end if;
            if cardinality(v_differs) = 0 then
                "position" := v_existing.position;
                seq := v_existing.seq;
                duplicate := true;
                return;
            end if;
            raise exception using errcode = '23505',
                message = format('command_id %s was already appended with a different %s', command_id, array_to_string(v_what, ', ')),
                detail = format('Key (command_id)=(%s) already exists at position %s (stream %s, seq %s); differs in: %s.',
                                command_id, v_existing.position, cqrs_portable._quoted(v_existing.stream), v_existing.seq,
                                array_to_string(v_differs, '; ')),
                hint = 'Reuse a command_id only to retry the very same command; give a new command a new id (cqrs.uuid_v7()).';
        end if;
        if pass = 2 then
            -- only possible when our snapshot cannot see a stream row created concurrently
            raise exception using errcode = '40001',
                message = format('stream %s was created concurrently; retry the transaction', append.stream);
        end if;
        -- first command of this stream: create its row (a concurrent creator is fine) and retry
        insert into cqrs.stream (stream, last_seq) values (append.stream, 0)
        on conflict on constraint stream_pkey do nothing;
    end loop;

    -- checked after the insert on purpose, as in the extension: a replay must answer duplicate
    -- even if its expected_seq is stale now or its schema changed since
    if expected_seq is not null and expected_seq <> seq - 1 then
        raise exception using errcode = '40001',
            message = format('stream %s is at seq %s, expected %s', append.stream, seq - 1, expected_seq),
            hint = 'Reload the stream and retry, or pass expected_seq => null to append unconditionally.';
    end if;
    select t.version, t.json_schema into v_version, v_schema from cqrs.command_type t where t.command_type = append.command_type;
    if found then
        v_violations := cqrs_portable._schema_violations(v_schema, payload, 6);
        if cardinality(v_violations) > 0 then
            raise exception using errcode = '22023',
                message = format('payload of %s does not match its schema at %s', append.command_type, v_violations[1]),
                detail = format('Violations: %s%s.', array_to_string(v_violations[1:5], '; '),
                                case when cardinality(v_violations) > 5 then '; …' else '' end),
                hint = format('See the schema with: select json_schema from cqrs.command_type where command_type = ''%s'';',
                              replace(append.command_type, '''', ''''''));
        end if;
    elsif coalesce(pg_catalog.current_setting('cqrs.require_registered_types', true), '') in ('on', 'true', 'yes', '1') then
        raise exception using errcode = '42704',
            message = format('command type %s is not registered', cqrs_portable._quoted(append.command_type)),
            hint = 'Register it with cqrs.register_command_type(), or turn off cqrs.require_registered_types.';
    end if;
    duplicate := false;
end
$$;

-- ---- sql/portable/json_schema.sql ----
-- pg_cqrs, portable edition: JSON Schema validation of payloads in PL/pgSQL, for the subset of
-- draft 2020-12 that applications write (managed PostgreSQL loads no Rust validator):
--
--   type, enum, const, properties, required, additionalProperties, patternProperties,
--   items, prefixItems, minItems, maxItems, uniqueItems, minLength, maxLength, pattern,
--   minimum, maximum, exclusiveMinimum, exclusiveMaximum, multipleOf, minProperties,
--   maxProperties, allOf, anyOf, oneOf, not, $ref (local, into $defs / definitions), and
--   format date-time, date, email, uuid; annotations ($schema, $id, $comment, title,
--   description, default, examples, deprecated, readOnly, writeOnly) are accepted and ignored.
--
-- A schema with any other keyword (or format) is refused at registration with 0A000 naming it,
-- never silently accepted. Violations read as the extension edition's (the jsonschema crate's
-- messages, values masked as "value"), each with the JSON pointer of the offending field; an
-- agreement test (tests/tests/json_schema.rs) checks both editions give the same verdicts.
-- Numbers are compared exactly (numeric), where the Rust validator uses floating point for
-- multipleOf with fractions.

-- These helpers carry no `set search_path`: they run inside cqrs.append and
-- cqrs.register_command_type, SECURITY DEFINER functions whose search_path is pinned, and
-- otherwise with their caller's own rights. A SET clause costs a save and restore of the
-- settings on every call, and the validator calls them per keyword (append measured 25-35 %
-- faster without).

-- A JSON value printed compactly, as serde_json prints it (jsonb's text puts spaces after ':'
-- and ','); used in messages that quote schema values (enum, const, not).
create function cqrs_portable._compact_json(value jsonb)
returns text
language plpgsql immutable strict parallel safe
as $$
begin
    case jsonb_typeof(value)
        when 'object' then
            return '{' || coalesce((select string_agg(to_jsonb(e.key)::text || ':' || cqrs_portable._compact_json(e.value), ',')
                                      from jsonb_each(value) e), '') || '}';
        when 'array' then
            return '[' || coalesce((select string_agg(cqrs_portable._compact_json(e.v), ',' order by e.n)
                                      from jsonb_array_elements(value) with ordinality e(v, n)), '') || ']';
        else
            return value::text;
    end case;
end
$$;

-- The JSON pointer of member `key` under `pointer` ("/" is the root).
create function cqrs_portable._pointer(pointer text, key text)
returns text
language sql immutable strict parallel safe
as $$ select case when pointer = '/' then '' else pointer end || '/' || replace(replace(key, '~', '~0'), '/', '~1') $$;

create function cqrs_portable._json_type_matches(value jsonb, type_name text)
returns boolean
language sql immutable strict parallel safe
as $$
    select case type_name
        when 'integer' then jsonb_typeof(value) = 'number' and (value #>> '{}')::numeric = trunc((value #>> '{}')::numeric)
        when 'number' then jsonb_typeof(value) = 'number'
        else jsonb_typeof(value) = type_name
    end
$$;

create function cqrs_portable._format_matches(value text, format text)
returns boolean
language plpgsql immutable strict parallel safe
as $$
declare
    v_parts text[];
begin
    case format
        when 'uuid' then
            return value ~ '^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$';
        when 'email' then
            return value ~ '^[^\s@"(),:;<>\[\]\\]+@[^\s@"(),:;<>\[\]\\]+$' and value !~ '(^\.|\.\.|\.@|@\.|\.$)';
        when 'date' then
            v_parts := regexp_match(value, '^([0-9]{4})-([0-9]{2})-([0-9]{2})$');
        when 'date-time' then
            v_parts := regexp_match(value,
                '^([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]+)?([Zz]|[+-]([0-9]{2}):([0-9]{2}))$');
            if v_parts is null or v_parts[4]::integer > 23 or v_parts[5]::integer > 59 or v_parts[6]::integer > 60
               or coalesce(v_parts[9]::integer, 0) > 23 or coalesce(v_parts[10]::integer, 0) > 59 then
                return false;
            end if;
        else
            return true;
    end case;
    if v_parts is null or v_parts[2]::integer not between 1 and 12 or v_parts[3]::integer < 1 then
        return false;
    end if;
    -- the day exists in that month (leap years included)
    return v_parts[3]::integer <= extract(day from (make_date(v_parts[1]::integer, v_parts[2]::integer, 1)
                                                    + interval '1 month - 1 day'))::integer;
end
$$;

-- Every violation of `schema` by `instance` as 'pointer: message', at most `max_errors` of them.
-- `root` resolves local $refs; `depth` bounds $ref recursion.
create function cqrs_portable._schema_walk(schema jsonb, instance jsonb, pointer text, root jsonb, max_errors integer, depth integer)
returns text[]
language plpgsql immutable parallel safe
as $$
declare
    v_errors text[] := '{}'::text[];
    v_keyword text;
    v_arg jsonb;
    v_type text := jsonb_typeof(instance);
    v_number numeric;
    v_text text;
    v_length integer;
    v_valid integer;
    v_key text;
    v_value jsonb;
    v_unexpected text[];
    v_target jsonb;
    v_options text[];
    v_count integer;
begin
    if depth > 64 then
        raise exception using errcode = '54001', message = 'json_schema: $ref nests more than 64 levels deep';
    end if;
    if jsonb_typeof(schema) = 'boolean' then
        if schema = 'false'::jsonb then
            return array[format('%s: False schema does not allow value', pointer)];
        end if;
        return v_errors;
    end if;
    if v_type = 'number' then
        v_number := (instance #>> '{}')::numeric;
    elsif v_type = 'string' then
        v_text := instance #>> '{}';
        v_length := char_length(v_text);
    end if;
    for v_keyword, v_arg in select e.key, e.value from jsonb_each(schema) e loop
        exit when cardinality(v_errors) >= max_errors;
        case v_keyword
        when 'type' then
            if jsonb_typeof(v_arg) = 'string' then
                if not cqrs_portable._json_type_matches(instance, v_arg #>> '{}') then
                    v_errors := v_errors || format('%s: value is not of type %s', pointer, v_arg::text);
                end if;
            elsif not exists (select from jsonb_array_elements_text(v_arg) t where cqrs_portable._json_type_matches(instance, t)) then
                -- listed in the Rust validator's order of types, each once
                v_errors := v_errors || format('%s: value is not of types %s', pointer,
                    (select string_agg(to_jsonb(t.v)::text, ', '
                                       order by array_position(array['null', 'boolean', 'integer', 'number', 'string', 'array', 'object'], t.v))
                       from (select distinct e as v from jsonb_array_elements_text(v_arg) e) t));
            end if;
        when 'enum' then
            if not exists (select from jsonb_array_elements(v_arg) o where o = instance) then
                select array_agg(cqrs_portable._compact_json(o.v) order by o.n), count(*) into v_options, v_count
                  from jsonb_array_elements(v_arg) with ordinality o(v, n);
                v_errors := v_errors || (pointer || ': value is not one of ' ||
                    case when v_count <= 3 then
                        case when v_count = 1 then v_options[1]
                             else array_to_string(v_options[1:v_count - 1], ', ') || ' or ' || v_options[v_count] end
                    else array_to_string(v_options[1:2], ', ') || format(' or %s other candidates', v_count - 2) end);
            end if;
        when 'const' then
            if instance <> v_arg then
                v_errors := v_errors || format('%s: %s was expected', pointer, cqrs_portable._compact_json(v_arg));
            end if;
        when 'required' then
            if v_type = 'object' then
                for v_key in select r from jsonb_array_elements_text(v_arg) r loop
                    if not instance ? v_key then
                        v_errors := v_errors || format('%s: %s is a required property', pointer, to_jsonb(v_key)::text);
                    end if;
                end loop;
            end if;
        when 'properties' then
            if v_type = 'object' then
                for v_key, v_value in select e.key, e.value from jsonb_each(instance) e loop
                    if v_arg ? v_key then
                        v_errors := v_errors || cqrs_portable._schema_walk(v_arg -> v_key, v_value, cqrs_portable._pointer(pointer, v_key), root,
                                                                   max_errors - cardinality(v_errors), depth);
                    end if;
                end loop;
            end if;
        when 'patternProperties' then
            if v_type = 'object' then
                for v_key, v_value in select e.key, e.value from jsonb_each(instance) e loop
                    for v_text, v_target in select p.key, p.value from jsonb_each(v_arg) p where v_key ~ p.key loop
                        v_errors := v_errors || cqrs_portable._schema_walk(v_target, v_value, cqrs_portable._pointer(pointer, v_key), root,
                                                                   max_errors - cardinality(v_errors), depth);
                    end loop;
                end loop;
            end if;
        when 'additionalProperties' then
            if v_type = 'object' then
                v_unexpected := array(
                    select e.key from jsonb_each(instance) e
                     where not coalesce(schema -> 'properties' ? e.key, false)
                       and not exists (select from jsonb_object_keys(coalesce(schema -> 'patternProperties', '{}')) p
                                        where e.key ~ p));
                if v_arg = 'false'::jsonb then
                    if cardinality(v_unexpected) > 0 then
                        v_errors := v_errors || format('%s: Additional properties are not allowed (%s %s unexpected)', pointer,
                            (select string_agg('''' || u || '''', ', ' order by n) from unnest(v_unexpected) with ordinality x(u, n)),
                            case when cardinality(v_unexpected) = 1 then 'was' else 'were' end);
                    end if;
                else
                    foreach v_key in array v_unexpected loop
                        v_errors := v_errors || cqrs_portable._schema_walk(v_arg, instance -> v_key, cqrs_portable._pointer(pointer, v_key), root,
                                                                   max_errors - cardinality(v_errors), depth);
                    end loop;
                end if;
            end if;
        when 'prefixItems' then
            if v_type = 'array' then
                for v_i in 0 .. least(jsonb_array_length(instance), jsonb_array_length(v_arg)) - 1 loop
                    v_errors := v_errors || cqrs_portable._schema_walk(v_arg -> v_i, instance -> v_i, cqrs_portable._pointer(pointer, v_i::text), root,
                                                               max_errors - cardinality(v_errors), depth);
                end loop;
            end if;
        when 'items' then
            if v_type = 'array' then
                for v_i in coalesce(jsonb_array_length(schema -> 'prefixItems'), 0) .. jsonb_array_length(instance) - 1 loop
                    v_errors := v_errors || cqrs_portable._schema_walk(v_arg, instance -> v_i, cqrs_portable._pointer(pointer, v_i::text), root,
                                                               max_errors - cardinality(v_errors), depth);
                end loop;
            end if;
        when 'minItems' then
            if v_type = 'array' and jsonb_array_length(instance) < (v_arg #>> '{}')::numeric then
                v_errors := v_errors || format('%s: value has less than %s item%s', pointer, v_arg::text,
                                               case when (v_arg #>> '{}')::numeric = 1 then '' else 's' end);
            end if;
        when 'maxItems' then
            if v_type = 'array' and jsonb_array_length(instance) > (v_arg #>> '{}')::numeric then
                v_errors := v_errors || format('%s: value has more than %s item%s', pointer, v_arg::text,
                                               case when (v_arg #>> '{}')::numeric = 1 then '' else 's' end);
            end if;
        when 'uniqueItems' then
            if v_type = 'array' and v_arg = 'true'::jsonb
               and (select count(*) <> count(distinct e) from jsonb_array_elements(instance) e) then
                v_errors := v_errors || format('%s: value has non-unique elements', pointer);
            end if;
        when 'minLength' then
            if v_type = 'string' and v_length < (v_arg #>> '{}')::numeric then
                v_errors := v_errors || format('%s: value is shorter than %s character%s', pointer, v_arg::text,
                                               case when (v_arg #>> '{}')::numeric = 1 then '' else 's' end);
            end if;
        when 'maxLength' then
            if v_type = 'string' and v_length > (v_arg #>> '{}')::numeric then
                v_errors := v_errors || format('%s: value is longer than %s character%s', pointer, v_arg::text,
                                               case when (v_arg #>> '{}')::numeric = 1 then '' else 's' end);
            end if;
        when 'pattern' then
            if v_type = 'string' and v_text !~ (v_arg #>> '{}') then
                v_errors := v_errors || format('%s: value does not match "%s"', pointer, v_arg #>> '{}');
            end if;
        when 'format' then
            if v_type = 'string' and not cqrs_portable._format_matches(v_text, v_arg #>> '{}') then
                v_errors := v_errors || format('%s: value is not a "%s"', pointer, v_arg #>> '{}');
            end if;
        when 'minimum' then
            if v_type = 'number' and v_number < (v_arg #>> '{}')::numeric then
                v_errors := v_errors || format('%s: value is less than the minimum of %s', pointer, v_arg::text);
            end if;
        when 'maximum' then
            if v_type = 'number' and v_number > (v_arg #>> '{}')::numeric then
                v_errors := v_errors || format('%s: value is greater than the maximum of %s', pointer, v_arg::text);
            end if;
        when 'exclusiveMinimum' then
            if v_type = 'number' and v_number <= (v_arg #>> '{}')::numeric then
                v_errors := v_errors || format('%s: value is less than or equal to the minimum of %s', pointer, v_arg::text);
            end if;
        when 'exclusiveMaximum' then
            if v_type = 'number' and v_number >= (v_arg #>> '{}')::numeric then
                v_errors := v_errors || format('%s: value is greater than or equal to the maximum of %s', pointer, v_arg::text);
            end if;
        when 'multipleOf' then
            if v_type = 'number' and mod(v_number, (v_arg #>> '{}')::numeric) <> 0 then
                v_errors := v_errors || format('%s: value is not a multiple of %s', pointer, v_arg::text);
            end if;
        when 'minProperties' then
            if v_type = 'object' and (select count(*) from jsonb_object_keys(instance)) < (v_arg #>> '{}')::numeric then
                v_errors := v_errors || format('%s: value has less than %s propert%s', pointer, v_arg::text,
                                               case when (v_arg #>> '{}')::numeric = 1 then 'y' else 'ies' end);
            end if;
        when 'maxProperties' then
            if v_type = 'object' and (select count(*) from jsonb_object_keys(instance)) > (v_arg #>> '{}')::numeric then
                v_errors := v_errors || format('%s: value has more than %s propert%s', pointer, v_arg::text,
                                               case when (v_arg #>> '{}')::numeric = 1 then 'y' else 'ies' end);
            end if;
        when 'allOf' then
            for v_target in select s from jsonb_array_elements(v_arg) s loop
                v_errors := v_errors || cqrs_portable._schema_walk(v_target, instance, pointer, root, max_errors - cardinality(v_errors), depth);
            end loop;
        when 'anyOf' then
            if not exists (select from jsonb_array_elements(v_arg) s
                            where cardinality(cqrs_portable._schema_walk(s, instance, pointer, root, 1, depth)) = 0) then
                v_errors := v_errors || format('%s: value is not valid under any of the schemas listed in the ''anyOf'' keyword', pointer);
            end if;
        when 'oneOf' then
            select count(*) into v_valid from jsonb_array_elements(v_arg) s
             where cardinality(cqrs_portable._schema_walk(s, instance, pointer, root, 1, depth)) = 0;
            if v_valid = 0 then
                v_errors := v_errors || format('%s: value is not valid under any of the schemas listed in the ''oneOf'' keyword', pointer);
            elsif v_valid > 1 then
                v_errors := v_errors || format('%s: value is valid under more than one of the schemas listed in the ''oneOf'' keyword', pointer);
            end if;
        when 'not' then
            if cardinality(cqrs_portable._schema_walk(v_arg, instance, pointer, root, 1, depth)) = 0 then
                v_errors := v_errors || format('%s: %s is not allowed for value', pointer, cqrs_portable._compact_json(v_arg));
            end if;
        when '$ref' then
            v_target := cqrs_portable._schema_ref(root, v_arg #>> '{}');
            v_errors := v_errors || cqrs_portable._schema_walk(v_target, instance, pointer, root, max_errors - cardinality(v_errors), depth + 1);
        else
            -- annotations and $defs / definitions (checked at registration)
            null;
        end case;
    end loop;
    return v_errors[1:max_errors];
end
$$;

-- The schema a local $ref points at ("#", "#/$defs/x", "#/definitions/x", any JSON pointer).
create function cqrs_portable._schema_ref(root jsonb, ref text)
returns jsonb
language plpgsql immutable strict parallel safe
as $$
declare
    v_path text[];
    v_target jsonb;
begin
    if ref !~ '^#(/.*)?$' then
        raise exception using errcode = '0A000',
            message = format('json_schema uses keyword $ref with %s, which the portable edition does not support (only local references: #/$defs/…)', ref);
    end if;
    v_path := array(select replace(replace(p, '~1', '/'), '~0', '~') from unnest(string_to_array(substr(ref, 3), '/')) p);
    v_target := case when ref = '#' then root else root #> v_path end;
    if v_target is null then
        raise exception using errcode = '22023', message = format('json_schema is not a valid JSON Schema: Pointer ''%s'' does not exist', substr(ref, 2));
    end if;
    return v_target;
end
$$;

-- The violations of a payload, up to `max_errors`, as 'pointer: message'.
create function cqrs_portable._schema_violations(schema jsonb, instance jsonb, max_errors integer)
returns text[]
language sql immutable parallel safe
as $$ select cqrs_portable._schema_walk(schema, instance, '/', schema, max_errors, 0) $$;

-- Refuses what the portable validator cannot check: a keyword (or format, or draft) outside the
-- subset is 0A000 naming it; a malformed one is 22023.
create function cqrs_portable._check_schema_node(schema jsonb, at text)
returns void
language plpgsql immutable parallel safe
as $$
declare
    v_keyword text;
    v_arg jsonb;
    v_item jsonb;
    v_kind text;
begin
    v_kind := jsonb_typeof(schema);
    if v_kind = 'boolean' then
        return;
    end if;
    if v_kind <> 'object' then
        raise exception using errcode = '22023',
            message = format('json_schema is not a valid JSON Schema: %s is not of types "boolean", "object" (at %s)', cqrs_portable._compact_json(schema), at);
    end if;
    for v_keyword, v_arg in select e.key, e.value from jsonb_each(schema) e loop
        case v_keyword
        when '$schema' then
            if v_arg #>> '{}' not in ('https://json-schema.org/draft/2020-12/schema', 'https://json-schema.org/draft/2020-12/schema#') then
                raise exception using errcode = '0A000',
                    message = format('json_schema uses $schema %s; the portable edition validates draft 2020-12 only', v_arg::text);
            end if;
        when '$id', '$comment', 'title', 'description', 'default', 'examples', 'deprecated', 'readOnly', 'writeOnly' then
            null;
        when 'type' then
            for v_item in select t from jsonb_array_elements(case when jsonb_typeof(v_arg) = 'array' then v_arg
                                                                  else jsonb_build_array(v_arg) end) t loop
                if v_item #>> '{}' is null or v_item #>> '{}' not in ('null', 'boolean', 'object', 'array', 'number', 'integer', 'string') then
                    raise exception using errcode = '22023',
                        message = format('json_schema is not a valid JSON Schema: %s is not a type (at %s)', cqrs_portable._compact_json(v_item), cqrs_portable._pointer(at, 'type'));
                end if;
            end loop;
        when 'enum', 'required', 'prefixItems', 'allOf', 'anyOf', 'oneOf' then
            if jsonb_typeof(v_arg) <> 'array' then
                raise exception using errcode = '22023',
                    message = format('json_schema is not a valid JSON Schema: %s must be an array (at %s)', v_keyword, cqrs_portable._pointer(at, v_keyword));
            end if;
            if v_keyword in ('prefixItems', 'allOf', 'anyOf', 'oneOf') then
                for v_item in select s from jsonb_array_elements(v_arg) s loop
                    perform cqrs_portable._check_schema_node(v_item, cqrs_portable._pointer(at, v_keyword));
                end loop;
            end if;
        when 'const' then
            null;
        when 'properties', 'patternProperties', '$defs', 'definitions' then
            if jsonb_typeof(v_arg) <> 'object' then
                raise exception using errcode = '22023',
                    message = format('json_schema is not a valid JSON Schema: %s must be an object (at %s)', v_keyword, cqrs_portable._pointer(at, v_keyword));
            end if;
            for v_item in select e.value from jsonb_each(v_arg) e loop
                perform cqrs_portable._check_schema_node(v_item, cqrs_portable._pointer(at, v_keyword));
            end loop;
            if v_keyword = 'patternProperties' then
                perform '' ~ p from jsonb_object_keys(v_arg) p;
            end if;
        when 'additionalProperties', 'items', 'not' then
            perform cqrs_portable._check_schema_node(v_arg, cqrs_portable._pointer(at, v_keyword));
        when 'minItems', 'maxItems', 'minLength', 'maxLength', 'minProperties', 'maxProperties' then
            if jsonb_typeof(v_arg) <> 'number' or (v_arg #>> '{}')::numeric < 0
               or (v_arg #>> '{}')::numeric <> trunc((v_arg #>> '{}')::numeric) then
                raise exception using errcode = '22023',
                    message = format('json_schema is not a valid JSON Schema: %s must be a non-negative integer (at %s)', v_keyword, cqrs_portable._pointer(at, v_keyword));
            end if;
        when 'minimum', 'maximum', 'exclusiveMinimum', 'exclusiveMaximum', 'multipleOf' then
            if jsonb_typeof(v_arg) <> 'number' or (v_keyword = 'multipleOf' and (v_arg #>> '{}')::numeric <= 0) then
                raise exception using errcode = '22023',
                    message = format('json_schema is not a valid JSON Schema: %s must be a number%s (at %s)', v_keyword,
                                     case when v_keyword = 'multipleOf' then ' above 0' else '' end, cqrs_portable._pointer(at, v_keyword));
            end if;
        when 'uniqueItems' then
            if jsonb_typeof(v_arg) <> 'boolean' then
                raise exception using errcode = '22023',
                    message = format('json_schema is not a valid JSON Schema: uniqueItems must be a boolean (at %s)', cqrs_portable._pointer(at, v_keyword));
            end if;
        when 'pattern' then
            -- compiles the pattern (an invalid one raises 2201B)
            perform '' ~ (v_arg #>> '{}');
        when 'format' then
            if v_arg #>> '{}' not in ('date-time', 'date', 'email', 'uuid') then
                raise exception using errcode = '0A000',
                    message = format('json_schema uses format %s, which the portable edition does not check (date-time, date, email and uuid only)', v_arg::text);
            end if;
        when '$ref' then
            if v_arg #>> '{}' !~ '^#(/.*)?$' then
                raise exception using errcode = '0A000',
                    message = format('json_schema uses keyword $ref with %s, which the portable edition does not support (only local references: #/$defs/…)', v_arg::text);
            end if;
        else
            raise exception using errcode = '0A000',
                message = format('json_schema uses keyword %s, which the portable edition does not support', cqrs_portable._quoted(v_keyword)),
                hint = 'The portable edition validates a subset of JSON Schema 2020-12 (see the README); the extension edition validates all of it.';
        end case;
    end loop;
end
$$;

create function cqrs._check_json_schema(json_schema jsonb)
returns void
language plpgsql immutable strict parallel safe
as $$
declare
    v_ref text;
begin
    perform cqrs_portable._check_schema_node(json_schema, '/');
    -- every local $ref resolves
    for v_ref in select r #>> '{}' from pg_catalog.jsonb_path_query(json_schema, 'lax $.**."$ref"') r loop
        perform cqrs_portable._schema_ref(json_schema, v_ref);
    end loop;
end
$$;

-- ---- sql/portable/projection_catalog.sql ----
-- pg_cqrs, portable edition: projection definitions — the handler language parsed and checked as
-- the extension edition does (projection/src/spec.rs, path.rs; extension/src/projection_catalog.rs),
-- with the same messages, SQLSTATEs and the same normalised form stored in cqrs.projection.

-- A handler error: 22023 with where in the document it is.
create function cqrs_portable._spec_error(at text, reason text)
returns void
language plpgsql volatile
as $$ begin raise exception using errcode = '22023', message = at || ': ' || reason; end $$;

-- A JSON path of the handler language ($, $.a.b, $.items[0], $["odd key"]) as a strict SQL/JSON
-- path (a step that does not fit the value yields nothing, as in the extension), or 22023.
create function cqrs_portable._json_path(at text, path text)
returns text
language plpgsql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$
declare
    v_out text := 'strict $';
    v_rest text;
    v_end integer;
    v_key text;
    v_i integer;
    v_c text;
    v_closed boolean;
    v_index text;
    v_fail text;
begin
    if left(path, 1) <> '$' then
        v_fail := 'must start with $';
    else
        v_rest := substr(path, 2);
        while v_fail is null and v_rest <> '' loop
            if left(v_rest, 1) = '.' then
                v_end := coalesce(nullif(least(nullif(strpos(substr(v_rest, 2), '.'), 0), nullif(strpos(substr(v_rest, 2), '['), 0)), 0),
                                  length(v_rest));
                v_key := substr(v_rest, 2, case when v_end = length(v_rest) and strpos(substr(v_rest, 2), '.') = 0
                                                     and strpos(substr(v_rest, 2), '[') = 0 then length(v_rest) - 1 else v_end - 1 end);
                if v_key = '' then
                    v_fail := 'empty key after ''.''';
                else
                    v_out := v_out || '.' || to_jsonb(v_key)::text;
                    v_rest := substr(v_rest, 2 + length(v_key));
                end if;
            elsif left(v_rest, 2) = '["' then
                -- a quoted key; \" and \\ are the only escapes
                v_key := '';
                v_closed := false;
                v_i := 3;
                while v_i <= length(v_rest) loop
                    v_c := substr(v_rest, v_i, 1);
                    if v_c = '\' then
                        if substr(v_rest, v_i + 1, 1) in ('"', '\') then
                            v_key := v_key || substr(v_rest, v_i + 1, 1);
                            v_i := v_i + 2;
                            continue;
                        end if;
                        v_fail := 'only \" and \\ may be escaped in a quoted key';
                        exit;
                    elsif v_c = '"' then
                        v_closed := true;
                        exit;
                    end if;
                    v_key := v_key || v_c;
                    v_i := v_i + 1;
                end loop;
                if v_fail is null and not v_closed then
                    v_fail := 'unterminated quoted key';
                elsif v_fail is null and substr(v_rest, v_i + 1, 1) <> ']' then
                    v_fail := 'expected ] after a quoted key';
                elsif v_fail is null then
                    v_out := v_out || '.' || to_jsonb(v_key)::text;
                    v_rest := substr(v_rest, v_i + 2);
                end if;
            elsif left(v_rest, 1) = '[' then
                v_end := strpos(v_rest, ']');
                if v_end = 0 then
                    v_fail := 'unterminated [';
                else
                    v_index := substr(v_rest, 2, v_end - 2);
                    if v_index !~ '^[0-9]+$' or length(ltrim(v_index, '0')) > 19 then
                        v_fail := 'an array index must be a non-negative integer';
                    else
                        v_out := v_out || '[' || v_index::numeric::text || ']';
                        v_rest := substr(v_rest, v_end + 1);
                    end if;
                end if;
            else
                v_fail := 'expected ''.'', ''['' or the end after a segment';
            end if;
        end loop;
    end if;
    if v_fail is not null then
        perform cqrs_portable._spec_error(at, format('invalid JSON path %s: %s', cqrs_portable._quoted(path), v_fail));
    end if;
    return v_out;
end
$$;

-- A value source, normalised: {"path": …}, {"meta": …}, {"field": …} or {"const": …}.
create function cqrs_portable._spec_source(at text, value jsonb)
returns jsonb
language plpgsql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$
declare
    v_kind text;
    v_inner jsonb;
begin
    if jsonb_typeof(value) = 'string' then
        if left(value #>> '{}', 1) = '$' then
            perform cqrs_portable._json_path(at, value #>> '{}');
            return jsonb_build_object('path', value);
        end if;
        perform cqrs_portable._spec_error(at, format('%s is not a value source; use "$.path", {"const": …}, {"field": …} or {"meta": …}',
                                            cqrs_portable._quoted(value #>> '{}')));
    end if;
    if jsonb_typeof(value) = 'object' and (select count(*) from jsonb_object_keys(value)) = 1 then
        select e.key, e.value into v_kind, v_inner from jsonb_each(value) e;
        case v_kind
            when 'path', 'meta' then
                if jsonb_typeof(v_inner) <> 'string' then
                    perform cqrs_portable._spec_error(at, format('"%s" takes a string', v_kind));
                end if;
                perform cqrs_portable._json_path(at, v_inner #>> '{}');
                return value;
            when 'field' then
                if jsonb_typeof(v_inner) <> 'string' then
                    perform cqrs_portable._spec_error(at, '"field" takes a string');
                end if;
                if v_inner #>> '{}' not in ('stream', 'seq', 'position', 'created_at', 'command_id', 'command_type') then
                    perform cqrs_portable._spec_error(at, '"field" must be one of stream, seq, position, created_at, command_id, command_type');
                end if;
                return value;
            when 'const' then
                return value;
            else
                perform cqrs_portable._spec_error(at, format('unknown source %s (path, meta, field or const)', cqrs_portable._quoted(v_kind)));
        end case;
    end if;
    perform cqrs_portable._spec_error(at, format('a value source is "$.path" or an object with one of path, meta, field, const; not %s',
                                        jsonb_typeof(value)));
    return null;
end
$$;

create function cqrs_portable._spec_columns(at text, value jsonb)
returns jsonb
language plpgsql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$
declare
    v_out jsonb := '{}'::jsonb;
    v_column text;
    v_source jsonb;
begin
    if value is null then
        return v_out;
    end if;
    if jsonb_typeof(value) <> 'object' then
        perform cqrs_portable._spec_error(at, format('must be an object of column → value source, not %s', jsonb_typeof(value)));
    end if;
    for v_column, v_source in select e.key, e.value from jsonb_each(value) e loop
        if v_column = '' then
            perform cqrs_portable._spec_error(at || '.' || v_column, 'column names must not be empty');
        end if;
        v_out := v_out || jsonb_build_object(v_column, cqrs_portable._spec_source(at || '.' || v_column, v_source));
    end loop;
    return v_out;
end
$$;

create function cqrs_portable._spec_handler(at text, value jsonb)
returns jsonb
language plpgsql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$
declare
    v_key text;
    v_action jsonb;
    v_set jsonb;
    v_add jsonb;
    v_out jsonb;
    v_column text;
begin
    if jsonb_typeof(value) <> 'object' then
        perform cqrs_portable._spec_error(at, format('a handler is an object, not %s', jsonb_typeof(value)));
    end if;
    if value ? 'function' then
        if (select count(*) from jsonb_object_keys(value)) <> 1 then
            perform cqrs_portable._spec_error(at, 'a function handler has only the key "function"');
        end if;
        if jsonb_typeof(value -> 'function') <> 'string' or value ->> 'function' = '' then
            perform cqrs_portable._spec_error(at || '.function', 'must be a function name such as "app.apply_note"');
        end if;
        return value;
    end if;
    for v_key in select k from jsonb_object_keys(value) k loop
        if v_key not in ('action', 'key', 'set', 'add') then
            perform cqrs_portable._spec_error(at, format('unknown key %s (action, key, set, add; or function)', cqrs_portable._quoted(v_key)));
        end if;
    end loop;
    v_action := value -> 'action';
    if v_action is null or jsonb_typeof(v_action) <> 'string' or v_action #>> '{}' not in ('upsert', 'update', 'delete') then
        perform cqrs_portable._spec_error(at || '.action', 'must be "upsert", "update" or "delete"');
    end if;
    v_out := jsonb_build_object('action', v_action,
                                'key', case when value ? 'key' then cqrs_portable._spec_source(at || '.key', value -> 'key')
                                            else '{"field": "stream"}'::jsonb end);
    v_set := cqrs_portable._spec_columns(at || '.set', value -> 'set');
    v_add := cqrs_portable._spec_columns(at || '.add', value -> 'add');
    if v_action #>> '{}' = 'delete' and (v_set <> '{}' or v_add <> '{}') then
        perform cqrs_portable._spec_error(at, 'a delete takes no set or add');
    end if;
    select c into v_column from jsonb_object_keys(v_set) c where v_add ? c limit 1;
    if v_column is not null then
        perform cqrs_portable._spec_error(at, format('column %s is both in set and in add', cqrs_portable._quoted(v_column)));
    end if;
    if v_set <> '{}' then
        v_out := v_out || jsonb_build_object('set', v_set);
    end if;
    if v_add <> '{}' then
        v_out := v_out || jsonb_build_object('add', v_add);
    end if;
    return v_out;
end
$$;

-- The handlers document parsed and normalised (every handler a list, defaults explicit), or 22023
-- naming where it is wrong.
create function cqrs_portable._spec(handlers jsonb)
returns jsonb
language plpgsql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$
declare
    v_out jsonb := '{}'::jsonb;
    v_type text;
    v_value jsonb;
    v_at text;
    v_list jsonb;
begin
    if jsonb_typeof(handlers) <> 'object' then
        perform cqrs_portable._spec_error('handlers', format('must be an object mapping command types to handlers, not %s', jsonb_typeof(handlers)));
    end if;
    if handlers = '{}' then
        perform cqrs_portable._spec_error('handlers', 'must map at least one command type');
    end if;
    for v_type, v_value in select e.key, e.value from jsonb_each(handlers) e loop
        v_at := 'handlers.' || v_type;
        if v_type = '' or octet_length(v_type) > 128 then
            perform cqrs_portable._spec_error(v_at, 'command types are 1 to 128 bytes');
        end if;
        if jsonb_typeof(v_value) = 'array' then
            if jsonb_array_length(v_value) = 0 then
                perform cqrs_portable._spec_error(v_at, 'an empty list of handlers');
            end if;
            select jsonb_agg(cqrs_portable._spec_handler(format('%s[%s]', v_at, h.n - 1), h.v) order by h.n) into v_list
              from jsonb_array_elements(v_value) with ordinality h(v, n);
        else
            v_list := jsonb_build_array(cqrs_portable._spec_handler(v_at, v_value));
        end if;
        v_out := v_out || jsonb_build_object(v_type, v_list);
    end loop;
    return v_out;
end
$$;

-- The catalog facts of a projection the engine needs, from its registration.
create function cqrs_portable._target(name text,
    out target text, out key_column text, out key_type text, out rev_column text, out owner oid,
    out handlers jsonb, out on_error text, out definition_version bigint, out relation_version text, out relid oid)
returns record
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
begin
    select '"' || replace(n.nspname, '"', '""') || '"."' || replace(c.relname, '"', '""') || '"', p.key_column::text,
           (select pg_catalog.format_type(a.atttypid, a.atttypmod) from pg_catalog.pg_attribute a
             where a.attrelid = c.oid and a.attname = p.key_column and not a.attisdropped),
           p.rev_column::text, c.relowner, p.handlers, p.on_error, p.definition_version, c.xmin::text, c.oid
      into target, key_column, key_type, rev_column, owner, handlers, on_error, definition_version, relation_version, relid
      from cqrs.projection p join pg_catalog.pg_class c on c.oid = p.target
      join pg_catalog.pg_namespace n on n.oid = c.relnamespace
     where p.name = _target.name;
    if not found then
        raise exception using errcode = '42704',
            message = format('projection %s does not exist, or its read-model table was dropped', cqrs_portable._quoted(name));
    end if;
end
$$;

-- The checks cqrs.create_projection makes against the catalog, in the extension's order and
-- with its messages; returns the handlers with function names resolved. `functions` maps each
-- handler function's name to its oid, resolved by the caller with its own search_path.
create function cqrs_portable._check_definition(name text, target regclass, key_column text, rev_column text, spec jsonb,
                                                functions jsonb)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    v_schema text;
    v_table text;
    v_kind text;
    v_owner oid;
    v_qualified text;
    v_key record;
    v_rev record;
    v_col record;
    v_type text;
    v_handler jsonb;
    v_n integer;
    v_at text;
    v_at2 text;
    v_column text;
    v_source jsonb;
    v_part text;
    v_function text;
    v_resolved jsonb := '{}'::jsonb;
    v_proc record;
    v_out jsonb := '{}'::jsonb;
    v_list jsonb;
begin
    -- function handlers exist and take (jsonb) returning setof text
    for v_function in select distinct h ->> 'function' collate "C" from jsonb_each(spec) e, jsonb_array_elements(e.value) h
                       where h ? 'function' order by 1 loop
        select n.nspname::text as nspname, p.proname::text as proname, p.proretset, p.prorettype = 'pg_catalog.text'::regtype as text_result, p.proowner
          into v_proc
          from pg_catalog.pg_proc p join pg_catalog.pg_namespace n on n.oid = p.pronamespace
         where p.oid = (functions ->> v_function)::oid;
        if not found then
            raise exception using errcode = '42883', message = format('handler function %s(jsonb) does not exist', v_function),
                hint = 'A handler function takes the event as jsonb and returns setof text: the keys of the rows it changed.';
        end if;
        if not (v_proc.proretset and v_proc.text_result) then
            raise exception using errcode = '42P13',
                message = format('handler function %s.%s(jsonb) must return setof text (the keys of the rows it changed)', v_proc.nspname, v_proc.proname);
        end if;
        v_resolved := v_resolved || jsonb_build_object(v_function,
            '"' || replace(v_proc.nspname, '"', '""') || '"."' || replace(v_proc.proname, '"', '""') || '"');
    end loop;

    select n.nspname, c.relname, c.relkind::text, c.relowner into v_schema, v_table, v_kind, v_owner
      from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace where c.oid = target;
    if not found then
        raise exception using errcode = '42P01', message = format('the target table (oid %s) does not exist', target::oid);
    end if;
    if v_kind not in ('r', 'p') then
        raise exception using errcode = '42809', message = format('%s.%s is not a table; a read model must be a table', v_schema, v_table);
    end if;
    if v_schema = 'cqrs' then
        raise exception using errcode = '42809', message = format('%s.%s is part of pg_cqrs; a read model is a table of your own', v_schema, v_table);
    end if;
    v_qualified := '"' || replace(v_schema, '"', '""') || '"."' || replace(v_table, '"', '""') || '"';
    -- (type names come out as statements running with search_path = pg_catalog, pg_temp need
    -- them: this function runs with that search_path)
    select a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod) as sql_type, a.atttypid,
           a.attgenerated <> '' or a.attidentity = 'a' as generated
      into v_key from pg_catalog.pg_attribute a
     where a.attrelid = target and a.attname = key_column and a.attnum > 0 and not a.attisdropped;
    if not found then
        raise exception using errcode = '42703', message = format('table %s has no column %s (the key column)', v_qualified, cqrs_portable._quoted(key_column));
    end if;
    select a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod) as sql_type, a.atttypid into v_rev
      from pg_catalog.pg_attribute a where a.attrelid = target and a.attname = rev_column and a.attnum > 0 and not a.attisdropped;
    if not found then
        raise exception using errcode = '42703', message = format('table %s has no revision column %s', v_qualified, cqrs_portable._quoted(rev_column)),
            hint = format('Every read-model row carries a revision that only grows: alter table %s add column %s bigint not null default 0;',
                          v_qualified, '"' || replace(rev_column, '"', '""') || '"');
    end if;
    if v_rev.atttypid <> 'pg_catalog.int8'::regtype then
        raise exception using errcode = '42804', message = format('the revision column %s is %s, it must be bigint', cqrs_portable._quoted(rev_column), v_rev.sql_type);
    end if;
    for v_column in select distinct c collate "C" from jsonb_each(spec) e, jsonb_array_elements(e.value) h,
                           jsonb_object_keys(coalesce(h -> 'set', '{}') || coalesce(h -> 'add', '{}')) c order by 1 loop
        if not exists (select from pg_catalog.pg_attribute a where a.attrelid = target and a.attname = v_column
                                                                and a.attnum > 0 and not a.attisdropped) then
            raise exception using errcode = '42703',
                message = format('table %s has no column %s, which the handlers write', v_qualified, cqrs_portable._quoted(v_column));
        end if;
    end loop;
    -- function handlers run with the table owner's code: they must belong to that owner
    for v_function, v_source in select e.key, e.value from jsonb_each(v_resolved) e loop
        if not pg_catalog.pg_has_role(v_owner, (select p.proowner from pg_catalog.pg_proc p
                                                 where p.oid = pg_catalog.to_regprocedure(v_source #>> '{}' || '(jsonb)')), 'MEMBER') then
            raise exception using errcode = '42501',
                message = format('handler function %s(jsonb) is owned by role %s, not by the read model''s owner %s or a role it is a member of',
                                 v_source #>> '{}',
                                 (select p.proowner::regrole::text from pg_catalog.pg_proc p where p.oid = pg_catalog.to_regprocedure(v_source #>> '{}' || '(jsonb)')),
                                 v_owner::regrole::text),
                hint = format('Function handlers must belong to the read model''s owner: alter function %s(jsonb) owner to %s;', v_source #>> '{}', v_owner::regrole::text);
        end if;
    end loop;
    if not exists (select from pg_catalog.pg_index i
                    where i.indrelid = target and i.indisunique and i.indisvalid and i.indnkeyatts = 1
                      and i.indpred is null and i.indexprs is null
                      and i.indkey[0] = (select a.attnum from pg_catalog.pg_attribute a
                                          where a.attrelid = target and a.attname = key_column and not a.attisdropped)) then
        raise exception using errcode = '42P10',
            message = format('table %s has no unique index on (%s) alone', v_qualified, '"' || replace(key_column, '"', '""') || '"'),
            hint = format('Make the key column the primary key, or: create unique index on %s (%s);', v_qualified, '"' || replace(key_column, '"', '""') || '"');
    end if;
    if v_key.generated then
        raise exception using errcode = '428C9',
            message = format('the key column %s is generated; pg_cqrs must be able to write it', cqrs_portable._quoted(key_column));
    end if;
    -- every declarative action against the table, in command-type order
    for v_type, v_list in select e.key, e.value from jsonb_each(spec) e order by e.key collate "C" loop
        v_n := jsonb_array_length(v_list);
        for v_i in 0 .. v_n - 1 loop
            v_handler := v_list -> v_i;
            continue when v_handler ? 'function';
            v_at := case when v_n = 1 then 'handlers.' || v_type else format('handlers.%s[%s]', v_type, v_i) end;
            perform cqrs_portable._check_source(v_at || '.key', v_handler -> 'key', target, key_column);
            for v_column, v_source, v_part in
                select s.key, s.value, 'set' from jsonb_each(coalesce(v_handler -> 'set', '{}')) s
                union all
                select a.key, a.value, 'add' from jsonb_each(coalesce(v_handler -> 'add', '{}')) a loop
                v_at2 := format('%s.%s.%s', v_at, v_part, v_column);
                if v_column = key_column then
                    raise exception using errcode = '42P10', message = v_at2 || ': the key column is written from "key", not from set/add';
                end if;
                if v_column = rev_column then
                    raise exception using errcode = '42P10', message = v_at2 || ': the revision column is maintained by pg_cqrs';
                end if;
                select a.attgenerated <> '' or a.attidentity = 'a' as generated, pg_catalog.format_type(a.atttypid, a.atttypmod) as sql_type,
                       a.atttypid in ('pg_catalog.int2'::regtype, 'pg_catalog.int4'::regtype, 'pg_catalog.int8'::regtype,
                                      'pg_catalog.float4'::regtype, 'pg_catalog.float8'::regtype, 'pg_catalog.numeric'::regtype) as numeric
                  into v_col from pg_catalog.pg_attribute a
                 where a.attrelid = target and a.attname = v_column and a.attnum > 0 and not a.attisdropped;
                if v_col.generated then
                    raise exception using errcode = '428C9', message = format('%s: column %s is generated and cannot be written', v_at2, cqrs_portable._quoted(v_column));
                end if;
                if v_part = 'add' and not v_col.numeric then
                    raise exception using errcode = '42804',
                        message = format('%s: "add" needs a numeric column; %s is %s', v_at2, cqrs_portable._quoted(v_column), v_col.sql_type);
                end if;
                perform cqrs_portable._check_source(v_at2, v_source, target, v_column);
            end loop;
        end loop;
    end loop;
    -- the handlers with function names resolved (schema-qualified, quoted)
    for v_type, v_list in select e.key, e.value from jsonb_each(spec) e loop
        v_out := v_out || jsonb_build_object(v_type, (
            select jsonb_agg(case when h ? 'function' then jsonb_build_object('function', v_resolved -> (h ->> 'function')) else h end order by n)
              from jsonb_array_elements(v_list) with ordinality x(h, n)));
    end loop;
    return v_out;
end
$$;

-- A constant or command-log field can be stored in `column` (a path's value can only be checked
-- when an event arrives).
create function cqrs_portable._check_source(at text, source jsonb, target regclass, column_name text)
returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    v_type text;
    v_oid oid;
    v_field_type text;
    v_message text;
begin
    select pg_catalog.format_type(a.atttypid, a.atttypmod), a.atttypid into v_type, v_oid
      from pg_catalog.pg_attribute a where a.attrelid = target and a.attname = column_name and a.attnum > 0 and not a.attisdropped;
    if not found or v_oid in ('pg_catalog.json'::regtype, 'pg_catalog.jsonb'::regtype) then
        return;
    end if;
    if source ? 'const' and jsonb_typeof(source -> 'const') <> 'null' then
        if jsonb_typeof(source -> 'const') in ('array', 'object') then
            raise exception using errcode = '42804',
                message = format('%s: a JSON %s constant cannot be stored in column %s of type %s', at, jsonb_typeof(source -> 'const'),
                                 cqrs_portable._quoted(column_name), v_type);
        end if;
        begin
            execute format('select (pg_catalog.jsonb_build_array($1::jsonb) ->> 0)::%s', v_type) using source -> 'const';
        exception when others then
            get stacked diagnostics v_message = message_text;
            raise exception using errcode = '42804',
                message = format('%s: the constant %s cannot be stored in column %s of type %s: %s', at, cqrs_portable._compact_json(source -> 'const'),
                                 cqrs_portable._quoted(column_name), v_type, v_message);
        end;
    elsif source ? 'field' then
        v_field_type := case source ->> 'field' when 'seq' then 'bigint' when 'position' then 'bigint'
                            when 'created_at' then 'timestamptz' when 'command_id' then 'uuid' else 'text' end;
        begin
            execute format('select null::%s::%s', v_field_type, v_type);
        exception when others then
            get stacked diagnostics v_message = message_text;
            raise exception using errcode = '42846',
                message = format('%s: the command-log field %s (%s) cannot be stored in column %s of type %s: %s', at, source ->> 'field',
                                 v_field_type, cqrs_portable._quoted(column_name), v_type, v_message);
        end;
    end if;
end
$$;

-- Only the table's owner (or a member of its role) may make it a read model.
create function cqrs_portable._check_owner(target regclass)
returns void
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
    v_owner oid;
begin
    select c.relowner into v_owner from pg_catalog.pg_class c where c.oid = target;
    if found and not pg_catalog.pg_has_role(v_owner, 'MEMBER') then
        raise exception using errcode = '42501',
            message = format('only the owner of %s (role %s) or a member of that role can make it a read model', target::text, v_owner::regrole::text),
            hint = 'Projections write their read model with its owner''s rights.';
    end if;
end
$$;

-- ---- sql/portable/read.sql ----
-- pg_cqrs, portable edition: reading read models and read-your-writes (the extension edition's
-- extension/src/projection_api.rs read_many and extension/src/waiters.rs).

create function cqrs.read_many(projection text, keys text[])
returns table (key text, rev bigint, doc json)
language plpgsql stable called on null input
as $$
#variable_conflict use_column
declare
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
    select s.revision into v_revision from cqrs.projection_state s where s.name = read_many.projection;
    -- for every key in the order given: its canonical form (the key column's own cast, so
    -- 'ABC' and 'abc' are one uuid), the row's revision (or the projection's) and the row;
    -- each canonical key once
    return query execute pg_catalog.format(
        'select d.canonical, coalesce(d.rev, $2), d.doc
           from (select distinct on (c.canonical) c.canonical, c.n, x.rev, x.doc
                   from (select (k.raw::%1$s)::text as canonical, k.n, k.raw
                           from unnest($1::text[]) with ordinality as k(raw, n) where k.raw is not null) c
                   left join lateral (select t.%2$I as rev, pg_catalog.row_to_json(t.*) as doc from %3$s as t
                                       where t.%4$I = c.raw::%1$s offset 0) as x on true
                  order by c.canonical, c.n) d
          order by d.n',
        v_def.key_type, v_def.rev_column, v_def.target, v_def.key_column)
        using keys, coalesce(v_revision, 0);
end
$$;

create function cqrs.wait_for(stream text, seq bigint, projection text, timeout interval default '5 s')
returns boolean
language plpgsql volatile strict parallel unsafe
as $$
declare
    v_deadline timestamptz;
    v_state record;
    v_error text;
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
               s.halted, s.last_error_sqlstate
          into v_state
          from cqrs.projection_state s where s.name = wait_for.projection;
        if not found then
            raise exception using errcode = '42704', message = pg_catalog.format('projection %s does not exist', cqrs_portable._quoted(wait_for.projection));
        end if;
        if v_state.applied then
            return true;
        end if;
        if v_state.halted then
            -- the error text carries command values: only for those who may read it
            if pg_catalog.has_column_privilege('cqrs.projection_state', 'last_error', 'select') then
                select s.last_error into v_error from cqrs.projection_state s where s.name = wait_for.projection;
            end if;
            raise exception using errcode = '55000',
                message = pg_catalog.format('projection %s is halted and will not apply %s#%s: %s', cqrs_portable._quoted(wait_for.projection),
                                            wait_for.stream, wait_for.seq, coalesce(v_error, 'SQLSTATE ' || coalesce(v_state.last_error_sqlstate, ''))),
                hint = 'See cqrs.status(); fix the cause and call cqrs.resume().';
        end if;
        if pg_catalog.clock_timestamp() >= v_deadline then
            return false;
        end if;
        -- no latch here: poll (the extension edition sleeps until the projecting commit wakes it)
        perform pg_catalog.pg_sleep(least(0.01, extract(epoch from v_deadline - pg_catalog.clock_timestamp())));
    end loop;
end
$$;

-- ---- sql/portable/projector.sql ----
-- pg_cqrs, portable edition: the projection engine in PL/pgSQL, with the extension edition's
-- semantics (extension/src/projector.rs, projection/src/sequencing.rs, fold.rs, sql.rs):
-- per-(projection, stream) sequencing with parking, one write per read-model row per batch,
-- exactly-once checkpoints, revisions, halt or dead letter with the failing event located.
--
-- Declarative handlers are compiled, once per definition version and table version, into one
-- set-based statement (ops → key probe → fold → delete/update/insert as data-modifying CTEs),
-- kept in a session setting and run once per batch; no loop over events on that path.

-- The small expression helpers below carry no `set search_path`: SQL functions without one are
-- inlined into the statements that call them per event and per key (with one, each call is a
-- function call plus a save and restore of the settings). They name only built-ins, which
-- PostgreSQL finds in pg_catalog before any schema of the caller's search_path.

-- The event rows a batch carries, checked as the extension checks them (the first bad element
-- and field named, 22023) and normalised: numbers as numbers, metadata {} when missing.
create function cqrs_portable._events(events jsonb)
returns jsonb
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
declare
    v_bad text;
    v_out jsonb;
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
    select coalesce(jsonb_agg(jsonb_build_object(
               'position', (e ->> 'position')::bigint, 'command_id', e -> 'command_id', 'stream', e -> 'stream',
               'seq', (e ->> 'seq')::bigint, 'command_type', e -> 'command_type', 'payload', e -> 'payload',
               'metadata', case when jsonb_typeof(e -> 'metadata') = 'object' then e -> 'metadata' else '{}'::jsonb end,
               'created_at', e -> 'created_at') order by n), '[]')
      into v_out from jsonb_array_elements(events) with ordinality x(e, n);
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

-- A key that is not a scalar: 23502, naming the projection and the event.
create function cqrs_portable._key_error(projection text, event jsonb, key jsonb)
returns text
language plpgsql immutable
as $$
begin
    raise exception using errcode = '23502',
        message = format('projection %s: %s: %s', projection, cqrs_portable._describe(event),
                         case when key is null or jsonb_typeof(key) = 'null' then 'the key is missing (null)'
                              else format('the key must be a scalar, not %s', jsonb_typeof(key)) end);
end
$$;


-- The SQL expression of a value source over event `e.ev`.
create function cqrs_portable._source_sql(source jsonb)
returns text
language sql immutable
as $$
    -- A path of plain keys becomes a chain of `->`: it gives what the strict, silent path query
    -- gives (the value; null when a key is missing or a step is not an object) at a fraction of
    -- its cost per event. Any other path (indexes, quoted keys) stays a path query.
    select case
        when p.path is null then
            case when source ? 'field' then format('(e.ev -> %L)', source ->> 'field')
                 else format('%L::jsonb', source -> 'const') end
        when p.path ~ '^strict \$(\."[A-Za-z0-9_]+")+$' then
            format('(e.ev -> %L%s)', p.doc,
                   (select string_agg(format(' -> %L', k.m[1]), '' order by k.n)
                      from regexp_matches(p.path, '\."([A-Za-z0-9_]+)"', 'g') with ordinality as k(m, n)))
        else format('pg_catalog.jsonb_path_query_first(e.ev -> %L, %L::pg_catalog.jsonpath, ''{}'', true)', p.doc, p.path)
    end
      from (select case when source ? 'path' then 'payload' when source ? 'meta' then 'metadata' end as doc,
                   case when source ? 'path' then cqrs_portable._json_path('', source ->> 'path')
                        when source ? 'meta' then cqrs_portable._json_path('', source ->> 'meta') end as path) as p
$$;

-- The compiled statement of a projection: $1 events (applicable, in log order), $2 the revision,
-- $3 whether to return rows as json, $4/$5 the range of handler steps to apply; returns
-- (key, doc, deleted). Built from the definition and the table as they are now.
create function cqrs_portable._compile(name text)
returns text
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
    v_def record;
    v_columns text[];
    v_branches text[] := '{}'::text[];
    v_type text;
    v_list jsonb;
    v_handler jsonb;
    v_sets text;
    v_adds text;
    v_col record;
    v_record text[] := array['k text'];
    v_window text[] := '{}'::text[];
    v_agg text[] := '{}'::text[];
    v_filter text;
    v_plain text;
    v_write text[] := array['''k'', f.k'];
    v_update_set text[];
    v_insert_names text[];
    v_insert_values text[];
    v_replace text[];
    v_others text[];
    v_value text;
    v_base text;
    v_start text;
    v_key text;
    v_kt text;
    v_idx integer;
begin
    v_def := cqrs_portable._target(name);
    v_key := format('%I', v_def.key_column);
    v_kt := v_def.key_type;
    -- the columns the handlers write, numbered in name order (as the extension numbers them)
    v_columns := array(select distinct c collate "C" from jsonb_each(v_def.handlers) e, jsonb_array_elements(e.value) h,
                              jsonb_object_keys(coalesce(h -> 'set', '{}') || coalesce(h -> 'add', '{}')) c order by 1);
    for v_type, v_list in select e.key, e.value from jsonb_each(v_def.handlers) e loop
        for v_i in 0 .. jsonb_array_length(v_list) - 1 loop
            v_handler := v_list -> v_i;
            continue when v_handler ? 'function';
            select coalesce(string_agg(format('%L, %s', array_position(v_columns, s.key) - 1, cqrs_portable._source_sql(s.value)), ', '), '')
              into v_sets from jsonb_each(coalesce(v_handler -> 'set', '{}')) s;
            -- an added value that is missing or JSON null adds nothing: it is left out of the
            -- object, inline (a function call per event costs more than the whole expression)
            select coalesce(string_agg(format('case when coalesce(pg_catalog.jsonb_typeof(%2$s), ''null'') = ''null'' then ''{}''::jsonb else pg_catalog.jsonb_build_object(%1$L, %2$s) end',
                                              array_position(v_columns, a.key) - 1, cqrs_portable._source_sql(a.value)), ' || '),
                            '''{}''::jsonb')
              into v_adds from jsonb_each(coalesce(v_handler -> 'add', '{}')) a;
            v_branches := v_branches || format(
                'select %s as act, %L as kind, %s as key_json, pg_catalog.jsonb_build_object(%s) as sets, (%s) as adds where e.ev ->> ''command_type'' = %L',
                v_i, v_handler ->> 'action', cqrs_portable._source_sql(v_handler -> 'key'), v_sets, v_adds, v_type);
        end loop;
    end loop;
    if cardinality(v_branches) = 0 then
        v_branches := array['select 0, null::text, null::jsonb, null::jsonb, null::jsonb where false'];
    end if;

    v_update_set := array[format('%I = $2', v_def.rev_column)];
    v_insert_names := array[v_key, format('%I', v_def.rev_column)];
    v_insert_values := array[format('e.k::%s', v_kt), '$2'];
    v_replace := array[format('%1$I = excluded.%1$I', v_def.rev_column)];
    for v_col in
        select c.name, c.idx, pg_catalog.format_type(a.atttypid, a.atttypmod) as sql_type, a.atttypid,
               pg_catalog.pg_get_expr(d.adbin, d.adrelid) as default_sql,
               exists (select from jsonb_each(v_def.handlers) e, jsonb_array_elements(e.value) h where h -> 'set' ? c.name) as uses_set,
               exists (select from jsonb_each(v_def.handlers) e, jsonb_array_elements(e.value) h where h -> 'add' ? c.name) as uses_add
          from unnest(v_columns) with ordinality c(name, idx)
          join pg_catalog.pg_attribute a on a.attrelid = v_def.relid and a.attname = c.name and not a.attisdropped
          left join pg_catalog.pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
         order by c.idx
    loop
        v_idx := v_col.idx - 1;
        v_value := case when v_col.atttypid = 'pg_catalog.jsonb'::regtype then 'jsonb'
                        when v_col.atttypid = 'pg_catalog.json'::regtype then 'json' else v_col.sql_type end;
        if v_col.uses_set then
            v_record := v_record || format('s%s boolean', v_idx) || format('v%s %s', v_idx, v_value);
            v_window := v_window || format('max(o.n) filter (where o.eff and o.sets ? %L) over (partition by o.k) as ls%s', v_idx, v_idx);
            v_agg := v_agg || format('bool_or(o.eff and o.sets ? %1$L) as s%2$s', v_idx, v_idx)
                           || format('(array_agg(o.sets -> %1$L order by o.n desc) filter (where o.eff and o.sets ? %1$L))[1] as v%2$s', v_idx, v_idx);
            v_write := v_write || format('''s%1$s'', f.s%1$s, ''v%1$s'', f.v%1$s', v_idx);
        end if;
        if v_col.uses_add then
            v_record := v_record || format('a%s %s', v_idx, v_col.sql_type) || format('l%s jsonb', v_idx);
            -- the values added after the last set, as a list, and, as the extension's fold gives
            -- it, their exact decimal sum when every one is a plain number (a JSON number or a
            -- string holding one); when one is not, a write sums the list with the column's type
            v_filter := format('o.eff and o.adds ? %L and o.n > coalesce(%s, 0)', v_idx::text,
                               case when v_col.uses_set then format('o.ls%s', v_idx) else '0' end);
            v_plain := format('(pg_catalog.jsonb_typeof(o.adds -> %1$L) = ''number'' or (pg_catalog.jsonb_typeof(o.adds -> %1$L) = ''string'' and (o.adds ->> %1$L) ~ ''^-?[0-9]+(\.[0-9]*)?([eE][+-]?[0-9]+)?$''))',
                              v_idx::text);
            v_agg := v_agg || format('pg_catalog.jsonb_agg(o.adds -> %1$L order by o.n) filter (where %3$s) as adds%2$s', v_idx::text, v_idx, v_filter)
                           || format('bool_and(%3$s) filter (where %2$s) as plain%1$s', v_idx, v_filter, v_plain)
                           || format('pg_catalog.sum(case when %3$s then (o.adds ->> %4$L)::numeric end) filter (where %2$s) as sum%1$s', v_idx, v_filter, v_plain, v_idx::text);
            v_write := v_write || format('''a%1$s'', case when f.plain%1$s then f.sum%1$s::text end, ''l%1$s'', f.adds%1$s', v_idx);
        end if;
        -- the value a write gives the column, from the current row (update) or the default (insert)
        for v_base in select unnest(array[format('t.%I', v_col.name), coalesce('(' || v_col.default_sql || ')', 'null')]) loop
            v_start := case when v_col.uses_set then format('case when e.s%s then e.v%s else %s end', v_idx, v_idx, v_base) else v_base end;
            if v_col.uses_add then
                v_start := format('case when e.a%1$s is not null or e.l%1$s is not null then coalesce(%2$s, 0) + coalesce(e.a%1$s, (select pg_catalog.sum(x::%3$s) from pg_catalog.jsonb_array_elements_text(e.l%1$s) as x), 0) else %2$s end',
                                  v_idx, v_start, v_col.sql_type);
            end if;
            if v_base like 't.%' then
                v_update_set := v_update_set || format('%I = %s', v_col.name, v_start);
            else
                v_insert_names := v_insert_names || format('%I', v_col.name);
                v_insert_values := v_insert_values || v_start;
                v_replace := v_replace || format('%1$I = excluded.%1$I', v_col.name);
            end if;
        end loop;
    end loop;
    -- the other writable columns go back to their defaults when a row is replaced
    v_others := array(select format('%I = default', a.attname) from pg_catalog.pg_attribute a
                       where a.attrelid = v_def.relid and a.attnum > 0 and not a.attisdropped
                         and a.attname::text <> all (v_columns || array[v_def.key_column, v_def.rev_column])
                         and a.attgenerated = '' and a.attidentity <> 'a'
                       order by a.attnum);
    v_replace := v_replace || v_others;

    return format($sql$
with ops as (
    select e.o as ord, a.act, a.kind, a.sets, a.adds, e.ev,
           case when pg_catalog.jsonb_typeof(a.key_json) in ('string', 'number', 'boolean') then a.key_json #>> '{}'
                else cqrs_portable._key_error(%1$L, e.ev, a.key_json) end as raw
      from pg_catalog.jsonb_array_elements($1) with ordinality as e(ev, o)
      cross join lateral (%2$s) as a
     where a.act between $4 and $5
), probe as (
    select k.raw, (k.raw::%3$s)::text as canonical, x.present is not null as existed
      from (select distinct raw from ops) k
      left join lateral (select true as present from %4$s as t where t.%5$s = k.raw::%3$s offset 0) as x on true
), numbered as (
    select ops.*, p.canonical as k, p.existed,
           pg_catalog.row_number() over (partition by p.canonical order by ops.ord, ops.act) as n
      from ops join probe p on p.raw = ops.raw
), resets as (
    -- whether the row is there before each op: the last delete or upsert before it decides
    -- (n * 2 + 1 marks an upsert, so a running max carries the kind along)
    select m.*, max(m.n * 2 + (m.kind = 'upsert')::int) filter (where m.kind in ('delete', 'upsert'))
                    over (partition by m.k order by m.n rows between unbounded preceding and 1 preceding) as prev_code
      from numbered m
), epochs as (
    -- a delete, or an upsert of a row that is not there, starts the row afresh
    select s.*, max(s.n * 2 + (s.kind = 'upsert')::int) filter (where s.kind = 'delete' or (s.kind = 'upsert' and not s.present_before))
                    over (partition by s.k) as start_code
      from (select r.*, case when r.prev_code is null then r.existed else r.prev_code %% 2 = 1 end as present_before
              from resets r) s
), marked as (
    select x.*, x.kind <> 'delete' and x.n >= coalesce(x.start_code / 2, 1) as eff,
           case x.start_code %% 2 when 1 then 'upsert' when 0 then 'delete' end as start_kind, x.start_code / 2 as start
      from epochs x
), windowed as (
    select o.*%6$s from marked o
), folded as (
    select o.k, min(o.existed::int)::boolean as existed, max(o.start_kind) as start_kind, max(o.start) as start, count(*) as ops%7$s
      from windowed o group by o.k
), writes as (
    select f.k, case when f.start_kind = 'delete' then case when f.existed then 'delete' end
                     when f.start_kind = 'upsert' then 'insert'
                     when f.existed then 'update' end as kind,
           pg_catalog.jsonb_build_object(%8$s) as w
      from folded f
), deleted as (
    delete from %4$s as t using writes w where w.kind = 'delete' and t.%5$s = w.k::%3$s
    returning t.%5$s::text as key
), updated as (
    update %4$s as t set %9$s
      from (select e.*, x.tid
              from pg_catalog.jsonb_to_recordset((select coalesce(pg_catalog.jsonb_agg(w.w), '[]') from writes w where w.kind = 'update')) as e(%10$s)
              cross join lateral (select t.ctid as tid from %4$s as t where t.%5$s = e.k::%3$s offset 0) as x) as e
     where t.ctid = e.tid
    returning t.%5$s::text as key, case when $3 then pg_catalog.row_to_json(t.*) end as doc
), inserted as (
    insert into %4$s as t (%11$s)
    select %12$s from pg_catalog.jsonb_to_recordset((select coalesce(pg_catalog.jsonb_agg(w.w), '[]') from writes w where w.kind = 'insert')) as e(%10$s)
    on conflict (%5$s) do update set %13$s
    returning t.%5$s::text as key, case when $3 then pg_catalog.row_to_json(t.*) end as doc
)
select key, null::json as doc, true as deleted from deleted
union all select key, doc, false from updated
union all select key, doc, false from inserted
$sql$,
        name,
        array_to_string(v_branches, ' union all '),
        v_kt,
        v_def.target,
        v_key,
        coalesce(', ' || nullif(array_to_string(v_window, ', '), ''), ''),
        coalesce(', ' || nullif(array_to_string(v_agg, ', '), ''), ''),
        array_to_string(v_write, ', '),
        array_to_string(v_update_set, ', '),
        array_to_string(v_record, ', '),
        array_to_string(v_insert_names, ', '),
        array_to_string(v_insert_values, ', '),
        array_to_string(v_replace, ', '));
end
$$;

-- The compiled statement of a projection, kept for the session per definition and table
-- version (a session setting is the only cache PL/pgSQL has).
create function cqrs_portable._compiled(name text)
returns text
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    v_slot text := 'cqrs.compiled_' || md5(name);
    v_version text;
    v_cached text := current_setting(v_slot, true);
    v_sql text;
begin
    select p.definition_version::text || ':' || c.xmin::text into v_version
      from cqrs.projection p join pg_catalog.pg_class c on c.oid = p.target where p.name = _compiled.name;
    if v_cached is not null and split_part(v_cached, E'\n', 1) = v_version then
        return substr(v_cached, length(v_version) + 2);
    end if;
    v_sql := cqrs_portable._compile(name);
    perform set_config(v_slot, v_version || E'\n' || v_sql, false);
    return v_sql;
end
$$;

-- Applies events (in order) to projection `name`'s read model at revision `rev`; returns the
-- changed rows (deleted: doc null, deleted true), each key once, its last change.
create function cqrs_portable._apply(name text, events jsonb, rev bigint, with_docs boolean)
returns table (key text, doc json, deleted boolean)
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    v_sql text := cqrs_portable._compiled(name);
    v_handlers jsonb := (select p.handlers from cqrs.projection p where p.name = _apply.name);
    v_keys text[] := '{}'::text[];
    v_docs json[] := '{}'::json[];
    v_gone boolean[] := '{}'::boolean[];
    -- an array, appended in place (a jsonb array would be copied at every append)
    v_segment jsonb[] := '{}'::jsonb[];
    v_event jsonb;
    v_steps jsonb;
    v_from integer;
    v_function text;
    v_changed text[];
    v_key text;
    v_doc json;
    v_deleted boolean;
    v_def record;
begin
    if not exists (select from jsonb_each(v_handlers) e, jsonb_array_elements(e.value) h where h ? 'function') then
        -- the common path: one set-based statement for the whole batch
        return query execute v_sql using events, rev, with_docs, 0, 1000000;
        return;
    end if;
    -- Function handlers see the read model as every earlier event left it: the events are
    -- applied in segments between them (each segment still set-based).
    v_def := cqrs_portable._target(name);
    for v_event in select e from jsonb_array_elements(events) e loop
        v_steps := v_handlers -> (v_event ->> 'command_type');
        if v_steps is null or not exists (select from jsonb_array_elements(v_steps) h where h ? 'function') then
            v_segment := v_segment || v_event;
            continue;
        end if;
        for v_key, v_doc, v_deleted in execute v_sql using pg_catalog.to_jsonb(v_segment), rev, with_docs, 0, 1000000 loop
            v_keys := v_keys || v_key; v_docs := v_docs || v_doc; v_gone := v_gone || v_deleted;
        end loop;
        v_segment := '{}'::jsonb[];
        v_from := 0;
        for v_f in 0 .. jsonb_array_length(v_steps) - 1 loop
            continue when not (v_steps -> v_f) ? 'function';
            for v_key, v_doc, v_deleted in execute v_sql using jsonb_build_array(v_event), rev, with_docs, v_from, v_f - 1 loop
                v_keys := v_keys || v_key; v_docs := v_docs || v_doc; v_gone := v_gone || v_deleted;
            end loop;
            v_function := v_steps -> v_f ->> 'function';
            execute format('select coalesce(array_agg(f.k) filter (where f.k is not null), ''{}'') from %s($1) as f(k)', v_function)
               into v_changed using v_event;
            if cardinality(v_changed) > 0 then
                -- stamp the rows it reports with the revision; the ones gone were deleted
                for v_key, v_doc, v_deleted in execute format(
                    'with touched as (update %1$s as t set %2$I = $2 from unnest($1::text[]) as e(k)
                                       where t.%3$I = e.k::%4$s
                                      returning t.%3$I::text as key, case when $3 then pg_catalog.row_to_json(t.*) end as doc)
                     select coalesce(t.key, k.k) as key, t.doc, t.key is null as gone
                       from unnest($1::text[]) with ordinality k(k, n) left join touched t on t.key = k.k order by k.n',
                    v_def.target, v_def.rev_column, v_def.key_column, v_def.key_type) using v_changed, rev, with_docs loop
                    v_keys := v_keys || v_key; v_docs := v_docs || v_doc; v_gone := v_gone || v_deleted;
                end loop;
            end if;
            v_from := v_f + 1;
        end loop;
        for v_key, v_doc, v_deleted in execute v_sql using jsonb_build_array(v_event), rev, with_docs, v_from, 1000000 loop
            v_keys := v_keys || v_key; v_docs := v_docs || v_doc; v_gone := v_gone || v_deleted;
        end loop;
    end loop;
    for v_key, v_doc, v_deleted in execute v_sql using pg_catalog.to_jsonb(v_segment), rev, with_docs, 0, 1000000 loop
        v_keys := v_keys || v_key; v_docs := v_docs || v_doc; v_gone := v_gone || v_deleted;
    end loop;
    -- each key once, where it first changed, with its last change
    return query
        select l.k, l.d, l.g
          from (select distinct on (x.k) x.k, x.d, x.g, x.n from unnest(v_keys, v_docs, v_gone) with ordinality x(k, d, g, n)
                 order by x.k, x.n desc) l
          join (select x.k, min(x.n) as first from unnest(v_keys) with ordinality x(k, n) group by x.k) f on f.k = l.k
         order by f.first;
end
$$;

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
    ), streams as (
        select distinct b.stream from batch b
    ), parked as (
        select k.event, k.stream, k.seq, (k.event ->> 'position')::bigint as position, 1 as origin, 0::bigint as o
          from streams s join cqrs.parked k on k.projection = name and k.stream = s.stream
         where has_parked
    ), ranked as (
        -- `is_parked`: this (stream, seq) is parked already. A window, not a probe of `parked`
        -- per row: the planner cannot size a CTE, and a nested loop over it is O(batch × parked)
        select c.*, coalesce(ps.last_seq, 0) as last,
               row_number() over (partition by c.stream, c.seq order by c.origin, c.o) as copy,
               bool_or(c.origin = 1) over (partition by c.stream, c.seq) as is_parked
          from (select * from batch union all select * from parked) c
          left join cqrs.projection_stream ps on ps.projection = name and ps.stream = c.stream
    ), firsts as (
        select r.*, r.seq = r.last + row_number() over (partition by r.stream order by r.seq) as applicable
          from ranked r where r.copy = 1 and r.seq > r.last
    )
    select
        (select coalesce(jsonb_agg(f.event order by f.position, f.stream collate "C", f.seq), '[]') from firsts f where f.applicable),
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
-- extension). `dead` holds [event, error, sqlstate] triples.
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
        insert into cqrs.dead_letter (projection, stream, seq, command_id, command_type, event, error, sqlstate)
        select _bookkeeping.name, d -> 0 ->> 'stream', (d -> 0 ->> 'seq')::bigint, (d -> 0 ->> 'command_id')::uuid, d -> 0 ->> 'command_type',
               d -> 0, d ->> 1, d ->> 2
          from jsonb_array_elements(dead) with ordinality x(d, n) order by n;
    end if;
end
$$;

-- An error as the extension keeps it: the message, and the detail in parentheses.
create function cqrs_portable._describe_error(message text, detail text)
returns text
language sql immutable
as $$ select case when coalesce(detail, '') = '' then message else message || ' (' || detail || ')' end $$;

-- Applies events (in commit order) to every projection not halted, or only to `only_name`:
-- one row per changed read-model row ('row'), and one 'report' per projection it ran
-- (applied, dead-lettered, and the failure and event it halted on, if it did). `skip` is
-- [stream, seq, error, sqlstate]: that event is set aside into the dead letters (resume).
create function cqrs_portable._project(events jsonb, commit_lsn pg_lsn, only_name text, with_docs boolean, skip jsonb,
    out kind text, out projection text, out key text, out rev bigint, out doc json, out deleted boolean,
    out applied bigint, out dead_lettered bigint, out failure text, out failure_event jsonb)
returns setof record
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    v_state record;
    v_plan record;
    v_rev bigint;
    v_max_position bigint := (select max((e ->> 'position')::bigint) from jsonb_array_elements(events) e);
    v_keys text[];
    v_docs json[];
    v_gone boolean[];
    v_dead jsonb;
    v_applicable integer;
    v_event jsonb;
    v_row record;
    v_failure text;
    v_sqlstate text;
    v_message text;
    v_detail text;
    v_poison jsonb;
    v_poison_failure text;
    v_poison_sqlstate text;
    v_halted boolean;
    v_any boolean := false;
begin
    for v_state in
        select s.name, s.halted, s.checkpoint_lsn, s.revision, s.parked, p.on_error
          from cqrs.projection_state s join cqrs.projection p on p.name = s.name
         where only_name is null or s.name = only_name
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
            select jsonb_agg(jsonb_build_array(e, skip ->> 2, skip ->> 3)) into v_dead from jsonb_array_elements(v_plan.apply) e
             where e ->> 'stream' = skip ->> 0 and (e ->> 'seq')::bigint = (skip ->> 1)::bigint;
            v_dead := coalesce(v_dead, '[]');
            select coalesce(jsonb_agg(e order by n), '[]') into v_plan.apply from jsonb_array_elements(v_plan.apply) with ordinality x(e, n)
             where not (e ->> 'stream' = skip ->> 0 and (e ->> 'seq')::bigint = (skip ->> 1)::bigint);
        end if;
        v_applicable := jsonb_array_length(v_plan.apply) + jsonb_array_length(v_dead);
        v_rev := v_state.revision + 1;
        v_keys := '{}'::text[]; v_docs := '{}'::json[]; v_gone := '{}'::boolean[];
        v_halted := false;
        v_failure := null; v_poison := null;
        begin
            for v_row in select * from cqrs_portable._apply(v_state.name, v_plan.apply, v_rev, with_docs) loop
                v_keys := v_keys || v_row.key; v_docs := v_docs || v_row.doc; v_gone := v_gone || v_row.deleted;
            end loop;
            perform cqrs_portable._bookkeeping(v_state.name, v_plan.progress, v_plan.park, v_plan.unpark, v_dead);
        exception when others then
            get stacked diagnostics v_sqlstate = returned_sqlstate, v_message = message_text, v_detail = pg_exception_detail;
            v_failure := cqrs_portable._describe_error(v_message, v_detail);
        end;
        if v_failure is not null and v_state.on_error = 'halt' then
            -- find the event that fails, then roll everything back: a halted projection keeps
            -- what it had before this batch
            begin
                for v_event in select e from jsonb_array_elements(v_plan.apply) e loop
                    begin
                        perform cqrs_portable._apply(v_state.name, jsonb_build_array(v_event), v_rev, false);
                    exception when others then
                        get stacked diagnostics v_poison_sqlstate = returned_sqlstate, v_message = message_text, v_detail = pg_exception_detail;
                        v_poison_failure := cqrs_portable._describe_error(v_message, v_detail);
                        v_poison := v_event;
                    end;
                    exit when v_poison is not null;
                end loop;
                raise exception using errcode = 'P0001', message = 'rolling back the search for the failing event';
            exception when others then
                null;
            end;
            if v_poison is not null then
                v_failure := v_poison_failure;
                v_sqlstate := v_poison_sqlstate;
            end if;
            v_halted := true;
        elsif v_failure is not null then
            -- dead_letter: apply one event at a time, set aside those that fail, go on
            begin
                v_keys := '{}'::text[]; v_docs := '{}'::json[]; v_gone := '{}'::boolean[];
                for v_event in select e from jsonb_array_elements(v_plan.apply) e loop
                    begin
                        for v_row in select * from cqrs_portable._apply(v_state.name, jsonb_build_array(v_event), v_rev, with_docs) loop
                            v_keys := v_keys || v_row.key; v_docs := v_docs || v_row.doc; v_gone := v_gone || v_row.deleted;
                        end loop;
                    exception when others then
                        get stacked diagnostics v_sqlstate = returned_sqlstate, v_message = message_text, v_detail = pg_exception_detail;
                        v_dead := v_dead || jsonb_build_array(jsonb_build_array(v_event, cqrs_portable._describe_error(v_message, v_detail), v_sqlstate));
                    end;
                end loop;
                perform cqrs_portable._bookkeeping(v_state.name, v_plan.progress, v_plan.park, v_plan.unpark, v_dead);
                v_failure := null;
            exception when others then
                get stacked diagnostics v_sqlstate = returned_sqlstate, v_message = message_text, v_detail = pg_exception_detail;
                v_failure := cqrs_portable._describe_error(v_message, v_detail);
                v_halted := true;
                v_keys := '{}'::text[]; v_docs := '{}'::json[]; v_gone := '{}'::boolean[];
            end;
        end if;
        kind := 'report'; projection := v_state.name; key := null; rev := null; doc := null; deleted := null;
        if v_halted then
            update cqrs.projection_state s
               set halted = true, last_error = v_failure, last_error_sqlstate = v_sqlstate, last_error_at = now(),
                   last_error_event = v_poison
             where s.name = v_state.name;
            raise warning '%', format('projection %s halted: %s (SQLSTATE %s)%s', v_state.name, v_failure, v_sqlstate,
                                      coalesce(' at ' || cqrs_portable._describe(v_poison), ''));
            applied := 0; dead_lettered := 0; failure := v_failure; failure_event := v_poison;
            return next;
            continue;
        end if;
        update cqrs.projection_state s set
               checkpoint_lsn = greatest(s.checkpoint_lsn, commit_lsn),
               checkpoint_position = greatest(s.checkpoint_position, v_max_position),
               checkpoint_at = now(),
               revision = greatest(s.revision, case when cardinality(v_keys) > 0 then v_rev else s.revision end),
               applied = s.applied + (v_applicable - jsonb_array_length(v_dead)),
               duplicates = s.duplicates + v_plan.duplicates,
               dead_lettered = s.dead_lettered + jsonb_array_length(v_dead)
         where s.name = v_state.name;
        -- the changed rows: each key once, where it first changed, with its last change
        for v_row in
            select l.k, l.d, l.g
              from (select distinct on (x.k) x.k, x.d, x.g, x.n from unnest(v_keys, v_docs, v_gone) with ordinality x(k, d, g, n)
                     order by x.k, x.n desc) l
              join (select x.k, min(x.n) as first from unnest(v_keys) with ordinality x(k, n) group by x.k) f on f.k = l.k
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

-- Refuses a projector whose lease has been taken over (the share lock makes cqrs.try_lead wait
-- for batches in flight, so after a takeover every call with the old token is refused).
create function cqrs_portable._check_lease(token bigint)
returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    v_current bigint := coalesce((select l.token from cqrs.projector_lease l for share), 0);
begin
    if token < v_current then
        raise exception using errcode = '55000',
            message = format('this projector''s lease (token %s) was taken over by a newer one (token %s)', token, v_current),
            hint = 'Another sidecar leads now; this one must stop projecting.';
    end if;
end
$$;

-- The work of cqrs.project_batch, which checks the fencing token first (sql/core/projection.sql).
create function cqrs._project_batch(events jsonb, commit_lsn pg_lsn, fencing_token bigint)
returns table (projection text, key text, rev bigint, doc json, deleted boolean)
language plpgsql volatile called on null input
as $$
#variable_conflict use_column
declare
    v_events jsonb := cqrs_portable._events(events);
begin
    if fencing_token is not null then
        perform cqrs_portable._check_lease(fencing_token);
    end if;
    return query
        select p.projection, p.key, p.rev, p.doc, p.deleted
          from cqrs_portable._project(v_events, commit_lsn, null, true, null) p where p.kind = 'row';
end
$$;

-- Every command projection `name` has not applied yet, in log order, `chunk` at a time (and
-- about 64 MiB); returns the changed rows, and how it ended in `halted` ('' when caught up).
create function cqrs_portable._catch_up_one(name text, chunk integer, with_docs boolean, skip jsonb,
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
begin
    loop
        select coalesce(jsonb_agg(c.doc order by c.n), '[]') into v_batch
          from (select r.doc, r.n, sum(r.bytes) over (order by r.n rows unbounded preceding) as running
                  from (select jsonb_build_object('position', l.position, 'command_id', l.command_id, 'stream', l.stream,
                                                  'seq', l.seq, 'command_type', l.command_type, 'payload', l.payload,
                                                  'metadata', l.metadata, 'created_at', l.created_at) as doc,
                               row_number() over (order by l.position) as n,
                               pg_column_size(l.payload) + pg_column_size(l.metadata) as bytes
                          from (select l.*
                                  from cqrs.stream s
                                  left join cqrs.projection_stream ps on ps.projection = _catch_up_one.name and ps.stream = s.stream
                                  cross join lateral (select * from cqrs.command_log l
                                                       where l.stream = s.stream and l.seq > coalesce(ps.last_seq, 0)
                                                       order by l.seq limit chunk) l
                                 where s.last_seq > coalesce(ps.last_seq, 0)
                                 order by l.position limit chunk) l) r) c
         where c.n = 1 or c.running <= 64 * 1024 * 1024;
        if jsonb_array_length(v_batch) = 0 then
            events := v_total; halted := '';
            projection := null; key := null; rev := null; doc := null; deleted := null;
            return next;
            return;
        end if;
        v_reported := false;
        v_progressed := 0;
        for v_row in select * from cqrs_portable._project(v_batch, null, _catch_up_one.name, with_docs, skip) loop
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

create function cqrs.catch_up(name text default null, chunk integer default 10000)
returns table (projection text, key text, rev bigint, doc json, deleted boolean)
language plpgsql volatile called on null input
as $$
#variable_conflict use_column
declare
    v_name text;
    v_row record;
    -- an array, appended in place (a jsonb array would be copied at every append)
    v_rows jsonb[] := '{}'::jsonb[];
begin
    if chunk is not null and chunk not between 1 and 1000000 then
        raise exception using errcode = '22023', message = format('chunk must be between 1 and 1000000, not %s', chunk);
    end if;
    for v_name in select s.name from cqrs.projection_state s where (catch_up.name is null or s.name = catch_up.name) and not s.halted order by s.name loop
        for v_row in select * from cqrs_portable._catch_up_one(v_name, coalesce(chunk, 10000), true, null) loop
            if v_row.halted is null then
                v_rows := v_rows || jsonb_build_object('projection', v_row.projection, 'key', v_row.key,
                                                      'rev', v_row.rev, 'doc', v_row.doc, 'deleted', v_row.deleted);
            elsif v_row.halted <> '' then
                raise warning '%', format('catch-up of %s stopped: %s', v_name, v_row.halted);
            end if;
        end loop;
    end loop;
    return query select * from cqrs_portable._changes(v_rows);
end
$$;

create function cqrs.resume(name text, skip boolean default false)
returns table (projection text, key text, rev bigint, doc json, deleted boolean)
language plpgsql volatile called on null input
as $$
#variable_conflict use_column
declare
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
        select s.halted, s.last_error_event, s.last_error, s.last_error_sqlstate into v_state
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
                                    coalesce(v_state.last_error, ''), coalesce(v_state.last_error_sqlstate, 'XX000'));
    end if;
    update cqrs.projection_state s
       set halted = false, last_error = null, last_error_sqlstate = null, last_error_at = null, last_error_event = null,
           generation = s.generation + 1
     where s.name = resume.name;
    if not found then
        raise exception using errcode = '42704', message = format('projection %s does not exist', cqrs_portable._quoted(resume.name));
    end if;
    for v_row in select * from cqrs_portable._catch_up_one(resume.name, 10000, true, v_skip) loop
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
    return query select * from cqrs_portable._changes(v_rows);
end
$$;

create function cqrs.retry_dead_letters(name text)
returns table (projection text, key text, rev bigint, doc json, deleted boolean)
language plpgsql volatile called on null input
as $$
#variable_conflict use_column
declare
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
            update cqrs.dead_letter d set retries = d.retries + 1, error = cqrs_portable._describe_error(v_message, v_detail),
                   sqlstate = v_sqlstate, failed_at = now()
             where d.id = v_letter.id;
        end;
    end loop;
    update cqrs.projection_state s set revision = greatest(s.revision, v_rev), generation = s.generation + 1
     where s.name = retry_dead_letters.name;
    return query select * from cqrs_portable._changes(v_rows);
end
$$;

create function cqrs.rebuild(name text, chunk integer default 10000)
returns table (events bigint, seconds double precision, events_per_second double precision)
language plpgsql volatile strict
as $$
#variable_conflict use_column
declare
    v_started timestamptz := clock_timestamp();
    v_last_notice timestamptz := clock_timestamp();
    v_def record;
    v_total bigint;
    v_done bigint := 0;
    v_cursor bigint := 0;
    v_batch jsonb;
    v_row record;
    v_seconds double precision;
    v_message text;
    v_detail text;
begin
    if chunk not between 1 and 1000000 then
        raise exception using errcode = '22023', message = format('chunk must be between 1 and 1000000, not %s', chunk);
    end if;
    update cqrs.projection_state s
       set halted = false, last_error = null, last_error_sqlstate = null, last_error_at = null, last_error_event = null,
           applied = 0, duplicates = 0, dead_lettered = 0
     where s.name = rebuild.name;
    if not found then
        raise exception using errcode = '42704', message = format('projection %s does not exist', cqrs_portable._quoted(rebuild.name));
    end if;
    v_def := cqrs_portable._target(rebuild.name);
    begin
        execute format('delete from %s', v_def.target);
    exception when others then
        get stacked diagnostics v_message = message_text, v_detail = pg_exception_detail;
        raise exception using errcode = '55000',
            message = format('rebuild of %s could not empty its read model: %s', rebuild.name, cqrs_portable._describe_error(v_message, v_detail));
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
        for v_row in select * from cqrs_portable._project(v_batch, null, rebuild.name, false, null) p where p.kind = 'report' loop
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
    for v_row in select * from cqrs_portable._catch_up_one(rebuild.name, chunk, false, null) where halted is not null loop
        if v_row.halted <> '' then
            raise exception using errcode = '55000', message = format('rebuild of %s stopped: %s', rebuild.name, v_row.halted);
        end if;
        v_done := v_done + v_row.events;
    end loop;
    update cqrs.projection_state s set generation = s.generation + 1 where s.name = rebuild.name;
    v_seconds := extract(epoch from clock_timestamp() - v_started);
    raise notice '%', format('rebuild %s: done, %s events in %s s', rebuild.name, v_done, round(v_seconds::numeric, 1));
    events := v_done;
    seconds := v_seconds;
    events_per_second := v_done / greatest(v_seconds, 1e-9);
    return next;
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
    v_spec jsonb;
    v_existing text;
    v_row record;
    v_message text;
begin
    if create_projection.name is null then raise exception using errcode = '22004', message = 'name must not be null'; end if;
    if target is null then raise exception using errcode = '22004', message = 'target must not be null'; end if;
    if key_column is null then raise exception using errcode = '22004', message = 'key_column must not be null'; end if;
    if handlers is null then raise exception using errcode = '22004', message = 'handlers must not be null'; end if;
    if on_error is null then raise exception using errcode = '22004', message = 'on_error must not be null'; end if;
    if rev_column is null then raise exception using errcode = '22004', message = 'rev_column must not be null'; end if;
    if backfill is null then raise exception using errcode = '22004', message = 'backfill must not be null'; end if;
    if create_projection.name !~ '^[A-Za-z0-9_.-]{1,63}$' then
        raise exception using errcode = '22023',
            message = format('projection name %s must be 1 to 63 characters of A-Z a-z 0-9 _ . -', cqrs_portable._quoted(create_projection.name)),
            hint = 'Names appear in cache keys and metric labels.';
    end if;
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
    -- handler functions resolve with the caller's search_path, as the extension resolves them
    v_spec := cqrs_portable._check_definition(create_projection.name, target, key_column, rev_column, v_spec,
        (select coalesce(jsonb_object_agg(f, pg_catalog.to_regprocedure(f || '(jsonb)')::oid), '{}')
           from (select distinct h ->> 'function' as f from jsonb_each(v_spec) e, jsonb_array_elements(e.value) h
                  where h ? 'function') fs));
    insert into cqrs.projection (name, target, key_column, rev_column, handlers, on_error)
    values (create_projection.name, target, key_column, rev_column, v_spec, on_error);
    insert into cqrs.projection_state (name) values (create_projection.name);
    -- this edition writes read models with the projector's rights: let it, if we may grant that
    begin
        execute format('grant usage on schema %I to cqrs_projector; grant select, insert, update, delete on %s to cqrs_projector',
                       (select n.nspname from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace where c.oid = target),
                       (cqrs_portable._target(create_projection.name)).target);
    exception when others then
        get stacked diagnostics v_message = message_text;
        raise notice '%', format('could not grant cqrs_projector access to %s (%s); grant usage on its schema and select, insert, update, delete on it to cqrs_projector yourself',
                                 target::text, v_message);
    end;
    if backfill then
        for v_row in select * from cqrs_portable._catch_up_one(create_projection.name, 10000, false, null) where halted is not null and halted <> '' loop
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
end
$$;

-- ---- sql/core/api.sql ----
-- pg_cqrs: what both editions share about the functions each implements in its own way
-- (the extension edition in Rust, sql/extension/functions.sql; the portable edition in
-- PL/pgSQL, sql/portable/): their comments, who may call them, and what is built on them.
-- Runs after the edition's functions exist.

create trigger command_type_changed
    after insert or update or delete or truncate on cqrs.command_type
    for each statement execute function cqrs._command_type_changed();

create function cqrs.read(projection text, key text)
returns table (doc jsonb, rev bigint)
language sql stable
as $$ select r.doc::jsonb, r.rev from cqrs.read_many(read.projection, array[read.key]) r where r.doc is not null $$;

comment on function cqrs.version() is
    'The installed pg_cqrs version and edition (extension: the compiled extension; portable: SQL and PL/pgSQL).';
comment on function cqrs.append(uuid, text, text, jsonb, bigint, jsonb) is
    'Appends one command in the caller''s transaction: idempotent on command_id, sequenced per stream, optionally guarded by expected_seq, validated against the registered JSON Schema.';
comment on function cqrs.create_projection(text, regclass, text, jsonb, text, text, boolean) is
    'Registers a read model: your table, its uniquely indexed key column, a bigint revision column, and what each command type does to it.';
comment on function cqrs.project_batch(jsonb, pg_lsn, bigint) is
    'Applies an ordered batch of command-log rows to every projection, exactly once, in one transaction; returns every read-model row it changed. A batch at or below a projection''s checkpoint LSN is skipped; a fencing_token older than the lease is refused.';
comment on function cqrs._project_batch(jsonb, pg_lsn, bigint) is
    'The work of cqrs.project_batch without its fencing check; call cqrs.project_batch.';
comment on function cqrs.read_many(text, text[]) is
    'The current rows of a read model: for every key its canonical form, revision and row as json; a missing row has a null doc and the projection''s current revision.';
comment on function cqrs.read(text, text) is 'One read-model row as jsonb with its revision; no row when there is none.';
comment on function cqrs.catch_up(text, integer) is
    'Applies every command a projection (or every projection) has not applied yet, read from the log; returns the changed rows.';
comment on function cqrs.resume(text, boolean) is
    'Clears a halted projection''s error and catches it up with the log; with skip => true the event it halted on goes to cqrs.dead_letter first (with its error), so that the projection moves past it.';
comment on function cqrs.rebuild(text, integer) is
    'Empties a read model and replays the whole log into it in one transaction (readers keep the old rows until it commits); returns events, seconds and rate.';
comment on function cqrs.wait_for(text, bigint, text, interval) is
    'Read-your-writes: true as soon as command seq of stream is applied to the projection, false after timeout.';
comment on function cqrs.uuid_v7() is 'A new time-ordered UUID (version 7), for command ids.';
comment on function cqrs.retry_dead_letters(text) is
    'Applies a projection''s dead letters again; those that succeed are removed.';

-- Who may call what: nothing is left to PUBLIC that is not meant for everyone.
revoke execute on function cqrs._command_type_changed(), cqrs._check_json_schema(jsonb),
    cqrs.append(uuid, text, text, jsonb, bigint, jsonb),
    cqrs.create_projection(text, regclass, text, jsonb, text, text, boolean),
    cqrs.project_batch(jsonb, pg_lsn, bigint), cqrs._project_batch(jsonb, pg_lsn, bigint),
    cqrs.catch_up(text, integer), cqrs.resume(text, boolean), cqrs.retry_dead_letters(text), cqrs.rebuild(text, integer), cqrs.read_many(text, text[]), cqrs.read(text, text),
    cqrs.wait_for(text, bigint, text, interval)
    from public;
grant execute on function cqrs.append(uuid, text, text, jsonb, bigint, jsonb) to cqrs_writer;
-- routine operations need no superuser: the projector resumes, rebuilds and retries
grant execute on function cqrs.project_batch(jsonb, pg_lsn, bigint), cqrs._project_batch(jsonb, pg_lsn, bigint),
    cqrs.catch_up(text, integer),
    cqrs.resume(text, boolean), cqrs.retry_dead_letters(text), cqrs.rebuild(text, integer) to cqrs_projector;
grant execute on function cqrs.read_many(text, text[]), cqrs.read(text, text), cqrs.wait_for(text, bigint, text, interval)
    to cqrs_reader, cqrs_projector;
-- cqrs.version() and cqrs.uuid_v7() stay callable by everyone: they reveal and change nothing.

-- the helpers: for pg_cqrs's own functions and its three roles, nobody else
revoke all on schema cqrs_portable from public;
grant usage on schema cqrs_portable to cqrs_writer, cqrs_reader, cqrs_projector;
revoke execute on all functions in schema cqrs_portable from public;
grant execute on all functions in schema cqrs_portable to cqrs_writer, cqrs_reader, cqrs_projector;

-- pg_cqrs body ends
reset client_min_messages;
