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
-- and field named, 22023), then each replaced by the log's row at its position.
create function cqrs_portable._events(events jsonb)
returns jsonb
language plpgsql stable
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
    -- each event must be the log's row at its position (extension/src/events.rs, from_log); what
    -- is projected is that row, whatever else the batch says
    select format('events[%s] is not in cqrs.command_log: no command %s of stream %s seq %s at position %s',
                  x.n - 1, x.e ->> 'command_id', cqrs_portable._quoted(x.e ->> 'stream'), x.e ->> 'seq', x.e ->> 'position')
      into v_bad
      from jsonb_array_elements(events) with ordinality x(e, n)
      left join cqrs.command_log l on l.position = (x.e ->> 'position')::bigint
     where l.position is null or l.command_id::text <> lower(x.e ->> 'command_id') or l.stream <> x.e ->> 'stream'
        or l.seq <> (x.e ->> 'seq')::bigint
     order by x.n limit 1;
    if v_bad is not null then
        raise exception using errcode = '22023', message = v_bad,
            hint = 'A batch carries rows of cqrs.command_log as they are (the sidecar sends them from the slot).';
    end if;
    select coalesce(jsonb_agg(jsonb_build_object(
               'position', l.position, 'command_id', l.command_id, 'stream', l.stream, 'seq', l.seq,
               'command_type', l.command_type, 'payload', l.payload, 'metadata', l.metadata,
               'created_at', l.created_at) order by x.n), '[]')
      into v_out
      from jsonb_array_elements(events) with ordinality x(e, n)
      join cqrs.command_log l on l.position = (x.e ->> 'position')::bigint;
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
        -- only function handlers: no declarative action applies to any event
        v_branches := array['select 0 as act, null::text as kind, null::jsonb as key_json, null::jsonb as sets, null::jsonb as adds where false'];
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
    v_handlers jsonb := _owner_apply.handlers;
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
        return query execute v_sql using events, rev, with_docs, 0, 1000000;
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
                    target, rev_column, key_column, key_type) using v_changed, rev, with_docs loop
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
-- extension). `dead` holds [event, summary, sqlstate, whole error] each.
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
        insert into cqrs.dead_letter (projection, stream, seq, command_id, command_type, event, error, sqlstate, error_detail)
        select _bookkeeping.name, d -> 0 ->> 'stream', (d -> 0 ->> 'seq')::bigint, (d -> 0 ->> 'command_id')::uuid, d -> 0 ->> 'command_type',
               d -> 0, d ->> 1, d ->> 2, d ->> 3
          from jsonb_array_elements(dead) with ordinality x(d, n) order by n;
    end if;
end
$$;

-- The whole error as the extension keeps it (Failure::describe): the message, and the detail
-- in parentheses. It may hold a command's values: kept where readers and logs do not reach.
create function cqrs_portable._describe_error(message text, detail text)
returns text
language sql immutable
as $$ select case when coalesce(detail, '') = '' then message else message || ' (' || detail || ')' end $$;

-- The error as it may be shown anywhere (extension/src/subtransaction.rs, summarize): its
-- SQLSTATE, with PostgreSQL's message only for the classes whose messages name objects and never
-- values (integrity constraints, rollback, access rules, resources, limits, object state,
-- operator intervention).
create function cqrs_portable._summarize_error(sqlstate text, message text)
returns text
language sql immutable
as $$
    select case when left(sqlstate, 2) in ('23', '40', '42', '53', '54', '55', '57')
                then 'SQLSTATE ' || sqlstate || ': ' || message else 'SQLSTATE ' || sqlstate end
$$;

-- "s#3 (position 9)": where an event is, without its contents (for warnings and messages).
create function cqrs_portable._locate(event jsonb)
returns text
language sql immutable
as $$ select format('%s#%s (position %s)', event ->> 'stream', event ->> 'seq', event ->> 'position') $$;

