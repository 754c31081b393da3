-- Both editions. The projector lease moves only through its functions (try_lead, release_lead,
-- and acquire_lease, now SECURITY DEFINER): the projecting role could set a token that deposed
-- the leader and made token + 1 overflow for everyone.
revoke insert, update on cqrs.projector_lease from cqrs_projector;

-- Errors are kept twice: the summary that may be shown anywhere (last_error, error: the SQLSTATE,
-- and the message where its class names only objects) and the whole error, which may hold a
-- command's values, where readers and logs do not reach (last_error_detail, error_detail). What
-- earlier releases recorded becomes the whole error; its summary is its SQLSTATE.
alter table cqrs.projection_state add column last_error_detail text;
alter table cqrs.dead_letter add column error_detail text;
update cqrs.projection_state
   set last_error_detail = last_error, last_error = 'SQLSTATE ' || coalesce(last_error_sqlstate, 'XX000')
 where last_error is not null;
update cqrs.dead_letter set error_detail = error, error = 'SQLSTATE ' || sqlstate;
grant select (last_error) on cqrs.projection_state to cqrs_reader;

-- An application (cqrs_writer) reads its own writes: the heads of its streams, cqrs.wait_for and
-- cqrs.read of the read models it may select, and the catalog those look at (granted with the
-- functions and tables they concern).

-- The projection-name rule is one function (the Rust twin is projection/src/name.rs); the
-- table's check calls it. Created here, before the check that needs it (the generated part
-- replaces it with the same definition).
create function cqrs._is_projection_name(name text)
returns boolean
language sql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$ select name ~ '^[A-Za-z0-9_.-]{1,63}$' $$;
alter table cqrs.projection drop constraint projection_name_check,
    add constraint projection_name_check check (cqrs._is_projection_name(name));

-- Projection groups: each projection belongs to one (default: 'default', today's behaviour), and
-- each group has its own lease, so that sidecars of different groups project in parallel. The
-- lease row becomes one row per group; tokens come from one sequence, started past every token
-- handed out before (a deposed 0.2.0 leader's token stays refused).
create function cqrs._is_projection_group(name text)
returns boolean
language sql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$ select name ~ '^[a-z][a-z0-9_]{0,39}$' $$;
alter table cqrs.projection add column projection_group text not null default 'default',
    add constraint projection_group_check check (cqrs._is_projection_group(projection_group));
create index projection_group_idx on cqrs.projection (projection_group);
comment on table cqrs.projection is 'Registered read models: target table, key, handlers per command type, projection group.';
create sequence cqrs.projector_lease_token_seq;
select pg_catalog.setval('cqrs.projector_lease_token_seq',
                         coalesce((select max(l.token) from cqrs.projector_lease l), 0) + 1, false);
alter table cqrs.projector_lease drop constraint projector_lease_pkey;
alter table cqrs.projector_lease drop column id;
alter table cqrs.projector_lease add column projection_group text not null default 'default',
    add constraint projector_lease_pkey primary key (projection_group),
    add constraint projector_lease_group_check check (cqrs._is_projection_group(projection_group));
revoke all on sequence cqrs.projector_lease_token_seq from public;
select pg_catalog.pg_extension_config_dump('cqrs.projector_lease_token_seq', '');
-- the lease functions take the group (a 0.2.0 sidecar's calls, without it, mean the default
-- group); project_batch gains a four-argument signature, the three-argument one stays the
-- default group's (a 0.2.0 sidecar looks for it at start)
drop function cqrs.acquire_lease(text);
drop function cqrs.try_lead(text, interval);
drop function cqrs.release_lead(text);
drop function cqrs.leader();
drop function cqrs._project_batch(jsonb, pg_lsn, bigint);

-- The outbox: sinks (brokers the sidecar delivers the command log to), their per-stream progress.
create table cqrs.sink (
    name                text        primary key,
    projection_group    text        not null default 'default',
    halted              boolean     not null default false,
    -- the summary of the broker's refusal (no command values), and the event it refused, located
    last_error          text,
    last_error_at       timestamptz,
    last_error_position bigint,
    checkpoint_lsn      pg_lsn,
    checkpoint_position bigint,
    checkpoint_at       timestamptz,
    delivered           bigint      not null default 0,
    created_at          timestamptz not null default pg_catalog.now(),
    constraint sink_name_check check (cqrs._is_projection_group(name)),
    constraint sink_group_check check (cqrs._is_projection_group(projection_group))
);
comment on table cqrs.sink is 'Outbox sinks (brokers the sidecar delivers the command log to): checkpoint, halt, counts.';

-- How far each sink has delivered each stream (or passed over it: events a sink's filter does
-- not send count as delivered).
create table cqrs.sink_stream (
    sink     text   not null,
    stream   text   not null,
    last_seq bigint not null,
    primary key (sink, stream)
) with (fillfactor = 70);
revoke all on cqrs.sink, cqrs.sink_stream from public;
grant select on cqrs.sink, cqrs.sink_stream to cqrs_projector;
select pg_catalog.pg_extension_config_dump('cqrs.sink', '');
select pg_catalog.pg_extension_config_dump('cqrs.sink_stream', '');
