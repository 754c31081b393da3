-- pg_cqrs, portable edition: JSON Schema validation of payloads in PL/pgSQL (managed PostgreSQL
-- loads no Rust validator), drafts 2020-12, 2019-09 and 07 as the root's "$schema" says (2020-12
-- when it names none):
--
--   type, enum, const, properties, required, additionalProperties, patternProperties,
--   propertyNames, dependentRequired, dependentSchemas, dependencies, items (a schema, or an
--   array of them before 2020-12), prefixItems, additionalItems, contains, minContains,
--   maxContains, unevaluatedProperties, unevaluatedItems, minItems, maxItems, uniqueItems,
--   minLength, maxLength, pattern, minimum, maximum, exclusiveMinimum, exclusiveMaximum,
--   multipleOf, minProperties, maxProperties, allOf, anyOf, oneOf, not, if/then/else, $ref
--   (within the document: JSON pointers escaped with ~0, ~1 and %XX, anchors, its own $id, and
--   schema resources embedded with an $id of their own, their relative URIs resolved),
--   $dynamicRef (2020-12) and $recursiveRef (2019-09) by their dynamic scope;
--   format date-time, date, time, duration, email, hostname, ipv4, ipv6, uri, uri-reference,
--   iri, iri-reference, uri-template, uuid, json-pointer, relative-json-pointer; annotations
--   ($id, $comment, title, description, default, examples, deprecated, readOnly, writeOnly,
--   $anchor, content* from 2019-09) are accepted and ignored.
--
-- A schema with what it cannot check as the extension does ($vocabulary, a remote $ref, a
-- dynamic reference of another draft, the formats regex and idn-*, a pattern PostgreSQL's
-- regular expressions cannot run such as \p{…}, an unknown keyword, draft 4 or 6) is refused
-- at registration with 0A000 naming it, never silently accepted. A keyword of another draft
-- (dependentRequired in draft-07) is ignored, as the extension ignores it, with a WARNING.
-- Violations read as the extension edition's (the jsonschema crate's messages, values masked as
-- "value"), each with the JSON pointer of the offending field; tests/tests/json_schema.rs (random schemas and payloads) and
-- tests/tests/json_schema_suite.rs (the official JSON-Schema-Test-Suite) check that both
-- editions give the same verdicts. Numbers are compared exactly (numeric), where the Rust
-- validator uses floating point for multipleOf with fractions.

-- Each registered schema is also compiled to a function of its own (validator.sql), which calls
-- the functions below for what it does not write out.
--
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
language sql immutable parallel safe
as $$ select case when pointer = '/' then '' else pointer end || '/' || replace(replace(key, '~', '~0'), '/', '~1') $$;

create function cqrs_portable._json_type_matches(value jsonb, type_name text)
returns boolean
language sql immutable parallel safe
as $$
    select case type_name
        when 'integer' then jsonb_typeof(value) = 'number' and (value #>> '{}')::numeric = trunc((value #>> '{}')::numeric)
        when 'number' then jsonb_typeof(value) = 'number'
        else jsonb_typeof(value) = type_name
    end
$$;

-- The draft a schema is read by: its root's $schema (as the extension detects it: http or https,
-- with or without the trailing '#'), 2020-12 when it names none.
create function cqrs_portable._schema_draft(root jsonb)
returns text
language sql immutable parallel safe
as $$
    select case
        when jsonb_typeof(root) <> 'object' or not root ? '$schema' then '2020-12'
        when root ->> '$schema' ~ '^https?://json-schema\.org/draft-07/schema#?$' then '07'
        when root ->> '$schema' ~ '^https?://json-schema\.org/draft/2019-09/schema#?$' then '2019-09'
        when root ->> '$schema' ~ '^https?://json-schema\.org/(draft/2020-12/)?schema#?$' then '2020-12'
        else 'unknown'
    end
$$;

