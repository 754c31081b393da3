-- pg_cqrs outbox: the command log delivered to message brokers (the sidecar's sinks). A sink is
-- delivered by the leader of a projection group, from that group's slot, like its projections:
-- per-stream progress (what the sink has delivered of each stream, so that nothing is sent twice
-- by the sidecar and a sink that fell behind catches up from cqrs.command_log exactly), a
-- checkpoint, and a halt for an event the broker refuses. Every change is fenced by the group's
-- lease (cqrs._fence): a deposed leader's late acknowledgement moves nothing.

-- What a sink may be called: the projection-group rule (lowercase, 1 to 40 characters), which
-- also fits metric labels and log fields.
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

-- Registers a sink of a group when the sidecar configured with it first leads (or moves it to
-- that group); the sidecar's role may not write the table itself.
create function cqrs._ensure_sink(name text, projection_group text)
returns void
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    if name is null or not cqrs._is_projection_group(name) then
        raise exception using errcode = '22023',
            message = format('%L cannot name a sink', name),
            hint = 'A sink name is 1 to 40 characters of a-z 0-9 _, starting with a letter.';
    end if;
    perform cqrs._check_projection_group(projection_group);
    insert into cqrs.sink as s (name, projection_group) values (_ensure_sink.name, _ensure_sink.projection_group)
    on conflict on constraint sink_pkey do update set projection_group = excluded.projection_group
     where s.projection_group is distinct from excluded.projection_group;
end
$$;
comment on function cqrs._ensure_sink(text, text) is
    'Registers sink name as delivered by projection_group''s leader (the sidecar calls it when it leads).';

-- Where a sink's catch-up starts: the position of the oldest command it has not delivered (each
-- stream's next after its progress), null when it has delivered everything. Once per catch-up:
-- from there the walk goes by position (cqrs._sink_behind), not over every stream per chunk.
create function cqrs._sink_behind_start(sink text)
returns bigint
language sql stable security definer
set search_path = pg_catalog, pg_temp
as $$
    select min(l.position)
      from cqrs.stream s
      left join cqrs.sink_stream ss on ss.sink = _sink_behind_start.sink and ss.stream = s.stream
      join cqrs.command_log l on l.stream = s.stream and l.seq = coalesce(ss.last_seq, 0) + 1
                             and l.id_time between s.min_id_time and s.max_id_time
     where s.last_seq > coalesce(ss.last_seq, 0);
$$;
comment on function cqrs._sink_behind_start(text) is
    'The position of the oldest command sink has not delivered (null: none): where its catch-up from the log starts.';

-- The command-log rows after position `after` that sink has not delivered (above its stream's
-- progress), in log order, at most chunk. A row that commits later with a position below the
-- walk is found by the next catch-up's start (the sidecar catches up once more after attaching
-- to the slot, which has every later commit).
create function cqrs._sink_behind(sink text, after bigint, chunk integer)
returns table (event_position bigint, event text)
language sql stable security definer
set search_path = pg_catalog, pg_temp
as $$
    select l.position,
           pg_catalog.json_build_object('position', l.position, 'command_id', l.command_id, 'stream', l.stream,
                                        'seq', l.seq, 'command_type', l.command_type, 'payload', l.payload,
                                        'metadata', l.metadata, 'created_at', l.created_at::text)::text
      from cqrs.command_log l
      left join cqrs.sink_stream ss on ss.sink = _sink_behind.sink and ss.stream = l.stream
     where l.position > after and l.seq > coalesce(ss.last_seq, 0)
     order by l.position
     limit chunk;
$$;
comment on function cqrs._sink_behind(text, bigint, integer) is
    'The command-log rows after position after that sink has not delivered, in log order, at most chunk: a sink''s catch-up walks the log with it from cqrs._sink_behind_start.';

-- Each given stream's progress for sink (0 for a stream it never delivered).
create function cqrs._sink_progress(sink text, streams text[])
returns table (stream text, last_seq bigint)
language sql stable security definer
set search_path = pg_catalog, pg_temp
as $$
    select u.stream, coalesce((select ss.last_seq from cqrs.sink_stream ss
                                where ss.sink = _sink_progress.sink and ss.stream = u.stream), 0)
      from pg_catalog.unnest(streams) as u(stream);
$$;
comment on function cqrs._sink_progress(text, text[]) is 'How far sink has delivered each of streams.';

-- The fence of a sink's bookkeeping: its row locked, QC001 unless fencing_token is the lease of
-- the sink's group (cqrs._fence), 42704 for an unknown sink.
create function cqrs._sink_fence(sink text, fencing_token bigint, commit_lsn pg_lsn)
returns void
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_group text;
begin
    select s.projection_group into v_group from cqrs.sink s where s.name = _sink_fence.sink for update;
    if not found then
        raise exception using errcode = '42704', message = format('sink %s does not exist', pg_catalog.quote_ident(sink));
    end if;
    perform cqrs._fence(fencing_token, commit_lsn, v_group);
end
$$;
comment on function cqrs._sink_fence(text, bigint, pg_lsn) is
    'Locks sink''s row and checks that fencing_token is the lease of its group (QC001), or raises 42704.';

