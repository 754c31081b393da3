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

-- The catalog facts of a projection the engine needs, from its registration. SECURITY DEFINER:
-- the owner's side of the engine (cqrs_portable._owner_write, _owner_read), which runs as the
-- table's owner, needs them too, and the owner may not read cqrs.projection.
create function cqrs_portable._target(name text,
    out target text, out key_column text, out key_type text, out rev_column text, out owner oid,
    out handlers jsonb, out on_error text, out definition_version bigint, out relation_version text, out relid oid)
returns record
language plpgsql stable security definer
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

-- The handler functions of `spec`, checked (they exist and take jsonb returning setof text) and
-- resolved: each name → its schema-qualified, quoted name. `functions` maps each name to its
-- oid, resolved by the caller with its own search_path.
create function cqrs_portable._resolve_handler_functions(spec jsonb, functions jsonb)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    v_function text;
    v_proc record;
    v_resolved jsonb := '{}'::jsonb;
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

    return v_resolved;
end
$$;

-- The checks of the read-model table itself, in the extension's order and with its messages:
-- a table of the caller's own, the key and revision columns, the columns the handlers write,
-- the owner of every function handler (`resolved`), a unique index on the key, a key that is
-- not generated.
create function cqrs_portable._check_table(target regclass, key_column text, rev_column text, spec jsonb, resolved jsonb)
returns void
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
    v_column text;
    v_function text;
    v_source jsonb;
begin
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
    for v_function, v_source in select e.key, e.value from jsonb_each(resolved) e loop
        if not pg_catalog.pg_has_role(v_owner, (select p.proowner from pg_catalog.pg_proc p
                                                 where p.oid = pg_catalog.to_regprocedure(v_source #>> '{}' || '(jsonb)')), 'MEMBER') then
            raise exception using errcode = '42501',
                message = format('handler function %s(jsonb) is owned by role %s, not by the read model''s owner %s or a role it is a member of',
                                 v_source #>> '{}',
                                 (select p.proowner::regrole::text from pg_catalog.pg_proc p where p.oid = pg_catalog.to_regprocedure(v_source #>> '{}' || '(jsonb)')),
                                 v_owner::regrole::text),
                hint = format('Handlers run as the table''s owner: alter function %s(jsonb) owner to %s;', v_source #>> '{}', v_owner::regrole::text);
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
end
$$;

-- The checks of every declarative action against the table, in command-type order: what it
-- writes may be written, and every constant or field it writes casts to its column.
create function cqrs_portable._check_actions(name text, target regclass, key_column text, rev_column text, spec jsonb)
returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    v_col record;
    v_type text;
    v_handler jsonb;
    v_n integer;
    v_at text;
    v_at2 text;
    v_column text;
    v_source jsonb;
    v_part text;
    v_list jsonb;
begin
    for v_type, v_list in select e.key, e.value from jsonb_each(spec) e order by e.key collate "C" loop
        v_n := jsonb_array_length(v_list);
        for v_i in 0 .. v_n - 1 loop
            v_handler := v_list -> v_i;
            continue when v_handler ? 'function';
            v_at := case when v_n = 1 then 'handlers.' || v_type else format('handlers.%s[%s]', v_type, v_i) end;
            perform cqrs_portable._check_source(name, v_at || '.key', v_handler -> 'key', target, key_column);
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
                perform cqrs_portable._check_source(name, v_at2, v_source, target, v_column);
            end loop;
        end loop;
    end loop;
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
    v_resolved jsonb;
    v_type text;
    v_list jsonb;
    v_out jsonb := '{}'::jsonb;
begin
    v_resolved := cqrs_portable._resolve_handler_functions(spec, functions);
    perform cqrs_portable._check_table(target, key_column, rev_column, spec, v_resolved);
    perform cqrs_portable._check_actions(name, target, key_column, rev_column, spec);
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
-- when an event arrives). The cast may run the owner's code (a domain's check): it is tried
-- through the projection's writer, as the table's owner.
create function cqrs_portable._check_source(name text, at text, source jsonb, target regclass, column_name text)
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
            perform cqrs_portable._write(name, 'probe', jsonb_build_array(column_name, source), null, false);
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
            perform cqrs_portable._write(name, 'probe', jsonb_build_array(column_name, source), null, false);
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