-- Whether draft `draft` has keyword `keyword`, for the keywords some drafts lack: a draft that
-- lacks one ignores it, in both editions (the extension's validator does so).
create function cqrs_portable._keyword_in_draft(keyword text, draft text)
returns boolean
language sql immutable parallel safe
as $$
    select case draft
        when '07' then keyword not in ('dependentRequired', 'dependentSchemas', 'minContains', 'maxContains',
                                       'unevaluatedProperties', 'unevaluatedItems', 'prefixItems')
        -- dependencies stays in 2019-09 and 2020-12 as the extension keeps it (for compatibility)
        else keyword <> 'prefixItems' or draft = '2020-12'
    end
$$;

-- A URI fragment with its %XX escapes decoded (UTF-8), as a $ref's JSON pointer needs.
create function cqrs_portable._percent_decode(value text)
returns text
language plpgsql immutable strict parallel safe
as $$
begin
    if strpos(value, '%') = 0 then
        return value;
    end if;
    return (select string_agg(case when m[1] is not null then convert_from(decode(replace(m[1], '%', ''), 'hex'), 'UTF8') else m[2] end,
                              '' order by n)
              from regexp_matches(value, '((?:%[0-9A-Fa-f]{2})+)|([^%]+|%)', 'g') with ordinality x(m, n));
end
$$;

-- RFC 1123 host names, as the extension reads them: ASCII letters, digits and hyphens, labels of
-- 1 to 63 that neither start nor end with a hyphen, at most 253 in all, no trailing dot; a label
-- with "--" in its third and fourth places must be an A-label ("xn--…": its shape is checked,
-- its Punycode is not decoded).
create function cqrs_portable._hostname_ok(value text)
returns boolean
language plpgsql immutable strict parallel safe
as $$
begin
    return octet_length(value) between 1 and 253
       and value ~ '^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$'
       -- "--" in a label's third and fourth places only after "xn"
       and value !~* '(^|\.)(?!xn)[^.]{2}--';
end
$$;

create function cqrs_portable._ipv4_ok(value text)
returns boolean
language sql immutable strict parallel safe
as $$ select value ~ '^(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}$' $$;

-- IPv6 as PostgreSQL's inet reads it (no prefix length, no zone).
create function cqrs_portable._ipv6_ok(value text)
returns boolean
language plpgsql immutable strict parallel safe
as $$
begin
    if value !~ '^[0-9A-Fa-f:.]{2,45}$' or strpos(value, ':') = 0 then
        return false;
    end if;
    return pg_catalog.family(value::inet) = 6;
exception when invalid_text_representation then
    return false;
end
$$;

-- RFC 3339 full-time: hh:mm:ss[.frac] and Z or an offset; a leap second only at 23:59:60 UTC.
create function cqrs_portable._time_ok(value text)
returns boolean
language plpgsql immutable strict parallel safe
as $$
declare
    v_parts text[] := regexp_match(value, '^([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]+)?([Zz]|([+-])([0-9]{2}):([0-9]{2}))$');
    v_utc integer;
begin
    if v_parts is null or v_parts[1]::integer > 23 or v_parts[2]::integer > 59 or v_parts[3]::integer > 60
       or coalesce(v_parts[7]::integer, 0) > 23 or coalesce(v_parts[8]::integer, 0) > 59 then
        return false;
    end if;
    if v_parts[3]::integer < 60 then
        return true;
    end if;
    v_utc := v_parts[1]::integer * 60 + v_parts[2]::integer
             - case v_parts[6] when '+' then 1 when '-' then -1 else 0 end
               * (coalesce(v_parts[7]::integer, 0) * 60 + coalesce(v_parts[8]::integer, 0));
    return ((v_utc % 1440) + 1440) % 1440 = 23 * 60 + 59;
end
$$;

create function cqrs_portable._date_ok(value text)
returns boolean
language plpgsql immutable strict parallel safe
as $$
declare
    v_parts text[] := regexp_match(value, '^([0-9]{4})-([0-9]{2})-([0-9]{2})$');
begin
    if v_parts is null or v_parts[2]::integer not between 1 and 12 or v_parts[3]::integer < 1 then
        return false;
    end if;
    -- the day exists in that month (leap years included)
    return v_parts[3]::integer <= extract(day from (make_date(greatest(v_parts[1]::integer, 1), v_parts[2]::integer, 1)
                                                    + interval '1 month - 1 day'))::integer;
end
$$;

-- An e-mail address as the extension reads one: a dot-atom or quoted local part of at most 64
-- bytes, ASCII; a host name or an address literal ([1.2.3.4], [IPv6:…]) of at most 254 bytes.
create function cqrs_portable._email_ok(value text)
returns boolean
language plpgsql immutable strict parallel safe
as $$
declare
    v_at integer := strpos(reverse(value), '@');
    v_local text;
    v_domain text;
begin
    if v_at = 0 then
        return false;
    end if;
    v_local := left(value, length(value) - v_at);
    v_domain := right(value, v_at - 1);
    if octet_length(v_local) not between 1 and 64 or octet_length(v_domain) not between 1 and 254 then
        return false;
    end if;
    if not (v_local ~ '^[A-Za-z0-9!#$%&''*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&''*+/=?^_`{|}~-]+)*$'
            or v_local ~ '^"([\x20\x21\x23-\x5B\x5D-\x7E]|\\[\x20-\x7E])*"$') then
        return false;
    end if;
    if v_domain ~* '^\[IPv6:.*\]$' then
        return cqrs_portable._ipv6_ok(substr(v_domain, 7, length(v_domain) - 7));
    elsif v_domain ~ '^\[.*\]$' then
        return cqrs_portable._ipv4_ok(substr(v_domain, 2, length(v_domain) - 2));
    end if;
    return cqrs_portable._hostname_ok(v_domain);
end
$$;

-- RFC 3986 URIs (`absolute`) and URI references as the extension reads them (scheme, authority
-- with a numeric port, path, query, fragment, each of its characters or %XX); IRIs (`iri`) take
-- any non-ASCII character too. An IP literal host ([…]) must be an IPv6 address or an IPvFuture.
create function cqrs_portable._uri_ok(value text, absolute boolean, iri boolean)
returns boolean
language plpgsql immutable strict parallel safe
as $$
declare
    v_other text := case when iri then '[^\x00-\x7F]|' else '' end;
    v_scheme text := substring(value from '^[A-Za-z][A-Za-z0-9+.-]*:');
    v_rest text := substr(value, coalesce(length(v_scheme), 0) + 1);
    v_authority text;
    v_host text;
    v_literal text[];
begin
    if absolute and v_scheme is null then
        return false;
    end if;
    if left(v_rest, 2) = '//' then
        v_literal := regexp_match(v_rest, '^//((?:' || v_other || '[A-Za-z0-9._~!$&''()*+,;=:-]|%[0-9A-Fa-f]{2})*@)?\[([^]]*)\](:[0-9]*)?');
        if v_literal is not null then
            -- an IP literal: IPv6 or IPvFuture
            if not (cqrs_portable._ipv6_ok(v_literal[2]) or v_literal[2] ~ '^[vV][0-9A-Fa-f]+\.[A-Za-z0-9._~!$&''()*+,;=:-]+$') then
                return false;
            end if;
            v_rest := substr(v_rest, 3 + coalesce(length(v_literal[1]), 0) + length(v_literal[2]) + 2 + coalesce(length(v_literal[3]), 0));
        else
            v_authority := substring(v_rest from '^//((?:' || v_other || '[A-Za-z0-9._~!$&''()*+,;=:@-]|%[0-9A-Fa-f]{2})*)');
            v_rest := substr(v_rest, 3 + length(v_authority));
            if left(v_rest, 1) in ('%', '[', ']') then
                return false;
            end if;
            -- [userinfo "@"] host [":" port]: the host holds no ':' or '@', the port digits only
            v_host := case when strpos(v_authority, '@') > 0 then substr(v_authority, strpos(v_authority, '@') + 1) else v_authority end;
            if v_host !~ '^[^:@]*(:[0-9]*)?$' then
                return false;
            end if;
        end if;
    elsif v_scheme is null and v_rest ~ '^[^:/?#]*:' then
        -- a first segment with a colon would read as a scheme
        return false;
    end if;
    return v_rest ~ ('^(?:' || v_other || '[A-Za-z0-9._~!$&''()*+,;=:@/-]|%[0-9A-Fa-f]{2})*'
                     || '(?:\?(?:' || v_other || '[A-Za-z0-9._~!$&''()*+,;=:@/?-]|%[0-9A-Fa-f]{2})*)?'
                     || '(?:#(?:' || v_other || '[A-Za-z0-9._~!$&''()*+,;=:@/?-]|%[0-9A-Fa-f]{2})*)?$');
end
$$;

-- RFC 6570 URI templates, as the extension reads them: literals (no controls, space, " < > \ ^ `
-- { | }, or %XX) and expressions {[operator]varname[:n|*],…}.
create function cqrs_portable._uri_template_ok(value text)
returns boolean
language sql immutable strict parallel safe
as $$
    select value ~ ('^(?:[^\x01-\x20"<>%\\^`{|}\x7F]|%[0-9A-Fa-f]{2}'
                    || '|\{[+#./;?&=,!@|]?(?:[A-Za-z0-9_]|%[0-9A-Fa-f]{2})+(?:\.(?:[A-Za-z0-9_]|%[0-9A-Fa-f]{2})+)*(?::[1-9][0-9]{0,3}|\*)?'
                    || '(?:,(?:[A-Za-z0-9_]|%[0-9A-Fa-f]{2})+(?:\.(?:[A-Za-z0-9_]|%[0-9A-Fa-f]{2})+)*(?::[1-9][0-9]{0,3}|\*)?)*\})*$')
$$;

-- Whether a string is of a format, as the extension of the same draft checks it; a format it
-- does not know is an annotation (true). The formats the portable edition cannot check are
-- refused at registration (cqrs_portable._check_schema_node).
create function cqrs_portable._format_matches(value text, format text, draft text)
returns boolean
language plpgsql immutable strict parallel safe
as $$
declare
    v_t integer;
begin
    case format
        when 'uuid' then
            return draft = '07' or value ~ '^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$';
        when 'email' then
            return cqrs_portable._email_ok(value);
        when 'hostname' then
            return cqrs_portable._hostname_ok(value);
        when 'ipv4' then
            return cqrs_portable._ipv4_ok(value);
        when 'ipv6' then
            return cqrs_portable._ipv6_ok(value);
        when 'date' then
            return cqrs_portable._date_ok(value);
        when 'time' then
            return cqrs_portable._time_ok(value);
        when 'date-time' then
            v_t := strpos(translate(value, 't', 'T'), 'T');
            return v_t = 11 and cqrs_portable._date_ok(left(value, 10)) and cqrs_portable._time_ok(substr(value, 12));
        when 'duration' then
            -- RFC 3339 appendix A: weeks stand alone; a T takes at least one time part
            return draft = '07'
                or (value ~ '^P(([0-9]+Y)?([0-9]+M)?([0-9]+D)?(T([0-9]+H)?([0-9]+M)?([0-9]+S)?)?|[0-9]+W)$'
                    and value !~ '^PT?$' and value !~ 'T$');
        when 'uri' then
            return cqrs_portable._uri_ok(value, true, false);
        when 'uri-reference' then
            return cqrs_portable._uri_ok(value, false, false);
        when 'iri' then
            return cqrs_portable._uri_ok(value, true, true);
        when 'iri-reference' then
            return cqrs_portable._uri_ok(value, false, true);
        when 'uri-template' then
            return cqrs_portable._uri_template_ok(value);
        when 'json-pointer' then
            return value ~ '^(/([^/~]|~[01])*)*$';
        when 'relative-json-pointer' then
            return value ~ '^(0|[1-9][0-9]*)(#|(/([^/~]|~[01])*)*)$';
        else
            return true;
    end case;
end
$$;

-- A pattern as PostgreSQL must run it to match as ECMA-262 (and the extension) do: \s and \S
-- cover Unicode's white space (PostgreSQL's \s is the locale's, often ASCII only). Other
-- patterns are returned as they are.
create function cqrs_portable._ecma_pattern(pattern text)
returns text
language plpgsql immutable strict parallel safe
as $$
begin
    if pattern !~ '\\[sS]' then
        return pattern;
    end if;
    return (select string_agg(case
                    when m[1] = '\s' then '[\s\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]'
                    when m[1] = '\S' then '[^\s\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]'
                    when m[2] is not null then replace(m[2], '\s', '\s\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff')
                    else coalesce(m[1], m[3]) end, '' order by n)
           from regexp_matches(pattern, '(\\.)|(\[\^?\]?(?:\\.|[^]\\])*\])|([^\\[]+|.)', 'g') with ordinality x(m, n));
end
$$;

-- Every violation of `schema` by `instance` as 'pointer: message', at most `max_errors` of them,
-- keyword by keyword in the schema's order: the keywords that apply subschemas
-- (cqrs_portable._schema_apply) and those that check the instance itself
-- (cqrs_portable._schema_assert). `root` resolves local $refs and names the draft; `depth`
-- bounds $ref recursion.
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
    -- draft-07 ignores the siblings of a $ref
    if schema ? '$ref' and cqrs_portable._schema_draft(root) = '07' then
        return cqrs_portable._schema_apply('$ref', schema -> '$ref', schema, instance, v_type, pointer, root, max_errors, depth);
    end if;
    if v_type = 'number' then
        v_number := (instance #>> '{}')::numeric;
    elsif v_type = 'string' then
        v_text := instance #>> '{}';
    end if;
    for v_keyword, v_arg in select e.key, e.value from jsonb_each(schema) e loop
        exit when cardinality(v_errors) >= max_errors;
        if v_keyword in ('dependentRequired', 'dependentSchemas', 'minContains', 'maxContains', 'unevaluatedProperties',
                         'unevaluatedItems', 'prefixItems', 'dependencies')
           and not cqrs_portable._keyword_in_draft(v_keyword, cqrs_portable._schema_draft(root)) then
            continue;
        end if;
        if v_keyword in ('properties', 'patternProperties', 'additionalProperties', 'prefixItems', 'items', 'additionalItems',
                         'allOf', 'anyOf', 'oneOf', 'not', '$ref', 'if', 'contains', 'dependentSchemas', 'dependencies',
                         'propertyNames', 'unevaluatedProperties', 'unevaluatedItems') then
            v_errors := v_errors || cqrs_portable._schema_apply(v_keyword, v_arg, schema, instance, v_type, pointer, root,
                                                                max_errors - cardinality(v_errors), depth);
        elsif v_keyword in ('minLength', 'maxLength', 'pattern', 'format', 'minimum', 'maximum', 'exclusiveMinimum', 'exclusiveMaximum', 'multipleOf') then
            v_errors := v_errors || cqrs_portable._schema_assert_scalar(v_keyword, v_arg, v_type, v_number, v_text, pointer,
                                                                        case when v_keyword = 'format' then cqrs_portable._schema_draft(root) end);
        else
            -- annotations, $defs / definitions (checked at registration), then / else (with if),
            -- minContains / maxContains (with contains) find nothing
            v_errors := v_errors || cqrs_portable._schema_assert(v_keyword, v_arg, instance, v_type, pointer);
        end if;
    end loop;
    return v_errors[1:max_errors];
end
$$;

-- The violations of one keyword that checks the instance itself (type, enum, const, required,
-- dependentRequired, the bounds of objects and arrays, uniqueItems; those of strings and numbers
-- in cqrs_portable._schema_assert_scalar); none for a keyword it does not know (annotations).
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
        -- every name present is the common case: one test, no query (for names without escapes
        -- or brackets, whose JSON array text reads as a PostgreSQL array once its brackets are
        -- braces)
        if v_type = 'object' and not (v_arg::text ~ '^\[[^][{}\\]*\]$' and instance ?& translate(v_arg::text, '[]', '{}')::text[]) then
            for v_key in select r from jsonb_array_elements_text(v_arg) r loop
                if not instance ? v_key then
                    v_errors := v_errors || format('%s: %s is a required property', pointer, to_jsonb(v_key)::text);
                end if;
            end loop;
        end if;
    when 'dependentRequired' then
        if v_type = 'object' then
            for v_key in select r from jsonb_each(v_arg) d, jsonb_array_elements_text(d.value) r
                          where instance ? d.key and not instance ? r loop
                v_errors := v_errors || format('%s: %s is a required property', pointer, to_jsonb(v_key)::text);
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
-- a number (minimum, maximum, exclusiveMinimum, exclusiveMaximum, multipleOf), if any; `draft`
-- is given for format (which formats a draft knows differs).
create function cqrs_portable._schema_assert_scalar(keyword text, arg jsonb, value_type text, number numeric,
                                                    string text, pointer text, draft text)
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
        if v_type = 'string' and v_text !~ cqrs_portable._ecma_pattern(v_arg #>> '{}') then
            v_errors := v_errors || format('%s: value does not match "%s"', pointer, v_arg #>> '{}');
        end if;
    when 'format' then
        if v_type = 'string' and not cqrs_portable._format_matches(v_text, v_arg #>> '{}', draft) then
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

-- The violations of one keyword that applies subschemas to an object's members (properties,
-- patternProperties, additionalProperties, dependentSchemas, dependencies, propertyNames,
-- unevaluatedProperties).
create function cqrs_portable._schema_apply_object(keyword text, arg jsonb, schema jsonb, instance jsonb, value_type text, pointer text,
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
                for v_text, v_target in select p.key, p.value from jsonb_each(v_arg) p where v_key ~ cqrs_portable._ecma_pattern(p.key) loop
                    v_errors := v_errors || cqrs_portable._schema_walk(v_target, v_value, cqrs_portable._pointer(pointer, v_key), root,
                                                               max_errors - cardinality(v_errors), depth);
                end loop;
            end loop;
        end if;
    when 'additionalProperties' then
        if v_type = 'object' then
            if schema ? 'patternProperties' then
                v_unexpected := array(
                    select e.key from jsonb_each(instance) e
                     where not coalesce(schema -> 'properties' ? e.key, false)
                       and not exists (select from jsonb_object_keys(schema -> 'patternProperties') p
                                        where e.key ~ cqrs_portable._ecma_pattern(p)));
            else
                v_unexpected := array(select k from jsonb_object_keys(instance) k where not coalesce(schema -> 'properties' ? k, false));
            end if;
            v_errors := v_errors || cqrs_portable._schema_unexpected('Additional properties', v_arg, v_unexpected, instance, pointer,
                                                                     root, max_errors, depth);
        end if;
    when 'dependentSchemas', 'dependencies' then
        if v_type = 'object' then
            for v_key, v_target in select d.key, d.value from jsonb_each(v_arg) d where instance ? d.key loop
                if jsonb_typeof(v_target) = 'array' then
                    -- draft-07's dependencies: a list of required properties
                    v_errors := v_errors || cqrs_portable._schema_assert('required', v_target, instance, v_type, pointer);
                else
                    v_errors := v_errors || cqrs_portable._schema_walk(v_target, instance, pointer, root, max_errors - cardinality(v_errors), depth);
                end if;
            end loop;
        end if;
    when 'propertyNames' then
        -- each name checked as a string; the message shows the name (not a value), as the
        -- extension's does
        if v_type = 'object' then
            for v_key in select k from jsonb_object_keys(instance) k loop
                foreach v_text in array cqrs_portable._schema_walk(v_arg, to_jsonb(v_key), pointer, root, max_errors - cardinality(v_errors), depth) loop
                    v_errors := v_errors || (pointer || ': ' || regexp_replace(substr(v_text, strpos(v_text, ': ') + 2), '\mvalue\M',
                                                                           replace(replace(to_jsonb(v_key)::text, '\', '\\'), '&', '\&')));
                end loop;
            end loop;
        end if;
    when 'unevaluatedProperties' then
        if v_type = 'object' then
            v_unexpected := array(
                select k from jsonb_object_keys(instance) k
                 where k <> all (cqrs_portable._schema_evaluated_properties(schema, instance, root, depth, true)));
            v_errors := v_errors || cqrs_portable._schema_unexpected('Unevaluated properties', v_arg, v_unexpected, instance, pointer,
                                                                     root, max_errors, depth);
        end if;
    end case;
    return v_errors;
end
$$;

-- The violations of one keyword that applies subschemas to an array's items (prefixItems, items,
-- additionalItems, contains, unevaluatedItems).
create function cqrs_portable._schema_apply_array(keyword text, arg jsonb, schema jsonb, instance jsonb, value_type text, pointer text,
                                                  root jsonb, max_errors integer, depth integer)
returns text[]
language plpgsql immutable parallel safe
as $$
declare
    v_errors text[] := '{}'::text[];
    v_arg jsonb := arg;
    v_type text := value_type;
    v_key text;
    v_unexpected text[];
    v_valid integer;
    v_start integer;
    v_min numeric;
    v_max numeric;
    v_draft text;
    v_indexes integer[];
begin
    case keyword
    when 'prefixItems' then
        if v_type = 'array' then
            for v_i in 0 .. least(jsonb_array_length(instance), jsonb_array_length(v_arg)) - 1 loop
                v_errors := v_errors || cqrs_portable._schema_walk(v_arg -> v_i, instance -> v_i, cqrs_portable._pointer(pointer, v_i::text), root,
                                                           max_errors - cardinality(v_errors), depth);
            end loop;
        end if;
    when 'items' then
        if v_type = 'array' then
            if jsonb_typeof(v_arg) = 'array' then
                -- draft-07 and 2019-09: one schema per position
                for v_i in 0 .. least(jsonb_array_length(instance), jsonb_array_length(v_arg)) - 1 loop
                    v_errors := v_errors || cqrs_portable._schema_walk(v_arg -> v_i, instance -> v_i, cqrs_portable._pointer(pointer, v_i::text), root,
                                                               max_errors - cardinality(v_errors), depth);
                end loop;
            else
                v_start := case when schema ? 'prefixItems' and cqrs_portable._schema_draft(root) = '2020-12'
                                then jsonb_array_length(schema -> 'prefixItems') else 0 end;
                for v_i in coalesce(v_start, 0) .. jsonb_array_length(instance) - 1 loop
                    v_errors := v_errors || cqrs_portable._schema_walk(v_arg, instance -> v_i, cqrs_portable._pointer(pointer, v_i::text), root,
                                                               max_errors - cardinality(v_errors), depth);
                end loop;
            end if;
        end if;
    when 'additionalItems' then
        -- only after an array of items (draft-07, 2019-09)
        if v_type = 'array' and jsonb_typeof(schema -> 'items') = 'array'
           and jsonb_array_length(instance) > jsonb_array_length(schema -> 'items') then
            v_start := jsonb_array_length(schema -> 'items');
            if v_arg = 'false'::jsonb then
                v_errors := v_errors || format('%s: Additional items are not allowed (%s item%s)', pointer,
                                               jsonb_array_length(instance) - v_start,
                                               case when jsonb_array_length(instance) - v_start = 1 then '' else 's' end);
            else
                for v_i in v_start .. jsonb_array_length(instance) - 1 loop
                    v_errors := v_errors || cqrs_portable._schema_walk(v_arg, instance -> v_i, cqrs_portable._pointer(pointer, v_i::text), root,
                                                               max_errors - cardinality(v_errors), depth);
                end loop;
            end if;
        end if;
    when 'contains' then
        if v_type = 'array' then
            v_draft := cqrs_portable._schema_draft(root);
            v_min := case when v_draft <> '07' and schema ? 'minContains' then (schema ->> 'minContains')::numeric else 1 end;
            v_max := case when v_draft <> '07' then (schema ->> 'maxContains')::numeric end;
            select count(*) into v_valid from jsonb_array_elements(instance) e
             where cardinality(cqrs_portable._schema_walk(v_arg, e, pointer, root, 1, depth)) = 0;
            if v_valid < v_min or v_valid > v_max then
                v_errors := v_errors || format('%s: None of value are valid under the given schema', pointer);
            end if;
        end if;
    when 'unevaluatedItems' then
        if v_type = 'array' then
            v_indexes := cqrs_portable._schema_evaluated_items(schema, instance, root, depth, true);
            v_unexpected := array(select i::text from generate_series(0, jsonb_array_length(instance) - 1) i
                                   where i <> all (v_indexes) order by i);
            if v_arg = 'false'::jsonb then
                if cardinality(v_unexpected) > 0 then
                    v_errors := v_errors || format('%s: Unevaluated items are not allowed (%s item%s)', pointer, cardinality(v_unexpected),
                                                   case when cardinality(v_unexpected) = 1 then '' else 's' end);
                end if;
            else
                foreach v_key in array v_unexpected loop
                    v_errors := v_errors || cqrs_portable._schema_walk(v_arg, instance -> v_key::integer, cqrs_portable._pointer(pointer, v_key), root,
                                                               max_errors - cardinality(v_errors), depth);
                end loop;
            end if;
        end if;
    end case;
    return v_errors;
end
$$;

-- The violations of one keyword that applies subschemas, at most `max_errors`: the in-place
-- applicators (allOf, anyOf, oneOf, not, if/then/else, $ref) here, those of objects in
-- cqrs_portable._schema_apply_object, those of arrays in cqrs_portable._schema_apply_array;
-- `schema` is the keyword's schema (several keywords look at their siblings).
create function cqrs_portable._schema_apply(keyword text, arg jsonb, schema jsonb, instance jsonb, value_type text, pointer text,
                                            root jsonb, max_errors integer, depth integer)
returns text[]
language plpgsql immutable parallel safe
as $$
declare
    v_errors text[] := '{}'::text[];
    v_arg jsonb := arg;
    v_type text := value_type;
    v_target jsonb;
    v_valid integer;
begin
    case keyword
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
    when 'if' then
        if cardinality(cqrs_portable._schema_walk(v_arg, instance, pointer, root, 1, depth)) = 0 then
            if schema ? 'then' then
                v_errors := v_errors || cqrs_portable._schema_walk(schema -> 'then', instance, pointer, root, max_errors, depth);
            end if;
        elsif schema ? 'else' then
            v_errors := v_errors || cqrs_portable._schema_walk(schema -> 'else', instance, pointer, root, max_errors, depth);
        end if;
    when '$ref' then
        v_target := cqrs_portable._schema_ref(root, v_arg #>> '{}');
        v_errors := v_errors || cqrs_portable._schema_walk(v_target, instance, pointer, root, max_errors - cardinality(v_errors), depth + 1);
    when 'properties', 'patternProperties', 'additionalProperties', 'dependentSchemas', 'dependencies', 'propertyNames',
         'unevaluatedProperties' then
        if v_type = 'object' then
            v_errors := cqrs_portable._schema_apply_object(keyword, arg, schema, instance, v_type, pointer, root, max_errors, depth);
        end if;
    when 'prefixItems', 'items', 'additionalItems', 'contains', 'unevaluatedItems' then
        if v_type = 'array' then
            v_errors := cqrs_portable._schema_apply_array(keyword, arg, schema, instance, v_type, pointer, root, max_errors, depth);
        end if;
    end case;
    return v_errors;
end
$$;

-- The violations of additionalProperties or unevaluatedProperties (`what`) over the members
-- `unexpected`: one listing them all for false, each member's against any other schema.
create function cqrs_portable._schema_unexpected(what text, arg jsonb, unexpected text[], instance jsonb, pointer text,
                                                 root jsonb, max_errors integer, depth integer)
returns text[]
language plpgsql immutable parallel safe
as $$
declare
    v_errors text[] := '{}'::text[];
    v_key text;
begin
    if arg = 'false'::jsonb then
        if cardinality(unexpected) > 0 then
            v_errors := v_errors || format('%s: %s are not allowed (%s %s unexpected)', pointer, what,
                (select string_agg('''' || u || '''', ', ' order by n) from unnest(unexpected) with ordinality x(u, n)),
                case when cardinality(unexpected) = 1 then 'was' else 'were' end);
        end if;
    else
        foreach v_key in array unexpected loop
            v_errors := v_errors || cqrs_portable._schema_walk(arg, instance -> v_key, cqrs_portable._pointer(pointer, v_key), root,
                                                       max_errors - cardinality(v_errors), depth);
        end loop;
    end if;
    return v_errors;
end
$$;

-- Whether `schema` holds for `instance` (for the annotations below: a subschema that fails
-- evaluates nothing).
create function cqrs_portable._schema_holds(schema jsonb, instance jsonb, root jsonb, depth integer)
returns boolean
language sql immutable parallel safe
as $$ select cardinality(cqrs_portable._schema_walk(schema, instance, '/', root, 1, depth)) = 0 $$;

-- The subschemas of `schema` that apply to the same instance and hold for it (allOf, anyOf,
-- oneOf, if/then/else, dependentSchemas, $ref), whose evaluated members count as the schema's.
create function cqrs_portable._schema_in_place(schema jsonb, instance jsonb, root jsonb, depth integer)
returns setof jsonb
language plpgsql immutable parallel safe
as $$
declare
    v_sub jsonb;
begin
    for v_sub in select s from jsonb_array_elements(coalesce(schema -> 'allOf', '[]') || coalesce(schema -> 'anyOf', '[]')
                                                     || coalesce(schema -> 'oneOf', '[]')) s loop
        if cqrs_portable._schema_holds(v_sub, instance, root, depth) then
            return next v_sub;
        end if;
    end loop;
    if schema ? 'if' then
        if cqrs_portable._schema_holds(schema -> 'if', instance, root, depth) then
            return next schema -> 'if';
            if schema ? 'then' and cqrs_portable._schema_holds(schema -> 'then', instance, root, depth) then
                return next schema -> 'then';
            end if;
        elsif schema ? 'else' and cqrs_portable._schema_holds(schema -> 'else', instance, root, depth) then
            return next schema -> 'else';
        end if;
    end if;
    if jsonb_typeof(instance) = 'object' then
        for v_sub in select d.value from jsonb_each(coalesce(schema -> 'dependentSchemas', '{}')) d where instance ? d.key loop
            if cqrs_portable._schema_holds(v_sub, instance, root, depth) then
                return next v_sub;
            end if;
        end loop;
    end if;
    if schema ? '$ref' then
        v_sub := cqrs_portable._schema_ref(root, schema ->> '$ref');
        if cqrs_portable._schema_holds(v_sub, instance, root, depth + 1) then
            return next v_sub;
        end if;
    end if;
end
$$;

-- The members of an object that `schema` evaluates (for unevaluatedProperties): those its
-- properties and patternProperties name, all of them under additionalProperties (or a nested
-- unevaluatedProperties; `at_top` is the schema that asks), and those of the subschemas applied in
-- place that hold.
create function cqrs_portable._schema_evaluated_properties(schema jsonb, instance jsonb, root jsonb, depth integer, at_top boolean)
returns text[]
language plpgsql immutable parallel safe
as $$
declare
    v_keys text[];
    v_sub jsonb;
begin
    if depth > 64 then
        raise exception using errcode = '54001', message = 'json_schema: $ref nests more than 64 levels deep';
    end if;
    if jsonb_typeof(schema) <> 'object' then
        return '{}'::text[];
    end if;
    if schema ? 'additionalProperties' or (not at_top and schema ? 'unevaluatedProperties') then
        return array(select jsonb_object_keys(instance));
    end if;
    v_keys := array(select k from jsonb_object_keys(instance) k
                     where coalesce(schema -> 'properties' ? k, false)
                        or exists (select from jsonb_object_keys(coalesce(schema -> 'patternProperties', '{}')) p where k ~ cqrs_portable._ecma_pattern(p)));
    for v_sub in select s from cqrs_portable._schema_in_place(schema, instance, root, depth) s loop
        v_keys := v_keys || cqrs_portable._schema_evaluated_properties(v_sub, instance, root, depth + 1, false);
    end loop;
    return v_keys;
end
$$;

-- The positions of an array that `schema` evaluates (for unevaluatedItems): prefixItems' and
-- items' (an array of items: its positions, and all of them under additionalItems), those
-- contains matches (2020-12), all under a nested unevaluatedItems, and those of the subschemas
-- applied in place that hold.
create function cqrs_portable._schema_evaluated_items(schema jsonb, instance jsonb, root jsonb, depth integer, at_top boolean)
returns integer[]
language plpgsql immutable parallel safe
as $$
declare
    v_length integer := jsonb_array_length(instance);
    v_indexes integer[] := '{}'::integer[];
    v_sub jsonb;
begin
    if depth > 64 then
        raise exception using errcode = '54001', message = 'json_schema: $ref nests more than 64 levels deep';
    end if;
    if jsonb_typeof(schema) <> 'object' then
        return v_indexes;
    end if;
    if (schema ? 'items' and jsonb_typeof(schema -> 'items') <> 'array')
       or (jsonb_typeof(schema -> 'items') = 'array' and schema ? 'additionalItems')
       or (not at_top and schema ? 'unevaluatedItems') then
        return array(select generate_series(0, v_length - 1));
    end if;
    v_indexes := array(select generate_series(0, least(v_length, greatest(coalesce(jsonb_array_length(case when cqrs_portable._schema_draft(root) = '2020-12'
                                                                                                            then schema -> 'prefixItems' end), 0),
                                                                           coalesce(jsonb_array_length(case when jsonb_typeof(schema -> 'items') = 'array'
                                                                                                            then schema -> 'items' end), 0))) - 1));
    if schema ? 'contains' and cqrs_portable._schema_draft(root) = '2020-12' then
        v_indexes := v_indexes || array(select (n - 1)::integer from jsonb_array_elements(instance) with ordinality e(v, n)
                                         where cqrs_portable._schema_holds(schema -> 'contains', e.v, root, depth));
    end if;
    for v_sub in select s from cqrs_portable._schema_in_place(schema, instance, root, depth) s loop
        v_indexes := v_indexes || cqrs_portable._schema_evaluated_items(v_sub, instance, root, depth + 1, false);
    end loop;
    return v_indexes;
end
$$;

-- The subschema of `schema` that declares anchor `name` ($anchor, $dynamicAnchor, or draft-07's
-- "$id": "#name"), looking only where subschemas are (not into enum, const, default, examples).
create function cqrs_portable._schema_anchor(schema jsonb, name text)
returns jsonb
language plpgsql immutable strict parallel safe
as $$
declare
    v_found jsonb;
    v_key text;
    v_value jsonb;
begin
    case jsonb_typeof(schema)
    when 'object' then
        if schema ->> '$anchor' = name or schema ->> '$dynamicAnchor' = name or schema ->> '$id' = '#' || name then
            return schema;
        end if;
        for v_key, v_value in select e.key, e.value from jsonb_each(schema) e
                               where e.key not in ('enum', 'const', 'default', 'examples') loop
            v_found := cqrs_portable._schema_anchor(v_value, name);
            if v_found is not null then
                return v_found;
            end if;
        end loop;
    when 'array' then
        for v_value in select e from jsonb_array_elements(schema) e loop
            v_found := cqrs_portable._schema_anchor(v_value, name);
            if v_found is not null then
                return v_found;
            end if;
        end loop;
    else
        null;
    end case;
    return null;
end
$$;

-- The schema a local $ref points at: "#", a JSON pointer ("#/$defs/x", escaped with ~0, ~1 and
-- %XX), an anchor ("#name": $anchor, or draft-07's "$id": "#name"), or the document's own $id
-- (with either). Anything else is another document: refused.
create function cqrs_portable._schema_ref(root jsonb, ref text)
returns jsonb
language plpgsql immutable strict parallel safe
as $$
declare
    v_hash integer := strpos(ref, '#');
    v_document text := case when v_hash = 0 then ref else left(ref, v_hash - 1) end;
    v_fragment text := case when v_hash = 0 then '' else substr(ref, v_hash + 1) end;
    v_path text[];
    v_target jsonb;
begin
    if v_document <> '' and v_document is distinct from rtrim(root ->> '$id', '#') then
        raise exception using errcode = '0A000',
            message = format('json_schema uses keyword $ref with %s, which the portable edition does not resolve (only references within the schema: #/$defs/…, #anchor, or its own $id)', to_jsonb(ref)::text),
            hint = 'Schemas must be self-contained: remote and file $refs are not resolved inside the database.';
    end if;
    if v_fragment = '' then
        return root;
    elsif left(v_fragment, 1) = '/' then
        v_path := cqrs_portable._fragment_path('#' || v_fragment);
        v_target := root #> v_path;
    else
        v_target := cqrs_portable._schema_anchor(root, v_fragment);
    end if;
    if v_target is null then
        raise exception using errcode = '22023', message = format('json_schema is not a valid JSON Schema: Pointer ''%s'' does not exist', '#' || v_fragment);
    end if;
    return v_target;
end
$$;

-- RFC 3986 reference resolution (section 5.2, with its remove_dot_segments): `ref` read against
-- `base`, as $id and $ref are. Scheme and host are compared as written (not case-folded).
create function cqrs_portable._uri_resolve(base text, ref text)
returns text
language plpgsql immutable strict parallel safe
as $$
declare
    -- scheme, authority, path, query, fragment (RFC 3986 appendix B); null where absent
    b text[] := regexp_match(base, '^(?:([^:/?#]+):)?(?://([^/?#]*))?([^?#]*)(?:\?([^#]*))?(?:#(.*))?$');
    r text[] := regexp_match(ref, '^(?:([^:/?#]+):)?(?://([^/?#]*))?([^?#]*)(?:\?([^#]*))?(?:#(.*))?$');
    v_scheme text := b[1];
    v_authority text := b[2];
    v_path text;
    v_query text;
    v_segment text;
    v_out text[] := '{}'::text[];
    v_parts text[];
    v_index integer := 0;
begin
    if r[1] is not null then
        v_scheme := r[1];
        v_authority := r[2];
        v_path := r[3];
        v_query := r[4];
    elsif r[2] is not null then
        v_authority := r[2];
        v_path := r[3];
        v_query := r[4];
    elsif r[3] = '' then
        v_path := b[3];
        v_query := coalesce(r[4], b[4]);
    elsif left(r[3], 1) = '/' then
        v_path := r[3];
        v_query := r[4];
    else
        -- merge: the base's path up to its last '/', or '/' under an authority with no path
        v_path := case when b[2] is not null and b[3] = '' then '/' || r[3]
                       else substring(b[3] from '^(.*/)') || r[3] end;
        v_path := coalesce(v_path, r[3]);
        v_query := r[4];
    end if;
    -- remove_dot_segments: '.' goes, '..' takes the segment before it along
    v_parts := string_to_array(case when left(v_path, 1) = '/' then substr(v_path, 2) else v_path end, '/');
    foreach v_segment in array coalesce(v_parts, '{}') loop
        v_index := v_index + 1;
        if v_segment = '.' then
            null;
        elsif v_segment = '..' then
            v_out := v_out[1:cardinality(v_out) - 1];
        else
            v_out := v_out || v_segment;
            continue;
        end if;
        if v_index = cardinality(v_parts) then
            v_out := v_out || ''::text;
        end if;
    end loop;
    v_path := case when left(v_path, 1) = '/' then '/' else '' end || array_to_string(v_out, '/');
    return coalesce(v_scheme || ':', '') || coalesce('//' || v_authority, '') || v_path
        || coalesce('?' || v_query, '') || coalesce('#' || r[5], '');
end
$$;

-- The subschemas directly under schema `node`: each with the steps from `node` to it (one or
-- two keys: "not", "allOf"/"0", "properties"/"name"). Only the values of applicator keywords —
-- never enum, const, default or examples, nor a property that merely is called "$id" or "$ref".
create function cqrs_portable._schema_children(node jsonb)
returns table (step text[], child jsonb)
language sql immutable strict parallel safe
as $$
    select array[e.key], e.value
      from jsonb_each(case when jsonb_typeof(node) = 'object' then node else '{}' end) e
     where e.key in ('additionalProperties', 'additionalItems', 'contains', 'propertyNames', 'not', 'if', 'then', 'else',
                     'unevaluatedProperties', 'unevaluatedItems', 'contentSchema')
        or (e.key = 'items' and jsonb_typeof(e.value) <> 'array')
    union all
    select array[e.key, (a.n - 1)::text], a.s
      from jsonb_each(case when jsonb_typeof(node) = 'object' then node else '{}' end) e,
           jsonb_array_elements(e.value) with ordinality a(s, n)
     where e.key in ('allOf', 'anyOf', 'oneOf', 'prefixItems', 'items') and jsonb_typeof(e.value) = 'array'
    union all
    select array[e.key, m.key], m.value
      from jsonb_each(case when jsonb_typeof(node) = 'object' then node else '{}' end) e,
           jsonb_each(e.value) m
     where e.key in ('properties', 'patternProperties', '$defs', 'definitions', 'dependentSchemas', 'dependencies')
       and jsonb_typeof(e.value) = 'object'
$$;

-- The schema positions under `node` (a schema at `path`, read against base URI `base`) that
-- references need: each schema resource (kind 'resource', name its absolute URI without
-- fragment), each anchor (kind 'anchor', name URI#anchor: $anchor, $dynamicAnchor, draft-07's
-- "$id": "#name"), each $ref (kind 'ref', name the absolute URI it asks for), each $dynamicRef
-- of 2020-12 and $recursiveRef of 2019-09 (kind 'dynamic', the same) and each anchor a dynamic
-- reference may land on (kind 'dynamic anchor', name the $dynamicAnchor, or '' for a
-- $recursiveAnchor that is true).
create function cqrs_portable._schema_locations(node jsonb, path text[], base text, draft text)
returns table (kind text, name text, location text[])
language plpgsql immutable strict parallel safe
as $$
declare
    v_id text;
    v_step text[];
    v_child jsonb;
begin
    if jsonb_typeof(node) <> 'object' then
        return;
    end if;
    -- draft-07 ignores every sibling of a $ref, its $id too (the suite's "$ref prevents a
    -- sibling $id from changing the base uri")
    if jsonb_typeof(node -> '$id') = 'string' and not (draft = '07' and node ? '$ref') then
        v_id := cqrs_portable._uri_resolve(base, node ->> '$id');
        if strpos(v_id, '#') > 0 and split_part(v_id, '#', 2) <> '' then
            -- "$id": "#name" (or "…#name" before 2019-09): an anchor in the resource it names
            return query select 'anchor', v_id, path;
        else
            v_id := split_part(v_id, '#', 1);
            base := v_id;
            return query select 'resource', v_id, path;
        end if;
    end if;
    if jsonb_typeof(node -> '$anchor') = 'string' then
        return query select 'anchor', split_part(base, '#', 1) || '#' || (node ->> '$anchor'), path;
    end if;
    if jsonb_typeof(node -> '$dynamicAnchor') = 'string' then
        return query select 'anchor', split_part(base, '#', 1) || '#' || (node ->> '$dynamicAnchor'), path;
        if draft = '2020-12' then
            return query select 'dynamic anchor', node ->> '$dynamicAnchor', path;
        end if;
    end if;
    if draft = '2019-09' and node -> '$recursiveAnchor' = 'true'::jsonb then
        return query select 'dynamic anchor', '', path;
    end if;
    if jsonb_typeof(node -> '$ref') = 'string' then
        return query select 'ref', cqrs_portable._uri_resolve(base, node ->> '$ref'), path;
    end if;
    if draft = '2020-12' and jsonb_typeof(node -> '$dynamicRef') = 'string' then
        return query select 'dynamic', cqrs_portable._uri_resolve(base, node ->> '$dynamicRef'), path;
    end if;
    if draft = '2019-09' and jsonb_typeof(node -> '$recursiveRef') = 'string' then
        return query select 'dynamic', cqrs_portable._uri_resolve(base, node ->> '$recursiveRef'), path;
    end if;
    for v_step, v_child in select c.step, c.child from cqrs_portable._schema_children(node) c loop
        return query select * from cqrs_portable._schema_locations(v_child, path || v_step, base, draft);
    end loop;
end
$$;

-- A JSON pointer to `path` as a URI fragment, as cqrs_portable._schema_ref reads it (~0, ~1,
-- and %25 for '%').
create function cqrs_portable._pointer_fragment(path text[])
returns text
language sql immutable strict parallel safe
as $$
    select '#' || coalesce(string_agg('/' || replace(replace(replace(p, '~', '~0'), '/', '~1'), '%', '%25'), '' order by n), '')
      from unnest(path) with ordinality x(p, n)
$$;

-- The path a JSON-pointer fragment ("#/$defs/a~1b") names: ~0, ~1 and %XX decoded.
create function cqrs_portable._fragment_path(fragment text)
returns text[]
language sql immutable strict parallel safe
as $$
    select coalesce(array_agg(replace(replace(cqrs_portable._percent_decode(p), '~1', '/'), '~0', '~') order by n), '{}')
      from unnest(string_to_array(nullif(substr(fragment, 3), ''), '/')) with ordinality x(p, n)
     where fragment <> '#'
$$;

-- `root` with every reference made a JSON pointer from the root ("#/$defs/…"), for a schema that
-- embeds schema resources of its own ($id below the root) or has dynamic references: the $refs
-- of an embedded resource are read against its own base URI ("$ref": "item.json", "#/$defs/x"
-- within the resource, its anchors), which the validator, reading every $ref against the root,
-- would not do; dynamic references are then unfolded (cqrs_portable._schema_dynamic). Any other
-- schema is returned as it is. A reference to a document the schema does not hold is refused
-- (0A000).
create function cqrs_portable._schema_localized(root jsonb)
returns jsonb
language plpgsql immutable strict parallel safe
as $$
declare
    -- the base of a root without $id (the extension's validator names it so too)
    c_base constant text := 'json-schema:///';
    v_draft text := cqrs_portable._schema_draft(root);
    v_resources jsonb;
    v_anchors jsonb;
    v_refs jsonb;
    v_dynamic jsonb;
    v_ref jsonb;
    v_name text;
    v_hash integer;
    v_fragment text;
    v_target jsonb;
    v_path text[];
    v_at text[];
    v_landing jsonb;
    v_out jsonb := root;
begin
    if not exists (select from pg_catalog.jsonb_path_query(root, 'strict $.*.**."$id" ? (@.type() == "string" && !(@ starts with "#"))', '{}', true))
       and not (v_draft = '2020-12' and exists (select from pg_catalog.jsonb_path_query(root, 'strict $.**."$dynamicRef"', '{}', true)))
       and not (v_draft = '2019-09' and exists (select from pg_catalog.jsonb_path_query(root, 'strict $.**."$recursiveRef"', '{}', true))) then
        return root;
    end if;
    select coalesce(jsonb_object_agg(l.name, to_jsonb(l.location)) filter (where l.kind = 'resource'), '{}'),
           coalesce(jsonb_object_agg(l.name, to_jsonb(l.location)) filter (where l.kind = 'anchor'), '{}'),
           coalesce(jsonb_agg(jsonb_build_array(l.name, to_jsonb(l.location), l.kind)) filter (where l.kind in ('ref', 'dynamic')), '[]'),
           coalesce(jsonb_agg(jsonb_build_array(l.name, to_jsonb(l.location))) filter (where l.kind = 'dynamic anchor'), '[]')
      into v_resources, v_anchors, v_refs, v_dynamic
      from cqrs_portable._schema_locations(root, '{}', c_base, v_draft) l;
    if jsonb_typeof(root -> '$id') is distinct from 'string' then
        v_resources := jsonb_build_object(c_base, '[]'::jsonb) || v_resources;
    end if;
    for v_ref in select e from jsonb_array_elements(v_refs) e loop
        v_name := v_ref ->> 0;
        v_hash := strpos(v_name, '#');
        v_fragment := case when v_hash = 0 then '' else substr(v_name, v_hash + 1) end;
        v_target := v_resources -> (case when v_hash = 0 then v_name else left(v_name, v_hash - 1) end);
        if v_target is null then
            raise exception using errcode = '0A000',
                message = format('json_schema uses keyword $ref with %s, which the portable edition does not resolve (only references within the schema: #/$defs/…, #anchor, or an $id of the schema)', to_jsonb(v_name)::text),
                hint = 'Schemas must be self-contained: remote and file $refs are not resolved inside the database.';
        end if;
        if v_fragment = '' then
            null;
        elsif left(v_fragment, 1) = '/' then
            v_target := v_target || to_jsonb(cqrs_portable._fragment_path('#' || v_fragment));
        else
            v_target := v_anchors -> (left(v_name, v_hash - 1) || '#' || v_fragment);
        end if;
        v_path := array(select jsonb_array_elements_text(v_target));
        if v_target is null or root #> v_path is null then
            raise exception using errcode = '22023', message = format('json_schema is not a valid JSON Schema: Pointer ''%s'' does not exist', '#' || v_fragment);
        end if;
        v_at := array(select jsonb_array_elements_text(v_ref -> 1));
        if v_ref ->> 2 = 'ref' then
            v_out := jsonb_set(v_out, v_at || '$ref'::text, to_jsonb(cqrs_portable._pointer_fragment(v_path)));
        else
            -- a dynamic reference, first resolved as a $ref is; it stays dynamic only where it
            -- lands on the anchor it names (the "bookend": a $dynamicAnchor of that name, or a
            -- $recursiveAnchor that is true) — otherwise it is a $ref
            v_landing := root #> v_path;
            v_landing := ((v_out #> v_at) - '$recursiveRef') || jsonb_build_object(
                '$dynamicRef', cqrs_portable._pointer_fragment(v_path),
                'pg_cqrs:anchor', case
                    when v_draft = '2019-09' and v_landing -> '$recursiveAnchor' = 'true'::jsonb then ''
                    when v_draft = '2020-12' and v_fragment !~ '^/' and v_fragment <> '' and v_landing ->> '$dynamicAnchor' = v_fragment then v_fragment
                end);
            v_out := case when cardinality(v_at) = 0 then v_landing else jsonb_set(v_out, v_at, v_landing) end;
        end if;
    end loop;
    if exists (select from jsonb_array_elements(v_refs) e where e ->> 2 = 'dynamic') then
        v_out := cqrs_portable._schema_dynamic(v_out, v_resources, v_dynamic);
    end if;
    return v_out;
end
$$;

-- The resource (the path of its root) that holds the schema at `path`: the deepest of
-- `resources` (paths) above it.
create function cqrs_portable._schema_resource_of(resources jsonb, path text[])
returns text[]
language sql immutable strict parallel safe
as $$
    select coalesce((select r.p from (select array(select jsonb_array_elements_text(e)) as p from jsonb_array_elements(resources) e) r
                      where path[1:cardinality(r.p)] = r.p or cardinality(r.p) = 0
                      order by cardinality(r.p) desc limit 1), '{}')
$$;

-- `root` (its references JSON pointers, cqrs_portable._schema_localized) with its dynamic
-- references unfolded into plain $refs. A $dynamicRef (or $recursiveRef) that lands on the anchor
-- it names goes to the outermost schema resource in the dynamic scope — the resources entered on
-- the way from the root, through $refs and nested $ids — that has a dynamic anchor of that name.
-- The scope at a schema is known from the path evaluation took to it, so each schema reached
-- with a different set of such anchors in scope is copied, under the root's "pg_cqrs:dynamic"
-- (which validation ignores), with its references pointing at the copies for that scope.
-- `resources` maps each resource's URI to its path; `anchors` lists [name, path] of every
-- dynamic anchor.
create function cqrs_portable._schema_dynamic(root jsonb, resources jsonb, anchors jsonb)
returns jsonb
language plpgsql immutable strict parallel safe
as $$
declare
    v_paths jsonb := (select jsonb_agg(distinct e.value) from jsonb_each(resources) e);
    v_bindings jsonb := '{}'::jsonb;
    v_anchor jsonb;
    v_resource text;
    v_scope jsonb;
    v_state jsonb;
    v_result jsonb;
begin
    -- each resource's dynamic anchors, by the pointer of the resource: {name: pointer}
    for v_anchor in select e from jsonb_array_elements(anchors) e loop
        v_resource := cqrs_portable._pointer_fragment(cqrs_portable._schema_resource_of(v_paths, array(select jsonb_array_elements_text(v_anchor -> 1))));
        v_bindings := v_bindings || jsonb_build_object(v_resource, coalesce(v_bindings -> v_resource, '{}')
                                                                   || jsonb_build_object(v_anchor ->> 0, cqrs_portable._pointer_fragment(array(select jsonb_array_elements_text(v_anchor -> 1)))));
    end loop;
    v_scope := coalesce(v_bindings -> '#', '{}');
    v_state := jsonb_build_object('memo', jsonb_build_object('# ' || v_scope::text, '#'), 'copies', '[]'::jsonb,
                                  'root', root, 'resources', v_paths, 'bindings', v_bindings);
    select s.state, s.result into v_state, v_result from cqrs_portable._schema_unfold(root, '{}', v_scope, v_state) s;
    return v_result || jsonb_build_object('pg_cqrs:dynamic', v_state -> 'copies');
end
$$;

-- Schema `node` at `path`, evaluated with `scope` ({anchor name: pointer}, the outermost
-- binding of each dynamic anchor so far), its references pointing at the copies for their scope
-- (cqrs_portable._schema_dynamic; `state` carries the copies made so far).
create function cqrs_portable._schema_unfold(node jsonb, path text[], scope jsonb, inout state jsonb, out result jsonb)
language plpgsql immutable strict parallel safe
as $$
declare
    v_step text[];
    v_child jsonb;
    v_target text[];
    v_pointer text;
begin
    result := node;
    if jsonb_typeof(node) <> 'object' then
        return;
    end if;
    -- entering a nested resource adds its anchors, where the scope has none of that name yet
    if exists (select from jsonb_array_elements(state -> 'resources') r where r = to_jsonb(path)) then
        scope := coalesce(state -> 'bindings' -> cqrs_portable._pointer_fragment(path), '{}') || scope;
    end if;
    for v_step, v_child in select c.step, c.child from cqrs_portable._schema_children(node) c loop
        select u.state, u.result into state, v_child from cqrs_portable._schema_unfold(v_child, path || v_step, scope, state) u;
        result := jsonb_set(result, v_step, v_child);
    end loop;
    if jsonb_typeof(node -> '$ref') = 'string' then
        select c.state, c.pointer into state, v_pointer
          from cqrs_portable._schema_copy(cqrs_portable._fragment_path(node ->> '$ref'), scope, state) c;
        result := jsonb_set(result, '{$ref}', to_jsonb(v_pointer));
    end if;
    if jsonb_typeof(node -> '$dynamicRef') = 'string' then
        v_target := cqrs_portable._fragment_path(coalesce(scope ->> (node ->> 'pg_cqrs:anchor'), node ->> '$dynamicRef'));
        select c.state, c.pointer into state, v_pointer from cqrs_portable._schema_copy(v_target, scope, state) c;
        result := result - '$dynamicRef' - 'pg_cqrs:anchor';
        if result ? '$ref' then
            -- beside a $ref: both apply in place, as allOf's members do
            result := jsonb_set(result, '{allOf}', coalesce(result -> 'allOf', '[]') || jsonb_build_array(jsonb_build_object('$ref', v_pointer)));
        else
            result := result || jsonb_build_object('$ref', v_pointer);
        end if;
    end if;
end
$$;

-- The pointer of the copy of the schema at `target` for `scope` entered through a reference
-- (adding the anchors of the resource that holds it), made if there is none yet.
create function cqrs_portable._schema_copy(target text[], scope jsonb, inout state jsonb, out pointer text)
language plpgsql immutable strict parallel safe
as $$
declare
    v_key text;
    v_index integer;
    v_copy jsonb;
begin
    scope := coalesce(state -> 'bindings' -> cqrs_portable._pointer_fragment(cqrs_portable._schema_resource_of(state -> 'resources', target)), '{}')
             || scope;
    v_key := cqrs_portable._pointer_fragment(target) || ' ' || scope::text;
    pointer := state -> 'memo' ->> v_key;
    if pointer is not null then
        return;
    end if;
    v_index := jsonb_array_length(state -> 'copies');
    if v_index >= 256 then
        raise exception using errcode = '0A000',
            message = 'json_schema: its dynamic references unfold into more than 256 scopes, more than the portable edition checks';
    end if;
    pointer := '#/pg_cqrs:dynamic/' || v_index;
    state := jsonb_set(jsonb_set(state, '{memo}', (state -> 'memo') || jsonb_build_object(v_key, pointer)),
                       '{copies}', (state -> 'copies') || 'null'::jsonb);
    select u.state, u.result into state, v_copy from cqrs_portable._schema_unfold(state -> 'root' #> target, target, scope, state) u;
    state := jsonb_set(state, array['copies', v_index::text], v_copy);
end
$$;

-- The violations of a payload, up to `max_errors`, as 'pointer: message'.
create function cqrs_portable._schema_violations(schema jsonb, instance jsonb, max_errors integer)
returns text[]
language sql immutable parallel safe
as $$ select cqrs_portable._schema_walk(l.root, instance, '/', l.root, max_errors, 0)
        from (select cqrs_portable._schema_localized(schema) as root) l $$;

-- Refuses a keyword whose argument is a value, not a subschema (type, the bounds, uniqueItems,
-- pattern, format, $ref) when it is malformed (22023) or cannot be checked as the extension
-- checks it (0A000).
create function cqrs_portable._check_schema_value(keyword text, arg jsonb, at text)
returns void
language plpgsql immutable parallel safe
as $$
declare
    v_keyword text := keyword;
    v_arg jsonb := arg;
    v_item jsonb;
begin
    case v_keyword
    when 'type' then
        for v_item in select t from jsonb_array_elements(case when jsonb_typeof(v_arg) = 'array' then v_arg
                                                              else jsonb_build_array(v_arg) end) t loop
            if v_item #>> '{}' is null or v_item #>> '{}' not in ('null', 'boolean', 'object', 'array', 'number', 'integer', 'string') then
                raise exception using errcode = '22023',
                    message = format('json_schema is not a valid JSON Schema: %s is not a type (at %s)', cqrs_portable._compact_json(v_item), cqrs_portable._pointer(at, 'type'));
            end if;
        end loop;
    when 'minItems', 'maxItems', 'minLength', 'maxLength', 'minProperties', 'maxProperties', 'minContains', 'maxContains' then
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
        if jsonb_typeof(v_arg) <> 'string' then
            raise exception using errcode = '22023',
                message = format('json_schema is not a valid JSON Schema: pattern must be a string (at %s)', cqrs_portable._pointer(at, v_keyword));
        end if;
        perform cqrs_portable._check_pattern(v_arg #>> '{}', cqrs_portable._pointer(at, v_keyword));
    when 'format' then
        -- a format the extension enforces must be enforced here too, or refused; any other
        -- (a format of your own, "isbn") is an annotation in both editions, as the JSON Schema
        -- specification says, and checked by neither
        if v_arg #>> '{}' in ('idn-email', 'idn-hostname', 'regex') then
            raise exception using errcode = '0A000',
                message = format('json_schema uses format %s, which the portable edition does not check', v_arg::text),
                hint = 'The portable edition checks date-time, date, time, duration, email, hostname, ipv4, ipv6, uri, uri-reference, iri, iri-reference, uri-template, uuid, json-pointer and relative-json-pointer; use "pattern" for the others.';
        end if;
    when '$ref', '$dynamicRef', '$recursiveRef' then
        if jsonb_typeof(v_arg) <> 'string' then
            raise exception using errcode = '22023',
                message = format('json_schema is not a valid JSON Schema: %s must be a string (at %s)', v_keyword, cqrs_portable._pointer(at, v_keyword));
        end if;
    else
        null;
    end case;
end
$$;

-- Refuses what the portable validator cannot check: a keyword (or format, or draft, or pattern)
-- it cannot check as the extension does is 0A000 naming it; a malformed one is 22023. `draft` is
-- the root's (cqrs_portable._schema_draft): some keywords belong to some drafts only.
create function cqrs_portable._check_schema_node(schema jsonb, at text, draft text)
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
        -- keywords of some drafts only: the other drafts ignore them, in both editions; said
        -- aloud, since whoever wrote one meant it to be checked
        if not cqrs_portable._keyword_in_draft(v_keyword, draft) then
            raise warning '%', format('json_schema: keyword %s (at %s) is not part of draft %s and is not checked, in either edition',
                                      cqrs_portable._quoted(v_keyword), at, draft)
                using hint = 'Declare the draft that has it in "$schema", or use the keyword of this draft.';
            continue;
        end if;
        case v_keyword
        when '$schema' then
            -- the root's is read by cqrs._check_json_schema; a subschema may only repeat it
            null;
        when '$id', '$comment', 'title', 'description', 'default', 'examples', 'deprecated', 'readOnly', 'writeOnly', '$anchor',
             '$dynamicAnchor', '$recursiveAnchor', 'contentMediaType', 'contentEncoding' then
            -- annotations (content* too: an annotation from 2019-09 on; in draft-07 refused below)
            if draft = '07' and v_keyword in ('contentMediaType', 'contentEncoding') then
                raise exception using errcode = '0A000',
                    message = format('json_schema uses keyword %s, which the portable edition does not check in draft-07', cqrs_portable._quoted(v_keyword));
            end if;
        when 'enum', 'required', 'prefixItems', 'allOf', 'anyOf', 'oneOf' then
            if jsonb_typeof(v_arg) <> 'array' then
                raise exception using errcode = '22023',
                    message = format('json_schema is not a valid JSON Schema: %s must be an array (at %s)', v_keyword, cqrs_portable._pointer(at, v_keyword));
            end if;
            if v_keyword in ('prefixItems', 'allOf', 'anyOf', 'oneOf') then
                for v_item, v_index in select s, n - 1 from jsonb_array_elements(v_arg) with ordinality x(s, n) loop
                    perform cqrs_portable._check_schema_node(v_item, cqrs_portable._pointer(cqrs_portable._pointer(at, v_keyword), v_index::text), draft);
                end loop;
            end if;
        when 'const' then
            null;
        when 'properties', 'patternProperties', '$defs', 'definitions', 'dependentSchemas', 'dependencies', 'dependentRequired' then
            if jsonb_typeof(v_arg) <> 'object' then
                raise exception using errcode = '22023',
                    message = format('json_schema is not a valid JSON Schema: %s must be an object (at %s)', v_keyword, cqrs_portable._pointer(at, v_keyword));
            end if;
            for v_name, v_item in select e.key, e.value from jsonb_each(v_arg) e loop
                if v_keyword = 'dependentRequired' or (v_keyword = 'dependencies' and jsonb_typeof(v_item) = 'array') then
                    if jsonb_typeof(v_item) <> 'array' or exists (select from jsonb_array_elements(v_item) r where jsonb_typeof(r) <> 'string') then
                        raise exception using errcode = '22023',
                            message = format('json_schema is not a valid JSON Schema: %s must list property names (at %s)', v_keyword,
                                             cqrs_portable._pointer(cqrs_portable._pointer(at, v_keyword), v_name));
                    end if;
                else
                    perform cqrs_portable._check_schema_node(v_item, cqrs_portable._pointer(cqrs_portable._pointer(at, v_keyword), v_name), draft);
                end if;
            end loop;
            if v_keyword = 'patternProperties' then
                perform cqrs_portable._check_pattern(p, cqrs_portable._pointer(at, v_keyword)) from jsonb_object_keys(v_arg) p;
            end if;
        when 'items' then
            if jsonb_typeof(v_arg) = 'array' then
                if draft = '2020-12' then
                    raise exception using errcode = '22023',
                        message = format('json_schema is not a valid JSON Schema: items must be a schema in draft 2020-12; use prefixItems for one schema per position (at %s)',
                                         cqrs_portable._pointer(at, v_keyword));
                end if;
                for v_item, v_index in select s, n - 1 from jsonb_array_elements(v_arg) with ordinality x(s, n) loop
                    perform cqrs_portable._check_schema_node(v_item, cqrs_portable._pointer(cqrs_portable._pointer(at, v_keyword), v_index::text), draft);
                end loop;
            else
                perform cqrs_portable._check_schema_node(v_arg, cqrs_portable._pointer(at, v_keyword), draft);
            end if;
        when 'additionalProperties', 'additionalItems', 'not', 'if', 'then', 'else', 'contains', 'propertyNames',
             'unevaluatedProperties', 'unevaluatedItems', 'contentSchema' then
            perform cqrs_portable._check_schema_node(v_arg, cqrs_portable._pointer(at, v_keyword), draft);
        when 'type', 'minItems', 'maxItems', 'minLength', 'maxLength', 'minProperties', 'maxProperties',
             'minContains', 'maxContains', 'minimum', 'maximum', 'exclusiveMinimum', 'exclusiveMaximum', 'multipleOf',
             'uniqueItems', 'pattern', 'format', '$ref', '$dynamicRef', '$recursiveRef' then
            perform cqrs_portable._check_schema_value(v_keyword, v_arg, at);
        else
            raise exception using errcode = '0A000',
                message = format('json_schema uses keyword %s, which the portable edition does not support', cqrs_portable._quoted(v_keyword)),
                hint = 'The portable edition validates drafts 2020-12, 2019-09 and 07 without $vocabulary (see the README); the extension edition validates all of them.';
        end case;
    end loop;
end
$$;

-- Refuses a pattern PostgreSQL's regular expressions cannot run as the extension runs it:
-- Unicode property classes (\p{…}) with 0A000 naming them, any other the engine rejects with
-- 0A000 and its reason (never a raw 2201B).
create function cqrs_portable._check_pattern(pattern text, at text)
returns void
language plpgsql immutable parallel safe
as $$
declare
    v_reason text;
begin
    if pattern ~ '\\[pP]\{?' then
        raise exception using errcode = '0A000',
            message = format('json_schema uses pattern %s with a Unicode property class (\p{…}), which the portable edition cannot run (at %s)', to_jsonb(pattern)::text, at),
            hint = 'Write the class out as a character range, or use the extension edition.';
    end if;
    perform '' ~ cqrs_portable._ecma_pattern(pattern);
exception when invalid_regular_expression then
    get stacked diagnostics v_reason = message_text;
    raise exception using errcode = '0A000',
        message = format('json_schema uses pattern %s, which PostgreSQL''s regular expressions cannot run (%s) (at %s)', to_jsonb(pattern)::text, v_reason, at);
end
$$;

create function cqrs._check_json_schema(json_schema jsonb)
returns void
language plpgsql immutable strict parallel safe
as $$
declare
    v_draft text := cqrs_portable._schema_draft(json_schema);
    v_ref text;
    v_local jsonb;
begin
    if v_draft = 'unknown' or exists (select from pg_catalog.jsonb_path_query(json_schema, 'strict $.**."$schema"', '{}', true) d
                                       where d <> json_schema -> '$schema') then
        raise exception using errcode = '0A000',
            message = format('json_schema uses $schema %s; the portable edition validates drafts 2020-12, 2019-09 and 07 (one per schema)',
                             coalesce((json_schema -> '$schema')::text, 'of a subschema')),
            hint = 'Declare one of https://json-schema.org/draft/2020-12/schema, https://json-schema.org/draft/2019-09/schema or http://json-schema.org/draft-07/schema#.';
    end if;
    -- a dynamic reference of another draft would be ignored by the extension: refused here
    if (v_draft <> '2020-12' and exists (select from pg_catalog.jsonb_path_query(json_schema, 'strict $.**."$dynamicRef"', '{}', true)))
       or (v_draft <> '2019-09' and exists (select from pg_catalog.jsonb_path_query(json_schema, 'strict $.**."$recursiveRef"', '{}', true))) then
        raise exception using errcode = '0A000',
            message = format('json_schema uses $dynamicRef or $recursiveRef outside the draft that has it (draft %s); the portable edition resolves $dynamicRef in 2020-12 and $recursiveRef in 2019-09', v_draft);
    end if;
    perform cqrs_portable._check_schema_node(json_schema, '/', v_draft);
    -- every $ref resolves: those of embedded schema resources (an $id below the root) against
    -- their own base URI, made JSON pointers from the root as the validator reads them
    v_local := cqrs_portable._schema_localized(json_schema);
    for v_ref in select r #>> '{}' from pg_catalog.jsonb_path_query(v_local, 'strict $.**."$ref" ? (@.type() == "string")', '{}', true) r loop
        perform cqrs_portable._schema_ref(v_local, v_ref);
    end loop;
end
$$;
