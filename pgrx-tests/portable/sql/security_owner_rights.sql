-- The portable edition writes read models with the projector's rights (PL/pgSQL cannot switch
-- to the table's owner in a security-restricted operation, as the extension does): what it
-- can enforce, it does — only the table's owner makes it a read model, and function handlers
-- must belong to that owner.
\set ON_ERROR_ROLLBACK on
\set SHOW_CONTEXT never
set client_min_messages = error;
begin;
\ir install.sql
create role rm_owner;
create role stranger;
create table public.owned_rm (stream text primary key, n integer not null default 0, rev bigint not null default 0);
alter table public.owned_rm owner to rm_owner;
grant usage on schema cqrs, cqrs_portable to stranger;
grant execute on function cqrs.create_projection(text, regclass, text, jsonb, text, text, boolean) to stranger;
set role stranger;
select cqrs.create_projection('theirs', 'public.owned_rm', 'stream', '{"T": {"action": "delete"}}');
\echo :LAST_ERROR_SQLSTATE
reset role;
create function public.stranger_handler(event jsonb) returns setof text language sql as $$ select null::text where false $$;
alter function public.stranger_handler(jsonb) owner to stranger;
select cqrs.create_projection('handled', 'public.owned_rm', 'stream', '{"T": {"function": "public.stranger_handler"}}');
\echo :LAST_ERROR_SQLSTATE
alter function public.stranger_handler(jsonb) owner to rm_owner;
select cqrs.create_projection('handled', 'public.owned_rm', 'stream', '{"T": {"function": "public.stranger_handler"}}');
-- the projector gets what writing the read model needs in this edition
select has_table_privilege('cqrs_projector', 'public.owned_rm', 'insert,update,delete') as may_write;
rollback;
