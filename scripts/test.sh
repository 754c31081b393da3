#!/usr/bin/env bash
# Runs every test: formatting, clippy, unit tests, the extension's #[pg_test]s and the pg_regress
# suite on PostgreSQL 15, 16, 17 and 18, the end-to-end tests against real PostgreSQL (15 and 18)
# and Redis processes, and the packages.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh

started=$(date +%s)
scripts/setup.sh

step "the upgrade scripts are what scripts/upgrade-scripts.sh writes from the sources"
scripts/upgrade-scripts.sh --check

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "unit tests (no database)"
cargo test --workspace --exclude pg_cqrs --exclude cqrs-e2e

step "#[pg_test]s inside PostgreSQL (cargo pgrx test) on ${PG_MAJORS[*]}"
# cargo pgrx test installs a test build of the extension; the release build is installed after.
pgrx_data=$(mktemp -d /tmp/pg_cqrs-pgrx-test.XXXXXX)
trap 'rm -rf "$pgrx_data"' EXIT
chmod 755 "$pgrx_data"
runas=()
if [ "$(id -u)" -eq 0 ]; then chown postgres "$pgrx_data"; runas=(--runas postgres); fi
for major in "${PG_MAJORS[@]}"; do
    (cd extension && cargo pgrx test "pg$major" "${runas[@]}" --pgdata "$pgrx_data/pg$major")
done

for major in "${PG_MAJORS[@]}"; do
    install_extension "$(pg_config_for "$major")"
done

# the end-to-end tests start real cqrs-sidecar processes from target/debug, and the upgrade
# test the sidecar of every earlier release too
cargo build -p cqrs-sidecar
while read -r version _; do
    scripts/release-sidecar.sh "$version"
done < <(grep -v '^#' scripts/releases)

step "pg_regress suite (pgrx-tests/) and end-to-end tests (tests/) on PostgreSQL 15"
cargo test -p cqrs-e2e

for major in 16 17; do
    step "pg_regress suite on PostgreSQL $major"
    PG_CONFIG=$(pg_config_for "$major") cargo test -p cqrs-e2e --test regress
done

step "pg_regress suite and end-to-end tests on PostgreSQL 18"
PG_CONFIG=$(pg_config_for 18) cargo test -p cqrs-e2e

step "packages (scripts/package.sh) and their tests"
scripts/package.sh
cargo test -p cqrs-e2e --test packages -- --ignored

step "all tests passed in $(( $(date +%s) - started )) s"
