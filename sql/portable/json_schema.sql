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

-- Every violation of `schema` by `instance` as 'pointer: message', at most `max_errors` of them,
-- keyword by keyword in the schema's order: the keywords that apply subschemas
-- (cqrs_portable._schema_apply) and those that check the instance itself
-- (cqrs_portable._schema_assert). `root` resolves local $refs; `depth` bounds $ref recursion.
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
    end if;
    for v_keyword, v_arg in select e.key, e.value from jsonb_each(schema) e loop
        exit when cardinality(v_errors) >= max_errors;
        if v_keyword in ('properties', 'patternProperties', 'additionalProperties', 'prefixItems', 'items', 'allOf', 'anyOf', 'oneOf', 'not', '$ref') then
            v_errors := v_errors || cqrs_portable._schema_apply(v_keyword, v_arg, schema, instance, v_type, pointer, root,
                                                                max_errors - cardinality(v_errors), depth);
        elsif v_keyword in ('minLength', 'maxLength', 'pattern', 'format', 'minimum', 'maximum', 'exclusiveMinimum', 'exclusiveMaximum', 'multipleOf') then
            v_errors := v_errors || cqrs_portable._schema_assert_scalar(v_keyword, v_arg, v_type, v_number, v_text, pointer);
        else
            -- annotations and $defs / definitions (checked at registration) find nothing
            v_errors := v_errors || cqrs_portable._schema_assert(v_keyword, v_arg, instance, v_type, pointer);
        end if;
    end loop;
    return v_errors[1:max_errors];
end
$$;

-- The violations of one keyword that checks the instance itself (type, enum, const, required,
-- the bounds of objects and arrays, uniqueItems; those of strings and numbers in
-- cqrs_portable._schema_assert_scalar); none for a keyword it does not know (annotations).
create function cqrs_portable._schema_assert(keyword text, arg jsonb, instance jsonb, value_type text, pointer text)
returns text[]
language plpgsql immutable parallel safe
as $$
declare
    v_errors text[] := '{}'::text[];
    v_arg jsonb := arg;
    v_type text := value_type;
    v_key text;
    v_options text[];
    v_count integer;
begin
    case keyword
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
    else
        null;
    end case;
    return v_errors;
end
$$;

-- The violation of one keyword that bounds a string (minLength, maxLength, pattern, format) or
-- a number (minimum, maximum, exclusiveMinimum, exclusiveMaximum, multipleOf), if any.
create function cqrs_portable._schema_assert_scalar(keyword text, arg jsonb, value_type text, number numeric,
                                                    string text, pointer text)
returns text[]
language plpgsql immutable parallel safe
as $$
declare
    v_errors text[] := '{}'::text[];
    v_arg jsonb := arg;
    v_type text := value_type;
    v_number numeric := number;
    v_text text := string;
    v_length integer := char_length(string);
begin
    case keyword
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
    end case;
    return v_errors;
end
$$;

-- The violations of one keyword that applies subschemas (properties, patternProperties,
-- additionalProperties, prefixItems, items, allOf, anyOf, oneOf, not, $ref), at most
-- `max_errors`; `schema` is the keyword's schema (additionalProperties and items look at its
-- siblings).
create function cqrs_portable._schema_apply(keyword text, arg jsonb, schema jsonb, instance jsonb, value_type text, pointer text,
                                            root jsonb, max_errors integer, depth integer)
returns text[]
language plpgsql immutable parallel safe
as $$
declare
    v_errors text[] := '{}'::text[];
    v_arg jsonb := arg;
    v_type text := value_type;
    v_text text;
    v_key text;
    v_value jsonb;
    v_unexpected text[];
    v_target jsonb;
    v_valid integer;
begin
    case keyword
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
    end case;
    return v_errors;
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
    v_name text;
    v_index integer;
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
                for v_item, v_index in select s, n - 1 from jsonb_array_elements(v_arg) with ordinality x(s, n) loop
                    perform cqrs_portable._check_schema_node(v_item, cqrs_portable._pointer(cqrs_portable._pointer(at, v_keyword), v_index::text));
                end loop;
            end if;
        when 'const' then
            null;
        when 'properties', 'patternProperties', '$defs', 'definitions' then
            if jsonb_typeof(v_arg) <> 'object' then
                raise exception using errcode = '22023',
                    message = format('json_schema is not a valid JSON Schema: %s must be an object (at %s)', v_keyword, cqrs_portable._pointer(at, v_keyword));
            end if;
            for v_name, v_item in select e.key, e.value from jsonb_each(v_arg) e loop
                perform cqrs_portable._check_schema_node(v_item, cqrs_portable._pointer(cqrs_portable._pointer(at, v_keyword), v_name));
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
            -- a format the extension enforces must be enforced here too, or refused; any other
            -- (a format of your own, "isbn") is an annotation in both editions, as the JSON Schema
            -- specification says, and checked by neither
            if v_arg #>> '{}' in ('time', 'duration', 'idn-email', 'hostname', 'idn-hostname', 'ipv4', 'ipv6', 'uri',
                                  'uri-reference', 'iri', 'iri-reference', 'uri-template', 'json-pointer',
                                  'relative-json-pointer', 'regex') then
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
