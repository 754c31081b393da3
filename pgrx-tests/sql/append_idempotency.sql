-- cqrs.append is idempotent on command_id.
\set ON_ERROR_ROLLBACK on
\set SHOW_CONTEXT never
begin;
\ir install.sql

create temp table first as
select * from cqrs.append('11111111-1111-1111-1111-111111111111', 'acct-1', 'OPEN', '{"owner": "ann"}');
select seq, duplicate from first;

-- the same command again: the original position and seq, duplicate = true, nothing written
select a.position = f.position as same_position, a.seq, a.duplicate
  from cqrs.append('11111111-1111-1111-1111-111111111111', 'acct-1', 'OPEN', '{"owner": "ann"}') a, first f;
select count(*) as rows, (select last_seq from cqrs.stream where stream = 'acct-1') as last_seq from cqrs.command_log;

-- key order and whitespace do not matter (jsonb equality); metadata is not part of identity
select duplicate from cqrs.append('11111111-1111-1111-1111-111111111111', 'acct-1', 'OPEN', '{ "owner" :"ann" }', metadata => '{"retry": 3}');

-- a replay answers duplicate even when its expected_seq is stale by now
select seq from cqrs.append('22222222-2222-2222-2222-222222222222', 'acct-1', 'DEPOSIT', '{"amount": 5}', expected_seq => 1);
select seq, duplicate from cqrs.append('22222222-2222-2222-2222-222222222222', 'acct-1', 'DEPOSIT', '{"amount": 5}', expected_seq => 1);

-- the same key with anything different is a conflict (23505) naming the key
select * from cqrs.append('11111111-1111-1111-1111-111111111111', 'acct-1', 'OPEN', '{"owner": "bob"}');
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.append('11111111-1111-1111-1111-111111111111', 'acct-2', 'OPEN', '{"owner": "ann"}');
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.append('11111111-1111-1111-1111-111111111111', 'acct-1', 'CLOSE', '{"owner": "ann"}');
\echo :LAST_ERROR_SQLSTATE

-- a conflict consumes nothing: the stream's next seq is still 3, and acct-2 was not created
select seq from cqrs.append('33333333-3333-3333-3333-333333333333', 'acct-1', 'DEPOSIT', '{"amount": 1}');
select count(*) as acct_2_streams from cqrs.stream where stream = 'acct-2';
select stream, array_agg(seq order by seq) from cqrs.command_log group by stream;

rollback;
