-- pg_cqrs retention: the command log in time partitions, made ahead and removed whole by age.
--
-- Why partitions by the time in the command id: idempotency needs command_id to be unique across
-- the whole log, and PostgreSQL enforces uniqueness on a partitioned table only within a
-- partition. A command's partition is a function of its id alone (cqrs.command_time: the time in
-- a UUIDv7, -infinity for any other id), so a retry always lands in the partition of its first
-- append, and each partition's unique index on command_id is as good as a global one. The same
-- function says how old a retried id is once its partition has left: older than the idempotency
-- horizon, refused, never appended again. Commit time could not do either.
--
-- A lookup by command id reads the partition of its id_time and the first partition (whose rows,
-- when an upgrade partitioned an existing log, have id_time -infinity whatever their id):
-- `id_time in (cqrs.command_time(id), '-infinity')`.
--
-- Ids without a time (UUIDv4 and the like) all go to the first partition, which holds everything
-- before the log was partitioned; retention can remove it only when nothing newer is in it, and
-- after that such ids are refused (README, Retention).

-- The time in a UUIDv7 command id (RFC 9562: 48 bits of Unix milliseconds, version 7, variant
-- 10), -infinity for every other id (and for null). One SQL expression, so that the planner
-- inlines it into every statement that calls it — an append calls it three times, and a call
-- that is not inlined parses the body again each time (4.5 times slower appends, measured). So:
-- no SET clause, and not STRICT (PostgreSQL inlines a strict function only when its body is
-- strict, which a CASE is not); every name in it is qualified.
create function cqrs.command_time(command_id uuid)
returns timestamptz
language sql immutable parallel safe
as $$
    select case when pg_catalog.substr(command_id::text, 15, 1) = '7'
                     and pg_catalog.substr(command_id::text, 20, 1) in ('8', '9', 'a', 'b')
                then pg_catalog.to_timestamp(pg_catalog.int8(pg_catalog.textcat('x',
                         pg_catalog.substr(pg_catalog.replace(command_id::text, '-', ''), 1, 12))::bit(48)) / 1000.0::float8)
                else '-infinity'::timestamptz end
$$;
comment on function cqrs.command_time(uuid) is
    'The time in a UUIDv7 command id (-infinity for other ids): which partition of cqrs.command_log holds it.';
grant execute on function cqrs.command_time(uuid) to public;

-- The W3C trace context a command was appended with (README, Observability): what an
-- application whose retry was answered as a duplicate links its own span to. Only the two
-- trace keys of the metadata, nothing else of the command; no row when the id is not in the log
-- (or its partition is gone). It reads the command's partition only (id_time, as append's
-- lookups do).
create function cqrs.trace_context(command_id uuid, out traceparent text, out tracestate text)
returns setof record
language sql stable security definer
set search_path = pg_catalog, pg_temp
as $$
    select l.metadata ->> 'traceparent', l.metadata ->> 'tracestate'
      from cqrs.command_log l
     where l.command_id = trace_context.command_id
       and l.id_time in (cqrs.command_time(trace_context.command_id), '-infinity'::timestamptz)
$$;
comment on function cqrs.trace_context(uuid) is
    'The traceparent and tracestate a command was appended with (null when it had none); no row when the command is not in the log. For linking a replay''s span to the original.';
revoke execute on function cqrs.trace_context(uuid) from public;
grant execute on function cqrs.trace_context(uuid) to cqrs_writer, cqrs_reader, cqrs_projector;

