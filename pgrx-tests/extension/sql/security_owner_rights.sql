-- A read model is written with its owner's rights, inside a security-restricted operation,
-- whoever projects: the sidecar's role or a superuser resuming it. A table owner cannot borrow
-- their rights through a trigger or a function handler.
\set ON_ERROR_ROLLBACK on
\set SHOW_CONTEXT never
set client_min_messages = error;
begin;
\ir install.sql
create role rm_owner;
create role stranger;
create role projector_app in role cqrs_projector;
create table public.owned_rm (stream text primary key, n integer not null default 0, rev bigint not null default 0);
create table public.trigger_log (at serial, ran_as text, superuser boolean, note text);
alter table public.owned_rm owner to rm_owner;
alter table public.trigger_log owner to rm_owner;

-- the owner's trigger records whose rights it runs with, and tries to use them
create function public.owner_trigger() returns trigger language plpgsql as $$
begin
    insert into public.trigger_log (ran_as, superuser)
    select current_user, r.rolsuper from pg_catalog.pg_roles r where r.rolname = current_user;
    begin
        execute 'alter role rm_owner superuser';
        insert into public.trigger_log (note) values ('became superuser');
    exception when others then
        insert into public.trigger_log (note) values ('alter role refused: ' || sqlstate);
    end;
    begin
        execute 'set role postgres';
    exception when others then
        insert into public.trigger_log (note) values ('set role refused: ' || sqlstate);
    end;
    return new;
end
$$;
alter function public.owner_trigger() owner to rm_owner;
create trigger leak after insert or update on public.owned_rm for each row execute function public.owner_trigger();

select cqrs.create_projection('owned', 'public.owned_rm', 'stream', '{"T": {"action": "upsert", "add": {"n": {"const": 1}}}}');
-- the projector reads the read model (caches), it does not write it
select has_table_privilege('cqrs_projector', 'public.owned_rm', 'select') as may_read,
       has_table_privilege('cqrs_projector', 'public.owned_rm', 'insert,update,delete') as may_write;

-- projected by the sidecar's role: the trigger runs as the owner, who gains nothing
select seq from cqrs.append(cqrs.uuid_v7(), 'a', 'T', '{}');
set role projector_app;
select projection, key from cqrs.project_batch((select jsonb_agg(to_jsonb(l)) from cqrs.command_log l), '0/10');
reset role;
select ran_as, superuser, note from public.trigger_log order by at;
truncate public.trigger_log;

-- resumed by a superuser: still the owner's rights
update cqrs.projection_state set halted = true where name = 'owned';
select seq from cqrs.append(cqrs.uuid_v7(), 'a', 'T', '{}');
select projection, key from cqrs.resume('owned');
select ran_as, superuser, note from public.trigger_log order by at;
select rolsuper from pg_roles where rolname = 'rm_owner';

-- routine operations need no superuser: the projector resumes, rebuilds and retries
set role projector_app;
select events from cqrs.rebuild('owned');
select count(*) from cqrs.retry_dead_letters('owned');
reset role;

-- only the table's owner (or a member of its role) may make it a read model
create table public.strangers_rm (stream text primary key, rev bigint not null default 0);
grant usage on schema cqrs to stranger;
grant execute on function cqrs.create_projection(text, regclass, text, jsonb, text, text, boolean) to stranger;
set role stranger;
select cqrs.create_projection('theirs', 'public.owned_rm', 'stream', '{"T": {"action": "delete"}}');
\echo :LAST_ERROR_SQLSTATE
reset role;

-- a function handler must be owned by the table's owner (it runs as that owner)
create function public.stranger_handler(event jsonb) returns setof text language sql as $$ select null::text where false $$;
alter function public.stranger_handler(jsonb) owner to stranger;
create table public.handled_rm (stream text primary key, rev bigint not null default 0);
alter table public.handled_rm owner to rm_owner;
select cqrs.create_projection('handled', 'public.handled_rm', 'stream', '{"T": {"function": "public.stranger_handler"}}');
\echo :LAST_ERROR_SQLSTATE
alter function public.stranger_handler(jsonb) owner to rm_owner;
select cqrs.create_projection('handled', 'public.handled_rm', 'stream', '{"T": {"function": "public.stranger_handler"}}');
rollback;
