-- The roles table of the README, done: every documented operation tried as a role granted
-- exactly one cqrs_* role (and as one granted none), each answering ok or its SQLSTATE. What a
-- role may do succeeds; everything else is 42501 — an application granted cqrs_writer and
-- select on its read model appends, reads its stream heads and reads its own writes.
\set ON_ERROR_ROLLBACK on
\set SHOW_CONTEXT never
set client_min_messages = error;
begin;
\ir install.sql

create role app_writer login in role cqrs_writer;
create role app_reader login in role cqrs_reader;
create role app_projector login in role cqrs_projector;
create role stranger login;
grant usage on schema cqrs to stranger;
create table public.loans_rm (book text primary key, borrower text, rev bigint not null default 0);
-- the read model is the application's: it grants select to whoever reads it
grant select on public.loans_rm to cqrs_writer, cqrs_reader;
select cqrs.register_command_type('BORROW_BOOK', '{"type": "object", "required": ["book"]}') > 0 as registered;
select cqrs.create_projection('loans', 'public.loans_rm', 'book',
    '{"BORROW_BOOK": {"action": "upsert", "key": "$.book", "set": {"borrower": "$.borrower"}}}');
select seq from cqrs.append(cqrs.uuid_v7(), 'book-1', 'BORROW_BOOK', '{"book": "book-1", "borrower": "ada"}');
select count(*) as applied from cqrs.catch_up();

-- ok, or the SQLSTATE of the error, of one statement run as one role (undone either way)
create function pg_temp.attempt(who text, statement text) returns text language plpgsql as $$
begin
    execute pg_catalog.format('set local role %I', who);
    execute statement;
    raise sqlstate 'P0004';
exception
    when sqlstate 'P0004' then return 'ok';
    when others then return sqlstate;
end
$$;
create temp table operations (n serial, statement text);
insert into operations (statement) values
    ($$select cqrs.append(cqrs.uuid_v7(), 'book-2', 'BORROW_BOOK', '{"book": "book-2"}')$$),
    ($$select cqrs.append_batch('[{"command_id": "0190f4f0-0000-7000-8000-000000000001", "stream": "book-3", "command_type": "BORROW_BOOK", "payload": {"book": "book-3"}}]')$$),
    ($$select last_seq from cqrs.stream where stream = 'book-1'$$),
    ($$select cqrs.wait_for('book-1', 1, 'loans', '10 ms')$$),
    ($$select * from cqrs.read('loans', 'book-1')$$),
    ($$select * from cqrs.read_many('loans', array['book-1', 'book-9'])$$),
    ($$select * from public.loans_rm$$),
    ($$select name, halted, last_error, checkpoint_position from cqrs.projection_state$$),
    ($$select * from cqrs.projection$$),
    ($$select * from cqrs.status()$$),
    ($$select * from cqrs.progress()$$),
    ($$select * from cqrs.command_type$$),
    ($$select * from cqrs.changed_since('loans', -1)$$),
    ($$select * from cqrs.command_log$$),
    ($$select last_error_detail from cqrs.projection_state$$),
    ($$select * from cqrs.dead_letter$$),
    ($$select * from cqrs.catch_up()$$),
    ($$select * from cqrs.project_batch('[]', null, null)$$),
    ($$select cqrs.try_lead('someone')$$),
    ($$select * from cqrs.resume('loans')$$),
    ($$select * from cqrs.rebuild('loans')$$),
    ($$select * from cqrs.retry_dead_letters('loans')$$),
    ($$insert into cqrs.command_log (command_id, stream, seq, command_type, payload) values (cqrs.uuid_v7(), 'x', 1, 'T', '{}')$$),
    ($$update cqrs.stream set last_seq = 0$$),
    ($$select cqrs.register_command_type('RETURN_BOOK', '{}')$$),
    ($$select cqrs.create_projection('loans2', 'public.loans_rm', 'book', '{}')$$),
    ($$select cqrs.drop_projection('loans')$$),
    ($$select cqrs.version()$$),
    ($$select cqrs.uuid_v7()$$);
grant select on operations to public;
select o.statement,
       pg_temp.attempt('app_writer', o.statement) as writer,
       pg_temp.attempt('app_reader', o.statement) as reader,
       pg_temp.attempt('app_projector', o.statement) as projector,
       pg_temp.attempt('stranger', o.statement) as "none"
  from operations o order by o.n;
rollback;
