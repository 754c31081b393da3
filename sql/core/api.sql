-- pg_cqrs: what both editions share about the functions each implements in its own way
-- (the extension edition in Rust, sql/extension/functions.sql; the portable edition in
-- PL/pgSQL, sql/portable/): their comments, who may call them, and what is built on them.
-- Runs after the edition's functions exist.

create trigger command_type_changed
    after insert or update or delete or truncate on cqrs.command_type
    for each statement execute function cqrs._command_type_changed();

create function cqrs.read(projection text, key text)
returns table (doc jsonb, rev bigint)
language sql stable
as $$ select r.doc::jsonb, r.rev from cqrs.read_many(read.projection, array[read.key]) r where r.doc is not null $$;

comment on function cqrs.version() is
    'The installed pg_cqrs version and edition (extension: the compiled extension; portable: SQL and PL/pgSQL).';
comment on function cqrs.append(uuid, text, text, jsonb, bigint, jsonb) is
    'Appends one command in the caller''s transaction: idempotent on command_id, sequenced per stream, optionally guarded by expected_seq, validated against the registered JSON Schema.';
comment on function cqrs.create_projection(text, regclass, text, jsonb, text, text, boolean) is
    'Registers a read model: your table, its uniquely indexed key column, a bigint revision column, and what each command type does to it.';
comment on function cqrs._command_type_changed() is
    'Trigger function: a change of cqrs.command_type invalidates the compiled schemas of every session.';
comment on function cqrs._check_json_schema(jsonb) is
    'Raises 22023 (0A000 in the portable edition, for what it cannot check) unless the JSON Schema is valid; used by cqrs.register_command_type.';
comment on function cqrs._project_batch(jsonb, pg_lsn, bigint, text) is
    'The work of cqrs.project_batch without its fencing check; call cqrs.project_batch.';
comment on function cqrs.read_many(text, text[]) is
    'The current rows of a read model: for every key its canonical form, revision and row as json; a missing row has a null doc and the projection''s current revision.';
comment on function cqrs.read(text, text) is 'One read-model row as jsonb with its revision; no row when there is none.';
comment on function cqrs.catch_up(text, integer) is
    'Applies every command a projection (or every projection) has not applied yet, read from the log up to its end when the call started; returns the changed rows.';
comment on function cqrs.resume(text, boolean) is
    'Clears a halted projection''s error and catches it up with the log; with skip => true the event it halted on goes to cqrs.dead_letter first (with its error), so that the projection moves past it.';
comment on function cqrs.rebuild(text, integer) is
    'Empties a read model and replays the whole log into it in one transaction (readers keep the old rows until it commits); returns events, seconds and rate.';
comment on function cqrs.wait_for(text, bigint, text, interval) is
    'Read-your-writes: true as soon as command seq of stream is applied to the projection, false after timeout.';
comment on function cqrs.uuid_v7() is 'A new time-ordered UUID (version 7), for command ids.';
comment on function cqrs.changed_since(text, bigint) is
    'Read-model rows of a projection whose revision is above the given one (all rows for -1), as (key, rev, doc): for warming and repairing caches. Scans the read model, as its owner.';
comment on function cqrs.drop_projection(text) is
    'Unregisters a projection (its progress, parked events and dead letters too); the read-model table stays.';
comment on function cqrs._gap_alert_seconds() is
    'Seconds a gap may stay unfilled before cqrs.status() flags it (cqrs.gap_alert_after).';
comment on function cqrs.stats() is
    'What cqrs.append answered since the server started, per command type: accepted, duplicate (a replay), expected_seq_conflict (40001), invalid (the command is wrong: class 22, 54000, 42704), error (anything else), calls and their total time. Extension edition with pg_cqrs in shared_preload_libraries (else 55000); portable edition: 0A000.';
comment on function cqrs.append_latency() is
    'The time cqrs.append took, per command type, as a cumulative histogram: calls that took at most le seconds (the last le is infinity). As cqrs.stats().';
comment on function cqrs.retry_dead_letters(text) is
    'Applies a projection''s dead letters again; those that succeed are removed.';

-- Who may call what: nothing is left to PUBLIC that is not meant for everyone.
revoke execute on function cqrs._command_type_changed(), cqrs._check_json_schema(jsonb),
    cqrs.append(uuid, text, text, jsonb, bigint, jsonb),
    cqrs.create_projection(text, regclass, text, jsonb, text, text, boolean),
    cqrs._project_batch(jsonb, pg_lsn, bigint, text),
    cqrs.catch_up(text, integer), cqrs.resume(text, boolean), cqrs.retry_dead_letters(text), cqrs.rebuild(text, integer), cqrs.read_many(text, text[]), cqrs.read(text, text),
    cqrs.wait_for(text, bigint, text, interval), cqrs.changed_since(text, bigint), cqrs.drop_projection(text),
    cqrs._gap_alert_seconds(), cqrs.stats(), cqrs.append_latency()
    from public;
grant execute on function cqrs.append(uuid, text, text, jsonb, bigint, jsonb) to cqrs_writer;
-- an application reads its own writes: it waits for them, then reads the read models it may select
grant execute on function cqrs.wait_for(text, bigint, text, interval), cqrs.read(text, text), cqrs.read_many(text, text[])
    to cqrs_writer;
-- routine operations need no superuser: the projector resumes, rebuilds and retries
grant execute on function cqrs._project_batch(jsonb, pg_lsn, bigint, text),
    cqrs.catch_up(text, integer),
    cqrs.resume(text, boolean), cqrs.retry_dead_letters(text), cqrs.rebuild(text, integer) to cqrs_projector;
grant execute on function cqrs.read_many(text, text[]), cqrs.read(text, text), cqrs.wait_for(text, bigint, text, interval),
    cqrs.changed_since(text, bigint), cqrs._gap_alert_seconds()
    to cqrs_reader, cqrs_projector;
-- command-side statistics: operators and the sidecar (command types and counts, no command data)
grant execute on function cqrs.stats(), cqrs.append_latency() to cqrs_reader, cqrs_projector;
-- cqrs.version() and cqrs.uuid_v7() stay callable by everyone: they reveal and change nothing.
