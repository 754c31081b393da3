#!/usr/bin/env bash
# Runs one benchmark of cqrs-bench against private servers it starts itself:
#   scripts/bench.sh append|project|sidecar|load|read|scale|groups|outbox|retention|traces [options]   (see `--help` after the name)
# Installs what is missing, builds and installs the extension and the release binaries first.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh

case "${1:-}" in
  append|project|sidecar|load|read|scale|groups|outbox|retention|traces) ;;
  *) echo "usage: scripts/bench.sh append|project|sidecar|load|read|scale|groups|outbox|retention|traces [options]" >&2; exit 2 ;;
esac

# the outbox benchmark's Kafka broker (tansu) is installed only for it
if [ "$1" = outbox ]; then prepare_release_tools --kafka-broker; else prepare_release_tools; fi
step "cqrs-bench $*"
exec target/release/cqrs-bench "$@"
