-- The projector lease (fencing tokens), the publication helper, and reading read-model rows.
\set ON_ERROR_ROLLBACK on
\set SHOW_CONTEXT never
begin;
\ir install.sql
create table things (id uuid primary key, name text, rev bigint not null default 0);
select cqrs.create_projection('things', 'things', 'id', '{"NAME": {"action": "upsert", "key": "$.id", "set": {"name": "$.name"}}, "DROP": {"action": "delete", "key": "$.id"}}');
select seq from cqrs.append(cqrs.uuid_v7(), 't', 'NAME', '{"id": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "name": "first"}');

-- every acquisition returns a higher token; a call with an older token is refused
select cqrs.acquire_lease('sidecar-a') as first_token, cqrs.acquire_lease('sidecar-b') as second_token;
select holder from cqrs.projector_lease;
select count(*) from cqrs.project_batch((select jsonb_agg(to_jsonb(l)) from cqrs.command_log l), '0/10', fencing_token => 1);
\echo :LAST_ERROR_SQLSTATE
select count(*) as nothing_applied from things;
select count(*) from cqrs.project_batch((select jsonb_agg(to_jsonb(l)) from cqrs.command_log l), '0/10', fencing_token => 2);
select count(*) as applied from things;

-- read_many: canonical keys (the key column's own cast), missing rows with the current revision
select key, rev, doc::jsonb ->> 'name' as name
  from cqrs.read_many('things', array['A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
                                      '00000000-0000-0000-0000-000000000000']);
-- cqrs.read: one row as jsonb with its revision, for applications reading from SQL
select doc ->> 'name' as name, rev, jsonb_typeof(doc) as doc_type from cqrs.read('things', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11');
select count(*) as no_row from cqrs.read('things', '00000000-0000-0000-0000-000000000000');
-- changed_since: the rows above a revision (every row for -1), for warming and repairing caches
select key, rev, doc::jsonb ->> 'name' as name from cqrs.changed_since('things', -1);
select count(*) as above_current from cqrs.changed_since('things', (select revision from cqrs.projection_state where name = 'things'));
select count(*) as above_previous from cqrs.changed_since('things', (select revision - 1 from cqrs.projection_state where name = 'things'));
select * from cqrs.changed_since('nope', 0);
\echo :LAST_ERROR_SQLSTATE
select seq from cqrs.append(cqrs.uuid_v7(), 't', 'DROP', '{"id": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"}');
select projection, key, rev, deleted from cqrs.project_batch((select jsonb_agg(to_jsonb(l)) from cqrs.command_log l where l.seq = 2));
select key, rev, doc from cqrs.read_many('things', array['a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11']);
select * from cqrs.read_many('things', array['not-a-uuid']);
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.read_many('nope', array['x']);
\echo :LAST_ERROR_SQLSTATE
select * from cqrs.read_many(null, array['x']);
\echo :LAST_ERROR_SQLSTATE
select count(*) from cqrs.read_many('things', '{}');

-- the publication the sidecar streams
select cqrs.ensure_publication('cqrs_test_pub') as created, cqrs.ensure_publication('cqrs_test_pub') as again;
select pubname, pubinsert, pubupdate, pubdelete, pubtruncate from pg_publication where pubname = 'cqrs_test_pub';
select schemaname, tablename from pg_publication_tables where pubname = 'cqrs_test_pub';
select cqrs.ensure_publication('Bad Name');
\echo :LAST_ERROR_SQLSTATE
create publication other_pub for table things;
select cqrs.ensure_publication('other_pub');
\echo :LAST_ERROR_SQLSTATE
rollback;
