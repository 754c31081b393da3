#!/usr/bin/env bash
# Runs every test: formatting, clippy, unit tests, the extension's #[pg_test]s and the pg_regress
# suite on PostgreSQL 15, 16, 17 and 18, the end-to-end tests against real PostgreSQL (15 and 18)
# and Redis processes, the packages, and the container images with the compose stack.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh

started=$(date +%s)
# A test run builds from clean in CI: the incremental cache would only double target/'s size.
export CARGO_INCREMENTAL=0
scripts/setup.sh

# tansu (the Kafka suite's broker, ≈17 CPU-minutes to build) builds in the background at the
# lowest priority, on the cycles the other steps leave idle (the end-to-end tests wait on servers
# much of the time); the Kafka suite runs last and waits for it.
tansu_log=$(mktemp /tmp/pg_cqrs-tansu-install.XXXXXX)
nice -n 19 scripts/kafka-broker.sh >"$tansu_log" 2>&1 &
tansu_install=$!

# The container test needs a Docker engine: started here (as root) when one is installed but
# not running; without one that test says it is skipped.
start_docker() {
    docker info >/dev/null 2>&1 && return 0
    if command -v dockerd >/dev/null && [ "$(id -u)" -eq 0 ]; then
        note "starting dockerd (log: /tmp/pg_cqrs-dockerd.log)"
        (dockerd >/tmp/pg_cqrs-dockerd.log 2>&1 &)
        for _ in $(seq 60); do docker info >/dev/null 2>&1 && return 0; sleep 0.5; done
        note "dockerd did not answer within 30 s; the container test will say it is skipped"
    fi
    return 0
}

step "the upgrade scripts are what scripts/upgrade-scripts.sh writes from the sources"
scripts/upgrade-scripts.sh --check

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "unit tests (no database)"
cargo test --workspace --exclude pg_cqrs --exclude cqrs-e2e

# The #[pg_test]s run on the ends of the supported range: each major costs a test build of the
# extension (≈1.5 min here) and 16 and 17 differ from their neighbours in nothing those tests
# touch; the pg_regress suite below runs on all four.
pgrx_test_majors=(15 18)
step "#[pg_test]s inside PostgreSQL (cargo pgrx test) on ${pgrx_test_majors[*]}"
# cargo pgrx test installs a test build of the extension; the release build is installed after.
pgrx_data=$(mktemp -d /tmp/pg_cqrs-pgrx-test.XXXXXX)
trap 'rm -rf "$pgrx_data"' EXIT
chmod 755 "$pgrx_data"
runas=()
if [ "$(id -u)" -eq 0 ]; then chown postgres "$pgrx_data"; runas=(--runas postgres); fi
for major in "${pgrx_test_majors[@]}"; do
    (cd extension && cargo pgrx test "pg$major" "${runas[@]}" --pgdata "$pgrx_data/pg$major")
done

for major in "${PG_MAJORS[@]}"; do
    install_extension "$(pg_config_for "$major")"
done

# the end-to-end tests start real cqrs-sidecar processes from target/debug, and the upgrade
# test the sidecar of every earlier release too
cargo build -p cqrs-sidecar
scripts/release-sidecar.sh

# The end-to-end suites, by name. The broker suites (Redis Cluster, NATS, Kafka) and the suites of
# the sidecar's own HTTP, cache and scheduling (read API, read auth, shared Redis, projection
# groups) test the sidecar against other servers, not a PostgreSQL feature: they run on 15 only,
# which keeps a clean clone's run under an hour; the Kafka suite runs last, once tansu is built.
# The NATS outbox and projection groups suites measure lag against limits, and a clean clone's
# tansu build (below every other step at nice 19, but on the same two cores) once pushed them
# past those: they run last too, after it.
suites() {
    local suite
    for suite in tests/tests/*.rs; do
        suite=$(basename "$suite" .rs)
        [[ " $* " == *" $suite "* ]] || printf -- '--test\n%s\n' "$suite"
    done
}
late_suites=(--test outbox --test projection_groups --test outbox_kafka)
mapfile -t pg15_suites < <(suites outbox outbox_kafka projection_groups)
mapfile -t pg18_suites < <(suites redis_cluster outbox outbox_kafka read_api read_auth shared_redis projection_groups traces)

step "pg_regress suite (pgrx-tests/) and end-to-end tests (tests/) on PostgreSQL 15 (all but the last three)"
cargo test -p cqrs-e2e --no-fail-fast "${pg15_suites[@]}"

for major in 16 17; do
    step "pg_regress suite on PostgreSQL $major"
    PG_CONFIG=$(pg_config_for "$major") cargo test -p cqrs-e2e --test regress
done

step "pg_regress suite and end-to-end tests on PostgreSQL 18 (all but the broker and sidecar-only suites)"
PG_CONFIG=$(pg_config_for 18) cargo test -p cqrs-e2e --no-fail-fast "${pg18_suites[@]}"

step "packages (scripts/package.sh) and their tests"
scripts/package.sh
cargo test -p cqrs-e2e --test packages -- --ignored

step "container images (from the packages and the release binary) and the compose stack"
cargo build --release -p cqrs-sidecar
start_docker
cargo test -p cqrs-e2e --test containers -- --ignored --nocapture

step "the NATS outbox, projection groups and Kafka sink suites on PostgreSQL 15 (Kafka against tansu, built in the background)"
if ! wait "$tansu_install"; then
    cat "$tansu_log"
    die "installing tansu failed (log above)"
fi
note "$(tail -n 1 "$tansu_log")"
cargo test -p cqrs-e2e --no-fail-fast "${late_suites[@]}"

step "all tests passed in $(( $(date +%s) - started )) s"
