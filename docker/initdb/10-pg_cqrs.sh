#!/usr/bin/env bash
# Runs once, when the container initialises an empty data directory: pg_cqrs, the sidecars' role
# (its password from the sidecar_db_password secret, never on a command line) and the example
# read models with their command types.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" <<'SQL'
create extension if not exists pg_cqrs;
\set sidecar_password `cat /run/secrets/sidecar_db_password`
create role cqrs_sidecar login replication password :'sidecar_password' in role cqrs_projector;
\unset sidecar_password
\i /opt/pg_cqrs/examples/order_commands.sql
\i /opt/pg_cqrs/examples/orders.sql
SQL
