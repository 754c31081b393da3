-- pg_cqrs, portable edition: its settings. The extension edition declares typed settings
-- (cqrs.max_payload_bytes …, superuser-only where they limit writers); PL/pgSQL cannot, and a
-- placeholder setting is anyone's to change in their own session — a writer could lift the
-- limits for itself — and nobody's to set for a database on a managed service (ALTER DATABASE …
-- SET of a placeholder needs a superuser). So this edition keeps them in one row that only the
-- installer may change, with the same names, defaults and ranges:
--
--   update cqrs_portable.settings set max_payload_bytes = 1048576, require_registered_types = true;
--
-- A misspelt name is an error (a column that does not exist), a value out of range too (the
-- checks below); a change applies to every session at once, from the next statement on.
create table cqrs_portable.settings (
    one                      boolean primary key default true check (one),
    -- refuse commands whose type has no registered JSON Schema (42704)
    require_registered_types boolean not null default false,
    -- largest payload cqrs.append accepts, in bytes of jsonb (54000)
    max_payload_bytes        integer not null default 4194304 check (max_payload_bytes >= 1),
    -- largest metadata, in bytes of jsonb (54000)
    max_metadata_bytes       integer not null default 65536 check (max_metadata_bytes >= 1),
    -- deepest nesting of payload and metadata (54000); at most 100, as in the extension
    max_json_depth           integer not null default 64 check (max_json_depth between 1 and 100),
    -- seconds a parked event may wait for its gap before cqrs.status() raises gap_alert
    gap_alert_after          integer not null default 60 check (gap_alert_after >= 0)
);
comment on table cqrs_portable.settings is
    'pg_cqrs portable edition: its settings, one row that only the installer may change (update cqrs_portable.settings set …).';
insert into cqrs_portable.settings default values;

-- A restore from pg_dump of a pg_tle install copies the dumped row into the table where CREATE
-- EXTENSION already put the default one (a duplicate key, and the restore stopped there): the
-- dumped row replaces it (the one row stays one), as cqrs._retention_restored does.
create function cqrs_portable._settings_restored()
returns trigger
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
    if exists (select from cqrs_portable.settings s where s.one) then
        update cqrs_portable.settings s
           set require_registered_types = new.require_registered_types, max_payload_bytes = new.max_payload_bytes,
               max_metadata_bytes = new.max_metadata_bytes, max_json_depth = new.max_json_depth,
               gap_alert_after = new.gap_alert_after
         where s.one;
        return null;
    end if;
    return new;
end
$$;
revoke execute on function cqrs_portable._settings_restored() from public;
create trigger settings_restored before insert on cqrs_portable.settings
    for each row execute function cqrs_portable._settings_restored();
select pg_catalog.pg_extension_config_dump('cqrs_portable.settings', '');