-- What the broker acknowledged: each stream's progress moves forward (never back), and the
-- checkpoint too; fenced by the group's lease, so a deposed leader's late acknowledgement is
-- refused (QC001) and moves nothing. (unnest of two arrays unqualified: the multi-argument form
-- is syntax, not a function of pg_catalog.)
create function cqrs._sink_delivered(sink text, fencing_token bigint, streams text[], seqs bigint[],
                                     commit_lsn pg_lsn, max_position bigint, delivered bigint)
returns void
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    perform cqrs._sink_fence(sink, fencing_token, commit_lsn);
    insert into cqrs.sink_stream as ss (sink, stream, last_seq)
    select _sink_delivered.sink, u.stream, u.last_seq from unnest(streams, seqs) as u(stream, last_seq)
    on conflict on constraint sink_stream_pkey do update set last_seq = excluded.last_seq
     where ss.last_seq < excluded.last_seq;
    update cqrs.sink s
       set checkpoint_lsn = greatest(s.checkpoint_lsn, commit_lsn),
           checkpoint_position = greatest(s.checkpoint_position, max_position),
           checkpoint_at = pg_catalog.now(),
           delivered = s.delivered + coalesce(_sink_delivered.delivered, 0)
     where s.name = _sink_delivered.sink;
end
$$;
comment on function cqrs._sink_delivered(text, bigint, text[], bigint[], pg_lsn, bigint, bigint) is
    'Records what the broker acknowledged for sink (per-stream progress, checkpoint, count); QC001 unless fencing_token is the lease of the sink''s group.';

-- The broker refused an event for good (too large, say): the sink stops there until resumed.
create function cqrs._sink_halt(sink text, fencing_token bigint, error text, at_position bigint)
returns void
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    perform cqrs._sink_fence(sink, fencing_token, null);
    update cqrs.sink s
       set halted = true, last_error = error, last_error_at = pg_catalog.now(), last_error_position = at_position
     where s.name = _sink_halt.sink;
end
$$;
comment on function cqrs._sink_halt(text, bigint, text, bigint) is
    'Halts sink on an event its broker refuses (QC001 unless fencing_token is the lease of the sink''s group).';

-- ==============================================================================================
-- public
-- ==============================================================================================

create function cqrs.resume_sink(name text)
returns boolean
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    update cqrs.sink s set halted = false, last_error = null, last_error_at = null, last_error_position = null
     where s.name = resume_sink.name and s.halted;
    if found then
        return true;
    end if;
    if not exists (select from cqrs.sink s where s.name = resume_sink.name) then
        raise exception using errcode = '42704', message = format('sink %s does not exist', pg_catalog.quote_ident(name)),
            hint = 'See select * from cqrs.sink_status().';
    end if;
    return false;
end
$$;
comment on function cqrs.resume_sink(text) is
    'Clears a halted sink: its leader delivers again from the event it halted on (fix the cause first: the broker''s limit, or the command). False when it was not halted.';

-- Per sink: halted and why, checkpoint, and what it has still to deliver (numbers only).
create function cqrs.sink_status()
returns table (sink text, projection_group text, halted boolean, last_error text, last_error_at timestamptz,
               last_error_position bigint, checkpoint_lsn pg_lsn, checkpoint_position bigint, checkpoint_at timestamptz,
               delivered bigint, events_behind bigint, seconds_behind double precision)
language sql stable security definer
set search_path = pg_catalog, pg_temp
as $$
    select s.name, s.projection_group, s.halted, s.last_error, s.last_error_at, s.last_error_position,
           s.checkpoint_lsn, s.checkpoint_position, s.checkpoint_at, s.delivered,
           behind.events, coalesce(behind.seconds, 0)
      from cqrs.sink s
      cross join lateral (
          select count(*)::bigint as events,
                 extract(epoch from pg_catalog.clock_timestamp() - min(l.created_at))::double precision as seconds
            from cqrs.command_log l
           where l.position > coalesce(s.checkpoint_position, 0)) behind
     order by s.name;
$$;
comment on function cqrs.sink_status() is
    'Per sink: its group, halted and why, checkpoint, delivered, and commands after the checkpoint with the age of the oldest.';

revoke all on cqrs.sink, cqrs.sink_stream from public;
grant select on cqrs.sink, cqrs.sink_stream to cqrs_projector;
revoke execute on function cqrs._sink_fence(text, bigint, pg_lsn) from public;
revoke execute on function cqrs._ensure_sink(text, text), cqrs._sink_behind_start(text), cqrs._sink_behind(text, bigint, integer), cqrs._sink_progress(text, text[]),
    cqrs._sink_delivered(text, bigint, text[], bigint[], pg_lsn, bigint, bigint), cqrs._sink_halt(text, bigint, text, bigint),
    cqrs.resume_sink(text), cqrs.sink_status() from public;
grant execute on function cqrs._ensure_sink(text, text), cqrs._sink_behind_start(text), cqrs._sink_behind(text, bigint, integer), cqrs._sink_progress(text, text[]),
    cqrs._sink_delivered(text, bigint, text[], bigint[], pg_lsn, bigint, bigint), cqrs._sink_halt(text, bigint, text, bigint),
    cqrs.resume_sink(text), cqrs.sink_status() to cqrs_projector;
grant execute on function cqrs.sink_status() to cqrs_reader;

select pg_catalog.pg_extension_config_dump('cqrs.sink', '');
select pg_catalog.pg_extension_config_dump('cqrs.sink_stream', '');
