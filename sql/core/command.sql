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

-- Partitioned by the time in the command id (id_time = cqrs.command_time(command_id)), so that
-- old commands leave a partition at a time; sql/core/retention.sql says why, and makes the
-- partitions, each with its unique indexes on position, command_id and (stream, seq).
create table cqrs.command_log (
    position     bigint      generated always as identity,
    command_id   uuid        not null,
    stream       text        not null,
    seq          bigint      not null,
    command_type text        not null,
    payload      jsonb       not null,
    metadata     jsonb       not null default '{}',
    created_at   timestamptz not null default pg_catalog.now(),
    id_time      timestamptz not null,
    constraint command_log_seq_check check (seq > 0)
) partition by range (id_time);
comment on table cqrs.command_log is
    'Append-only log of accepted commands. Write it only through cqrs.append()/cqrs.append_batch().';

-- One row per stream holding its last sequence number. The row lock taken when a command is
-- appended is what makes each stream's sequence gap-free and commit-ordered. fillfactor leaves
-- room on each page so the constant last_seq updates stay HOT (no index writes). The table is
-- deliberately minimal (no timestamps, no CHECK): it is updated by every append, and each CHECK
-- is re-compiled on every statement execution.
--
-- min_id_time and max_id_time bound the id times (cqrs.command_time) of the stream's commands:
-- what reads a stream's commands from the log reads only the partitions between them (the log
-- is partitioned by id time, sql/core/retention.sql), not every day of a year. A new stream's
-- range is empty (infinity, -infinity); each append widens it under the same row lock.
create table cqrs.stream (
    stream      text        primary key,
    last_seq    bigint      not null,
    min_id_time timestamptz not null default 'infinity',
    max_id_time timestamptz not null default '-infinity'
) with (fillfactor = 70);
comment on table cqrs.stream is 'Last sequence number of every stream in cqrs.command_log, and the id times of its commands.';

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
comment on function cqrs._check_name(text, text, integer) is
    'Raises 22004, 22023 or 22001 unless a stream or command type name is non-null, non-empty and at most max_bytes long.';

create function cqrs.register_command_type(command_type text, json_schema jsonb)
returns bigint
language plpgsql security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_version bigint;
    v_state text;
    v_message text;
    v_hint text;
begin
    perform cqrs._check_name('command_type', register_command_type.command_type, 128);
    if json_schema is null then
        raise exception using errcode = '22004', message = 'json_schema must not be null';
    end if;
    -- the edition's validator checks the schema: an invalid one is 22023 naming the problem, one
    -- the portable edition cannot check is 0A000; raised again from here, so that the error
    -- reads the same in both editions, without the validator's internals as its context
    begin
        perform cqrs._check_json_schema(json_schema);
    exception when invalid_parameter_value or feature_not_supported or program_limit_exceeded then
        get stacked diagnostics v_state = returned_sqlstate, v_message = message_text, v_hint = pg_exception_hint;
        if v_hint = '' then
            raise exception using errcode = v_state, message = v_message;
        end if;
        raise exception using errcode = v_state, message = v_message, hint = v_hint;
    end;
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
comment on function cqrs.unregister_command_type(text) is
    'Removes the JSON Schema of a command type; true if there was one.';

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
            if v_hint = '' then
            raise exception using errcode = v_state, message = v_message;
        end if;
        raise exception using errcode = v_state, message = v_message, hint = v_hint;
        else
            raise exception using errcode = v_state, message = v_message;
        end if;
    end;
end
$$;
comment on function cqrs.append_batch(jsonb) is
    'Appends an array of commands atomically with the rules of cqrs.append(); one row per command, in order.';

-- Privileges: applications append through the functions only. (Each file revokes what it
-- creates; sql/README.md.)
revoke all on cqrs.command_log, cqrs.stream, cqrs.command_type from public;
revoke all on sequence cqrs.command_log_position_seq, cqrs.command_type_version_seq from public;
grant usage on schema cqrs to cqrs_writer, cqrs_reader, cqrs_projector;
revoke execute on function cqrs._check_name(text, text, integer) from public;
revoke execute on function cqrs.append_batch(jsonb) from public;
revoke execute on function cqrs.register_command_type(text, jsonb) from public;
revoke execute on function cqrs.unregister_command_type(text) from public;
grant execute on function cqrs.append_batch(jsonb) to cqrs_writer;
grant select on cqrs.stream, cqrs.command_type to cqrs_reader, cqrs_projector;
-- an application sees the heads of its streams (for expected_seq)
grant select on cqrs.stream to cqrs_writer;
grant select on cqrs.command_log to cqrs_projector;

-- Extension tables are not dumped by pg_dump unless marked; these hold user data.
select pg_catalog.pg_extension_config_dump('cqrs.command_log', '');
select pg_catalog.pg_extension_config_dump('cqrs.stream', '');
select pg_catalog.pg_extension_config_dump('cqrs.command_type', '');
select pg_catalog.pg_extension_config_dump('cqrs.command_type_version_seq', '');
select pg_catalog.pg_extension_config_dump('cqrs.command_log_position_seq', '');
