#!/usr/bin/env bash
# Installs what pg_cqrs needs on Debian 12, skipping whatever is already there:
# PostgreSQL 15 (server, headers, pgbench), redis-server, clang (bindgen), sudo (cargo pgrx test
# --runas), prometheus (promtool), openssl (test certificates), cargo-pgrx 0.18.1 and its PostgreSQL 15 configuration.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh

command -v cargo >/dev/null || die "cargo not found: install the Rust toolchain (rustup) first"

packages=(postgresql-15 postgresql-server-dev-15 postgresql-client-15 redis-server redis-tools
          clang libclang-dev sudo prometheus openssl)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' || missing+=("$package")
done
if ((${#missing[@]})); then
    step "apt-get install ${missing[*]}"
    as_root apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    note "Debian packages already installed"
fi
if cargo pgrx --version 2>/dev/null | grep -q "^cargo-pgrx $PGRX_VERSION\$"; then
    note "cargo-pgrx $PGRX_VERSION already installed"
else
    step "cargo install cargo-pgrx $PGRX_VERSION (about 5 minutes, once)"
    cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi

if grep -qs "pg15 = \"$PG_CONFIG\"" "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
    note "cargo pgrx already initialised for PostgreSQL 15"
else
    step "cargo pgrx init --pg15 $PG_CONFIG"
    cargo pgrx init --pg15 "$PG_CONFIG"
fi
