-- Optimistic concurrency with expected_seq: null = any, 0 = new stream, n = stream is at n.
\set ON_ERROR_ROLLBACK on
\set SHOW_CONTEXT never
begin;
\ir install.sql

-- 0: the stream must be new
select seq from cqrs.append(cqrs.uuid_v7(), 'cart-1', 'CREATE', '{}', expected_seq => 0);
select seq from cqrs.append(cqrs.uuid_v7(), 'cart-1', 'CREATE', '{}', expected_seq => 0);
\echo :LAST_ERROR_SQLSTATE

-- n: the stream's last seq must be n
select seq from cqrs.append(cqrs.uuid_v7(), 'cart-1', 'ADD', '{}', expected_seq => 1);
select seq from cqrs.append(cqrs.uuid_v7(), 'cart-1', 'ADD', '{}', expected_seq => 1);
\echo :LAST_ERROR_SQLSTATE
select seq from cqrs.append(cqrs.uuid_v7(), 'cart-1', 'ADD', '{}', expected_seq => 7);
\echo :LAST_ERROR_SQLSTATE

-- a non-zero expectation on a stream that does not exist
select seq from cqrs.append(cqrs.uuid_v7(), 'cart-404', 'ADD', '{}', expected_seq => 3);
\echo :LAST_ERROR_SQLSTATE
select count(*) as cart_404_rows from cqrs.stream where stream = 'cart-404';

-- null: no expectation
select seq from cqrs.append(cqrs.uuid_v7(), 'cart-1', 'ADD', '{}', expected_seq => null);

-- failed attempts left no gap
select array_agg(seq order by seq) as seqs from cqrs.command_log where stream = 'cart-1';

-- negative expectations are refused before anything happens
select seq from cqrs.append(cqrs.uuid_v7(), 'cart-1', 'ADD', '{}', expected_seq => -1);
\echo :LAST_ERROR_SQLSTATE

rollback;
