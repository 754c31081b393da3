#!/usr/bin/env bash
# Builds the portable edition of pg_cqrs (SQL and PL/pgSQL, for managed PostgreSQL that loads
# no C extension) from the repository's SQL — nothing hand-copied:
#
#   target/portable/pg_cqrs.sql         psql -v ON_ERROR_STOP=1 -1 -f target/portable/pg_cqrs.sql
#                                       (as the database owner with CREATEROLE, no superuser needed)
#   target/portable/pg_cqrs--pgtle.sql  registers pg_cqrs with pg_tle (pgtle.install_extension);
#                                       then CREATE EXTENSION pg_cqrs works without the C library
#   target/portable/pg_cqrs--A--B.sql   upgrades a psql install from A to B (one per
#                                       sql/portable/upgrades/pg_cqrs--A--B.sql; none yet: 0.2.0
#                                       is the first portable release)
#
# Both are: sql/core/command.sql, projection.sql and outbox.sql (shared with the extension
# edition), sql/portable/*.sql (the PL/pgSQL twins of what the extension implements in Rust),
# then sql/core/api.sql (the comments and grants of the functions each edition implements its
# own way, shared) and sql/portable/grants.sql (its helpers' grants).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
[ -n "$version" ] || { echo "no version in Cargo.toml" >&2; exit 1; }
# PORTABLE_OUT and PORTABLE_UPGRADES are for the tests (a made-up release step, built elsewhere).
# The upgrade steps: those of released versions, frozen in sql/portable/upgrades/, and the one
# to this version, written by scripts/upgrade-scripts.sh.
out=${PORTABLE_OUT:-target/portable}
if [ -n "${PORTABLE_UPGRADES:-}" ]; then
    upgrade_dirs=("$PORTABLE_UPGRADES")
else
    scripts/upgrade-scripts.sh
    upgrade_dirs=(sql/portable/upgrades target/upgrades/portable)
fi
mkdir -p "$out"

upgrade_files() {
    local dir
    for dir in "${upgrade_dirs[@]}"; do
        ls "$dir"/pg_cqrs--*--*.sql 2>/dev/null || true
    done
}

# The edition's SQL, in dependency order. $1 = psql | pgtle: pg_extension_config_dump() only
# exists inside CREATE EXTENSION, so the psql file leaves those lines out.
body() {
    local mode=$1
    local files=("${PORTABLE_SQL[@]}")
    cat <<SQL
-- Helpers of the portable edition only (schema cqrs holds exactly what the extension edition's
-- schema holds: the conformance suite compares them).
create schema cqrs_portable;
comment on schema cqrs_portable is 'pg_cqrs portable edition: internal helpers of the PL/pgSQL engine.';
SQL
    for file in "${files[@]}"; do
        printf '\n-- ---- %s ----\n' "$file"
        if [ "$mode" = psql ]; then
            grep -v 'pg_catalog.pg_extension_config_dump' "$file"
        else
            cat "$file"
        fi | sed "s/@VERSION@/$version/g"
    done
    printf '\n'
    cat "$PORTABLE_GRANTS"
}

{
    cat <<SQL
-- pg_cqrs $version, portable edition (SQL and PL/pgSQL), built by scripts/portable.sh.
-- Install into a database, as its owner with CREATEROLE (the RDS / Cloud SQL / Azure admin
-- user; no superuser needed), in one transaction:
--   psql -v ON_ERROR_STOP=1 -1 -f pg_cqrs.sql "postgres://admin@host/app"
\\set ON_ERROR_STOP on
set client_min_messages = warning;
do \$guard\$
begin
    if pg_catalog.to_regprocedure('cqrs.version()') is not null then
        raise exception using errcode = '42710',
            message = pg_catalog.format('pg_cqrs %s (%s edition) is already installed in this database; this script installs %s only where there is none',
                                        (select v.version from cqrs.version() v), (select v.edition from cqrs.version() v), '$version'),
            hint = 'Nothing was changed. Upgrades ship as their own scripts (README, Upgrading).';
    end if;
    if pg_catalog.to_regnamespace('cqrs') is not null then
        raise exception using errcode = '42P06', message = 'schema cqrs exists already and is not pg_cqrs',
            hint = 'Nothing was changed. Drop or rename that schema first.';
    end if;
end
\$guard\$;
-- pg_cqrs body begins
create schema cqrs;
SQL
    body psql
    printf '\n-- pg_cqrs body ends\nreset client_min_messages;\n'
} > "$out/pg_cqrs.sql"

