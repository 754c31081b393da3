-- pg_cqrs, portable edition: the command side. PL/pgSQL twins of what the extension edition
-- implements in Rust (extension/src/append.rs, uuid_v7.rs, command_limits.rs): the same
-- signatures, results, SQLSTATEs and messages. scripts/portable.sh assembles the edition.

create function cqrs.version(out version text, out edition text)
returns record
language sql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$ select '@VERSION@'::text, 'portable'::text $$;

-- The extension edition invalidates each backend's cache of compiled schemas here; this
-- edition compiles each registered schema to a function of its own (sql/portable/validator.sql).
create function cqrs._command_type_changed()
returns trigger
language plpgsql
as $$
begin
    perform cqrs_portable._compile_validators();
    return null;
end
$$;

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
    -- any session code can change a placeholder setting: one that is not ours, or ahead of the
    -- clock by more than a minute, is ignored
    if v_last ~ '^[0-9]{1,15}:[0-9]{1,4}$' then
        v_last_ms := pg_catalog.split_part(v_last, ':', 1)::bigint;
        if v_ms <= v_last_ms and v_last_ms < v_ms + 60000 then
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

-- The size and nesting limits of cqrs.append (see extension/src/command_limits.rs): a document
-- larger than its setting (cqrs_portable.settings), or with a value below level max_json_depth
-- (levels as jsonpath counts them), is refused with 54000. No `set search_path` here, on
-- purpose: see the note at the top of json_schema.sql.
create function cqrs_portable._check_limits(what text, doc jsonb, max_bytes integer, max_depth integer)
returns void
language plpgsql stable
as $$
declare
    v_setting text := case what when 'payload' then 'cqrs.max_payload_bytes' else 'cqrs.max_metadata_bytes' end;
    v_compressed boolean := pg_catalog.pg_column_compression(doc) is not null;
    -- the size of the jsonb as stored uncompressed (a compressed argument is copied to measure it)
    v_bytes integer := case when v_compressed then pg_catalog.pg_column_size(doc || '{}'::jsonb)
                            else pg_catalog.pg_column_size(doc) end;
begin
    if v_bytes > max_bytes then
        raise exception using errcode = '54000',
            message = format('%s is larger than %s (%s bytes)', what, v_setting, max_bytes),
            hint = format('Keep large documents elsewhere and put a reference in the command, or have pg_cqrs''s installer raise %s (README, Settings).', v_setting);
    end if;
    -- every level below the root costs at least 8 bytes of jsonb (a container header and its
    -- entry in the parent), so a smaller document cannot be too deep: skip the walk
    if (v_bytes > 8 * max_depth or v_compressed)
       and pg_catalog.jsonb_path_exists(doc, format('lax $.**{%s to last}', max_depth + 1)::jsonpath) then
        raise exception using errcode = '54000',
            message = format('%s nests deeper than cqrs.max_json_depth (%s levels)', what, max_depth),
            hint = 'Flatten the document; projections read at most cqrs.max_json_depth levels.';
    end if;
end
$$;

-- The W3C trace context a command may carry in its metadata: a malformed traceparent or
-- tracestate is refused with 22023, by the rules and in the words of the extension's
-- (projection/src/trace_context.rs): lowercase hex version-trace_id-parent_id-flags, version not
-- ff, ids not all zero, version 00 exactly 55 characters; tracestate printable ASCII, <= 512 bytes.
create function cqrs_portable._check_trace_context(metadata jsonb)
returns void
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
declare
    v_parent jsonb := metadata -> 'traceparent';
    v_state jsonb := metadata -> 'tracestate';
    v_text text;
    v_rule text;
