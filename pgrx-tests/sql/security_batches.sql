-- Who may apply a batch, and what: only the leader — its fencing token, or none while no sidecar
-- leads; QC001 otherwise, from cqrs.project_batch and cqrs._project_batch alike — only commands
-- as the log holds them, and nothing moves the projector lease but its functions.
\set ON_ERROR_ROLLBACK on
\set SHOW_CONTEXT never
set client_min_messages = error;
begin;
\ir install.sql
create role projector_app in role cqrs_projector;
create table counts (stream text primary key, n integer not null default 0, rev bigint not null default 0);
select cqrs.create_projection('counts', 'counts', 'stream', '{"T": {"action": "upsert", "add": {"n": "$.n"}}}', backfill => false);
select seq from cqrs.append('00000000-0000-4000-8000-000000000001', 's', 'T', '{"n": 1}');
select seq from cqrs.append('00000000-0000-4000-8000-000000000002', 's', 'T', '{"n": 2}');
set role projector_app;

-- a batch is rows of the log: an event that is not there, or not at its position, is refused
-- whole, and nothing of the batch applies
select count(*) from cqrs.project_batch('[{"position": 999, "command_id": "00000000-0000-4000-8000-0000000000ff", "stream": "s", "seq": 3, "command_type": "T", "payload": {"n": 1000}, "created_at": "2026-01-01T00:00:00Z"}]');
\echo :LAST_ERROR_SQLSTATE
select count(*) from cqrs.project_batch((select jsonb_agg(to_jsonb(l) || '{"command_id": "00000000-0000-4000-8000-0000000000ff"}' order by l.position) from cqrs.command_log l));
\echo :LAST_ERROR_SQLSTATE
select count(*) from cqrs.project_batch((select jsonb_agg(to_jsonb(l) || '{"seq": 7}' order by l.position) from cqrs.command_log l));
\echo :LAST_ERROR_SQLSTATE
select count(*) as nothing_applied from counts;
-- what a batch says of a real command's payload is not what is projected: the log's row is
select key from cqrs.project_batch((select jsonb_agg(to_jsonb(l) || '{"payload": {"n": 1000}}' order by l.position) from cqrs.command_log l));
select n from counts;
-- a commit LSN past the server's WAL is not a commit's (it would make the real batches below it skip)
select count(*) from cqrs.project_batch('[]', 'FFFFFFFF/FFFFFFFF');
\echo :LAST_ERROR_SQLSTATE

-- the lease moves only through its functions
update cqrs.projector_lease set token = 9223372036854775807;
\echo :LAST_ERROR_SQLSTATE
insert into cqrs.projector_lease (projection_group, token) values ('default', 9223372036854775807);
\echo :LAST_ERROR_SQLSTATE

-- while a sidecar leads, only its token applies a batch
reset role;
select seq from cqrs.append('00000000-0000-4000-8000-000000000003', 's', 'T', '{"n": 3}');
set role projector_app;
select cqrs.try_lead('sidecar-a') as token \gset
select count(*) from cqrs.project_batch((select jsonb_agg(to_jsonb(l)) from cqrs.command_log l where l.seq = 3));
\echo :LAST_ERROR_SQLSTATE
select count(*) from cqrs.project_batch((select jsonb_agg(to_jsonb(l)) from cqrs.command_log l where l.seq = 3), null, :token - 1, 'default');
\echo :LAST_ERROR_SQLSTATE
select count(*) from cqrs.project_batch((select jsonb_agg(to_jsonb(l)) from cqrs.command_log l where l.seq = 3), null, :token + 1000);
\echo :LAST_ERROR_SQLSTATE
-- the work function itself keeps the same fence, with the same SQLSTATE
select count(*) from cqrs._project_batch((select jsonb_agg(to_jsonb(l)) from cqrs.command_log l where l.seq = 3), null, :token - 1, 'default');
\echo :LAST_ERROR_SQLSTATE
select count(*) from cqrs._project_batch((select jsonb_agg(to_jsonb(l)) from cqrs.command_log l where l.seq = 3), null, null, 'default');
\echo :LAST_ERROR_SQLSTATE
select n as still from counts;
select key from cqrs.project_batch((select jsonb_agg(to_jsonb(l)) from cqrs.command_log l where l.seq = 3), null, :token);
select n from counts;
-- once nobody leads, a batch without a token applies again (cqrs.catch_up needs none ever)
select cqrs.release_lead('sidecar-a');
select count(*) from cqrs.project_batch((select jsonb_agg(to_jsonb(l)) from cqrs.command_log l where l.seq = 3));
reset role;
rollback;
