-- pg_cqrs, portable edition: the code of a read model's owner runs as its owner and leaves no
-- setting behind (the extension edition: extension/src/owner_rights.rs).
--
-- PL/pgSQL cannot switch users inside a security-restricted operation as the extension does, so
-- every projection gets two functions owned by its table's owner, SECURITY DEFINER with a pinned
-- search_path, made by cqrs.create_projection (whose caller must be a member of that owner):
--
--   cqrs_portable."_write_<md5 of the name>"(op, args, rev, with_docs)  writes the read model
--   cqrs_portable."_read_<md5 of the name>"(keys, after)               reads it
--
-- The engine calls them for every write and read of the read model, so the owner's triggers,
-- defaults, domain and check constraints, index expressions, policies and function handlers run
-- as the owner (inside a SECURITY DEFINER function PostgreSQL refuses SET ROLE and SET SESSION
-- AUTHORIZATION). What they run is fixed: the statements are compiled by
-- cqrs_portable._definition, with the installer's rights, from the catalog and the projection's
-- definition, into cqrs_portable.compiled, which only that function writes — not by the caller,
-- so neither the projecting role nor the owner can make the other's rights run their SQL. Before
-- each call the engine checks that the function is still the one pg_cqrs made (owner, SECURITY
-- DEFINER, search_path, body): its owner may ALTER it, and a SECURITY INVOKER writer would run as
-- the projector. Around each call the engine snapshots every setting the session may change and
-- puts back whatever the owner's code changed (a plain SET would otherwise reach the session's
-- next statement); see the README for what that costs.

-- The compiled write statement of each projection, for its definition and table version.
create table cqrs_portable.compiled (
    projection text primary key,
    -- definition_version:pg_class xmin of the table, as cqrs_portable._definition computes it
    version    text  not null,
    sql        text  not null,
    handlers   jsonb not null,
    target     text  not null,
    key_column text  not null,
    key_type   text  not null,
    rev_column text  not null
);

-- A projection's definition with its compiled write statement, compiled again when the
-- definition or its table changed. SECURITY DEFINER: only this function writes
-- cqrs_portable.compiled, and it compiles from the catalog and cqrs.projection, never from what
-- a caller passes.
create function cqrs_portable._definition(name text,
    out sql text, out handlers jsonb, out target text, out key_column text, out key_type text, out rev_column text)
returns record
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_version text;
    v_def record;
begin
    select p.definition_version::text || ':' || c.xmin::text into v_version
      from cqrs.projection p join pg_catalog.pg_class c on c.oid = p.target where p.name = _definition.name;
    if not found then
        raise exception using errcode = '42704',
            message = format('projection %s does not exist, or its read-model table was dropped', cqrs_portable._quoted(name));
    end if;
    select k.sql, k.handlers, k.target, k.key_column, k.key_type, k.rev_column
      into sql, handlers, target, key_column, key_type, rev_column
      from cqrs_portable.compiled k where k.projection = _definition.name and k.version = v_version;
    if found then
        -- compiled before its statement became a function (0.2.0), or the function was dropped
        if pg_catalog.to_regprocedure(cqrs_portable._fold_signature(sql)) is null then
            perform cqrs_portable._make_fold(sql, name);
        end if;
        return;
    end if;
    v_def := cqrs_portable._target(name);
    sql := cqrs_portable._compile(name);
    handlers := v_def.handlers;
    target := v_def.target;
    key_column := v_def.key_column;
    key_type := v_def.key_type;
    rev_column := v_def.rev_column;
    insert into cqrs_portable.compiled as k (projection, version, sql, handlers, target, key_column, key_type, rev_column)
    values (name, v_version, sql, handlers, target, key_column, key_type, rev_column)
    on conflict (projection) do update
        set version = excluded.version, sql = excluded.sql, handlers = excluded.handlers, target = excluded.target,
            key_column = excluded.key_column, key_type = excluded.key_type, rev_column = excluded.rev_column;
    if pg_catalog.to_regprocedure(cqrs_portable._fold_signature(sql)) is null then
        perform cqrs_portable._make_fold(sql, name);
    end if;
