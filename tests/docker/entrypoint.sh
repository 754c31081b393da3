#!/usr/bin/env bash
# For the tests only (see postgres.Dockerfile): what the official postgres image's entrypoint
# does for pg_cqrs's image. On an empty data directory: initdb with the superuser's password
# from POSTGRES_PASSWORD_FILE (or POSTGRES_PASSWORD), password authentication over TCP, the
# database POSTGRES_DB, and every /docker-entrypoint-initdb.d/ script (*.sh run, *.sql through
# psql) against a server listening on its Unix socket only. Then postgres, as the postgres user.
set -euo pipefail
if [ "${1:-}" != postgres ]; then
    exec "$@"
fi
shift
socket=/var/run/postgresql
if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA" "$socket"
    chown -R postgres:postgres "$PGDATA" "$socket"
    chmod 700 "$PGDATA"
    exec runuser -u postgres -- "$0" postgres "$@"
fi
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    password=${POSTGRES_PASSWORD:-}
    if [ -n "${POSTGRES_PASSWORD_FILE:-}" ]; then
        password=$(cat "$POSTGRES_PASSWORD_FILE")
    fi
    if [ -z "$password" ]; then
        echo "POSTGRES_PASSWORD_FILE or POSTGRES_PASSWORD is required" >&2
        exit 1
    fi
    initdb --username=postgres --pwfile=<(printf '%s\n' "$password") --auth-local=trust \
        --auth-host=scram-sha-256 -D "$PGDATA" >/dev/null
    echo 'host all all all scram-sha-256' >> "$PGDATA/pg_hba.conf"
    pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -c unix_socket_directories=$socket" -w start >/dev/null
    export PGHOST=$socket POSTGRES_USER=postgres POSTGRES_DB=${POSTGRES_DB:-postgres}
    if [ "$POSTGRES_DB" != postgres ]; then
        psql -v ON_ERROR_STOP=1 -U postgres -d postgres -q -c "create database \"$POSTGRES_DB\""
    fi
    for script in /docker-entrypoint-initdb.d/*; do
        case "$script" in
            *.sh) "$script" ;;
            *.sql) psql -v ON_ERROR_STOP=1 -U postgres -d "$POSTGRES_DB" -q -f "$script" ;;
        esac
    done
    pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
    unset PGHOST
fi
exec postgres -D "$PGDATA" -c listen_addresses='*' -c unix_socket_directories=$socket "$@"
