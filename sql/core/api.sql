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
comment on function cqrs.project_batch(jsonb, pg_lsn, bigint) is
    'Applies an ordered batch of command-log rows to every projection, exactly once, in one transaction; returns every read-model row it changed. A batch at or below a projection''s checkpoint LSN is skipped; a fencing_token older than the lease is refused.';
comment on function cqrs.read_many(text, text[]) is
    'The current rows of a read model: for every key its canonical form, revision and row as json; a missing row has a null doc and the projection''s current revision.';
comment on function cqrs.read(text, text) is 'One read-model row as jsonb with its revision; no row when there is none.';
comment on function cqrs.catch_up(text, integer) is
    'Applies every command a projection (or every projection) has not applied yet, read from the log; returns the changed rows.';
comment on function cqrs.resume(text) is 'Clears a halted projection''s error and catches it up with the log.';
comment on function cqrs.retry_dead_letters(text) is
    'Applies a projection''s dead letters again; those that succeed are removed.';

revoke execute on function cqrs.append(uuid, text, text, jsonb, bigint, jsonb) from public;
grant execute on function cqrs.append(uuid, text, text, jsonb, bigint, jsonb) to cqrs_writer;
revoke execute on function cqrs.create_projection(text, regclass, text, jsonb, text, text, boolean) from public;
revoke execute on function cqrs.project_batch(jsonb, pg_lsn, bigint), cqrs.catch_up(text, integer), cqrs.resume(text),
    cqrs.retry_dead_letters(text), cqrs.read_many(text, text[]), cqrs.read(text, text) from public;
grant execute on function cqrs.project_batch(jsonb, pg_lsn, bigint), cqrs.catch_up(text, integer) to cqrs_projector;
grant execute on function cqrs.read_many(text, text[]), cqrs.read(text, text) to cqrs_reader, cqrs_projector;
