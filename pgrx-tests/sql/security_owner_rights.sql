-- A read model's owner gains nothing and leaves nothing behind, in both editions: its code —
-- a trigger, a domain's check, a row-level security policy, a function handler — runs with the
-- owner's rights whoever projects or reads (the sidecar's role, a superuser creating, resuming
-- or rebuilding), and no setting it changes outlives the call that ran it. (The extension runs
-- it in a security-restricted operation; the portable edition through SECURITY DEFINER
-- functions owned by the table's owner, made by cqrs.create_projection.)
\set ON_ERROR_ROLLBACK on
\set SHOW_CONTEXT never
set client_min_messages = error;
begin;
\ir install.sql
create role rm_owner;
create role stranger;
create role projector_app in role cqrs_projector;
create role reader_app in role cqrs_reader;
create schema owned authorization rm_owner;
set role rm_owner;
create table owned.seen (at serial, code text, ran_as text, superuser boolean, note text);
grant insert, select on owned.seen to public;
grant usage on schema owned to public;
grant usage on sequence owned.seen_at_seq to public;

-- What every piece of the owner's code does: record whose rights it runs with, try to use them
-- (become superuser, switch role, move the projector lease), and change settings the caller's
-- next statement would run with.
create function owned.tamper(code text) returns boolean language plpgsql as $$
begin
    insert into owned.seen (code, ran_as, superuser)
    select code, current_user, r.rolsuper from pg_catalog.pg_roles r where r.rolname = current_user;
    begin
        execute 'alter role rm_owner superuser';
        insert into owned.seen (code, note) values (code, 'became superuser');
    exception when others then
        insert into owned.seen (code, note) values (code, 'alter role refused: ' || sqlstate);
    end;
    begin
        execute 'set role postgres';
        insert into owned.seen (code, note) values (code, 'became postgres');
    exception when others then
        insert into owned.seen (code, note) values (code, 'set role refused: ' || sqlstate);
    end;
    begin
        execute 'update cqrs.projector_lease set token = 9223372036854775807';
        insert into owned.seen (code, note) values (code, 'moved the lease');
    exception when others then
        insert into owned.seen (code, note) values (code, 'lease refused: ' || sqlstate);
    end;
    perform pg_catalog.set_config('application_name', 'owned by ' || code, false);
    perform pg_catalog.set_config('statement_timeout', '1', false);
    perform pg_catalog.set_config('search_path', 'owned, pg_catalog', false);
    perform pg_catalog.set_config('work_mem', '77kB', true);
    return true;
end
$$;
create domain owned.status as text check (owned.tamper('domain'));
create table owned.rm (stream text primary key, status owned.status, n integer not null default 0, rev bigint not null default 0);
create function owned.rm_trigger() returns trigger language plpgsql as $$
begin
    perform owned.tamper('trigger ' || lower(tg_op));
    return new;
end
$$;
create trigger tamper before insert or update or delete on owned.rm for each row execute function owned.rm_trigger();
create function owned.handler(event jsonb) returns setof text language plpgsql as $$
begin
    perform owned.tamper('handler');
    return next event ->> 'stream';
end
$$;
reset role;

-- the session's settings, which must be the same after each step below
select current_setting('application_name') as app, current_setting('statement_timeout') as timeout,
       current_setting('search_path') as search_path, current_setting('work_mem') as work_mem \gset before_

-- created by a superuser, with a constant to cast to the owner's domain: the check runs as the owner
select seq from cqrs.append(cqrs.uuid_v7(), 'a', 'T', '{}');
select cqrs.create_projection('owned', 'owned.rm', 'stream', '{"T": {"action": "upsert", "set": {"status": {"const": "open"}}, "add": {"n": {"const": 1}}}}');
select ran_as, superuser, note, count(*) from owned.seen group by 1, 2, 3 order by 1, 2, 3;
select rolsuper from pg_roles where rolname = 'rm_owner';
select current_setting('application_name') = :'before_app' as app_kept, current_setting('statement_timeout') = :'before_timeout' as timeout_kept,
       current_setting('search_path') = :'before_search_path' as search_path_kept, current_setting('work_mem') = :'before_work_mem' as work_mem_kept;
truncate owned.seen;

-- the projector reads the read model (caches), it does not write it
select has_table_privilege('cqrs_projector', 'owned.rm', 'select') as may_read,
       has_table_privilege('cqrs_projector', 'owned.rm', 'insert,update,delete') as may_write;

-- projected by the sidecar's role
select seq from cqrs.append(cqrs.uuid_v7(), 'a', 'T', '{}');
set role projector_app;
select projection, key from cqrs.project_batch((select jsonb_agg(to_jsonb(l)) from cqrs.command_log l));
reset role;
select current_setting('application_name') = :'before_app' as app_kept, current_setting('statement_timeout') = :'before_timeout' as timeout_kept,
       current_setting('search_path') = :'before_search_path' as search_path_kept, current_setting('work_mem') = :'before_work_mem' as work_mem_kept;
-- caught up by the sidecar's role
select seq from cqrs.append(cqrs.uuid_v7(), 'b', 'T', '{}');
set role projector_app;
select projection, key from cqrs.catch_up();
reset role;
select current_setting('application_name') = :'before_app' as app_kept, current_setting('statement_timeout') = :'before_timeout' as timeout_kept,
       current_setting('search_path') = :'before_search_path' as search_path_kept, current_setting('work_mem') = :'before_work_mem' as work_mem_kept;
-- resumed and rebuilt by a superuser
update cqrs.projection_state set halted = true where name = 'owned';
select seq from cqrs.append(cqrs.uuid_v7(), 'a', 'T', '{}');
select projection, key from cqrs.resume('owned');
select events from cqrs.rebuild('owned');
select current_setting('application_name') = :'before_app' as app_kept, current_setting('statement_timeout') = :'before_timeout' as timeout_kept,
       current_setting('search_path') = :'before_search_path' as search_path_kept, current_setting('work_mem') = :'before_work_mem' as work_mem_kept;
-- read by the sidecar's role, through a row-level security policy of the owner's
set role rm_owner;
alter table owned.rm enable row level security;
alter table owned.rm force row level security;
create policy reads on owned.rm for select using (owned.tamper('policy'));
create policy inserts on owned.rm for insert with check (true);
create policy updates on owned.rm for update using (true) with check (true);
create policy deletes on owned.rm for delete using (true);
reset role;
set role projector_app;
select doc ->> 'stream' as stream, rev from cqrs.read('owned', 'a');
select count(*) from cqrs.changed_since('owned', -1);
reset role;
select current_setting('application_name') = :'before_app' as app_kept, current_setting('statement_timeout') = :'before_timeout' as timeout_kept,
       current_setting('search_path') = :'before_search_path' as search_path_kept, current_setting('work_mem') = :'before_work_mem' as work_mem_kept;
-- a reader who may not select from the table reads nothing; one subject to its policies cannot
-- have pg_cqrs lift them (the owner's rights would): both 42501
set role reader_app;
select doc from cqrs.read('owned', 'a');
\echo :LAST_ERROR_SQLSTATE
reset role;
grant select on owned.rm to reader_app;
set role reader_app;
select doc from cqrs.read('owned', 'a');
\echo :LAST_ERROR_SQLSTATE
reset role;
-- every piece of the owner's code ran as the owner, who gained nothing
select ran_as, superuser, note, count(*) from owned.seen group by 1, 2, 3 order by 1, 2, 3;
select code, count(*) > 0 as ran from owned.seen where code is not null group by 1 order by 1;
select rolsuper from pg_roles where rolname = 'rm_owner';
select token < 1000 as lease_untouched from cqrs.projector_lease union all select true where not exists (select from cqrs.projector_lease);

-- a function handler runs as the owner too, dead letters retried by the projector included
set role rm_owner;
alter table owned.rm disable row level security;
create table owned.handled (stream text primary key, rev bigint not null default 0);
reset role;
select cqrs.create_projection('handled', 'owned.handled', 'stream', '{"T": {"function": "owned.handler"}}', on_error => 'dead_letter');
truncate owned.seen;
select seq from cqrs.append(cqrs.uuid_v7(), 'c', 'T', '{}');
set role projector_app;
select projection, key from cqrs.catch_up('handled');
insert into cqrs.dead_letter (projection, stream, seq, command_id, command_type, event, error, sqlstate)
select 'handled', l.stream, l.seq, l.command_id, l.command_type, to_jsonb(l), 'test', 'XX000' from cqrs.command_log l where l.stream = 'c';
select projection, key from cqrs.retry_dead_letters('handled');
reset role;
select ran_as, superuser, note, count(*) from owned.seen group by 1, 2, 3 order by 1, 2, 3;
select current_setting('application_name') = :'before_app' as app_kept, current_setting('statement_timeout') = :'before_timeout' as timeout_kept,
       current_setting('search_path') = :'before_search_path' as search_path_kept, current_setting('work_mem') = :'before_work_mem' as work_mem_kept;

-- only the table's owner (or a member of its role) may make it a read model
create table public.strangers_rm (stream text primary key, rev bigint not null default 0);
create table public.owned_rm (stream text primary key, rev bigint not null default 0);
alter table public.owned_rm owner to rm_owner;
grant usage on schema cqrs to stranger;
grant execute on function cqrs.create_projection(text, regclass, text, jsonb, text, text, boolean) to stranger;
-- (the portable edition's create_projection also needs its helpers)
do $$ begin
    if to_regnamespace('cqrs_portable') is not null then
        grant usage on schema cqrs_portable to stranger;
        grant execute on all functions in schema cqrs_portable to stranger;
    end if;
end $$;
set role stranger;
select cqrs.create_projection('theirs', 'public.owned_rm', 'stream', '{"T": {"action": "delete"}}');
\echo :LAST_ERROR_SQLSTATE
reset role;

-- a function handler must be owned by the table's owner (it runs as that owner)
create function public.stranger_handler(event jsonb) returns setof text language sql as $$ select null::text where false $$;
alter function public.stranger_handler(jsonb) owner to stranger;
select cqrs.create_projection('strange', 'public.owned_rm', 'stream', '{"T": {"function": "public.stranger_handler"}}');
\echo :LAST_ERROR_SQLSTATE
alter function public.stranger_handler(jsonb) owner to rm_owner;
select cqrs.create_projection('strange', 'public.owned_rm', 'stream', '{"T": {"function": "public.stranger_handler"}}');
rollback;
