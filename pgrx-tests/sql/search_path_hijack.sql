-- SECURITY DEFINER functions run with the extension owner's rights, so a caller's search_path
-- must not be able to substitute operators or functions inside them. This file runs in a fresh
-- backend, so cqrs.append prepares its plan here, under the hostile search_path below.
\set ON_ERROR_ROLLBACK on
\set SHOW_CONTEXT never
begin;
\ir install.sql

create schema evil;
create function evil.spy_texteq(text, text) returns boolean language plpgsql as $$
begin
    raise notice 'hijacked: evil.= ran as %', current_user;
    return $1 operator(pg_catalog.=) $2;
end $$;
create operator evil.= (leftarg = text, rightarg = text, function = evil.spy_texteq);
create function evil.spy_plus(bigint, integer) returns bigint language plpgsql as $$
begin
    raise notice 'hijacked: evil.+ ran as %', current_user;
    return $1 operator(pg_catalog.+) $2;
end $$;
create operator evil.+ (leftarg = bigint, rightarg = integer, function = evil.spy_plus);

-- the operators work for ordinary queries under this search_path …
set search_path = evil, pg_catalog;
select 'a'::text = 'a'::text as spy_works;

-- … but never inside the extension's functions (no NOTICE may appear below)
select seq from cqrs.append(cqrs.uuid_v7(), 'h-1', 'T', '{}');
select seq from cqrs.append(cqrs.uuid_v7(), 'h-1', 'T', '{}');
select cqrs.register_command_type('T', '{"type": "object"}') > 0 as registered;
select seq from cqrs.append(cqrs.uuid_v7(), 'h-1', 'T', '{}');
select seq from cqrs.append_batch('[{"command_id": "55555555-5555-5555-5555-555555555555", "stream": "h-1", "command_type": "T", "payload": {}}]');
select cqrs.unregister_command_type('T');
reset search_path;
rollback;
