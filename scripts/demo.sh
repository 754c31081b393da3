#!/usr/bin/env bash
# The main job: a local demo. Installs what is missing, builds and installs pg_cqrs, starts a
# private PostgreSQL 15 cluster (its own data directory and port, wal_level=logical, run as the
# postgres user), creates the extension and runs a concurrent order workload, then prints what
# the database accepted and refused. Extra arguments go to `cqrs-bench demo` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh

scripts/setup.sh
install_extension
step "building the demo"
cargo build --release -p cqrs-bench
step "running the demo"
exec target/release/cqrs-bench demo "$@"
