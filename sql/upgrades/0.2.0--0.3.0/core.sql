-- The tables this upgrade alters that a batch in flight also holds, locked first and in the
-- order project_batch takes them (the lease's fence, then the log; an append takes the log, then
-- its stream): the upgrade then waits for a batch or an append to end instead of taking the
-- projection tables first and deadlocking with a batch that holds the log and waits for them
-- (seen once in a full test run: the upgrade was the deadlock's victim, 40P01).
lock table cqrs.projector_lease, cqrs.command_log, cqrs.stream in access exclusive mode;

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

-- The command log becomes partitioned by the time in its command ids (sql/core/retention.sql),
-- without a rewrite: the 0.2.0 table becomes the first partition, command_log_start, holding
-- every earlier time and every id without a time. Its rows get id_time -infinity as a default
-- (no rewrite); a retry of one of its UUIDv7 commands computes the id's time instead, which the
-- partition's bound also covers (it ends after the newest such time), so the retry lands in this
-- partition, whose own unique index on command_id finds the first append. The locks: the
-- renames take ACCESS EXCLUSIVE on the table, held to the end of the upgrade; the bound's check
-- reads the table once and the position identity moves to the new parent (README, Retention,
-- measures how long appends wait).
alter table cqrs.command_log rename to command_log_start;
comment on table cqrs.command_log_start is null;
alter table cqrs.command_log_start rename constraint command_log_pkey to command_log_start_pkey;
alter table cqrs.command_log_start rename constraint command_log_command_id_key to command_log_start_command_id_key;
alter table cqrs.command_log_start rename constraint command_log_stream_seq_key to command_log_start_stream_seq_key;
alter table cqrs.command_log_start add column id_time timestamptz not null default '-infinity';
alter table cqrs.command_log_start alter column id_time drop default;
-- Each stream's id-time range (sql/core/command.sql): its commands so far are all in the first
-- partition, at -infinity, which the range says without a rewrite; a new stream's range starts
-- empty.
alter table cqrs.stream add column min_id_time timestamptz not null default '-infinity',
    add column max_id_time timestamptz not null default '-infinity';
alter table cqrs.stream alter column min_id_time set default 'infinity';
comment on table cqrs.stream is 'Last sequence number of every stream in cqrs.command_log, and the id times of its commands.';
create table cqrs.retention (
    singleton          boolean     primary key default true,
    keep               interval,
    partition_interval interval    not null default '1 day',
    premake            integer     not null default 14,
    archive_schema     name,
    log_from           timestamptz not null default '-infinity',
    log_to             timestamptz not null default '-infinity',
    removed_through    bigint,
    constraint retention_singleton_check check (singleton),
    constraint retention_interval_check check (
        partition_interval between interval '1 hour' and interval '31 days'
        and pg_catalog.date_part('month', partition_interval) = 0
        and pg_catalog.date_part('epoch', partition_interval)::bigint % 3600 = 0),
    constraint retention_premake_check check (premake between 1 and 1000),
    constraint retention_keep_check check (keep is null or keep >= partition_interval)
);
comment on table cqrs.retention is
    'How cqrs.command_log is partitioned (partition_interval, premake) and kept (keep, archive_schema); its horizon (log_from).';
insert into cqrs.retention default values;
select pg_catalog.pg_extension_config_dump('cqrs.retention', '');
create table cqrs.log_consumer (
    name                text        primary key,
    checkpoint_position bigint      not null,
    updated_at          timestamptz not null default now(),
    constraint log_consumer_checkpoint_check check (checkpoint_position >= 0)
);
select pg_catalog.pg_extension_config_dump('cqrs.log_consumer', '');
do $log$
declare
    v_last bigint;
    v_called boolean;
    v_newest timestamptz;
    v_bound timestamptz;
    v_constraint name;
begin
    select s.last_value, s.is_called into v_last, v_called from cqrs.command_log_position_seq s;
    -- the newest UUIDv7 time among the ids (found from the top of the command_id index, below
    -- the ids of the next ten years; ids without a time say nothing)
    select pg_catalog.to_timestamp(pg_catalog.int8(pg_catalog.textcat('x',
               pg_catalog.substr(pg_catalog.replace(l.command_id::text, '-', ''), 1, 12))::bit(48)) / 1000.0::float8)
      into v_newest
      from cqrs.command_log_start l
     where l.command_id < pg_catalog.rpad(pg_catalog.lpad(pg_catalog.to_hex(
               (pg_catalog.date_part('epoch', pg_catalog.now() + interval '10 years') * 1000)::bigint), 12, '0'), 32, '0')::uuid
       and pg_catalog.substr(l.command_id::text, 15, 1) = '7'
       and pg_catalog.substr(l.command_id::text, 20, 1) in ('8', '9', 'a', 'b')
     order by l.command_id desc
     limit 1;
    v_bound := pg_catalog.date_bin(interval '1 day', greatest(pg_catalog.now(), v_newest),
                                   timestamptz '2000-01-01 00:00:00+00') + interval '1 day';
    -- the identity (and its sequence) moves to the partitioned table, which goes on from there;
    -- the old sequence leaves the extension first, and with it pg_dump's list (an install by
    -- psql has no extension)
    if exists (select from pg_catalog.pg_extension e where e.extname = 'pg_cqrs') then
        alter extension pg_cqrs drop sequence cqrs.command_log_position_seq;
    end if;
    alter table cqrs.command_log_start alter column position drop identity;
    -- PostgreSQL 18 names NOT NULL constraints, choosing names no table of the schema uses: out
    -- of the way for a moment, so that the new table's are named as in a fresh install (none
    -- before 18)
    for v_constraint in select c.conname from pg_catalog.pg_constraint c
                         where c.conrelid = 'cqrs.command_log_start'::regclass and c.contype = 'n' loop
        execute pg_catalog.format('alter table cqrs.command_log_start rename constraint %I to %I',
                                  v_constraint, v_constraint || '_of_0_2_0');
    end loop;
    create table cqrs.command_log (
        position     bigint      generated always as identity,
        command_id   uuid        not null,
        stream       text        not null,
        seq          bigint      not null,
        command_type text        not null,
        payload      jsonb       not null,
        metadata     jsonb       not null default '{}',
        created_at   timestamptz not null default pg_catalog.now(),
        id_time      timestamptz not null,
        constraint command_log_seq_check check (seq > 0)
    ) partition by range (id_time);
    perform pg_catalog.setval('cqrs.command_log_position_seq', v_last, v_called);
    -- back to their names before the attach (an inherited constraint cannot be renamed)
    for v_constraint in select c.conname from pg_catalog.pg_constraint c
                         where c.conrelid = 'cqrs.command_log_start'::regclass and c.contype = 'n'
                           and c.conname like '%\_of\_0\_2\_0' loop
        execute pg_catalog.format('alter table cqrs.command_log_start rename constraint %I to %I',
                                  v_constraint, pg_catalog.left(v_constraint, -pg_catalog.length('_of_0_2_0')));
    end loop;
    -- (and the one of the column added above, named after this table, as a fresh install names it)
    if exists (select from pg_catalog.pg_constraint c where c.conrelid = 'cqrs.command_log_start'::regclass
                  and c.conname = 'command_log_start_id_time_not_null') then
        alter table cqrs.command_log_start rename constraint command_log_start_id_time_not_null to command_log_id_time_not_null;
    end if;
    -- a checked bound makes the attach skip its own scan
    execute pg_catalog.format('alter table cqrs.command_log_start add constraint command_log_start_bound check (id_time < %L)', v_bound);
    execute pg_catalog.format('alter table cqrs.command_log attach partition cqrs.command_log_start for values from (minvalue) to (%L)', v_bound);
    alter table cqrs.command_log_start drop constraint command_log_start_bound;
end
$log$;
comment on table cqrs.command_log is
    'Append-only log of accepted commands. Write it only through cqrs.append()/cqrs.append_batch().';
revoke all on cqrs.command_log from public;
revoke all on sequence cqrs.command_log_position_seq from public;
grant select on cqrs.command_log to cqrs_projector;
revoke all on cqrs.command_log_start from cqrs_projector;
select pg_catalog.pg_extension_config_dump('cqrs.command_log', '');
select pg_catalog.pg_extension_config_dump('cqrs.command_log_position_seq', '');
