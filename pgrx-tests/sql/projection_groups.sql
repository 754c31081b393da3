-- Projection groups: each group has its own lease and fencing token; project_batch applies a
-- batch to its group's projections only; cqrs.move_projection moves one with nothing lost or
-- applied twice.
\set ON_ERROR_ROLLBACK on
\set SHOW_CONTEXT never
begin;
\ir install.sql
create table totals_a (stream text primary key, total bigint not null default 0, rev bigint not null default 0);
create table totals_b (stream text primary key, total bigint not null default 0, rev bigint not null default 0);
select cqrs.create_projection('totals_a', 'totals_a', 'stream', '{"PAY": {"action": "upsert", "add": {"total": "$.amount"}}}');
select cqrs.create_projection('totals_b', 'totals_b', 'stream', '{"PAY": {"action": "upsert", "add": {"total": "$.amount"}}}');
select name, projection_group from cqrs.projection order by name;

-- group names: lowercase identifiers, checked where given
select cqrs.move_projection('totals_b', 'Billing');
\echo :LAST_ERROR_SQLSTATE
select cqrs.move_projection('totals_b', null);
\echo :LAST_ERROR_SQLSTATE
select cqrs.move_projection('nope', 'billing');
\echo :LAST_ERROR_SQLSTATE
select cqrs.try_lead('x', '2 s', 'no-dashes');
\echo :LAST_ERROR_SQLSTATE
select count(*) from cqrs.project_batch('[]', null, null, '');
\echo :LAST_ERROR_SQLSTATE

-- totals_b goes to group billing while nothing is in the log yet
select count(*) as changed from cqrs.move_projection('totals_b', 'billing');
select projection_group, projections, holder, live from cqrs.projection_groups();

-- each group's lease is its own; a token is never valid for another group
select cqrs.try_lead('sidecar-default') is not null as leads_default;
select cqrs.try_lead('sidecar-billing', '2 s', 'billing') is not null as leads_billing;
select (select token from cqrs.leader()) <> (select token from cqrs.leader('billing')) as tokens_differ;
select holder, live from cqrs.leader('billing');
select cqrs.try_lead('another', '2 s', 'billing') as not_while_live;
select seq from cqrs.append(cqrs.uuid_v7(), 's1', 'PAY', '{"amount": 5}');
-- the default group's token on the billing group is refused
select count(*) from cqrs.project_batch((select jsonb_agg(to_jsonb(l)) from cqrs.command_log l), null,
                                        (select token from cqrs.leader()), 'billing');
\echo :LAST_ERROR_SQLSTATE
-- each group's batch applies to its own projections only
select projection, key from cqrs.project_batch((select jsonb_agg(to_jsonb(l)) from cqrs.command_log l), null,
                                               (select token from cqrs.leader()));
select (select count(*) from totals_a) as a_rows, (select count(*) from totals_b) as b_rows;
select projection, key from cqrs.project_batch((select jsonb_agg(to_jsonb(l)) from cqrs.command_log l), null,
                                               (select token from cqrs.leader('billing')), 'billing');
select (select total from totals_a) as a_total, (select total from totals_b) as b_total;
select cqrs.release_lead('sidecar-billing', 'billing') as released, cqrs.release_lead('sidecar-billing') as not_the_holder;

-- moving catches up from the log in the same transaction: a projection moved back to the
-- default group while billing had applied commands the default group's batches did not carry
select seq from cqrs.append(cqrs.uuid_v7(), 's1', 'PAY', '{"amount": 7}');
select seq from cqrs.append(cqrs.uuid_v7(), 's2', 'PAY', '{"amount": 11}');
select projection, key, rev from cqrs.move_projection('totals_b', 'default') order by key;
select stream, total from totals_b order by stream;
select generation > 0 as cache_told from cqrs.projection_state where name = 'totals_b';
-- a later batch of the default group carrying the same commands applies nothing twice
select count(*) as changed from cqrs.project_batch((select jsonb_agg(to_jsonb(l) order by l.position) from cqrs.command_log l), null,
                                                   (select token from cqrs.leader()));
select (select total from totals_a where stream = 's1') as a_s1, (select total from totals_a where stream = 's2') as a_s2;
select stream, total from totals_b order by stream;
select duplicates from cqrs.projection_state where name = 'totals_b';
-- moving to the group it is in changes nothing
select count(*) as nothing from cqrs.move_projection('totals_b', 'default');
select projection_group, projections from cqrs.projection_groups();
rollback;