-- One projection's part of a batch, applied (run_plan in the extension): its events and
-- bookkeeping in one go; on a failure, with on_error = 'halt' the failing event is found and
-- nothing applied, with 'dead_letter' the events are applied one at a time and those that fail
-- set aside. `dead` holds [event, summary, sqlstate, whole error] of the events set aside
-- already (a resume's skip).
create function cqrs_portable._run_plan(name text, on_error text, apply jsonb, progress jsonb, park jsonb, unpark jsonb,
    dead jsonb, rev bigint, with_docs boolean,
    out keys text[], out docs json[], out gone boolean[], out dead_letters jsonb,
    out halted boolean, out summary text, out whole text, out code text, out poison jsonb)
returns record
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    v_row record;
    v_event jsonb;
    v_message text;
    v_detail text;
    v_code text;
begin
    keys := '{}'; docs := '{}'; gone := '{}'; dead_letters := dead; halted := false;
    begin
        for v_row in select * from cqrs_portable._apply(name, apply, rev, with_docs) loop
            keys := keys || v_row.key; docs := docs || v_row.doc; gone := gone || v_row.deleted;
        end loop;
        perform cqrs_portable._bookkeeping(name, progress, park, unpark, dead);
        return;
    exception when others then
        get stacked diagnostics code = returned_sqlstate, v_message = message_text, v_detail = pg_exception_detail;
        summary := cqrs_portable._summarize_error(code, v_message);
        whole := cqrs_portable._describe_error(v_message, v_detail);
    end;
    keys := '{}'; docs := '{}'; gone := '{}';
    if on_error = 'halt' then
        -- find the event that fails, then roll everything back: a halted projection keeps what it
        -- had before this batch
        begin
            for v_event in select e from jsonb_array_elements(apply) e loop
                begin
                    perform cqrs_portable._apply(name, jsonb_build_array(v_event), rev, false);
                exception when others then
                    get stacked diagnostics v_code = returned_sqlstate, v_message = message_text, v_detail = pg_exception_detail;
                    code := v_code;
                    summary := cqrs_portable._summarize_error(v_code, v_message);
                    whole := cqrs_portable._describe_error(v_message, v_detail);
                    poison := v_event;
                end;
                exit when poison is not null;
            end loop;
            raise exception using errcode = 'P0001', message = 'rolling back the search for the failing event';
        exception when others then
            null;
        end;
        halted := true;
        return;
    end if;
    -- dead_letter: apply one event at a time, set aside those that fail, go on
    begin
        for v_event in select e from jsonb_array_elements(apply) e loop
            begin
                for v_row in select * from cqrs_portable._apply(name, jsonb_build_array(v_event), rev, with_docs) loop
                    keys := keys || v_row.key; docs := docs || v_row.doc; gone := gone || v_row.deleted;
                end loop;
            exception when others then
                get stacked diagnostics v_code = returned_sqlstate, v_message = message_text, v_detail = pg_exception_detail;
                dead_letters := dead_letters || jsonb_build_array(jsonb_build_array(v_event,
                    cqrs_portable._summarize_error(v_code, v_message), v_code, cqrs_portable._describe_error(v_message, v_detail)));
            end;
        end loop;
        perform cqrs_portable._bookkeeping(name, progress, park, unpark, dead_letters);
        summary := null; whole := null; code := null;
    exception when others then
        get stacked diagnostics code = returned_sqlstate, v_message = message_text, v_detail = pg_exception_detail;
        summary := cqrs_portable._summarize_error(code, v_message);
        whole := cqrs_portable._describe_error(v_message, v_detail);
        halted := true;
        keys := '{}'; docs := '{}'; gone := '{}';
    end;
end
$$;

-- Applies events (in commit order) to every projection not halted, or only to `only_name`:
-- one row per changed read-model row ('row'), and one 'report' per projection it ran
-- (applied, dead-lettered, and the failure's summary and the event it halted on, if it did).
-- `skip` is [stream, seq, summary, sqlstate, whole error]: that event is set aside into the dead
-- letters (resume).
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
    v_run record;
    v_rev bigint;
    v_max_position bigint := (select max((e ->> 'position')::bigint) from jsonb_array_elements(events) e);
    v_dead jsonb;
    v_applicable integer;
    v_row record;
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
            select jsonb_agg(jsonb_build_array(e, skip ->> 2, skip ->> 3, coalesce(skip ->> 4, skip ->> 2))) into v_dead
              from jsonb_array_elements(v_plan.apply) e
             where e ->> 'stream' = skip ->> 0 and (e ->> 'seq')::bigint = (skip ->> 1)::bigint;
            v_dead := coalesce(v_dead, '[]');
            select coalesce(jsonb_agg(e order by n), '[]') into v_plan.apply from jsonb_array_elements(v_plan.apply) with ordinality x(e, n)
             where not (e ->> 'stream' = skip ->> 0 and (e ->> 'seq')::bigint = (skip ->> 1)::bigint);
        end if;
        v_applicable := jsonb_array_length(v_plan.apply) + jsonb_array_length(v_dead);
        v_rev := v_state.revision + 1;
        v_run := cqrs_portable._run_plan(v_state.name, v_state.on_error, v_plan.apply, v_plan.progress, v_plan.park,
                                         v_plan.unpark, v_dead, v_rev, with_docs);
        kind := 'report'; projection := v_state.name; key := null; rev := null; doc := null; deleted := null;
        if v_run.halted then
            -- the summary where readers and logs see it, the whole error where they do not
            update cqrs.projection_state s
               set halted = true, last_error = v_run.summary, last_error_sqlstate = v_run.code, last_error_at = now(),
                   last_error_event = v_run.poison, last_error_detail = v_run.whole
             where s.name = v_state.name;
            raise warning '%', format('projection %s halted%s: %s', v_state.name,
                                      coalesce(' at ' || cqrs_portable._locate(v_run.poison), ''), v_run.summary);
            applied := 0; dead_lettered := 0; failure := v_run.summary; failure_event := v_run.poison;
            return next;
            continue;
        end if;
        v_dead := v_run.dead_letters;
        update cqrs.projection_state s set
               checkpoint_lsn = greatest(s.checkpoint_lsn, commit_lsn),
               checkpoint_position = greatest(s.checkpoint_position, v_max_position),
               checkpoint_at = now(),
               revision = greatest(s.revision, case when cardinality(v_run.keys) > 0 then v_rev else s.revision end),
               applied = s.applied + (v_applicable - jsonb_array_length(v_dead)),
               duplicates = s.duplicates + v_plan.duplicates,
               dead_lettered = s.dead_lettered + jsonb_array_length(v_dead)
         where s.name = v_state.name;
        -- the changed rows: each key once, where it first changed, with its last change
        for v_row in
            select l.k, l.d, l.g
              from (select distinct on (x.k) x.k, x.d, x.g, x.n from unnest(v_run.keys, v_run.docs, v_run.gone) with ordinality x(k, d, g, n)
                     order by x.k, x.n desc) l
              join (select x.k, min(x.n) as first from unnest(v_run.keys) with ordinality x(k, n) group by x.k) f on f.k = l.k
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

-- The work of cqrs.project_batch: the fence (cqrs._fence, sql/core/projection.sql), the events
-- as the log holds them, then every projection.
create function cqrs._project_batch(events jsonb, commit_lsn pg_lsn, fencing_token bigint)
returns table (projection text, key text, rev bigint, doc json, deleted boolean)
language plpgsql volatile called on null input
as $$
#variable_conflict use_column
declare
    -- the caller's search_path: the owner's code may change it (see cqrs_portable._restore_search_path)
    v_search_path text := pg_catalog.current_setting('search_path');
    v_events jsonb;
begin
    perform cqrs._fence(fencing_token, commit_lsn);
    v_events := cqrs_portable._events(events);
    return query
        select p.projection, p.key, p.rev, p.doc, p.deleted
          from cqrs_portable._project(v_events, commit_lsn, null, true, null) p where p.kind = 'row';
    perform cqrs_portable._restore_search_path(v_search_path);
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
    -- the caller's search_path: the owner's code may change it (see cqrs_portable._restore_search_path)
    v_search_path text := pg_catalog.current_setting('search_path');
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
    perform cqrs_portable._restore_search_path(v_search_path);
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
    perform cqrs_portable._restore_search_path(v_search_path);
end
$$;
