-- cqrs.create_projection checks a definition against the catalog; nothing is registered when
-- it is refused.
\set ON_ERROR_ROLLBACK on
\set SHOW_CONTEXT never
begin;
\ir install.sql

create table rm (id text primary key, n integer not null default 0, label text, payload jsonb,
                 seen_at timestamptz, gen integer generated always as (n * 2) stored, rev bigint not null default 0);
create table no_key (id text, rev bigint);
create table no_rev (id text primary key);
create table bad_rev (id text primary key, rev integer);
create table rm2 (like rm including all);

-- a valid one
select cqrs.create_projection('ok', 'rm', 'id', '{"T": {"action": "upsert", "set": {"label": "$.label", "seen_at": {"field": "created_at"}}, "add": {"n": {"const": 1}}}}');
select name, target, key_column, rev_column, on_error, handlers from cqrs.projection;
select name, halted, revision from cqrs.projection_state;

-- names, targets, duplicates
select cqrs.create_projection('ok', 'rm', 'id', '{"T": {"action": "delete"}}');
\echo :LAST_ERROR_SQLSTATE
select cqrs.create_projection('other', 'rm', 'id', '{"T": {"action": "delete"}}');
\echo :LAST_ERROR_SQLSTATE
select cqrs.create_projection('bad name!', 'no_rev', 'id', '{"T": {"action": "delete"}}');
\echo :LAST_ERROR_SQLSTATE
select cqrs.create_projection('x', 'no_such_table', 'id', '{"T": {"action": "delete"}}');
\echo :LAST_ERROR_SQLSTATE
select cqrs.create_projection('x', 'cqrs.stream', 'stream', '{"T": {"action": "delete"}}');
\echo :LAST_ERROR_SQLSTATE
select cqrs.create_projection(null, 'rm', 'id', '{}');
\echo :LAST_ERROR_SQLSTATE
select cqrs.create_projection('x', 'no_rev', 'id', '{"T": {"action": "delete"}}', on_error => 'ignore');
\echo :LAST_ERROR_SQLSTATE

-- the key and the revision column
select cqrs.create_projection('x', 'no_key', 'id', '{"T": {"action": "delete"}}');
\echo :LAST_ERROR_SQLSTATE
select cqrs.create_projection('x', 'no_rev', 'nope', '{"T": {"action": "delete"}}');
\echo :LAST_ERROR_SQLSTATE
select cqrs.create_projection('x', 'no_rev', 'id', '{"T": {"action": "delete"}}');
\echo :LAST_ERROR_SQLSTATE
select cqrs.create_projection('x', 'bad_rev', 'id', '{"T": {"action": "delete"}}');
\echo :LAST_ERROR_SQLSTATE

-- handlers: shape
select cqrs.create_projection('x', 'no_rev', 'id', '[]');
\echo :LAST_ERROR_SQLSTATE
select cqrs.create_projection('x', 'no_rev', 'id', '{"T": {"action": "merge"}}');
\echo :LAST_ERROR_SQLSTATE
select cqrs.create_projection('x', 'no_rev', 'id', '{"T": {"action": "upsert", "sett": {}}}');
\echo :LAST_ERROR_SQLSTATE
select cqrs.create_projection('x', 'no_rev', 'id', '{"T": {"action": "upsert", "set": {"label": "$.a..b"}}}');
\echo :LAST_ERROR_SQLSTATE

-- handlers: against the table
select cqrs.create_projection('x', 'rm2', 'id', '{"T": {"action": "upsert", "set": {"colour": "$.c"}}}');
\echo :LAST_ERROR_SQLSTATE
select cqrs.create_projection('x', 'rm2', 'id', '{"T": {"action": "upsert", "set": {"id": "$.c"}}}');
\echo :LAST_ERROR_SQLSTATE
select cqrs.create_projection('x', 'rm2', 'id', '{"T": {"action": "upsert", "set": {"rev": "$.c"}}}');
\echo :LAST_ERROR_SQLSTATE
select cqrs.create_projection('x', 'rm2', 'id', '{"T": {"action": "upsert", "set": {"gen": "$.c"}}}');
\echo :LAST_ERROR_SQLSTATE
select cqrs.create_projection('x', 'rm2', 'id', '{"T": {"action": "upsert", "add": {"label": "$.c"}}}');
\echo :LAST_ERROR_SQLSTATE
select cqrs.create_projection('x', 'rm2', 'id', '{"T": {"action": "upsert", "set": {"n": {"const": "many"}}}}');
\echo :LAST_ERROR_SQLSTATE
select cqrs.create_projection('x', 'rm2', 'id', '{"T": {"action": "upsert", "set": {"n": {"const": [1]}}}}');
\echo :LAST_ERROR_SQLSTATE
select cqrs.create_projection('x', 'rm2', 'id', '{"T": {"action": "upsert", "set": {"n": {"field": "created_at"}}}}');
\echo :LAST_ERROR_SQLSTATE
select cqrs.create_projection('x', 'rm2', 'id', '{"T": {"function": "no_such_function"}}');
\echo :LAST_ERROR_SQLSTATE
create function wrong_signature(e jsonb) returns text language sql as $$ select 'x' $$;
select cqrs.create_projection('x', 'rm2', 'id', '{"T": {"function": "wrong_signature"}}');
\echo :LAST_ERROR_SQLSTATE

-- none of the refused ones left anything behind
select count(*) as projections from cqrs.projection;

-- hostile names are just names
create schema "my schema";
create table "my schema"."order" ("select" text primary key, "drop table x; --" integer not null default 0,
                                  "Mixed ""Case""" text, rev bigint not null default 0);
select cqrs.create_projection('weird', '"my schema"."order"', 'select',
    '{"T": {"action": "upsert", "key": "$[\"the key\"]", "add": {"drop table x; --": {"const": 2}}, "set": {"Mixed \"Case\"": "$.v"}}}');
select seq from cqrs.append(cqrs.uuid_v7(), 's', 'T', '{"the key": "k1", "v": "it''s"}');
select projection, key, deleted from cqrs.project_batch((select jsonb_agg(to_jsonb(l)) from cqrs.command_log l));
table "my schema"."order";

-- drop_projection leaves the table and forgets everything else
select cqrs.drop_projection('weird'), cqrs.drop_projection('weird') as again;
select count(*) as rows_kept from "my schema"."order";
select count(*) as progress_left from cqrs.projection_stream where projection = 'weird';

-- a handler of a type that is not registered, while such commands are refused, is named (a
-- typo would otherwise wait for commands that never come)
create table typo_rm (id text primary key, rev bigint not null default 0);
call pg_temp.cqrs_set('require_registered_types', 'on');
select cqrs.register_command_type('BORROW_BOOK', '{}') > 0 as registered;
select cqrs.create_projection('typo', 'typo_rm', 'id',
    '{"BORROW_BOK": {"action": "upsert", "key": "$.id"}, "BORROW_BOOK": {"action": "upsert", "key": "$.id"}, "RETURN_BOOK": {"action": "delete", "key": "$.id"}}');
call pg_temp.cqrs_set('require_registered_types', 'off');
rollback;