begin
    if v_parent is not null then
        if jsonb_typeof(v_parent) <> 'string' then
            v_rule := 'metadata.traceparent must be a string';
        else
            v_text := v_parent #>> '{}';
            if v_text !~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-.*)?$' collate "C" then
                v_rule := 'metadata.traceparent is not a W3C traceparent (version-trace_id-parent_id-flags in lowercase hex, e.g. 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01)';
            elsif left(v_text, 2) = 'ff' then
                v_rule := 'metadata.traceparent has version ff, which W3C Trace Context forbids';
            elsif left(v_text, 2) = '00' and length(v_text) <> 55 then
                v_rule := 'metadata.traceparent is not a W3C traceparent (version-trace_id-parent_id-flags in lowercase hex, e.g. 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01)';
            elsif substr(v_text, 4, 32) = repeat('0', 32) or substr(v_text, 37, 16) = repeat('0', 16) then
                v_rule := 'metadata.traceparent has an all-zero trace id or parent id, which W3C Trace Context forbids';
            end if;
        end if;
    end if;
    if v_rule is null and v_state is not null
       and (jsonb_typeof(v_state) <> 'string' or octet_length(v_state #>> '{}') > 512
            or (v_state #>> '{}') !~ '^[\x20-\x7e]*$' collate "C") then
        v_rule := 'metadata.tracestate must be a string of printable ASCII of at most 512 bytes';
    end if;
    if v_rule is not null then
        raise exception using errcode = '22023', message = v_rule,
            hint = 'Pass the traceparent of the application''s current span as OpenTelemetry''s propagator writes it, or leave the key out (README, Observability).';
    end if;
end
$$;

-- cqrs.append of a command_id that is in the log: gives back the seq this call took (if it took
-- one; see GIVE_BACK_SEQ in extension/src/append.rs) and answers the first append's position and
-- seq when the command is the same (a retry), or raises 23505 naming what differs.
create function cqrs_portable._replay(command_id uuid, stream text, command_type text, payload jsonb,
                                      out "position" bigint, out seq bigint)
returns record
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    v_existing record;
    v_differs text[] := '{}'::text[];
    v_what text[] := '{}'::text[];
begin
    -- give back the seq this call took, if it took one (see GIVE_BACK_SEQ in extension/src/append.rs)
    update cqrs.stream s set last_seq = s.last_seq - 1
     where s.stream = _replay.stream
       and s.last_seq > (select coalesce(max(l.seq), 0) from cqrs.command_log l where l.stream = _replay.stream);
    select l.position, l.seq, l.stream, l.command_type, l.payload = _replay.payload as same_payload
      into v_existing from cqrs.command_log l
     where l.command_id = _replay.command_id and l.id_time in (cqrs.command_time(_replay.command_id), '-infinity');
    if v_existing.stream is distinct from _replay.stream then
        v_differs := v_differs || format('stream %s (was %s)', cqrs_portable._quoted(_replay.stream), cqrs_portable._quoted(v_existing.stream));
        v_what := v_what || 'stream'::text;
    end if;
    if v_existing.command_type is distinct from _replay.command_type then
        v_differs := v_differs || format('command_type %s (was %s)', cqrs_portable._quoted(_replay.command_type), cqrs_portable._quoted(v_existing.command_type));
        v_what := v_what || 'command_type'::text;
    end if;
    if not v_existing.same_payload then
        v_differs := v_differs || 'payload'::text;
        v_what := v_what || 'payload'::text;
    end if;
    if cardinality(v_differs) = 0 then
        "position" := v_existing.position;
        seq := v_existing.seq;
        return;
    end if;
    raise exception using errcode = '23505',
        message = format('command_id %s was already appended with a different %s', _replay.command_id, array_to_string(v_what, ', ')),
        detail = format('Key (command_id)=(%s) already exists at position %s (stream %s, seq %s); differs in: %s.',
                        _replay.command_id, v_existing.position, cqrs_portable._quoted(v_existing.stream), v_existing.seq,
                        array_to_string(v_differs, '; ')),
        hint = 'Reuse a command_id only to retry the very same command; give a new command a new id (cqrs.uuid_v7()).';
end
$$;

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
language plpgsql volatile called on null input
security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set jit = off
as $$
declare
    -- the limits, read once (only the installer may change them)
    v_settings cqrs_portable.settings := (select s from cqrs_portable.settings s);
    v_id_time timestamptz;
    v_log record;
    v_version bigint;
    v_schema jsonb;
    v_validator name;
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
    perform cqrs_portable._check_limits('payload', payload, v_settings.max_payload_bytes, v_settings.max_json_depth);
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
    perform cqrs_portable._check_limits('metadata', metadata, v_settings.max_metadata_bytes, v_settings.max_json_depth);
    if metadata ? 'traceparent' or metadata ? 'tracestate' then
        perform cqrs_portable._check_trace_context(metadata);
    end if;

    -- The partition the command id's time names must exist (sql/core/retention.sql): the same
    -- refusals, in the same words, as the extension's (extension/src/append.rs, outside_log).
    v_id_time := cqrs.command_time(command_id);
    select r.log_from, r.log_to into v_log from cqrs.retention r;
    if v_log.log_to = '-infinity' then
        -- a log without partitions yet (CREATE EXTENSION makes none): the first append makes them
        perform cqrs._make_log_partitions();
        select r.log_from, r.log_to into v_log from cqrs.retention r;
    end if;
    if v_id_time < v_log.log_from and v_id_time = '-infinity' then
        raise exception using errcode = '55000',
            message = format('command_id %s is not a UUIDv7, and retention removed the partition of cqrs.command_log that holds such ids', command_id),
            hint = 'Only the time in a UUIDv7 tells a retry older than the idempotency horizon from a new command: give commands UUIDv7 ids (cqrs.uuid_v7()).';
    elsif v_id_time < v_log.log_from then
        raise exception using errcode = '55000',
            message = format('command_id %s is older than the idempotency horizon: cqrs.command_log no longer keeps commands that old', command_id),
            hint = 'A retry of a command older than cqrs.idempotency_horizon() is refused rather than appended twice; a new command needs a new id (cqrs.uuid_v7()).';
    elsif v_id_time >= v_log.log_to then
        raise exception using errcode = '55000',
            message = format('command_id %s is later than the newest partition of cqrs.command_log', command_id),
            hint = 'cqrs.maintain() (the sidecar runs it) makes partitions ahead (cqrs.retention.premake); check the clock of whoever made this id.';
    end if;

    -- One statement on the happy path, as in the extension: bump the stream's seq under its row
    -- lock and insert the command; no row means a new stream or a command_id that exists (the
    -- conflict has no target: see BUMP_AND_INSERT in extension/src/append.rs).
    for pass in 1..2 loop
        with bumped as (
            update cqrs.stream s
               set last_seq = s.last_seq + 1, min_id_time = least(s.min_id_time, v_id_time),
                   max_id_time = greatest(s.max_id_time, v_id_time)
             where s.stream = append.stream
            returning s.last_seq
        )
        insert into cqrs.command_log as l (command_id, stream, seq, command_type, payload, metadata, id_time)
        select append.command_id, append.stream, b.last_seq, append.command_type, append.payload, append.metadata, v_id_time
          from bumped b
        on conflict do nothing
        returning l.position, l.seq into "position", seq;
        exit when found;
        if exists (select from cqrs.command_log l where l.command_id = append.command_id and l.id_time in (v_id_time, '-infinity')) then
            -- a replay of the same command answers as the first time; anything else is 23505
            select r."position", r.seq into "position", seq
              from cqrs_portable._replay(append.command_id, append.stream, append.command_type, append.payload) r;
            duplicate := true;
            return;
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
    select t.version, t.json_schema, v.function into v_version, v_schema, v_validator
      from cqrs.command_type t
      left join cqrs_portable.validator v on v.command_type = t.command_type and v.version = t.version
     where t.command_type = append.command_type;
    if found then
        -- the schema's compiled validator (sql/portable/validator.sql), or the interpreter: when
        -- there is none, or when a re-registration committed since dropped the one read here
        if v_validator is not null then
            begin
                execute format('select cqrs_portable.%I($1, $2, 6)', v_validator) into v_violations using payload, v_schema;
            exception when undefined_function then
                v_validator := null;
            end;
        end if;
        if v_validator is null then
            v_violations := cqrs_portable._schema_violations(v_schema, payload, 6);
        end if;
        if cardinality(v_violations) > 0 then
            raise exception using errcode = '22023',
                message = format('payload of %s does not match its schema at %s', append.command_type, v_violations[1]),
                detail = format('Violations: %s%s.', array_to_string(v_violations[1:5], '; '),
                                case when cardinality(v_violations) > 5 then '; …' else '' end),
                hint = format('See the schema with: select json_schema from cqrs.command_type where command_type = ''%s'';',
                              replace(append.command_type, '''', ''''''));
        end if;
    elsif v_settings.require_registered_types then
        raise exception using errcode = '42704',
            message = format('command type %s is not registered', cqrs_portable._quoted(append.command_type)),
            hint = 'Register it with cqrs.register_command_type(), or turn off cqrs.require_registered_types.';
    end if;
    duplicate := false;
end
$$;

-- The extension counts what cqrs.append answered in shared memory (cqrs.stats()). PL/pgSQL has
-- no memory outside transactions: a refused append rolls back whatever it would have counted,
-- so the portable edition cannot count refusals, and an accepted append is already in the log.
-- Same names and shapes as the extension's, refusing with 0A000 and saying what to use instead
-- (no search_path: the bodies look nothing up).
create function cqrs.stats()
returns table (command_type text, accepted bigint, duplicate bigint, expected_seq_conflict bigint,
               invalid bigint, error bigint, calls bigint, total_seconds double precision)
language plpgsql volatile strict
as $$
begin
    raise exception using errcode = '0A000',
        message = 'the portable edition cannot count appends: a refused append rolls back whatever it would have counted',
        hint = 'Accepted commands are in cqrs.command_log (and the sidecar counts them by type: cqrs_commands_total); refusals are counted by the application''s own metrics, or by the extension edition''s cqrs.stats().';
end
$$;

create function cqrs.append_latency()
returns table (command_type text, le double precision, calls bigint)
language plpgsql volatile strict
as $$
begin
    raise exception using errcode = '0A000',
        message = 'the portable edition cannot time appends: PL/pgSQL keeps nothing outside a transaction',
        hint = 'Time cqrs.append in the application (its client''s metrics), or use the extension edition''s cqrs.append_latency().';
end
$$;
