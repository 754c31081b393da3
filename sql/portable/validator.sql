-- pg_cqrs, portable edition: each registered schema compiled to a PL/pgSQL function of its own.
--
-- The validator in json_schema.sql interprets a schema keyword by keyword, a function call and
-- often a query per keyword: a schema of ten properties costs a quarter of a millisecond per
-- append. Compiled, the common keywords become straight-line checks on local variables with
-- their messages written out beforehand (type, enum, const, required, properties,
-- additionalProperties, the bounds of strings and numbers, pattern, format); every other keyword
-- calls the interpreter's function for that keyword, so the verdicts and messages are the
-- interpreter's by construction (and tests/tests/json_schema*.rs compare both with the
-- extension). cqrs.append calls the compiled function of the type's current version, and the
-- interpreter when there is none (a schema registered while compiling failed).
--
-- The functions are named after the schema's md5 (cqrs_portable._v_<md5>), made and dropped by
-- cqrs_portable._compile_validators (run after every change of cqrs.command_type), and hold no
-- code of anyone's: only checks and literals derived from the schema, quoted with format's %L.

create table cqrs_portable.validator (
    command_type text primary key,
    version      bigint not null,
    function     name   not null
);
comment on table cqrs_portable.validator is
    'pg_cqrs portable edition: the compiled validator of each registered command type (made by cqrs_portable._compile_validators).';

