#!/usr/bin/env bash
# Installs tansu, the Kafka-protocol broker the Kafka sink's tests and the outbox benchmark start
# (Apache Kafka needs a JVM and a Maven repository this project cannot reach), unless that version
# is already there: `cargo install tansu --locked --features dynostore,libsql` (libsql: a log in
# SQLite that survives a kill). About 17 CPU-minutes; scripts/test.sh runs it in the background
# at the lowest priority.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh

bin=${CARGO_HOME:-$HOME/.cargo}/bin
if [ -x "$bin/tansu" ] && [ "$(cat "$bin/.tansu-version" 2>/dev/null)" = "$TANSU_VERSION" ]; then
    note "tansu $TANSU_VERSION already installed"
    exit 0
fi
step "cargo install tansu $TANSU_VERSION (the Kafka sink's test broker, once)"
CARGO_INCREMENTAL=0 cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,libsql
echo "$TANSU_VERSION" > "$bin/.tansu-version"
note "tansu $TANSU_VERSION built in $SECONDS s"
