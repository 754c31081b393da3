-- cqrs.append_batch: the rules of cqrs.append for an array of commands, atomically.
\set ON_ERROR_ROLLBACK on
\set SHOW_CONTEXT never
begin;
\ir install.sql

select index, command_id, seq, duplicate from cqrs.append_batch('[
  {"command_id": "00000000-0000-0000-0000-0000000000a1", "stream": "b-1", "command_type": "CREATE", "payload": {"n": 1}},
  {"command_id": "00000000-0000-0000-0000-0000000000a2", "stream": "b-1", "command_type": "ADD", "payload": {"n": 2}, "expected_seq": 1},
  {"command_id": "00000000-0000-0000-0000-0000000000a3", "stream": "b-2", "command_type": "CREATE", "payload": {}, "metadata": {"trace": "x"}},
  {"command_id": "00000000-0000-0000-0000-0000000000a1", "stream": "b-1", "command_type": "CREATE", "payload": {"n": 1}}
]');

-- a failure anywhere rolls back the whole batch and names the element
select * from cqrs.append_batch('[
  {"command_id": "00000000-0000-0000-0000-0000000000b1", "stream": "b-3", "command_type": "CREATE", "payload": {}},
  {"command_id": "00000000-0000-0000-0000-0000000000b2", "stream": "b-1", "command_type": "ADD", "payload": {}, "expected_seq": 0}
]');
\echo :LAST_ERROR_SQLSTATE
select count(*) as b_3_rows from cqrs.command_log where stream = 'b-3';

-- malformed batches
select * from cqrs.append_batch(null);
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.append_batch('{"command_id": "x"}');
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.append_batch('[1]');
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.append_batch('[{"stream": "s", "command_type": "T", "payload": {}}]');
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.append_batch('[{"command_id": "nope", "stream": "s", "command_type": "T", "payload": {}}]');
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.append_batch('[{"command_id": "00000000-0000-0000-0000-0000000000c1", "stream": 7, "command_type": "T", "payload": {}}]');
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.append_batch('[{"command_id": "00000000-0000-0000-0000-0000000000c1", "stream": "s", "command_type": "T", "payload": {}, "expectedSeq": 1}]');
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.append_batch('[{"command_id": "00000000-0000-0000-0000-0000000000c1", "stream": "s", "command_type": "T", "payload": {}, "expected_seq": 1.5}]');
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.append_batch('[{"command_id": "00000000-0000-0000-0000-0000000000c1", "stream": "s", "command_type": "T", "payload": [1]}]');
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.append_batch('[{"command_id": "00000000-0000-0000-0000-0000000000c1", "stream": "s", "command_type": "T"}]');
\echo :LAST_ERROR_SQLSTATE
-- an empty batch is fine and appends nothing
select count(*) from cqrs.append_batch('[]');

select stream, seq, command_type from cqrs.command_log order by position;
rollback;