-- The PL/pgSQL statements that check value v_<level> (jsonb, not null) against `node`, whose
-- pointer is `pointer`, appending violations to the text[] variable `acc` until it holds `lim`
-- of them, when `when_full` runs (a return, or an exit from a condition's block); `draft` is the
-- root's, `id` names this node's own variables (c_<id> for an if's condition). Deeper nodes use
-- the next level's variables; cqrs_portable._validator_function declares them all.
create function cqrs_portable._validator_node(node jsonb, level integer, pointer text, draft text,
                                              acc text, lim text, when_full text, id text)
returns text
language plpgsql immutable
as $$
declare
    v text := 'v_' || level;
    t text := 't_' || level;
    s text := 's_' || level;
    n text := 'n_' || level;
    v_add text := acc || ' := ' || acc || ' || ';
    v_room text := lim || ' - cardinality(' || acc || ')';
    v_code text := '';
    v_keyword text;
    v_arg jsonb;
    v_index integer := 0;
begin
    if jsonb_typeof(node) = 'boolean' then
        return case when node = 'false'::jsonb
                    then format('%s%L::text;', v_add, pointer || ': False schema does not allow value') else '' end;
    end if;
    -- what the compiler does not unfold runs in the interpreter, whole
    if level >= 16 or (node ? '$ref' and draft = '07') then
        return format('%s cqrs_portable._schema_walk(%L::jsonb, %s, %L, root, %s, 0);', v_add, node, v, pointer, v_room);
    end if;
    v_code := format('%s := jsonb_typeof(%s);', t, v);
    if node ?| array['minLength', 'maxLength', 'pattern', 'format'] then
        v_code := v_code || format(' %s := case when %s = ''string'' then %s #>> ''{}'' end;', s, t, v);
    end if;
    if node ?| array['minimum', 'maximum', 'exclusiveMinimum', 'exclusiveMaximum', 'multipleOf']
       or node -> 'type' = '"integer"'::jsonb or coalesce(node -> 'type' @> '["integer"]'::jsonb, false) then
        v_code := v_code || format(' %s := case when %s = ''number'' then (%s #>> ''{}'')::numeric end;', n, t, v);
    end if;
    for v_keyword, v_arg in select k.key, k.value from jsonb_each(node) k loop
        v_index := v_index + 1;
        if v_keyword in ('dependentRequired', 'dependentSchemas', 'minContains', 'maxContains', 'unevaluatedProperties',
                         'unevaluatedItems', 'prefixItems', 'dependencies')
           and not cqrs_portable._keyword_in_draft(v_keyword, draft) then
            continue;
        end if;
        if v_keyword = 'additionalProperties' and node ? 'properties' and not node ? 'patternProperties' then
            -- with properties, below
            continue;
        end if;
        -- bounds are written into the code as numbers: only numbers (cqrs.register_command_type
        -- checked them; this guards a row written some other way)
        if v_keyword in ('minLength', 'maxLength', 'minimum', 'maximum', 'exclusiveMinimum', 'exclusiveMaximum', 'multipleOf')
           and jsonb_typeof(v_arg) <> 'number' then
            raise exception using errcode = '22023', message = format('%s at %s is not a number', v_keyword, pointer);
        end if;
        v_code := v_code || cqrs_portable._validator_keyword(node, v_keyword, v_arg, level, pointer, draft, acc, lim, when_full,
                                                            id || '_' || v_index);
    end loop;
    return v_code;
end
$$;

-- The statements for one keyword of `node` (see cqrs_portable._validator_node, whose arguments
-- these are; `id` is the keyword's own): checks written out for the common keywords, a call of
-- the interpreter's function for that keyword for the others.
create function cqrs_portable._validator_keyword(node jsonb, v_keyword text, v_arg jsonb, level integer, pointer text, draft text,
                                                 acc text, lim text, when_full text, id text)
returns text
language plpgsql immutable
as $$
declare
    v text := 'v_' || level;
    t text := 't_' || level;
    s text := 's_' || level;
    n text := 'n_' || level;
    v_add text := acc || ' := ' || acc || ' || ';
    v_room text := lim || ' - cardinality(' || acc || ')';
    v_limit text := format(E'\nif cardinality(%s) >= %s then %s end if;\n', acc, lim, when_full);
    v_code text := '';
    v_name text;
    v_sub jsonb;
    v_msg text;
    v_child integer := 0;
begin
    -- Checks written out add to the violations without looking at how many there are: the
    -- function returns the first max_errors, in the interpreter's order, all the same. Before a
    -- call of the interpreter the count is looked at, as the interpreter does.
    case
    when v_keyword = 'type' and jsonb_typeof(v_arg) = 'string' then
        v_code := v_code || format('if %s then %s%L::text; end if;',
            case v_arg #>> '{}'
                when 'integer' then format('%1$s <> ''number'' or %2$s <> trunc(%2$s)', t, n)
                else format('%s <> %L', t, v_arg #>> '{}') end,
            v_add, format('%s: value is not of type %s', pointer, v_arg::text));
    when v_keyword = 'type' and jsonb_typeof(v_arg) = 'array' then
        -- the message names the types, not the value: the interpreter's, made once with a value of
        -- none of them (no such value: every value passes)
        v_msg := (select (cqrs_portable._schema_assert('type', v_arg, c.value, jsonb_typeof(c.value), pointer))[1]
                    from unnest(array['null', 'true', '{}', '[]', '"x"', '1.5', '1']::jsonb[]) with ordinality c(value, n)
                   where not exists (select from jsonb_array_elements_text(v_arg) k where cqrs_portable._json_type_matches(c.value, k))
                   order by c.n limit 1);
        if v_msg is not null then
            v_code := v_code || format('if not (%s) then %s%L::text; end if;',
                (select string_agg(case k when 'integer' then format('(%1$s = ''number'' and %2$s = trunc(%2$s))', t, n)
                                          else format('%s = %L', t, k) end, ' or ')
                   from (select distinct k from jsonb_array_elements_text(v_arg) k) x),
                v_add, v_msg);
        end if;
    when v_keyword = 'const' then
        v_code := v_code || format('if %s <> %L::jsonb then %s%L::text; end if;', v, v_arg, v_add,
                                              format('%s: %s was expected', pointer, cqrs_portable._compact_json(v_arg)));
    when v_keyword = 'enum' and not exists (select from jsonb_array_elements(v_arg) o where jsonb_typeof(o) in ('object', 'array')) then
        -- containment is equality for scalars; anything else takes the exact test
        v_code := v_code || format(
            'if %1$s in (''object'', ''array'') or not %2$L::jsonb @> jsonb_build_array(%3$s) then %5$s cqrs_portable._schema_assert(''enum'', %2$L::jsonb, %3$s, %1$s, %4$L); end if;',
            t, v_arg, v, pointer, v_add);
    when v_keyword = 'required' then
        v_code := v_code || format(
            'if %1$s = ''object'' and not %2$s ?& %3$L::text[] then %6$s cqrs_portable._schema_assert(''required'', %4$L::jsonb, %2$s, %1$s, %5$L); end if;',
            t, v, array(select jsonb_array_elements_text(v_arg)), v_arg, pointer, v_add);
    when v_keyword = 'properties' then
        v_code := v_code || format('if %s = ''object'' then', t);
        for v_name, v_sub in select p.key, p.value from jsonb_each(v_arg) p loop
            v_code := v_code || format(E'\nv_%s := %s -> %L;\nif v_%s is not null then\n%s\nend if;', level + 1, v, v_name, level + 1,
                                       cqrs_portable._validator_node(v_sub, level + 1, cqrs_portable._pointer(pointer, v_name), draft,
                                                                     acc, lim, when_full, id || '_' || v_child));
            v_child := v_child + 1;
        end loop;
        if node ? 'additionalProperties' and not node ? 'patternProperties' then
            v_code := v_code || format(
                E'\nif (%1$s - %2$L::text[]) <> ''{}''::jsonb then %5$s cqrs_portable._schema_unexpected(''Additional properties'', %3$L::jsonb, array(select jsonb_object_keys(%1$s - %2$L::text[])), %1$s, %4$L, root, %6$s, 0); end if;',
                v, array(select jsonb_object_keys(v_arg)), node -> 'additionalProperties', pointer, v_add, v_room);
        end if;
        v_code := v_code || E'\nend if;';
    when v_keyword = 'if' then
        -- the condition collects at most one violation in c_<id>, in a block it leaves when it has one
        v_code := v_code || format(E'c_%1$s := ''{}''::text[];\n<<if_%1$s>>\nbegin\n%2$s\nend;\nif cardinality(c_%1$s) = 0 then\n%3$s\nelse\n%4$s\nend if;',
            id,
            cqrs_portable._validator_node(v_arg, level, pointer, draft, 'c_' || id, '1',
                                          'exit if_' || id || ';', id || 'c'),
            case when node ? 'then' then cqrs_portable._validator_node(node -> 'then', level, pointer, draft, acc, lim, when_full, id || 't') else 'null;' end,
            case when node ? 'else' then cqrs_portable._validator_node(node -> 'else', level, pointer, draft, acc, lim, when_full, id || 'e') else 'null;' end);
    when v_keyword in ('minLength', 'maxLength', 'pattern', 'format') then
        v_code := v_code || format('if %s = ''string'' and %s then %s%L::text; end if;', t,
            case v_keyword
                when 'minLength' then format('char_length(%s) < %s', s, v_arg #>> '{}')
                when 'maxLength' then format('char_length(%s) > %s', s, v_arg #>> '{}')
                when 'pattern' then format('%s !~ %L', s, cqrs_portable._ecma_pattern(v_arg #>> '{}'))
                else format('not cqrs_portable._format_matches(%s, %L, %L)', s, v_arg #>> '{}', draft) end,
            v_add,
            -- the interpreter's messages (cqrs_portable._schema_assert_scalar), written out
            case v_keyword
                when 'minLength' then format('%s: value is shorter than %s character%s', pointer, v_arg::text,
                                             case when (v_arg #>> '{}')::numeric = 1 then '' else 's' end)
                when 'maxLength' then format('%s: value is longer than %s character%s', pointer, v_arg::text,
                                             case when (v_arg #>> '{}')::numeric = 1 then '' else 's' end)
                when 'pattern' then format('%s: value does not match "%s"', pointer, v_arg #>> '{}')
                else format('%s: value is not a "%s"', pointer, v_arg #>> '{}') end);
    when v_keyword in ('minimum', 'maximum', 'exclusiveMinimum', 'exclusiveMaximum', 'multipleOf') then
        v_code := v_code || format('if %s = ''number'' and %s then %s cqrs_portable._schema_assert_scalar(%L, %L::jsonb, ''number'', %s, null, %L, null); end if;',
            t, case v_keyword
                   when 'minimum' then format('%s < %s', n, v_arg::text)
                   when 'maximum' then format('%s > %s', n, v_arg::text)
                   when 'exclusiveMinimum' then format('%s <= %s', n, v_arg::text)
                   when 'exclusiveMaximum' then format('%s >= %s', n, v_arg::text)
                   else format('mod(%s, %s) <> 0', n, v_arg::text) end,
            v_add, v_keyword, v_arg, n, pointer);
    when v_keyword in ('type', 'enum', 'dependentRequired', 'minItems', 'maxItems', 'uniqueItems', 'minProperties', 'maxProperties') then
        v_code := v_code || v_limit || format('%s cqrs_portable._schema_assert(%L, %L::jsonb, %s, %s, %L);', v_add, v_keyword, v_arg, v, t, pointer);
    when v_keyword in ('properties', 'patternProperties', 'additionalProperties', 'prefixItems', 'items', 'additionalItems',
                       'allOf', 'anyOf', 'oneOf', 'not', '$ref', 'contains', 'dependentSchemas', 'dependencies',
                       'propertyNames', 'unevaluatedProperties', 'unevaluatedItems') then
        v_code := v_code || v_limit || format('%s cqrs_portable._schema_apply(%L, %L::jsonb, %L::jsonb, %s, %s, %L, root, %s, 0);',
                                              v_add, v_keyword, v_arg, node, v, t, pointer, v_room);
    else
        -- annotations, $defs, then / else (with if): nothing to check
        null;
    end case;
    return v_code;
end
$$;

-- The compiled validator of `schema` as a create function statement: the checks of
-- cqrs_portable._validator_node over the payload, with the variables of every level declared.
create function cqrs_portable._validator_function(name text, schema jsonb)
returns text
language plpgsql immutable
as $$
declare
    -- a schema that embeds resources of its own or has dynamic references is checked in its
    -- localized form (cqrs_portable._schema_localized: references made pointers from the root,
    -- dynamic ones unfolded), the root the interpreter is then given too
    v_local jsonb := cqrs_portable._schema_localized(schema);
    v_body text := cqrs_portable._validator_node(v_local, 0, '/', cqrs_portable._schema_draft(schema), 'e', 'max_errors',
                                                  'return e[1:max_errors];', '0');
    v_declare text;
begin
    if v_local <> schema then
        v_body := format(E'root := %L::jsonb;\n', v_local) || v_body;
    end if;
    -- every variable the checks use: values, their types, texts and numbers per level, and the
    -- violations of each if's condition
    select string_agg(format(E'    %s %s;\n', x.name, case left(x.name, 1) when 'v' then 'jsonb' when 'n' then 'numeric'
                                                                           when 'c' then 'text[]' else 'text' end), '' order by x.name)
      into v_declare
      from (select distinct m[1] as name from regexp_matches('v_0 ' || v_body, '\m([vtsn]_[0-9]+|c_[0-9a-z_]+)\M', 'g') m) x;
    return format(
        E'create function cqrs_portable.%I(payload jsonb, root jsonb, max_errors integer)\nreturns text[]\nlanguage plpgsql immutable parallel safe\nas %L',
        name,
        E'\n-- pg_cqrs: generated by cqrs_portable._compile_validators from a registered schema; do not edit\ndeclare\n    e text[] := ''{}''::text[];\n'
            || coalesce(v_declare, '') || E'begin\n    v_0 := payload;\n' || v_body || E'\nreturn e[1:max_errors];\nend\n');
end
$$;

-- Compiles the schema of every registered command type whose version has no compiled validator
-- yet and drops the validators no registered schema uses; run by cqrs._command_type_changed after
-- every change of cqrs.command_type. A schema the compiler fails on keeps the interpreter (and a
-- WARNING says so): registering never fails here.
create function cqrs_portable._compile_validators()
returns void
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_type record;
    v_function text;
    v_message text;
begin
    delete from cqrs_portable.validator v
     where not exists (select from cqrs.command_type t where t.command_type = v.command_type and t.version = v.version);
    for v_type in
        select t.command_type, t.version, t.json_schema from cqrs.command_type t
         where not exists (select from cqrs_portable.validator v where v.command_type = t.command_type and v.version = t.version)
    loop
        v_function := '_v_' || md5(v_type.json_schema::text);
        begin
            if pg_catalog.to_regprocedure(format('cqrs_portable.%I(jsonb, jsonb, integer)', v_function)) is null then
                execute cqrs_portable._validator_function(v_function, v_type.json_schema);
                execute format('revoke all on function cqrs_portable.%I(jsonb, jsonb, integer) from public', v_function);
            end if;
            insert into cqrs_portable.validator (command_type, version, function)
            values (v_type.command_type, v_type.version, v_function);
        exception when others then
            get stacked diagnostics v_message = message_text;
            raise warning '%', format('pg_cqrs: the schema of command type %s is validated without compiling it (%s)',
                                      cqrs_portable._quoted(v_type.command_type), v_message);
        end;
    end loop;
    for v_function in
        select p.proname from pg_catalog.pg_proc p
         where p.pronamespace = 'cqrs_portable'::regnamespace and p.proname ~ '^_v_[0-9a-f]{32}$'
           and not exists (select from cqrs_portable.validator v where v.function = p.proname)
    loop
        execute format('drop function cqrs_portable.%I(jsonb, jsonb, integer)', v_function);
    end loop;
end
$$;