end
$$;

-- The compiled statement as a function of its own, cqrs_portable."_fold_<md5 of the statement>"
-- (events jsonb, rev bigint, with_docs boolean, first_step integer, last_step integer): a
-- statement run with EXECUTE is planned again at every call — ≈ 6 ms of a 1,000-event batch's
-- ≈ 24 ms for the example projection, and most of a 100-event batch's — while PL/pgSQL keeps the
-- plan of a function's own statements for the session. SECURITY INVOKER: it runs as whoever
-- calls it, which is the table's owner (cqrs_portable._owner_apply, inside the projection's
-- writer); owned by the installer, so nobody else can change what it runs. Named by its
-- statement, so a recompiled definition gets a function of its own and a session still running
-- the last one is not changed under it (they are dropped with their projection).
--
-- Its plan is kept, so it must not depend on how large the read model was when it was made: the
-- kept plan of a read model that was empty then scanned the whole table for every batch once it
-- had grown (cqrs-bench project 5-7x slower, measured). Without sequential scans, hash and merge
-- joins the read model is reached only through its key's index, at any size. The settings hold
-- while the statement runs, so the owner's triggers plan under them too (they change plans, not
-- results); JIT off, because a plan that must scan a table anyway costs past jit_above_cost.
create function cqrs_portable._fold_signature(sql text)
returns text
language sql immutable
as $$ select 'cqrs_portable._fold_' || pg_catalog.md5(sql) || '(jsonb, bigint, boolean, integer, integer)' $$;

create function cqrs_portable._make_fold(sql text, projection text)
returns void
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    -- by the table's oid: its name may be in a schema the installer may not look into
    v_owner text := (select c.relowner::regrole::text from cqrs.projection p join pg_catalog.pg_class c on c.oid = p.target
                      where p.name = _make_fold.projection);
begin
    begin
        execute format('create function cqrs_portable.%I(jsonb, bigint, boolean, integer, integer)
            returns table (key text, doc json, deleted boolean)
            language plpgsql volatile
            set search_path = pg_catalog, pg_temp
            set enable_seqscan = off set enable_hashjoin = off set enable_mergejoin = off set jit = off
            as %L', '_fold_' || pg_catalog.md5(sql),
            E'\n-- pg_cqrs: made by cqrs_portable._definition from a projection''s compiled statement; do not edit\n'
            || E'#variable_conflict use_column\nbegin\n    return query ' || sql || E';\nend\n');
    exception when duplicate_function or unique_violation then
        -- another session made it at the same moment: the same statement, so the same function
        return;
    end;
    execute format('revoke all on function %s from public', cqrs_portable._fold_signature(sql));
    execute format('grant execute on function %s to %I', cqrs_portable._fold_signature(sql), v_owner);
end
$$;

-- The name of a projection's writer ('w') or reader ('r') function in cqrs_portable.
create function cqrs_portable._owner_function(name text, kind text)
returns text
language sql immutable
as $$ select case kind when 'w' then '_write_' else '_read_' end || pg_catalog.md5(name) $$;

-- The body of a projection's writer or reader: it only hands its arguments to the engine's
-- owner-side functions, with the projection's name and table fixed.
create function cqrs_portable._owner_function_body(name text, relid oid, kind text)
returns text
language sql immutable
as $$
    select case kind
        when 'w' then pg_catalog.format($b$
begin
    return query select * from cqrs_portable._owner_write(%L, %s::pg_catalog.oid, op, args, rev, with_docs);
end
$b$, name, relid)
        else pg_catalog.format($b$
begin
    return query select * from cqrs_portable._owner_read(%L, %s::pg_catalog.oid, keys, after);
end
$b$, name, relid)
    end
$$;

