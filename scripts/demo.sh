#!/usr/bin/env bash
# The main job: a local demo. Installs what is missing, builds and installs pg_cqrs, builds
# cqrs-sidecar, then starts a private PostgreSQL 15 cluster (its own data directory and port,
# wal_level=logical, run as the postgres user) and a private redis-server, and runs the demo:
# the command side under a workload with mistakes made on purpose, then the order projections
# fed live by two sidecars (one killed half-way) with Redis kept in step. Ctrl-C stops
# everything it started. Extra arguments go to `cqrs-bench demo` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh

prepare_release_tools
step "running the demo"
exec target/release/cqrs-bench demo "$@"
