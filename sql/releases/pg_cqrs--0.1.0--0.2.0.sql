-- pg_cqrs 0.1.0 → 0.2.0 (ALTER EXTENSION pg_cqrs UPDATE TO '0.2.0').
--
-- Written by hand, like every upgrade script: the upgrade test (tests/tests/upgrade.rs) installs
-- 0.1.0, fills it, runs this script, and compares the catalog of schema cqrs with a fresh 0.2.0
-- install, naming every difference; it also checks that every row survived and still behaves.

\echo Use "ALTER EXTENSION pg_cqrs UPDATE TO '0.2.0'" to load this file. \quit

-- Which version and edition is installed: the sidecar asks this (a psql -f install of the
-- portable edition has no pg_extension row).
create function cqrs.version(out version text, out edition text)
returns record
language sql immutable parallel safe
set search_path = pg_catalog, pg_temp
as $$ select '0.2.0'::text, 'extension'::text $$;
comment on function cqrs.version() is
    'The installed pg_cqrs version and edition (extension: the compiled extension; portable: SQL and PL/pgSQL).';