-- One row: how the log is partitioned and how long it is kept. Only the installer changes it.
create table cqrs.retention (
    singleton          boolean     primary key default true,
    -- keep at least this long (by the time in the command ids); null keeps everything
    keep               interval,
    -- the width of one partition, a whole number of hours between 1 hour and 31 days
    partition_interval interval    not null default '1 day',
    -- how many partitions cqrs.maintain() keeps ready after the current one
    premake            integer     not null default 14,
    -- where removed partitions go: null drops them, a schema name keeps them there, detached
    archive_schema     name,
    -- the lower bound of the oldest partition left (the idempotency horizon) and the upper bound
    -- of the newest: kept by cqrs.maintain() and cqrs.archive_before()
    log_from           timestamptz not null default '-infinity',
    log_to             timestamptz not null default '-infinity',
    -- the highest position removed so far: null while the log still starts at its first command
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

-- A restore from pg_dump copies the dumped row into the table where CREATE EXTENSION already put
-- the default one: the dumped row replaces it (the one row stays one).
create function cqrs._retention_restored()
returns trigger
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
    if exists (select from cqrs.retention r where r.singleton) then
        update cqrs.retention r
           set keep = new.keep, partition_interval = new.partition_interval, premake = new.premake,
               archive_schema = new.archive_schema, log_from = new.log_from, log_to = new.log_to,
               removed_through = new.removed_through
         where r.singleton;
        return null;
    end if;
    return new;
end
$$;
revoke execute on function cqrs._retention_restored() from public;

-- The partitions of the log with their bounds (-infinity for MINVALUE, infinity for MAXVALUE).
create function cqrs.log_partitions()
returns table (partition regclass, lower_bound timestamptz, upper_bound timestamptz)
language sql stable security definer
set search_path = pg_catalog, pg_temp
-- the bounds are printed and read back as ISO text whatever the caller's settings
set datestyle = 'ISO, YMD'
as $$
    select b.partition, b.lower_bound, b.upper_bound
      from (select i.inhrelid::regclass as partition,
                   case when m[1] = 'MINVALUE' then '-infinity' else pg_catalog.btrim(m[1], '''') end::timestamptz as lower_bound,
                   case when m[2] = 'MAXVALUE' then 'infinity' else pg_catalog.btrim(m[2], '''') end::timestamptz as upper_bound
              from pg_catalog.pg_inherits i
              join pg_catalog.pg_class c on c.oid = i.inhrelid
              cross join lateral pg_catalog.regexp_match(pg_catalog.pg_get_expr(c.relpartbound, c.oid),
                                                         '^FOR VALUES FROM \((.*)\) TO \((.*)\)$') m
             where i.inhparent = 'cqrs.command_log'::regclass) b
     order by b.lower_bound;
$$;
comment on function cqrs.log_partitions() is
    'The partitions of cqrs.command_log and the command-id times each holds, oldest first.';

-- Creates one partition with the keys every partition has: position (its primary key), command_id
-- (the idempotency key) and (stream, seq), each unique within the partition (position and seq are
-- unique across the log by construction; command_id by the partitioning, see above). Made apart
-- and then attached, which takes SHARE UPDATE EXCLUSIVE on the log — appends go on — where
-- CREATE TABLE … PARTITION OF would take ACCESS EXCLUSIVE and make them wait.
create function cqrs._create_log_partition(name text, lower_bound timestamptz, upper_bound timestamptz)
returns void
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
set datestyle = 'ISO, YMD'
as $$
begin
    -- A partition of that name that this transaction's snapshot did not list: another maker
    -- (a concurrent first append, another sidecar's maintain()) committed it after this
    -- REPEATABLE READ or SERIALIZABLE transaction began. Making it again would fail with 42P07,
    -- which no application retries; a retry of the transaction sees it. (pg_partition_tree
    -- reads the catalog as it is now, not as of the snapshot.)
    if pg_catalog.to_regclass(pg_catalog.format('cqrs.%I', name)) in
           (select t.relid from pg_catalog.pg_partition_tree('cqrs.command_log'::pg_catalog.regclass) t) then
        raise exception using errcode = '40001',
            message = pg_catalog.format('partition %s of cqrs.command_log was made by a transaction that committed after this one began (%s isolation)',
                                        name, pg_catalog.current_setting('transaction_isolation')),
            hint = 'Retry the transaction: it will see the partition.';
    end if;
    execute format('create table cqrs.%I (like cqrs.command_log including defaults including constraints)', name);
    execute format('alter table cqrs.%I add constraint %I primary key ("position"), add constraint %I unique (command_id),
                        add constraint %I unique (stream, seq)',
                   name, name || '_pkey', name || '_command_id_key', name || '_stream_seq_key');
    perform cqrs._attach_log_partition(format('cqrs.%I', name)::regclass, lower_bound, upper_bound);
end
$$;

-- Attaches a table of the log's shape as the partition of the id times [lower_bound,
-- upper_bound) (-infinity: MINVALUE): SHARE UPDATE EXCLUSIVE on the log, and a scan of the table
-- unless a CHECK constraint of it implies the bound.
create function cqrs._attach_log_partition(partition regclass, lower_bound timestamptz, upper_bound timestamptz)
returns void
language plpgsql volatile
set search_path = pg_catalog, pg_temp
set datestyle = 'ISO, YMD'
as $$
begin
    execute format('alter table cqrs.command_log attach partition %s for values from (%s) to (%L)',
                   partition, case when lower_bound = '-infinity' then 'minvalue' else quote_literal(lower_bound::text) end,
                   upper_bound::text);
end
$$;

-- The name of the partition starting at lower_bound: command_log_YYYYMMDD, with _HH24 when
-- partitions are narrower than a day.
create function cqrs._log_partition_name(lower_bound timestamptz)
returns text
language sql stable
set search_path = pg_catalog, pg_temp
as $$
    select 'command_log_' || to_char(lower_bound at time zone 'UTC',
                                      case when (select r.partition_interval from cqrs.retention r) < interval '1 day'
                                           then 'YYYYMMDD"_"HH24' else 'YYYYMMDD' end);
$$;

-- Whether pg_partman keeps cqrs.command_log (its part_config names the log), and its retention
-- of it (README, Retention: beside pg_partman). pg_cqrs then makes no partitions — pg_partman's
-- maintenance makes them, and two makers would make overlapping ones — and refuses a retention
-- of pg_partman's (it would drop partitions that a projection, a sink or the idempotency horizon
-- still needs). False when pg_partman is not installed, or its config is not readable by the
-- installer (then pg_cqrs cannot tell, and makes partitions as without it).
create function cqrs._partman_keeps_log(out keeps boolean, out retention text)
language plpgsql stable security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_config regclass;
begin
    keeps := false;
    -- to_regclass raises, not answers null, in a schema the installer may not use (pg_partman in a
    -- schema of the DBA's, as on managed services): looked up only where it may
    select pg_catalog.to_regclass(pg_catalog.format('%I.part_config', n.nspname)) into v_config
      from pg_catalog.pg_extension e join pg_catalog.pg_namespace n on n.oid = e.extnamespace
     where e.extname = 'pg_partman' and pg_catalog.has_schema_privilege(n.oid, 'USAGE');
    if v_config is null or not pg_catalog.has_table_privilege(v_config, 'select') then
        return;
    end if;
    execute pg_catalog.format('select true, c.retention from %s c where c.parent_table = %L', v_config, 'cqrs.command_log')
       into keeps, retention;
    keeps := coalesce(keeps, false);
end
$$;

-- What idempotency and sequencing stand on, in every partition, whoever made it: unique
-- indexes on position, command_id and (stream, seq) — a partition without the one on command_id
-- takes a retried command a second time (pg_partman without a template makes such partitions:
-- tried) — and no default partition (it would take a retry of a command older than the horizon,
-- or an id later than the newest partition, as new, and it forbids DETACH … CONCURRENTLY). A
-- missing key is added (instant on the empty partitions made ahead; a partition with rows is
-- locked while its index is built); a default partition or pg_partman's retention of the log is
-- refused. Returns the partitions given keys.
create function cqrs._check_log_partitions()
returns setof text
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_default regclass;
    v_partman record;
    v_part regclass;
    v_missing text;
begin
    select i.inhrelid::regclass into v_default
      from pg_catalog.pg_inherits i join pg_catalog.pg_class c on c.oid = i.inhrelid
     where i.inhparent = 'cqrs.command_log'::regclass and pg_catalog.pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT';
    if v_default is not null then
        raise exception using errcode = '55000',
            message = format('cqrs.command_log has a default partition, %s: it would take a retry of a command older than the idempotency horizon, or an id later than the newest partition, as a new command', v_default),
            hint = format('Move any rows it holds into partitions of their own, then detach and drop it (alter table cqrs.command_log detach partition %s; drop table %s). pg_partman makes one in create_parent: drop it there.', v_default, v_default);
    end if;
    select * into v_partman from cqrs._partman_keeps_log();
    if v_partman.keeps and v_partman.retention is not null then
        raise exception using errcode = '55000',
            message = format('pg_partman keeps cqrs.command_log with a retention of %s: it would drop partitions that a projection, a sink or a log consumer has not passed, and move the idempotency horizon without pg_cqrs knowing', v_partman.retention),
            hint = 'Set pg_partman''s retention of the log to null (update <partman schema>.part_config set retention = null where parent_table = ''cqrs.command_log'') and keep it with cqrs.retention.keep instead.';
    end if;
    for v_part in select l.partition from cqrs.log_partitions() l order by l.lower_bound loop
        -- the keys it lacks, added by one statement (one lock of the partition)
        select string_agg(case when k.cols = array['position'] then 'add primary key ("position")'
                               else format('add unique (%s)', (select string_agg(format('%I', c), ', ') from unnest(k.cols) c)) end,
                          ', ' order by k.n)
          into v_missing
          from (values (1, array['position']), (2, array['command_id']), (3, array['stream', 'seq'])) k(n, cols)
         where not exists (select from pg_catalog.pg_index i
                            where i.indrelid = v_part and i.indisunique and i.indisvalid and i.indpred is null
                              and i.indexprs is null
                              and (select array_agg(a.attname::text order by x.n)
                                     from unnest(i.indkey::int2[]) with ordinality x(attnum, n)
                                     join pg_catalog.pg_attribute a on a.attrelid = i.indrelid and a.attnum = x.attnum) = k.cols);
        if v_missing is not null then
            begin
                execute format('alter table %s %s', v_part, v_missing);
            exception when insufficient_privilege then
                raise exception using errcode = '42501',
                    message = format('partition %s of cqrs.command_log lacks pg_cqrs''s keys, and pg_cqrs may not add them: a retried command could be appended twice', v_part),
                    hint = format('Its owner runs: alter table %s %s; — or gives the table to the role that installed pg_cqrs.', v_part, v_missing);
            end;
            return next v_part::text;
        end if;
    end loop;
end
$$;

-- Makes the partitions from the newest one's end up to premake partitions after the current
-- one; records the log's bounds. Returns what it created.
create function cqrs._make_log_partitions()
returns setof text
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_retention cqrs.retention;
    v_from timestamptz;
    v_until timestamptz;
    v_name text;
begin
    -- one maker at a time (the sidecars of several groups call cqrs.maintain())
    perform pg_advisory_xact_lock('cqrs.retention'::regclass::oid::bigint);
    select * into v_retention from cqrs.retention;
    v_from := (select max(p.upper_bound) from cqrs.log_partitions() p);
    v_until := date_bin(v_retention.partition_interval, now(), timestamptz '2000-01-01 00:00:00+00')
               + v_retention.partition_interval * (v_retention.premake + 1);
    if v_from is not null and (select k.keeps from cqrs._partman_keeps_log() k) then
        -- pg_partman's maintenance makes them: only the bounds are recorded
        v_until := v_from;
    end if;
    if v_from is null then
        -- an empty log: the first partition takes every earlier time and every id without one
        v_from := date_bin(v_retention.partition_interval, now(), timestamptz '2000-01-01 00:00:00+00');
        perform cqrs._create_log_partition('command_log_start', '-infinity', v_from);
        return next 'command_log_start';
    end if;
    while v_from < v_until loop
        v_name := cqrs._log_partition_name(v_from);
        perform cqrs._create_log_partition(v_name, v_from, v_from + v_retention.partition_interval);
        return next v_name;
        v_from := v_from + v_retention.partition_interval;
    end loop;
    update cqrs.retention r
       set log_from = coalesce((select min(p.lower_bound) from cqrs.log_partitions() p), '-infinity'),
           log_to = coalesce((select max(p.upper_bound) from cqrs.log_partitions() p), '-infinity');
end
$$;

-- A partition made while the extension is being created or updated becomes one of its members;
-- no partition stays one (pg_dump must dump each whole: see the end of this file), so it leaves
-- the extension (and pg_dump's list of tables whose rows it keeps, if it was on it). Nothing to
-- do in an install without an extension (psql).
create function cqrs._disown_log_partition(partition regclass)
returns void
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_extension name;
begin
    select e.extname into v_extension
      from pg_catalog.pg_depend d join pg_catalog.pg_extension e on e.oid = d.refobjid
     where d.classid = 'pg_catalog.pg_class'::regclass and d.objid = partition
       and d.refclassid = 'pg_catalog.pg_extension'::regclass and d.deptype = 'e';
    if v_extension is not null then
        execute format('alter extension %I drop table %s', v_extension, partition);
    end if;
end
$$;

-- Programs that read the log by position besides the projections and the sinks (a CDC
-- connector, an export, a consumer of the outbox of its own): each one registered here holds
-- back retention from every command after its checkpoint, as a projection or a sink does.
create table cqrs.log_consumer (
    name                text        primary key,
    -- the position it has read through: everything after it stays
    checkpoint_position bigint      not null,
    updated_at          timestamptz not null default now(),
    constraint log_consumer_checkpoint_check check (checkpoint_position >= 0)
);
comment on table cqrs.log_consumer is
    'Readers of cqrs.command_log other than projections and sinks: retention keeps every command after their checkpoints (cqrs.hold_log).';

-- Registers a log consumer, or moves its checkpoint (either way): retention removes nothing it
-- has not read. Serialised with the removals (their advisory lock, shared), so that a consumer
-- that rewinds is either in time or refused.
create function cqrs.hold_log(consumer text, checkpoint_position bigint)
returns void
language plpgsql volatile strict security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_removed bigint;
begin
    if length(consumer) not between 1 and 63 then
        raise exception using errcode = '22023',
            message = format('a log consumer''s name has 1 to 63 characters, not %s', length(consumer));
    end if;
    if checkpoint_position < 0 then
        raise exception using errcode = '22023',
            message = format('checkpoint_position is a position in cqrs.command_log (0 for the beginning), not %s', checkpoint_position);
    end if;
    perform pg_advisory_xact_lock_shared('cqrs.retention'::regclass::oid::bigint);
    v_removed := (select r.removed_through from cqrs.retention r);
    if checkpoint_position < v_removed then
        raise exception using errcode = '55000',
            message = format('log consumer %s would read on from position %s, but the log''s commands through position %s were removed',
                             consumer, checkpoint_position, v_removed),
            hint = 'Start it at cqrs.retention.removed_through or later; the older commands were dropped or archived (cqrs.retention.archive_schema).';
    end if;
    insert into cqrs.log_consumer as c (name, checkpoint_position) values (consumer, hold_log.checkpoint_position)
        on conflict (name) do update set checkpoint_position = excluded.checkpoint_position, updated_at = now();
end
$$;
comment on function cqrs.hold_log(text, bigint) is
    'Registers a reader of cqrs.command_log (or moves its checkpoint): retention keeps every command after checkpoint_position.';

-- Forgets a log consumer: retention no longer waits for it. Whether it was registered.
create function cqrs.release_log(consumer text)
returns boolean
language sql volatile strict security definer
set search_path = pg_catalog, pg_temp
as $$
    with gone as (delete from cqrs.log_consumer c where c.name = consumer returning 1)
    select exists (select from gone)
$$;
comment on function cqrs.release_log(text) is
    'Forgets a reader of cqrs.command_log registered by cqrs.hold_log: retention no longer waits for it.';

-- Why a partition whose times are all before `before` must stay, or null: it holds a command
-- (by its position) that a projection, a sink or a log consumer has not checkpointed past, or
-- (the first partition) a command with an id without a time appended at or after `before`.
-- Also the newest position in it.
create function cqrs._log_partition_hold(partition regclass, lower_bound timestamptz, before timestamptz,
                                         out newest_position bigint, out reason text)
language plpgsql stable security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_untimed timestamptz;
    v_holder text;
    v_checkpoint bigint;
begin
    execute format('select max(l.position) from %s l', partition) into newest_position;
    -- the first partition also holds the commands whose ids have no time: their age is when
    -- they were appended
    if lower_bound = '-infinity' then
        execute format('select l.created_at from %s l where l.id_time = ''-infinity'' order by l.position desc limit 1',
                       partition)
           into v_untimed;
        if v_untimed >= before then
            reason := format('it holds a command appended at %s (an id without a time)', v_untimed);
            return;
        end if;
    end if;
    -- the least checkpoint of every reader: what all have passed
    select c.name, c.checkpoint into v_holder, v_checkpoint
      from (select 'projection ' || s.name as name, coalesce(s.checkpoint_position, 0) as checkpoint
              from cqrs.projection_state s
            union all
            select 'sink ' || k.name, coalesce(k.checkpoint_position, 0) from cqrs.sink k
            union all
            select 'log consumer ' || c.name, c.checkpoint_position from cqrs.log_consumer c) c
     order by c.checkpoint limit 1;
    if newest_position is not null and v_checkpoint < newest_position then
        reason := format('%s has not checkpointed past position %s (it is at %s)', v_holder, newest_position, v_checkpoint);
    end if;
end
$$;

-- What every removal checks first, under the advisory lock that serialises removals (and log
-- consumers' rewinds): a time in the past, and an archive schema that is there and ours.
create function cqrs._archive_check(before timestamptz)
returns cqrs.retention
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_retention cqrs.retention;
begin
    perform pg_advisory_xact_lock('cqrs.retention'::regclass::oid::bigint);
    select * into v_retention from cqrs.retention;
    if before > now() then
        raise exception using errcode = '22023',
            message = 'archive_before was given a time to come: it would remove commands not yet appended',
            hint = 'Pass a time in the past: now() - interval ''7 days'' keeps a week.';
    end if;
    -- where archived partitions go must be there, and ours to create in, before anything moves
    if v_retention.archive_schema is not null then
        if not exists (select from pg_catalog.pg_namespace n where n.nspname = v_retention.archive_schema) then
            raise exception using errcode = '3F000',
                message = format('schema %s (cqrs.retention.archive_schema) does not exist', v_retention.archive_schema),
                hint = 'Create it, or set archive_schema to null to drop old partitions.';
        end if;
        if not has_schema_privilege(v_retention.archive_schema, 'CREATE') then
            raise exception using errcode = '42501',
                message = format('pg_cqrs may not create tables in schema %s (cqrs.retention.archive_schema)', v_retention.archive_schema),
                hint = 'Grant CREATE on it to the role that installed pg_cqrs.';
        end if;
    end if;
    return v_retention;
end
$$;

-- A partition once detached: dropped, or moved into retention.archive_schema; the log's horizon
-- and what it no longer holds recorded. What was done, and the table's name after it.
create function cqrs._archive_detached_table(partition regclass, newest_position bigint,
                                             out action text, out archived_as text)
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_retention cqrs.retention := (select r from cqrs.retention r);
begin
    perform cqrs._disown_log_partition(partition);
    if v_retention.archive_schema is null then
        archived_as := partition::text;
        execute format('drop table %s', partition);
        action := 'dropped';
    else
        execute format('alter table %s set schema %I', partition, v_retention.archive_schema);
        archived_as := partition::text;
        action := 'archived';
    end if;
    update cqrs.retention r
       set log_from = coalesce((select min(p.lower_bound) from cqrs.log_partitions() p), r.log_to),
           removed_through = greatest(r.removed_through, _archive_detached_table.newest_position);
end
$$;

-- Removes the partitions whose every command id is older than `before`, oldest first, and stops
-- at the first one it must keep (cqrs._log_partition_hold says why). Detached into
-- retention.archive_schema when that is set, dropped otherwise. The detach takes ACCESS
-- EXCLUSIVE on the log until the call commits, so appends wait that long (milliseconds,
-- README); it waits at most lock_wait for the lock (appends queue behind a waiting detach, so it
-- must not wait long), and a partition it could not get the lock for is kept, with that reason,
-- for the next call. cqrs.archive_before_concurrently does the same without making appends wait.
create function cqrs.archive_before(before timestamptz, lock_wait interval default '2 seconds')
returns table (partition text, action text, commands bigint, newest_position bigint, reason text)
language plpgsql volatile strict security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_part record;
    v_newest bigint;
    v_late bigint;
begin
    perform cqrs._archive_check(before);
    perform set_config('lock_timeout', (extract(epoch from lock_wait) * 1000)::bigint::text, true);
    for v_part in select p.partition, p.lower_bound, p.upper_bound from cqrs.log_partitions() p
                   where p.upper_bound <= before order by p.lower_bound loop
        partition := v_part.partition::text;
        execute format('select count(*) from %s l', v_part.partition) into commands;
        select h.newest_position, h.reason into newest_position, reason
          from cqrs._log_partition_hold(v_part.partition, v_part.lower_bound, before) h;
        if reason is null then
            begin
                execute format('alter table cqrs.command_log detach partition %s', v_part.partition);
                -- under the lock now: a command may have come in since the look above (a late
                -- retry of an old id), so the partition is looked at again and, if it must stay
                -- after all, the detach undone
                select h.newest_position, h.reason into v_newest, reason
                  from cqrs._log_partition_hold(v_part.partition, v_part.lower_bound, before) h;
                if reason is not null then
                    -- (pg_cqrs's own class QC, caught just below: it never leaves this function)
                    raise exception using errcode = 'QC900', message = reason;
                end if;
                if v_newest is distinct from newest_position then
                    -- only what came after the first look is counted here, by its position's
                    -- index: a count of the whole partition would hold every append that long (a
                    -- command that took its position before that look and committed after it
                    -- is removed but not counted)
                    execute format('select count(*) from %s l where l.position > $1', v_part.partition)
                       into v_late using newest_position;
                    commands := commands + v_late;
                    newest_position := v_newest;
                end if;
            exception
                when lock_not_available then
                    reason := format('cqrs.command_log was in use longer than lock_wait (%s), by a long reader such as a rebuild: left for the next call',
                                     lock_wait);
                when sqlstate 'QC900' then
                    null;
            end;
        end if;
        if reason is not null then
            action := 'kept';
            return next;
            exit;
        end if;
        select d.action, d.archived_as into action, partition
          from cqrs._archive_detached_table(v_part.partition, newest_position) d;
        return next;
    end loop;
end
$$;
comment on function cqrs.archive_before(timestamptz, interval) is
    'Removes (drops, or detaches into retention.archive_schema) the log partitions older than before that every projection, sink and log consumer has passed; returns what it did.';

-- The same removal with DETACH PARTITION … CONCURRENTLY, which takes SHARE UPDATE EXCLUSIVE on
-- the log where a plain detach takes ACCESS EXCLUSIVE, so no append waits. PostgreSQL runs that
-- only as a statement of its own, outside any transaction block and function: so this returns
-- the statements, for psql's \gexec, run by the owner of the log (who installed pg_cqrs):
--   select * from cqrs.archive_before_concurrently(now() - interval '7 days') \gexec
-- Each detach is followed by cqrs.archive_detached(), which looks at the partition again (a
-- command may have come in between: then it is attached again, kept) and drops or archives it.
create function cqrs.archive_before_concurrently(before timestamptz)
returns table (statement text)
language plpgsql volatile strict security definer
set search_path = pg_catalog, pg_temp
set datestyle = 'ISO, YMD'
as $$
declare
    v_part record;
    v_reason text;
begin
    perform cqrs._archive_check(before);
    for v_part in select p.partition, p.lower_bound, p.upper_bound from cqrs.log_partitions() p
                   where p.upper_bound <= before order by p.lower_bound loop
        select h.reason into v_reason from cqrs._log_partition_hold(v_part.partition, v_part.lower_bound, before) h;
        if v_reason is not null then
            raise notice '%', format('%s is kept: %s', v_part.partition, v_reason);
            exit;
        end if;
        statement := format('alter table cqrs.command_log detach partition %s concurrently', v_part.partition);
        return next;
        statement := format('select * from cqrs.archive_detached(%L, %L, %L, %L)',
                            v_part.partition, v_part.lower_bound, v_part.upper_bound, before);
        return next;
    end loop;
end
$$;
comment on function cqrs.archive_before_concurrently(timestamptz) is
    'The statements (for psql''s \gexec, by the log''s owner) that remove what archive_before would, with DETACH PARTITION … CONCURRENTLY: appends never wait.';

-- Finishes the removal of a partition that a DETACH … CONCURRENTLY of
-- cqrs.archive_before_concurrently took off the log: looked at again, then dropped or
-- archived, or attached again and kept if a command came in that a reader has not passed.
create function cqrs.archive_detached(detached regclass, lower_bound timestamptz, upper_bound timestamptz,
                                      before timestamptz)
returns table (partition text, action text, commands bigint, newest_position bigint, reason text)
language plpgsql volatile strict security definer
set search_path = pg_catalog, pg_temp
set datestyle = 'ISO, YMD'
as $$
declare
    v_table regclass := detached;
    v_pending boolean;
begin
    perform cqrs._archive_check(before);
    partition := v_table::text;
    select i.inhdetachpending into v_pending from pg_catalog.pg_inherits i where i.inhrelid = v_table;
    if found then
        raise exception using errcode = '55000',
            message = format('%s is still a partition of cqrs.command_log: its detach %s', v_table,
                             case when v_pending then 'was interrupted' else 'did not happen' end),
            hint = case when v_pending then format('Finish it (alter table cqrs.command_log detach partition %s finalize), then call this again.', v_table)
                        else 'Run the statements of cqrs.archive_before_concurrently again, each on its own (psql''s \gexec), by the owner of cqrs.command_log.' end;
    end if;
    execute format('select count(*) from %s l', v_table) into commands;
    select h.newest_position, h.reason into newest_position, reason
      from cqrs._log_partition_hold(v_table, lower_bound, before) h;
    if reason is not null then
        -- the CHECK constraint the concurrent detach left on it spares the attach its scan
        perform cqrs._attach_log_partition(v_table, lower_bound, upper_bound);
        action := 'kept';
        return next;
        return;
    end if;
    select d.action, d.archived_as into action, partition
      from cqrs._archive_detached_table(v_table, newest_position) d;
    return next;
end
$$;
comment on function cqrs.archive_detached(regclass, timestamptz, timestamptz, timestamptz) is
    'Drops or archives a log partition that cqrs.archive_before_concurrently''s detach took off the log (or attaches it again if it must stay).';

-- What the sidecar's maintenance runs: every partition's keys checked, partitions ahead, and
-- retention.keep applied.
create function cqrs.maintain()
returns table (partition text, action text, commands bigint, newest_position bigint, reason text)
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_keep interval := (select r.keep from cqrs.retention r);
begin
    return query select k, 'keyed', 0::bigint, null::bigint, null::text from cqrs._check_log_partitions() k;
    return query select m, 'created', 0::bigint, null::bigint, null::text from cqrs._make_log_partitions() m;
    if v_keep is not null then
        return query select * from cqrs.archive_before(now() - v_keep);
    end if;
end
$$;
comment on function cqrs.maintain() is
    'Gives any log partition without them pg_cqrs''s keys (refusing a default partition), creates the partitions ahead (retention.premake; none while pg_partman keeps the log) and removes those older than retention.keep; returns what it did. The sidecar calls it.';

-- The oldest command-id time the log still holds: a retry of an older command is refused.
create function cqrs.idempotency_horizon()
returns timestamptz
language sql stable security definer
set search_path = pg_catalog, pg_temp
as $$ select r.log_from from cqrs.retention r $$;
comment on function cqrs.idempotency_horizon() is
    'The oldest command-id time cqrs.command_log still holds (-infinity: all); a retry of an older command is refused.';

-- Raises 55000 when the log no longer starts at its first command: what reads all of it from
-- the beginning (a rebuild, a new projection's backfill) cannot be exact.
create function cqrs._check_log_whole(what text, backfill boolean default false)
returns void
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_retention cqrs.retention;
begin
    -- the log first: a removal that had not committed by then waits for the caller's
    -- transaction (its detach needs ACCESS EXCLUSIVE), one that had is seen just below
    lock table cqrs.command_log in access share mode;
    v_retention := (select r from cqrs.retention r);
    if v_retention.removed_through is not null then
        raise exception using errcode = '55000',
            message = format('%s needs the whole command log, and it starts after position %s since cqrs.archive_before removed older commands',
                             what, v_retention.removed_through),
            hint = case when v_retention.archive_schema is null
                        then 'The removed partitions were dropped: restore them from a backup into cqrs.command_log to read from the beginning.'
                        else format('Attach the archived partitions in schema %s back to cqrs.command_log (alter table cqrs.command_log attach partition …), then set cqrs.retention.removed_through to null.',
                                    v_retention.archive_schema) end
                   || case when backfill then ' Or start the projection at the end of the log: create_projection(…, backfill => false).' else '' end;
    end if;
end
$$;

-- Where a projection's catch-up reads the log from: stream by stream (null), or walking it in
-- log order after the position returned. Stream by stream, each chunk looks up every behind
-- stream's next commands in each partition its id times span (cqrs.stream's range): cheap while
-- streams are short-lived, a year of index lookups per stream per chunk when each lives all year
-- (0.11x of one partition, measured). A walk looks into each partition once per chunk but reads
-- every command after its start, applied or not. Both are counted without reading the log —
-- lookups: the partitions each behind stream spans; a walk: the positions it passes — with one
-- lookup weighed as 4 commands walked (measured: ≈10 µs against 2.3–5 µs). Where the walk
-- starts is each behind stream's next command, looked up once, and only where that can skip
-- more than it costs: the commands before it were all applied, so it skips at most the log's
-- commands less those not applied (none when a new projection starts from the beginning).
create function cqrs._catch_up_from(projection text, upto bigint, chunk integer)
returns bigint
language plpgsql stable security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_width double precision;
    v_partitions bigint;
    v_lookups numeric;
    v_missing numeric;
    v_first bigint;
    v_end bigint;
    v_by_stream numeric;
    v_start bigint;
begin
    select extract(epoch from r.partition_interval), coalesce(r.removed_through, 0) into v_width, v_first
      from cqrs.retention r;
    select count(*) into v_partitions from pg_catalog.pg_inherits i where i.inhparent = 'cqrs.command_log'::pg_catalog.regclass;
    select sum(least(v_partitions,
                     case when s.min_id_time = '-infinity' and s.max_id_time = '-infinity' then 1
                          when s.min_id_time = '-infinity' or s.max_id_time = 'infinity' or s.min_id_time > s.max_id_time
                          then v_partitions
                          else floor(extract(epoch from s.max_id_time - s.min_id_time) / v_width) + 1 end)),
           sum(s.last_seq - coalesce(ps.last_seq, 0))
      into v_lookups, v_missing
      from cqrs.stream s
      left join cqrs.projection_stream ps on ps.projection = _catch_up_from.projection and ps.stream = s.stream
     where s.last_seq > coalesce(ps.last_seq, 0);
    if v_missing is null then
        return null;
    end if;
    v_end := coalesce(upto, (select max(l.position) from cqrs.command_log l), 0);
    v_by_stream := ceil(v_missing / chunk) * v_lookups * 4;
    if v_end - v_first - v_missing <= v_lookups * 4 then
        return case when v_end - v_first < v_by_stream then v_first end;
    end if;
    select min(l.position) into v_start
      from cqrs.stream s
      left join cqrs.projection_stream ps on ps.projection = _catch_up_from.projection and ps.stream = s.stream
      join cqrs.command_log l on l.stream = s.stream and l.seq = coalesce(ps.last_seq, 0) + 1
                             and l.id_time between s.min_id_time and s.max_id_time
     where s.last_seq > coalesce(ps.last_seq, 0);
    return case when v_start is not null and v_end - v_start < v_by_stream then v_start - 1 end;
end
$$;
comment on function cqrs._catch_up_from(text, bigint, integer) is
    'Where projection''s catch-up (up to position upto, chunk commands at a time) walks the log from in log order, or null to read it stream by stream: whichever reads less.';

revoke all on cqrs.retention, cqrs.log_consumer from public;
grant select on cqrs.retention to cqrs_reader, cqrs_projector, cqrs_writer;
grant select on cqrs.log_consumer to cqrs_reader, cqrs_projector;
revoke execute on function cqrs.log_partitions() from public;
revoke execute on function cqrs._create_log_partition(text, timestamptz, timestamptz) from public;
revoke execute on function cqrs._attach_log_partition(regclass, timestamptz, timestamptz) from public;
revoke execute on function cqrs._log_partition_name(timestamptz) from public;
revoke execute on function cqrs._make_log_partitions() from public;
revoke execute on function cqrs._partman_keeps_log() from public;
revoke execute on function cqrs._check_log_partitions() from public;
revoke execute on function cqrs._disown_log_partition(regclass) from public;
revoke execute on function cqrs.hold_log(text, bigint) from public;
revoke execute on function cqrs.release_log(text) from public;
revoke execute on function cqrs._log_partition_hold(regclass, timestamptz, timestamptz) from public;
revoke execute on function cqrs._archive_check(timestamptz) from public;
revoke execute on function cqrs._archive_detached_table(regclass, bigint) from public;
revoke execute on function cqrs.archive_before(timestamptz, interval) from public;
revoke execute on function cqrs.archive_before_concurrently(timestamptz) from public;
revoke execute on function cqrs.archive_detached(regclass, timestamptz, timestamptz, timestamptz) from public;
revoke execute on function cqrs.maintain() from public;
revoke execute on function cqrs.idempotency_horizon() from public;
revoke execute on function cqrs._check_log_whole(text, boolean) from public;
revoke execute on function cqrs._catch_up_from(text, bigint, integer) from public;
grant execute on function cqrs.log_partitions() to cqrs_reader, cqrs_projector;
grant execute on function cqrs.maintain() to cqrs_projector;
grant execute on function cqrs.hold_log(text, bigint), cqrs.release_log(text) to cqrs_projector;
grant execute on function cqrs.idempotency_horizon() to cqrs_writer, cqrs_reader, cqrs_projector;
grant execute on function cqrs._check_log_whole(text, boolean) to cqrs_projector;
grant execute on function cqrs._catch_up_from(text, bigint, integer) to cqrs_projector;

create trigger retention_restored before insert on cqrs.retention
    for each row execute function cqrs._retention_restored();
select pg_catalog.pg_extension_config_dump('cqrs.retention', '');
select pg_catalog.pg_extension_config_dump('cqrs.log_consumer', '');

-- CREATE EXTENSION makes no partition: the first append (either edition) or cqrs.maintain()
-- makes them (cqrs._make_log_partitions). A restore from pg_dump brings the dumped log's own
-- partitions, rows and bounds after CREATE EXTENSION, and partitions made by it would collide
-- with them; no setting tells a restore apart reliably (`--enable-row-security` leaves
-- row_security on, as in any session), so none are made. Partitions made later are no members
-- of the extension either, so that pg_dump dumps each one whole (README, Retention).
