-- Added values, as both editions fold them: JSON numbers and strings holding numbers sum
-- exactly; a missing or JSON-null value adds nothing; a set resets what was added before it in
-- the batch; nested keys, array indexes and metadata are value sources; a value the column's
-- type cannot take halts the projection with that type's error.
\set ON_ERROR_ROLLBACK on
\set SHOW_CONTEXT never
begin;
\ir install.sql
create table tally (stream text primary key, n integer not null default 0, amount numeric(14,2) not null default 0,
                    deep numeric, first_item numeric, by_meta integer, rev bigint not null default 0);
select cqrs.create_projection('tally', 'tally', 'stream',
    '{"ADD":   {"action": "upsert", "add": {"n": "$.n", "amount": "$.amount", "deep": "$.a.b", "first_item": "$.items[0]", "by_meta": {"meta": "$.w"}}},
      "RESET": {"action": "update", "set": {"amount": {"const": 0}, "n": "$.n"}}}');

-- numbers, numeric strings (with exponents), nulls and missing values, in one batch
select count(*) from (select cqrs.append(cqrs.uuid_v7(), 't-1', 'ADD', p, metadata => m) from (values
    ('{"n": 1, "amount": 1.25, "a": {"b": 2}, "items": [10, 20]}'::jsonb, '{"w": 3}'::jsonb),
    ('{"n": "2", "amount": "0.75", "a": {"b": "1e2"}, "items": ["5.5"]}', '{"w": "4"}'),
    ('{"n": null, "amount": null, "a": {"b": null}, "items": []}', '{}'),
    ('{"a": [1], "items": {"0": 7}}', '{"w": null}'),
    ('{"n": 3, "amount": 1e1, "a": "not an object"}', '{}')) v(p, m)) appended;
select count(*) as changed from cqrs.project_batch((select jsonb_agg(to_jsonb(l) order by l.seq) from cqrs.command_log l where l.stream = 't-1'));
select n, amount, deep, first_item, by_meta, rev from tally;

-- a set in the middle of a batch: only what is added after it counts
select count(*) from (select cqrs.append(cqrs.uuid_v7(), 't-1', c, p) from (values
    ('ADD', '{"n": 100, "amount": 100}'::jsonb), ('RESET', '{"n": 7}'), ('ADD', '{"n": 1, "amount": "2.50"}')) v(c, p)) appended;
select count(*) as changed from cqrs.project_batch((select jsonb_agg(to_jsonb(l) order by l.seq) from cqrs.command_log l where l.stream = 't-1' and l.seq > 5));
select n, amount, deep, first_item, by_meta from tally;

-- a value the column cannot take: the projection halts with the type's error
select cqrs.append(cqrs.uuid_v7(), 't-2', 'ADD', '{"n": "many"}') is not null as appended;
select count(*) as changed from cqrs.project_batch((select jsonb_agg(to_jsonb(l) order by l.seq) from cqrs.command_log l where l.stream = 't-2'));
select projection, halted, last_error_sqlstate from cqrs.status();
select cqrs.append(cqrs.uuid_v7(), 't-3', 'ADD', '{"amount": 1e20}') is not null as appended;
select cqrs.resume('tally', skip => true);
select count(*) as changed from cqrs.project_batch((select jsonb_agg(to_jsonb(l) order by l.seq) from cqrs.command_log l where l.stream = 't-3'));
select projection, halted, last_error_sqlstate from cqrs.status();
rollback;
