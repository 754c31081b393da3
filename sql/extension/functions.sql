-- pg_cqrs, extension edition: the functions implemented in Rust (extension/src/), declared here
-- and nowhere else. The portable edition declares the same signatures in sql/portable/; the
-- comments and grants of both are in sql/core/api.sql (sql/README.md).
--
-- The C symbol names ('MODULE_PATHNAME', '<symbol>') are forever: every install script ever
-- released (sql/releases/pg_cqrs--<version>.sql) names them, CREATE EXTENSION … VERSION '<old>'
-- must still find them in today's library, and the upgrade test installs the oldest release with
-- it. Rename a Rust function freely, but keep its exported symbol (#[unsafe(export_name)] or a
-- pg_extern `name`), or keep a stub under the old symbol; never reuse an old symbol for a
-- function with other arguments.

create function cqrs.version(out version text, out edition text)
returns record
language sql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$ select '0.3.0'::text, 'extension'::text $$;

-- (The trigger on cqrs.command_type that calls it is in sql/core/command.sql.)
create function cqrs._command_type_changed()
returns trigger
language c
as 'MODULE_PATHNAME', '_command_type_changed_wrapper';

create function cqrs._check_json_schema(json_schema jsonb)
returns void
language c immutable strict parallel safe
as 'MODULE_PATHNAME', 'check_json_schema_wrapper';

create function cqrs.uuid_v7()
returns uuid
language c volatile strict parallel safe
as 'MODULE_PATHNAME', 'uuid_v7_wrapper';

-- enable_seqscan and jit off: the plans of its statements are kept for the session, and one made
-- while cqrs.stream held a page (a fresh install) read the table whole on every append until an
-- ANALYZE planned it again (pgrx-tests/sql/lookup_scans.sql); every lookup here is by a unique
-- key. JIT off: a disabled scan is costed past jit_above_cost. No measurable cost per call.
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
language c volatile called on null input
security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set jit = off
as 'MODULE_PATHNAME', 'cqrs_append';

create function cqrs.create_projection(
    name text,
    target regclass,
    key_column text,
    handlers jsonb,
    on_error text default 'halt',
    rev_column text default 'rev',
    backfill boolean default true)
returns void
language c volatile called on null input
as 'MODULE_PATHNAME', 'create_projection_wrapper';

-- The work of cqrs.project_batch (sql/core/projection.sql checks the fencing token first). The
-- symbol is the one 0.1.0 declared cqrs.project_batch with.
create function cqrs._project_batch(events jsonb, commit_lsn pg_lsn, fencing_token bigint, projection_group text)
returns table (projection text, key text, rev bigint, doc json, deleted boolean)
language c volatile called on null input
as 'MODULE_PATHNAME', 'cqrs_project_batch';

create function cqrs.catch_up(name text default null, chunk integer default 10000)
returns table (projection text, key text, rev bigint, doc json, deleted boolean)
language c volatile called on null input
as 'MODULE_PATHNAME', 'cqrs_catch_up';

create function cqrs.resume(name text, skip boolean default false)
returns table (projection text, key text, rev bigint, doc json, deleted boolean)
language c volatile called on null input
as 'MODULE_PATHNAME', 'cqrs_resume';

create function cqrs.retry_dead_letters(name text)
returns table (projection text, key text, rev bigint, doc json, deleted boolean)
language c volatile called on null input
as 'MODULE_PATHNAME', 'cqrs_retry_dead_letters';

create function cqrs.rebuild(name text, chunk integer default 10000)
returns table (events bigint, seconds double precision, events_per_second double precision)
language c volatile strict
as 'MODULE_PATHNAME', 'rebuild_wrapper';

create function cqrs.read_many(projection text, keys text[])
returns table (key text, rev bigint, doc json)
language c stable called on null input
as 'MODULE_PATHNAME', 'cqrs_read_many';

-- enable_seqscan and jit off as in the portable edition, whose lookup needs them (its catalog
-- entry is the same); the statements here are planned that way already (prepared::index_plans).
create function cqrs.wait_for(stream text, seq bigint, projection text, timeout interval default '5 s')
returns boolean
language c volatile strict parallel unsafe
set enable_seqscan = off
set jit = off
as 'MODULE_PATHNAME', 'wait_for_wrapper';

create function cqrs.changed_since(projection text, after bigint)
returns table (key text, rev bigint, doc json)
language c stable called on null input
as 'MODULE_PATHNAME', 'cqrs_changed_since';

-- What cqrs.append answered, per command type, since the server started (shared memory: needs
-- pg_cqrs in shared_preload_libraries; extension/src/append_stats.rs).
create function cqrs.stats()
returns table (command_type text, accepted bigint, duplicate bigint, expected_seq_conflict bigint,
               invalid bigint, error bigint, calls bigint, total_seconds double precision)
language c volatile strict
as 'MODULE_PATHNAME', 'stats_wrapper';

create function cqrs.append_latency()
returns table (command_type text, le double precision, calls bigint)
language c volatile strict
as 'MODULE_PATHNAME', 'append_latency_wrapper';

-- Seconds a gap may stay unfilled before status() flags it: the setting cqrs.gap_alert_after.
create function cqrs._gap_alert_seconds()
returns double precision
language sql stable
as $$ select coalesce(nullif(pg_catalog.current_setting('cqrs.gap_alert_after', true), ''), '60')::double precision $$;

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