# pg_tle: the same body as the extension's install script. The dollar-quote tag must not occur in it.
tag='_pg_cqrs_portable_'
if body pgtle | grep -q "\$$tag\$"; then
    echo "the body contains the dollar-quote tag \$$tag\$" >&2
    exit 1
fi
{
    cat <<SQL
-- pg_cqrs $version, portable edition, for pg_tle (RDS, Aurora, Supabase): registers it, after
-- which CREATE EXTENSION pg_cqrs works on a server without the C library. Run as a member of
-- pgtle_admin:  psql -v ON_ERROR_STOP=1 -f pg_cqrs--pgtle.sql  then  create extension pg_cqrs;
-- Where an earlier release is registered already, this adds $version and the update paths to
-- it and makes it the default: then  alter extension pg_cqrs update;
-- Built by scripts/portable.sh.
\\set ON_ERROR_STOP on
do \$register\$
begin
    if exists (select from pgtle.available_extensions() e where e.name = 'pg_cqrs') then
        perform pgtle.install_extension_version_sql('pg_cqrs', '$version', \$$tag\$
SQL
    body pgtle
    cat <<SQL
\$$tag\$);
    else
        perform pgtle.install_extension(
            'pg_cqrs',
            '$version',
            'CQRS inside PostgreSQL: idempotent, sequenced, validated commands and set-based projections (portable edition)',
            \$$tag\$
SQL
    body pgtle
    cat <<SQL
\$$tag\$,
            '{}',
            'cqrs');
    end if;
end
\$register\$;
SQL
    # every step to this version; one registered already (by an earlier release's file) stays
    for upgrade in $(upgrade_files); do
        from=$(basename "$upgrade" .sql | sed 's/^pg_cqrs--\(.*\)--\(.*\)$/\1/')
        to=$(basename "$upgrade" .sql | sed 's/^pg_cqrs--\(.*\)--\(.*\)$/\2/')
        printf 'do $register$\nbegin\n    if not exists (select from pgtle.extension_update_paths(%s) p where p.source = %s and p.target = %s and p.path = %s) then\n' \
            "'pg_cqrs'" "'$from'" "'$to'" "'$from--$to'"
        printf "        perform pgtle.install_update_path('pg_cqrs', '%s', '%s', \$%s\$\n" "$from" "$to" "$tag"
        sed "s/@VERSION@/$to/g" "$upgrade"
        printf "\$%s\$);\n    end if;\nend\n\$register\$;\n" "$tag"
    done
    printf "select pgtle.set_default_version('pg_cqrs', '%s');\n" "$version"
} > "$out/pg_cqrs--pgtle.sql"

# psql: one upgrade script per release step, each refusing to run on any other version than
# the one it upgrades from (pg_tle checks that itself).
rm -f "$out"/pg_cqrs--*--*.sql
for upgrade in $(upgrade_files); do
    name=$(basename "$upgrade")
    from=$(basename "$upgrade" .sql | sed 's/^pg_cqrs--\(.*\)--\(.*\)$/\1/')
    to=$(basename "$upgrade" .sql | sed 's/^pg_cqrs--\(.*\)--\(.*\)$/\2/')
    {
        cat <<SQL
-- pg_cqrs portable edition: upgrade $from to $to, installed with psql (not pg_tle: there,
-- alter extension pg_cqrs update). Run as the role that installed it, in one transaction:
--   psql -v ON_ERROR_STOP=1 -1 -f $name "postgres://admin@host/app"
\\set ON_ERROR_STOP on
do \$guard\$
begin
    if pg_catalog.to_regprocedure('cqrs.version()') is null
       or (select v.version from cqrs.version() v) <> '$from'
       or (select v.edition from cqrs.version() v) <> 'portable' then
        raise exception using errcode = '55000',
            message = 'this script upgrades the portable edition of pg_cqrs $from, which is not what this database has',
            hint = 'Nothing was changed. select * from cqrs.version(); shows what is installed; run the upgrade scripts from there in order.';
    end if;
end
\$guard\$;
SQL
        grep -v 'pg_catalog.pg_extension_config_dump' "$upgrade" | sed "s/@VERSION@/$to/g"
    } > "$out/$name"
done

echo "wrote $out/pg_cqrs.sql, $out/pg_cqrs--pgtle.sql and the upgrade scripts (pg_cqrs $version, portable edition)"
