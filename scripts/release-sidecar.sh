#!/usr/bin/env bash
# Builds the cqrs-sidecar of an earlier release from this repository's history, for the upgrade
# test (tests/tests/upgrade.rs: a released sidecar streams while the database is upgraded under
# it). Usage: scripts/release-sidecar.sh 0.1.0   → target/releases/0.1.0/cqrs-sidecar
# A second run reuses the build.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh

version=${1:?usage: scripts/release-sidecar.sh <version>}
commit=$(awk -v v="$version" '$1 == v { print $2 }' scripts/releases)
[ -n "$commit" ] || die "version $version is not in scripts/releases"
out="target/releases/$version"
if [ -x "$out/cqrs-sidecar" ] && [ "$(cat "$out/commit" 2>/dev/null)" = "$commit" ]; then
    note "cqrs-sidecar $version already built ($out/cqrs-sidecar)"
    exit 0
fi
git cat-file -e "$commit^{commit}" 2>/dev/null \
    || die "commit $commit of release $version is not in this clone's history (a shallow clone? git fetch --unshallow)"
step "building cqrs-sidecar $version from commit ${commit:0:12}"
rm -rf "$out/src"
mkdir -p "$out/src"
git archive "$commit" | tar -x -C "$out/src"
# its own target directory: the release's workspace must not overwrite this one's binaries
# No debug info and no incremental cache: only the binary is kept, and the build directory
# (about 2 GB) is removed once it is copied.
CARGO_PROFILE_DEV_DEBUG=0 CARGO_INCREMENTAL=0 \
    cargo build --locked -p cqrs-sidecar --manifest-path "$out/src/Cargo.toml" --target-dir target/releases/target
cp target/releases/target/debug/cqrs-sidecar "$out/cqrs-sidecar"
echo "$commit" > "$out/commit"
rm -rf "$out/src" target/releases/target