-- Makes (or makes again) a projection's writer and reader, owned by the owner of its table. The
-- caller is a member of that owner (cqrs.create_projection checks it) and owns cqrs_portable
-- (the installer): the owner gets CREATE on the schema for as long as ALTER FUNCTION … OWNER
-- needs it, within this transaction, and keeps only USAGE.
create function cqrs_portable._make_owner_functions(name text, target regclass)
returns void
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    v_owner text := (select c.relowner::regrole::text from pg_catalog.pg_class c where c.oid = target);
    v_writer text := cqrs_portable._owner_function(name, 'w');
    v_reader text := cqrs_portable._owner_function(name, 'r');
    v_could_create boolean := pg_catalog.has_schema_privilege(v_owner, 'cqrs_portable', 'create');
begin
    execute format('create or replace function cqrs_portable.%I(op text, args jsonb, rev bigint, with_docs boolean)
        returns table (key text, doc json, deleted boolean)
        language plpgsql volatile security definer
        set search_path = pg_catalog, pg_temp set client_min_messages = error
        as %L', v_writer, cqrs_portable._owner_function_body(name, target, 'w'));
    execute format('create or replace function cqrs_portable.%I(keys text[], after bigint)
        returns table (key text, rev bigint, doc json)
        language plpgsql stable security definer
        set search_path = pg_catalog, pg_temp set client_min_messages = error
        as %L', v_reader, cqrs_portable._owner_function_body(name, target, 'r'));
    execute format('comment on function cqrs_portable.%I(text, jsonb, bigint, boolean) is %L', v_writer,
                   format('pg_cqrs: writes the read model of projection %s as its owner (made by cqrs.create_projection; do not alter it)', name));
    execute format('comment on function cqrs_portable.%I(text[], bigint) is %L', v_reader,
                   format('pg_cqrs: reads the read model of projection %s as its owner (made by cqrs.create_projection; do not alter it)', name));
    execute format('revoke all on function cqrs_portable.%I(text, jsonb, bigint, boolean) from public', v_writer);
    execute format('revoke all on function cqrs_portable.%I(text[], bigint) from public', v_reader);
    -- who projects: the sidecar's role, and the installer (create_projection's backfill, rebuild)
    execute format('grant execute on function cqrs_portable.%I(text, jsonb, bigint, boolean) to cqrs_projector, %I',
                   v_writer, current_user);
    execute format('grant execute on function cqrs_portable.%I(text[], bigint) to cqrs_projector, cqrs_reader, cqrs_writer, %I',
                   v_reader, current_user);
    -- what the owner's side of the engine calls, as the owner
    execute format('grant usage on schema cqrs_portable to %I', v_owner);
    execute format('grant execute on function cqrs_portable._owner_write(text, oid, text, jsonb, bigint, boolean),
                        cqrs_portable._owner_apply(text, jsonb, text, text, text, text, jsonb, bigint, boolean),
                        cqrs_portable._owner_read(text, oid, text[], bigint), cqrs_portable._definition(text),
                        cqrs_portable._key_error(text, jsonb, jsonb), cqrs_portable._describe(jsonb),
                        cqrs_portable._quoted(text), cqrs_portable._may_read(text, oid, name), cqrs_portable._target(text)
                        to %I', v_owner);
    if not v_could_create then
        execute format('grant create on schema cqrs_portable to %I', v_owner);
    end if;
    execute format('alter function cqrs_portable.%I(text, jsonb, bigint, boolean) owner to %I', v_writer, v_owner);
    execute format('alter function cqrs_portable.%I(text[], bigint) owner to %I', v_reader, v_owner);
    if not v_could_create then
        execute format('revoke create on schema cqrs_portable from %I', v_owner);
    end if;
end
$$;

-- Drops a projection's writer and reader (cqrs.drop_projection).
create function cqrs_portable._drop_owner_functions(name text)
returns void
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    v_function regprocedure;
begin
    for v_function in
        select f from unnest(array[
            pg_catalog.to_regprocedure('cqrs_portable.' || cqrs_portable._owner_function(name, 'w') || '(text, jsonb, bigint, boolean)'),
            pg_catalog.to_regprocedure('cqrs_portable.' || cqrs_portable._owner_function(name, 'r') || '(text[], bigint)')]) f
         where f is not null
    loop
        execute format('drop function %s', v_function);
    end loop;
    -- its compiled statements' functions (cqrs_portable._make_fold) that no other projection runs
    for v_function in
        select pg_catalog.to_regprocedure('cqrs_portable.' || p.proname || '(jsonb, bigint, boolean, integer, integer)')
          from pg_catalog.pg_proc p
         where p.pronamespace = 'cqrs_portable'::pg_catalog.regnamespace and p.proname ~ '^_fold_[0-9a-f]{32}$'
           and not exists (select from cqrs_portable.compiled k
                            where k.projection <> _drop_owner_functions.name and '_fold_' || pg_catalog.md5(k.sql) = p.proname)
    loop
        execute format('drop function %s', v_function);
    end loop;
    delete from cqrs_portable.compiled k where k.projection = _drop_owner_functions.name;
end
$$;

-- The projection's writer or reader, refused (55000) unless it is still the function pg_cqrs
-- made: owned by the table's owner, SECURITY DEFINER, with the pinned search_path and its body.
-- Its owner may ALTER it — made SECURITY INVOKER, it would run as whoever projects — or the table
-- may have changed hands since. (client_min_messages = error: the owner's messages stay in the
-- server's log and do not reach the caller's client, the sidecar's log.)
create function cqrs_portable._owner_function_checked(name text, kind text)
returns text
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
    v_function text := cqrs_portable._owner_function(name, kind);
    v_args text := case kind when 'w' then '(text, jsonb, bigint, boolean)' else '(text[], bigint)' end;
    v_fn record;
    v_table record;
begin
    select c.oid, c.relowner::regrole::text as owner, c.relowner into v_table
      from cqrs.projection p join pg_catalog.pg_class c on c.oid = p.target where p.name = _owner_function_checked.name;
    if not found then
        raise exception using errcode = '42704',
            message = format('projection %s does not exist, or its read-model table was dropped', cqrs_portable._quoted(name));
    end if;
    select f.proowner, f.prosecdef, f.proconfig, f.prosrc into v_fn
      from pg_catalog.pg_proc f where f.oid = pg_catalog.to_regprocedure('cqrs_portable.' || quote_ident(v_function) || v_args);
    if not found or v_fn.proowner <> v_table.relowner or not v_fn.prosecdef
       or v_fn.proconfig is distinct from array['search_path=pg_catalog, pg_temp', 'client_min_messages=error']
       or v_fn.prosrc is distinct from cqrs_portable._owner_function_body(name, v_table.oid, kind) then
        raise exception using errcode = '55000',
            message = format('the %s of projection %s (function cqrs_portable.%s) is not the one pg_cqrs made for the owner of its table, role %s',
                             case kind when 'w' then 'writer' else 'reader' end, name, v_function, v_table.owner),
            detail = case when not found then 'It is missing.'
                          when v_fn.proowner <> v_table.relowner then format('It belongs to role %s: the table changed owner since.', v_fn.proowner::regrole)
                          -- the body names its table by oid, which a restore from pg_dump changes
                          when v_fn.prosrc = cqrs_portable._owner_function_body(name,
                                  (pg_catalog.substring(v_fn.prosrc, '([0-9]+)::pg_catalog\.oid'))::oid, kind)
                          then format('It was made for the table with oid %s, and the table is %s now: the database was restored from a dump, or the table was made again.',
                                      pg_catalog.substring(v_fn.prosrc, '([0-9]+)::pg_catalog\.oid'), v_table.oid)
                          else 'It was altered.' end,
            hint = format('As the installer, a member of role %s: select cqrs_portable.rebind(%L);', v_table.owner, name);
    end if;
    return v_function;
end
$$;

-- Makes a projection's writer and reader again, for the current owner of its table: after the
-- table changed owner, or after someone altered them. The caller must be a member of the owner.
create function cqrs_portable.rebind(name text)
returns void
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    v_target regclass;
begin
    select p.target into v_target from cqrs.projection p where p.name = rebind.name;
    if not found then
        raise exception using errcode = '42704', message = format('projection %s does not exist', cqrs_portable._quoted(name));
    end if;
    perform cqrs_portable._check_owner(v_target);
    perform cqrs_portable._drop_owner_functions(name);
    perform cqrs_portable._make_owner_functions(name, v_target);
end
$$;
comment on function cqrs_portable.rebind(text) is
    'Makes a projection''s writer and reader functions again for the current owner of its table (after an owner change).';

-- Every setting this session may change, as name=value (the value as SHOW prints it, which
-- set_config takes back unchanged).
--
-- This function and the two after it have no `set search_path` and name everything with its
-- schema, on purpose: they run right after the owner's code returns, when the session's
-- search_path may be whatever that code set — a plain SET outlives every function that ran it,
-- overriding their own SET clauses (PostgreSQL's rule) — and they must see and put back that
-- value, not a function's own.
create function cqrs_portable._settings()
returns pg_catalog.text[]
language sql volatile
as $$
    select pg_catalog.array_agg(pg_catalog.textcat(pg_catalog.textcat(s.name, '='), pg_catalog.current_setting(s.name)) order by s.name)
      from pg_catalog.pg_show_all_settings() s
     where s.context operator(pg_catalog.=) any ('{user,superuser}'::pg_catalog.text[])
$$;

-- Puts back, session-wide, every setting that differs from `before` (cqrs_portable._settings()):
-- what the owner's code changed, with SET or SET LOCAL, must not reach the next statement.
create function cqrs_portable._restore_settings(before pg_catalog.text[])
returns void
language plpgsql volatile
as $$
declare
    v_name pg_catalog.text;
    v_value pg_catalog.text;
    v_now pg_catalog.text[];
begin
    -- nothing changed, the usual case: the settings of `before` read again by name (≈ 0.07 ms)
    -- instead of listing every setting (pg_show_all_settings, ≈ 0.6 ms: it formats each one's
    -- descriptions too) and taking the set difference (measured). A setting the owner's code
    -- created is not in `before` either way: a custom setting cannot be removed again.
    if (select pg_catalog.array_agg(pg_catalog.textcat(pg_catalog.textcat(b.name, '='), pg_catalog.current_setting(b.name)) order by b.n)
          from (select pg_catalog.split_part(x.s, '=', 1), x.n from pg_catalog.unnest(before) with ordinality as x(s, n)) as b(name, n))
       operator(pg_catalog.=) before then
        return;
    end if;
    v_now := cqrs_portable._settings();
    for v_name, v_value in
        select pg_catalog.split_part(b.s, '=', 1), pg_catalog.substr(b.s, pg_catalog.strpos(b.s, '=') operator(pg_catalog.+) 1)
          from pg_catalog.unnest(before) as b(s)
        except
        select pg_catalog.split_part(a.s, '=', 1), pg_catalog.substr(a.s, pg_catalog.strpos(a.s, '=') operator(pg_catalog.+) 1)
          from pg_catalog.unnest(v_now) as a(s)
    loop
        perform pg_catalog.set_config(v_name, v_value, false);
    end loop;
end
$$;

-- Puts the session's search_path back to `before`, the value a public function of this
-- edition found when it was called. Inside the engine, after the owner's code ran, it is
-- pg_catalog, pg_temp (the value cqrs_portable._write put back, which is its own); every
-- function that can run the owner's code ends with this.
create function cqrs_portable._restore_search_path(before pg_catalog.text)
returns void
language plpgsql volatile
as $$
begin
    if pg_catalog.current_setting('search_path') operator(pg_catalog.<>) before then
        perform pg_catalog.set_config('search_path', before, false);
    end if;
end
$$;

-- Runs op ('apply', 'clear' or 'probe') of projection `name`'s writer, as its table's owner, and
-- puts back every setting the owner's code changed before anything else runs. `settings` is
-- cqrs_portable._settings() as the caller took it, when it knows they are unchanged since: a
-- batch takes them once for all its projections (each writer puts them back before the next).
create function cqrs_portable._write(name text, op text, args jsonb, rev bigint, with_docs boolean,
                                     settings pg_catalog.text[] default null)
returns table (key text, doc json, deleted boolean)
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    v_function text := cqrs_portable._owner_function_checked(name, 'w');
    v_before text[] := coalesce(settings, cqrs_portable._settings());
begin
    return query execute format('select * from cqrs_portable.%I($1, $2, $3, $4)', v_function) using op, args, rev, with_docs;
    perform cqrs_portable._restore_settings(v_before);
end
$$;

-- Reads projection `name`'s read model as its table's owner — the rows of `keys` (in order,
-- each key's canonical text; a missing row has a null rev and doc) or, with keys null, the rows
-- changed after `after` — and puts back every setting the owner's code changed.
create function cqrs_portable._read(name text, keys text[], after bigint)
returns table (key text, rev bigint, doc json)
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    v_function text := cqrs_portable._owner_function_checked(name, 'r');
    v_before text[] := cqrs_portable._settings();
begin
    return query execute format('select * from cqrs_portable.%I($1, $2)', v_function) using keys, after;
    perform cqrs_portable._restore_settings(v_before);
end
$$;

-- Who may read a read model through pg_cqrs (see extension/src/read_models.rs): a role that may
-- select from it and, where it has row-level security, one that sees every row anyway. 42501
-- otherwise. cqrs.read_many checks its caller; the reader function checks the session's role
-- again, for whoever calls it directly.
create function cqrs_portable._may_read(name text, relid oid, role name)
returns void
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
    v_table record;
begin
    select '"' || replace(n.nspname, '"', '""') || '"."' || replace(c.relname, '"', '""') || '"' as name, c.relrowsecurity, c.relowner
      into v_table
      from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace where c.oid = relid;
    if not pg_catalog.has_table_privilege(role, relid, 'select') then
        raise exception using errcode = '42501',
            message = format('permission denied for the read model of projection %s (table %s)', name, v_table.name),
            hint = format('Its owner grants it: grant select on %s to %s;', v_table.name, quote_ident(role));
    end if;
    if v_table.relrowsecurity
       and not (pg_catalog.pg_has_role(role, v_table.relowner, 'member')
                or (select r.rolsuper or r.rolbypassrls from pg_catalog.pg_roles r where r.rolname = role)
                or pg_catalog.pg_has_role(role, 'cqrs_projector', 'member')) then
        raise exception using errcode = '42501',
            message = format('table %s has row-level security, which pg_cqrs cannot apply to role %s: it reads read models as their owner',
                             v_table.name, role),
            hint = 'Select from the table yourself, so that its policies apply to you.';
    end if;
end
$$;

-- ==============================================================================================
-- internal: the owner's side of the engine (what a projection's writer and reader run)
-- ==============================================================================================

-- Applies events (in order) to projection `name`'s read model at revision `rev`, as its table's
-- owner (cqrs_portable._write); returns the changed rows (deleted: doc null, deleted true), each
-- key once, its last change.
create function cqrs_portable._apply(name text, events jsonb, rev bigint, with_docs boolean)
returns table (key text, doc json, deleted boolean)
language sql volatile
set search_path = pg_catalog, pg_temp
as $$ select w.key, w.doc, w.deleted from cqrs_portable._write(name, 'apply', events, rev, with_docs) w $$;

-- The owner's side of the engine: what a projection's writer function (cqrs_portable._write_…,
-- SECURITY DEFINER, owned by the table's owner) runs, as that owner. `op`:
--   apply  `args` the events (in order) to apply at revision `rev`; returns the changed rows
--   clear  empties the read model (cqrs.rebuild)
--   probe  `args` [column, source]: whether a constant or command-log field casts to the
--          column's type (cqrs.create_projection) — the cast may run the owner's domain checks
create function cqrs_portable._owner_write(name text, relid oid, op text, args jsonb, rev bigint, with_docs boolean)
returns table (key text, doc json, deleted boolean)
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    v_def record;
    v_type text;
begin
    if op = 'probe' then
        select pg_catalog.format_type(a.atttypid, a.atttypmod) into v_type
          from pg_catalog.pg_attribute a where a.attrelid = relid and a.attname = args ->> 0 and a.attnum > 0 and not a.attisdropped;
        if args -> 1 ? 'const' then
            execute format('select (pg_catalog.jsonb_build_array($1::jsonb) ->> 0)::%s', v_type) using args -> 1 -> 'const';
        else
            execute format('select null::%s::%s', case args -> 1 ->> 'field' when 'seq' then 'bigint' when 'position' then 'bigint'
                                                      when 'created_at' then 'timestamptz' when 'command_id' then 'uuid' else 'text' end,
                           v_type);
        end if;
        return;
    end if;
    v_def := cqrs_portable._definition(name);
    if op = 'clear' then
        execute format('delete from %s', v_def.target);
        return;
    end if;
    return query select * from cqrs_portable._owner_apply(v_def.sql, v_def.handlers, v_def.target, v_def.key_column,
                                                          v_def.key_type, v_def.rev_column, args, rev, with_docs);
end
$$;

-- Applies events with a compiled definition (cqrs_portable._definition), as the owner.
create function cqrs_portable._owner_apply(sql text, handlers jsonb, target text, key_column text, key_type text,
                                           rev_column text, events jsonb, rev bigint, with_docs boolean)
returns table (key text, doc json, deleted boolean)
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    v_sql text := _owner_apply.sql;
    -- the statement's function, or the statement itself when there is none (the name as in
    -- cqrs_portable._make_fold). Built-ins only: what an owner may run is granted by
    -- cqrs_portable._make_owner_functions, and owners of 0.2.0 were granted no new helper.
    v_run text := case when pg_catalog.to_regprocedure('cqrs_portable._fold_' || pg_catalog.md5(v_sql)
                                                       || '(jsonb, bigint, boolean, integer, integer)') is not null
                       then 'select * from cqrs_portable._fold_' || pg_catalog.md5(v_sql) || '($1, $2, $3, $4, $5)'
                       else v_sql end;
    v_handlers jsonb := _owner_apply.handlers;
    -- Owner code that may change rows after the statement wrote them: an AFTER trigger runs when
    -- the whole statement ends (a delete's trigger may change a row the same statement updated,
    -- which RETURNING showed before it), a rule may write other rows, and a function handler
    -- runs between segments. The rows returned for the cache are then read again at the end, as
    -- the owner (a row gone by then is returned as deleted); otherwise the cache could keep a row
    -- older than the table. (Built-ins only, for the reason above.)
    -- (looked up only when rows are returned: `with_docs and …` stops at false)
    v_triggered boolean := with_docs
                           and (exists (select from pg_catalog.pg_trigger g
                                         where g.tgrelid = target::pg_catalog.regclass and not g.tgisinternal and g.tgenabled <> 'D')
                                or exists (select from pg_catalog.pg_rewrite r
                                            where r.ev_class = target::pg_catalog.regclass and r.rulename <> '_RETURN'));
    v_reread text := pg_catalog.format(
        'select k.k, case when t.%1$I is not null then pg_catalog.row_to_json(t.*) end, t.%1$I is null
           from pg_catalog.unnest($1::pg_catalog.text[]) with ordinality as k(k, n)
           left join %2$s as t on t.%1$I = k.k::%3$s
          order by k.n', key_column, target, key_type);
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
begin
    if not exists (select from jsonb_each(v_handlers) e, jsonb_array_elements(e.value) h where h ? 'function') then
        -- the common path: one set-based statement for the whole batch
        if not with_docs or not v_triggered then
            return query execute v_run using events, rev, with_docs, 0, 1000000;
            return;
        end if;
        for v_key, v_doc, v_deleted in execute v_run using events, rev, with_docs, 0, 1000000 loop
            v_keys := v_keys || v_key;
        end loop;
        return query execute v_reread using v_keys;
        return;
    end if;
    -- Function handlers see the read model as every earlier event left it: the events are
    -- applied in segments between them (each segment still set-based).
    for v_event in select e from jsonb_array_elements(events) e loop
        v_steps := v_handlers -> (v_event ->> 'command_type');
        if v_steps is null or not exists (select from jsonb_array_elements(v_steps) h where h ? 'function') then
            v_segment := v_segment || v_event;
            continue;
        end if;
        for v_key, v_doc, v_deleted in execute v_run using pg_catalog.to_jsonb(v_segment), rev, with_docs, 0, 1000000 loop
            v_keys := v_keys || v_key; v_docs := v_docs || v_doc; v_gone := v_gone || v_deleted;
        end loop;
        v_segment := '{}'::jsonb[];
        v_from := 0;
        for v_f in 0 .. jsonb_array_length(v_steps) - 1 loop
            continue when not (v_steps -> v_f) ? 'function';
            for v_key, v_doc, v_deleted in execute v_run using jsonb_build_array(v_event), rev, with_docs, v_from, v_f - 1 loop
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
                    target, rev_column, key_column, key_type) using v_changed, rev, with_docs loop
                    v_keys := v_keys || v_key; v_docs := v_docs || v_doc; v_gone := v_gone || v_deleted;
                end loop;
            end if;
            v_from := v_f + 1;
        end loop;
        for v_key, v_doc, v_deleted in execute v_run using jsonb_build_array(v_event), rev, with_docs, v_from, 1000000 loop
            v_keys := v_keys || v_key; v_docs := v_docs || v_doc; v_gone := v_gone || v_deleted;
        end loop;
    end loop;
    for v_key, v_doc, v_deleted in execute v_run using pg_catalog.to_jsonb(v_segment), rev, with_docs, 0, 1000000 loop
        v_keys := v_keys || v_key; v_docs := v_docs || v_doc; v_gone := v_gone || v_deleted;
    end loop;
    -- each key once, where it first changed, with its last change (read again: see v_triggered)
    if with_docs then
        select coalesce(array_agg(f.k order by f.first), '{}') into v_keys
          from (select x.k, min(x.n) as first from unnest(v_keys) with ordinality x(k, n) group by x.k) f;
        return query execute v_reread using v_keys;
        return;
    end if;
    return query
        select l.k, l.d, l.g
          from (select distinct on (x.k) x.k, x.d, x.g, x.n from unnest(v_keys, v_docs, v_gone) with ordinality x(k, d, g, n)
                 order by x.k, x.n desc) l
          join (select x.k, min(x.n) as first from unnest(v_keys) with ordinality x(k, n) group by x.k) f on f.k = l.k
         order by f.first;
end
$$;

-- What a projection's reader function (cqrs_portable._read_…, owned by the table's owner) runs,
-- as that owner: for `keys`, in order, each key's canonical text (the key column's own cast, so
-- 'ABC' and 'abc' are one uuid) with the row's revision and the row (null when there is none),
-- each canonical key once; with keys null, the rows whose revision is above `after`.
create function cqrs_portable._owner_read(name text, relid oid, keys text[], after bigint)
returns table (key text, rev bigint, doc json)
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    v_def record;
begin
    -- cqrs.read_many checked its caller; this checks whoever called the reader directly
    perform cqrs_portable._may_read(name, relid, session_user);
    v_def := cqrs_portable._target(name);
    if keys is null then
        return query execute pg_catalog.format(
            'select t.%1$I::text, t.%2$I::bigint, pg_catalog.row_to_json(t.*) from %3$s as t where t.%2$I > $1',
            v_def.key_column, v_def.rev_column, v_def.target)
            using coalesce(after, -1);
        return;
    end if;
    return query execute pg_catalog.format(
        'select d.canonical, d.rev, d.doc
           from (select distinct on (c.canonical) c.canonical, c.n, x.rev, x.doc
                   from (select (k.raw::%1$s)::text as canonical, k.n, k.raw
                           from unnest($1::text[]) with ordinality as k(raw, n) where k.raw is not null) c
                   left join lateral (select t.%2$I as rev, pg_catalog.row_to_json(t.*) as doc from %3$s as t
                                       where t.%4$I = c.raw::%1$s offset 0) as x on true
                  order by c.canonical, c.n) d
          order by d.n',
        v_def.key_type, v_def.rev_column, v_def.target, v_def.key_column)
        using keys;
end
$$;
