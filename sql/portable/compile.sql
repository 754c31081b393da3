-- pg_cqrs, portable edition: the compiler of projection statements (projection/src/sql.rs in
-- the extension edition). A projection's declarative handlers become, once per definition
-- version and table version (cqrs_portable._definition, owner_rights.sql, keeps the result in
-- cqrs_portable.compiled), one set-based statement: ops and their key probes → fold → delete/update/
-- insert as data-modifying CTEs. Everything here is internal.

-- ==============================================================================================
-- internal: the statement of a projection
-- ==============================================================================================

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

-- The handlers of a projection as the union of one select per declarative action over event
-- `e.ev`: (act, kind, key_json, sets, adds) for the events of its command type, the columns
-- numbered by their index in `columns` (name order, as the extension numbers them).
create function cqrs_portable._compile_branches(handlers jsonb, columns text[])
returns text
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
    v_branches text[] := '{}'::text[];
    v_type text;
    v_list jsonb;
    v_handler jsonb;
    v_sets text;
    v_adds text;
begin
    for v_type, v_list in select e.key, e.value from jsonb_each(handlers) e loop
        for v_i in 0 .. jsonb_array_length(v_list) - 1 loop
            v_handler := v_list -> v_i;
            continue when v_handler ? 'function';
            select coalesce(string_agg(format('%L, %s', array_position(columns, s.key) - 1, cqrs_portable._source_sql(s.value)), ', '), '')
              into v_sets from jsonb_each(coalesce(v_handler -> 'set', '{}')) s;
            -- an added value that is missing or JSON null adds nothing: it is left out of the
            -- object, inline (a function call per event costs more than the whole expression)
            select coalesce(string_agg(format('case when coalesce(pg_catalog.jsonb_typeof(%2$s), ''null'') = ''null'' then ''{}''::jsonb else pg_catalog.jsonb_build_object(%1$L, %2$s) end',
                                              array_position(columns, a.key) - 1, cqrs_portable._source_sql(a.value)), ' || '),
                            '''{}''::jsonb')
              into v_adds from jsonb_each(coalesce(v_handler -> 'add', '{}')) a;
            v_branches := v_branches || format(
                'select %s as act, %L as kind, %s as key_json, pg_catalog.jsonb_build_object(%s) as sets, (%s) as adds where e.ev ->> ''command_type'' = %L',
                v_i, v_handler ->> 'action', cqrs_portable._source_sql(v_handler -> 'key'), v_sets, v_adds, v_type);
        end loop;
    end loop;
    if cardinality(v_branches) = 0 then
        -- only function handlers: no declarative action applies to any event
        return 'select 0 as act, null::text as kind, null::jsonb as key_json, null::jsonb as sets, null::jsonb as adds where false';
    end if;
    return array_to_string(v_branches, ' union all ');
end
$$;

-- The per-column parts of projection `name`'s compiled statement, for the columns its handlers
-- write (`columns`, numbered by index): the record of a folded write, the window and aggregate
-- expressions of the fold, the write's JSON, and the update, insert and replace lists.
create function cqrs_portable._compile_columns(name text, columns text[],
    out record_columns text[], out windows text[], out aggregates text[], out write_fields text[],
    out update_set text[], out insert_names text[], out insert_values text[], out replace text[])
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
    v_def record;
    v_col record;
    v_filter text;
    v_plain text;
    v_value text;
    v_base text;
    v_start text;
    v_idx integer;
begin
    v_def := cqrs_portable._target(name);
    record_columns := array['k text'];
    windows := '{}'::text[];
    aggregates := '{}'::text[];
    write_fields := array['''k'', f.k'];
    update_set := array[format('%I = $2', v_def.rev_column)];
    insert_names := array[format('%I', v_def.key_column), format('%I', v_def.rev_column)];
    insert_values := array[format('e.k::%s', v_def.key_type), '$2'];
    replace := array[format('%1$I = excluded.%1$I', v_def.rev_column)];
    for v_col in
        select c.name, c.idx, pg_catalog.format_type(a.atttypid, a.atttypmod) as sql_type, a.atttypid,
               pg_catalog.pg_get_expr(d.adbin, d.adrelid) as default_sql,
               exists (select from jsonb_each(v_def.handlers) e, jsonb_array_elements(e.value) h where h -> 'set' ? c.name) as uses_set,
               exists (select from jsonb_each(v_def.handlers) e, jsonb_array_elements(e.value) h where h -> 'add' ? c.name) as uses_add
          from unnest(columns) with ordinality c(name, idx)
          join pg_catalog.pg_attribute a on a.attrelid = v_def.relid and a.attname = c.name and not a.attisdropped
          left join pg_catalog.pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
         order by c.idx
    loop
        v_idx := v_col.idx - 1;
        v_value := case when v_col.atttypid = 'pg_catalog.jsonb'::regtype then 'jsonb'
                        when v_col.atttypid = 'pg_catalog.json'::regtype then 'json' else v_col.sql_type end;
        if v_col.uses_set then
            record_columns := record_columns || format('s%s boolean', v_idx) || format('v%s %s', v_idx, v_value);
            windows := windows || format('max(o.n) filter (where o.eff and o.sets ? %L) over (partition by o.k) as ls%s', v_idx, v_idx);
            aggregates := aggregates || format('bool_or(o.eff and o.sets ? %1$L) as s%2$s', v_idx, v_idx)
                           || format('(array_agg(o.sets -> %1$L order by o.n desc) filter (where o.eff and o.sets ? %1$L))[1] as v%2$s', v_idx, v_idx);
            write_fields := write_fields || format('''s%1$s'', f.s%1$s, ''v%1$s'', f.v%1$s', v_idx);
        end if;
        if v_col.uses_add then
            record_columns := record_columns || format('a%s %s', v_idx, v_col.sql_type) || format('l%s jsonb', v_idx);
            -- the values added after the last set, as a list, and, as the extension's fold gives
            -- it, their exact decimal sum when every one is a plain number (a JSON number or a
            -- string holding one); when one is not, a write sums the list with the column's type
            v_filter := format('o.eff and o.adds ? %L and o.n > coalesce(%s, 0)', v_idx::text,
                               case when v_col.uses_set then format('o.ls%s', v_idx) else '0' end);
            v_plain := format('(pg_catalog.jsonb_typeof(o.adds -> %1$L) = ''number'' or (pg_catalog.jsonb_typeof(o.adds -> %1$L) = ''string'' and (o.adds ->> %1$L) ~ ''^-?[0-9]+(\.[0-9]*)?([eE][+-]?[0-9]+)?$''))',
                              v_idx::text);
            aggregates := aggregates || format('pg_catalog.jsonb_agg(o.adds -> %1$L order by o.n) filter (where %3$s) as adds%2$s', v_idx::text, v_idx, v_filter)
                           || format('bool_and(%3$s) filter (where %2$s) as plain%1$s', v_idx, v_filter, v_plain)
                           || format('pg_catalog.sum(case when %3$s then (o.adds ->> %4$L)::numeric end) filter (where %2$s) as sum%1$s', v_idx, v_filter, v_plain, v_idx::text);
            write_fields := write_fields || format('''a%1$s'', case when f.plain%1$s then f.sum%1$s::text end, ''l%1$s'', f.adds%1$s', v_idx);
        end if;
        -- the value a write gives the column, from the current row (update) or the default (insert)
        for v_base in select unnest(array[format('t.%I', v_col.name), coalesce('(' || v_col.default_sql || ')', 'null')]) loop
            v_start := case when v_col.uses_set then format('case when e.s%s then e.v%s else %s end', v_idx, v_idx, v_base) else v_base end;
            if v_col.uses_add then
                v_start := format('case when e.a%1$s is not null or e.l%1$s is not null then coalesce(%2$s, 0) + coalesce(e.a%1$s, (select pg_catalog.sum(x::%3$s) from pg_catalog.jsonb_array_elements_text(e.l%1$s) as x), 0) else %2$s end',
                                  v_idx, v_start, v_col.sql_type);
            end if;
            if v_base like 't.%' then
                update_set := update_set || format('%I = %s', v_col.name, v_start);
            else
                insert_names := insert_names || format('%I', v_col.name);
                insert_values := insert_values || v_start;
                replace := replace || format('%1$I = excluded.%1$I', v_col.name);
            end if;
        end loop;
    end loop;
    -- the other writable columns go back to their defaults when a row is replaced
    replace := replace || array(select format('%I = default', a.attname) from pg_catalog.pg_attribute a
                       where a.attrelid = v_def.relid and a.attnum > 0 and not a.attisdropped
                         and a.attname::text <> all (columns || array[v_def.key_column, v_def.rev_column])
                         and a.attgenerated = '' and a.attidentity <> 'a'
                       order by a.attnum);

end
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
    v_parts record;
begin
    v_def := cqrs_portable._target(name);
    -- the columns the handlers write, numbered in name order (as the extension numbers them)
    v_columns := array(select distinct c collate "C" from jsonb_each(v_def.handlers) e, jsonb_array_elements(e.value) h,
                              jsonb_object_keys(coalesce(h -> 'set', '{}') || coalesce(h -> 'add', '{}')) c order by 1);
    v_parts := cqrs_portable._compile_columns(name, v_columns);
    return format($sql$
with ops as (
    select e.o as ord, a.act, a.kind, a.sets, a.adds, e.ev,
           case when pg_catalog.jsonb_typeof(a.key_json) in ('string', 'number', 'boolean') then a.key_json #>> '{}'
                else cqrs_portable._key_error(%1$L, e.ev, a.key_json) end as raw
      from pg_catalog.jsonb_array_elements($1) with ordinality as e(ev, o)
      cross join lateral (%2$s) as a
     where a.act between $4 and $5
), numbered as (
    -- whether each op's row is there before the batch: probed per op, not per distinct key and
    -- joined back — ops is estimated at one row, and that join was planned as a nested loop
    -- over every key for every op (7 s for a batch of 10,000 keys, measured)
    select ops.*, (ops.raw::%3$s)::text as k, x.present is not null as existed,
           pg_catalog.row_number() over (partition by (ops.raw::%3$s)::text order by ops.ord, ops.act) as n
      from ops
      left join lateral (select true as present from %4$s as t where t.%5$s = ops.raw::%3$s offset 0) as x on true
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
    -- each deleted key probes its row, as the update below does: joined with writes instead, the
    -- table was scanned whole for every batch by a kept plan made while it was empty
    delete from %4$s as t
     using (select x.tid from writes w
              cross join lateral (select t.ctid as tid from %4$s as t where t.%5$s = w.k::%3$s offset 0) as x
             where w.kind = 'delete') as d
     where t.ctid = d.tid
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
        cqrs_portable._compile_branches(v_def.handlers, v_columns),
        v_def.key_type,
        v_def.target,
        format('%I', v_def.key_column),
        coalesce(', ' || nullif(array_to_string(v_parts.windows, ', '), ''), ''),
        coalesce(', ' || nullif(array_to_string(v_parts.aggregates, ', '), ''), ''),
        array_to_string(v_parts.write_fields, ', '),
        array_to_string(v_parts.update_set, ', '),
        array_to_string(v_parts.record_columns, ', '),
        array_to_string(v_parts.insert_names, ', '),
        array_to_string(v_parts.insert_values, ', '),
        array_to_string(v_parts.replace, ', '));
end
$$;
