-- Who may do what: nothing is left to PUBLIC that is not meant for everyone, readers do not see
-- the commands a projection failed on, and leadership is the projector's alone.
\set ON_ERROR_ROLLBACK on
\set SHOW_CONTEXT never
set client_min_messages = error;
begin;
\ir install.sql

-- what PUBLIC may call
select p.oid::regprocedure as callable_by_anyone
  from pg_proc p
 where p.pronamespace = 'cqrs'::regnamespace and has_function_privilege('public', p.oid, 'execute')
 order by 1;

create role app_reader login in role cqrs_reader;
create role app_writer login in role cqrs_writer;
create role sidecar_a login in role cqrs_projector;
create role sidecar_b login in role cqrs_projector;
create role stranger login;
-- even with usage on the schema, a role without cqrs_* rights can call nothing of pg_cqrs's
grant usage on schema cqrs to stranger;
create table public.pay_rm (stream text primary key, amount integer not null default 0, rev bigint not null default 0);
grant select on public.pay_rm to cqrs_reader;
select cqrs.create_projection('pay', 'public.pay_rm', 'stream', '{"PAY": {"action": "upsert", "set": {"amount": "$.amount"}}}');
select seq from cqrs.append(cqrs.uuid_v7(), 'card-4111', 'PAY', '{"amount": "4111 1111 1111 1111"}');
select count(*) from cqrs.catch_up();

-- everyone who may see the status sees why it halted without the value that caused it: the
-- SQLSTATE (and the message where its class names only objects); the installer finds the whole
-- error, value included, in last_error_detail
select projection, halted, last_error_sqlstate, last_error from cqrs.status();
select last_error_detail from cqrs.projection_state;
-- a reader sees that it halted and why, not the command's data
set role app_reader;
select projection, halted, last_error_sqlstate, last_error from cqrs.status();
select last_error from cqrs.projection_state;
select last_error_detail from cqrs.projection_state;
\echo :LAST_ERROR_SQLSTATE
select last_error_event from cqrs.projection_state;
\echo :LAST_ERROR_SQLSTATE
select name, halted, last_error_sqlstate from cqrs.projection_state;
select cqrs.wait_for('card-4111', 1, 'pay', '10 ms');
\echo :LAST_ERROR_SQLSTATE
select count(*) from cqrs.dead_letter;
\echo :LAST_ERROR_SQLSTATE
select count(*) from cqrs.parked;
\echo :LAST_ERROR_SQLSTATE
reset role;

-- leadership: only the projector role can take the lease, and one holder at a time
set role stranger;
select cqrs.try_lead('stray session');
\echo :LAST_ERROR_SQLSTATE
select cqrs.acquire_lease('stray session');
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.projector_lease for update;
\echo :LAST_ERROR_SQLSTATE
reset role;
set role app_reader;
select * from cqrs.projector_lease for share;
\echo :LAST_ERROR_SQLSTATE
reset role;
set role sidecar_a;
select cqrs.try_lead('a') as token_a, cqrs.try_lead('a') as renewed_a;
reset role;
set role sidecar_b;
-- b is told no while a holds a live lease (from this same backend here, so the pid is alive)
select cqrs.try_lead('b') as token_b;
select holder, token, live from cqrs.leader();
reset role;
set role sidecar_a;
select cqrs.release_lead('b') as not_b, cqrs.release_lead('a') as released;
reset role;
set role sidecar_b;
select cqrs.try_lead('b') as token_b;
select holder, token, live from cqrs.leader();
select cqrs.try_lead('b', '1 ms');
\echo :LAST_ERROR_SQLSTATE
select cqrs.try_lead(null);
\echo :LAST_ERROR_SQLSTATE
reset role;
-- an expired lease goes to the next who asks, with a higher token
update cqrs.projector_lease set expires_at = clock_timestamp() - interval '1 s';
set role sidecar_a;
select cqrs.try_lead('a') as token_a;
select holder, token, live from cqrs.leader();
reset role;
rollback;
