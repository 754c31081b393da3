#!/usr/bin/env bash
# Runs one benchmark of cqrs-bench against private servers it starts itself:
#   scripts/bench.sh append|project|sidecar|load [options]   (see `--help` after the name)
# Installs what is missing, builds and installs the extension and the release binaries first.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh

case "${1:-}" in
  append|project|sidecar|load) ;;
  *) echo "usage: scripts/bench.sh append|project|sidecar|load [options]" >&2; exit 2 ;;
esac

scripts/setup.sh
install_extension
step "building cqrs-bench and cqrs-sidecar (release)"
cargo build --release -p cqrs-bench -p cqrs-sidecar
export CQRS_SIDECAR_BIN="$PWD/target/release/cqrs-sidecar"
step "cqrs-bench $*"
exec target/release/cqrs-bench "$@"
