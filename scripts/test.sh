#!/usr/bin/env bash
# Runs every test: formatting, clippy, unit tests, the extension's #[pg_test]s, the pg_regress
# suite and the end-to-end tests against real PostgreSQL and Redis processes.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh

started=$(date +%s)
scripts/setup.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "unit tests (no database)"
cargo test --workspace --exclude pg_cqrs --exclude cqrs-e2e

step "#[pg_test]s inside PostgreSQL (cargo pgrx test)"
# cargo pgrx test installs a test build of the extension; the release build is installed after.
pgrx_data=$(mktemp -d /tmp/pg_cqrs-pgrx-test.XXXXXX)
trap 'rm -rf "$pgrx_data"' EXIT
chmod 755 "$pgrx_data"
runas=()
if [ "$(id -u)" -eq 0 ]; then chown postgres "$pgrx_data"; runas=(--runas postgres); fi
(cd extension && cargo pgrx test pg15 "${runas[@]}" --pgdata "$pgrx_data/pgdata")

install_extension

step "pg_regress suite (pgrx-tests/) and end-to-end tests (tests/)"
# the end-to-end tests start real cqrs-sidecar processes from target/debug, and the upgrade
# test the sidecar of every earlier release too
cargo build -p cqrs-sidecar
while read -r version _; do
    scripts/release-sidecar.sh "$version"
done < <(grep -v '^#' scripts/releases)
cargo test -p cqrs-e2e

step "all tests passed in $(( $(date +%s) - started )) s"
