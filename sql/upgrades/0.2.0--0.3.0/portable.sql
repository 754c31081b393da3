-- The portable edition's settings: one row only the installer may change (they were placeholder
-- settings, which any session could change for itself). What a superuser gave the placeholders
-- for this database (ALTER DATABASE … SET) carries over.
create table cqrs_portable.settings (
    one                      boolean primary key default true check (one),
    require_registered_types boolean not null default false,
    max_payload_bytes        integer not null default 4194304 check (max_payload_bytes >= 1),
    max_metadata_bytes       integer not null default 65536 check (max_metadata_bytes >= 1),
    max_json_depth           integer not null default 64 check (max_json_depth between 1 and 100),
    gap_alert_after          integer not null default 60 check (gap_alert_after >= 0)
);
comment on table cqrs_portable.settings is
    'pg_cqrs portable edition: its settings, one row that only the installer may change (update cqrs_portable.settings set …).';
insert into cqrs_portable.settings default values;
update cqrs_portable.settings s set
    require_registered_types = case when lower(pg_catalog.current_setting('cqrs.require_registered_types', true)) in ('on', 'true', 'yes', '1')
                                    then true else s.require_registered_types end,
    max_payload_bytes = case when pg_catalog.current_setting('cqrs.max_payload_bytes', true) ~ '^[1-9][0-9]{0,8}$'
                             then pg_catalog.current_setting('cqrs.max_payload_bytes', true)::integer else s.max_payload_bytes end,
    max_metadata_bytes = case when pg_catalog.current_setting('cqrs.max_metadata_bytes', true) ~ '^[1-9][0-9]{0,8}$'
                              then pg_catalog.current_setting('cqrs.max_metadata_bytes', true)::integer else s.max_metadata_bytes end,
    max_json_depth = case when pg_catalog.current_setting('cqrs.max_json_depth', true) ~ '^([1-9][0-9]?|100)$'
                          then pg_catalog.current_setting('cqrs.max_json_depth', true)::integer else s.max_json_depth end,
    gap_alert_after = case when pg_catalog.current_setting('cqrs.gap_alert_after', true) ~ '^[0-9]{1,9}$'
                           then pg_catalog.current_setting('cqrs.gap_alert_after', true)::integer else s.gap_alert_after end;
select pg_catalog.pg_extension_config_dump('cqrs_portable.settings', '');

-- Compiled write statements, written only by cqrs_portable._definition (they were kept in a
-- session setting, which code running in the session could plant).
create table cqrs_portable.compiled (
    projection text primary key,
    version    text  not null,
    sql        text  not null,
    handlers   jsonb not null,
    target     text  not null,
    key_column text  not null,
    key_type   text  not null,
    rev_column text  not null
);

-- helpers that are gone, or whose arguments changed
drop function cqrs_portable._setting(text, integer);
drop function cqrs_portable._check_limits(text, jsonb);
drop function cqrs_portable._check_source(text, jsonb, regclass, text);
drop function cqrs_portable._compiled(text);
drop function cqrs_portable._check_lease(bigint);

-- The validator reads drafts 2020-12, 2019-09 and 07: the format check and the registration
-- check take the draft.
drop function cqrs_portable._format_matches(text, text);
drop function cqrs_portable._check_schema_node(jsonb, text);

-- Each registered schema compiled to a function of its own (sql/portable/validator.sql).
create table cqrs_portable.validator (
    command_type text primary key,
    version      bigint not null,
    function     name   not null
);
comment on table cqrs_portable.validator is
    'pg_cqrs portable edition: the compiled validator of each registered command type (made by cqrs_portable._compile_validators).';

-- The engine's batch takes the projection group whose projections it applies.
drop function cqrs_portable._project(jsonb, pg_lsn, text, boolean, jsonb);
-- A catch-up takes the last log position it applies (a catch-up under load stops at the end of
-- the log as it was when it started).
drop function cqrs_portable._catch_up_one(text, integer, boolean, jsonb);
