#!/usr/bin/env bash
# Makes the local stack's secrets in docker/secrets/ (random, once; kept when they exist):
#   postgres_password     the postgres superuser's
#   sidecar_db_password   the sidecars' database role's (cqrs_sidecar)
#   jwt_hs256.secret      the read API's JWT secret
#   read-keys             the read API's keys file, with one key for a service ("local")
#   read-key.local        that key itself, for curl (only its hash is in read-keys)
# They are files mounted as compose secrets, never values in compose.yaml. Readable by the
# containers' users (mode 644): this is a developer's machine; in production use your
# orchestrator's secrets.
set -euo pipefail
dir="$(cd "$(dirname "$0")" && pwd)/secrets"
mkdir -p "$dir"
secret() { [ -s "$dir/$1" ] || { "${@:2}" > "$dir/$1"; chmod 644 "$dir/$1"; }; }
secret postgres_password openssl rand -hex 24
secret sidecar_db_password openssl rand -hex 24
secret jwt_hs256.secret openssl rand -hex 32
secret read-key.local sh -c 'printf "cqrs_%s" "$(openssl rand -hex 32)"'
secret read-keys sh -c "printf 'local sha256:%s order_summary,user_order_stats\n' \"\$(tr -d '\n' < '$dir/read-key.local' | sha256sum | cut -d' ' -f1)\""
echo "secrets in $dir"
