#!/usr/bin/env bash
# Builds the cqrs-sidecar of earlier releases from this repository's history, for the upgrade
# test (tests/tests/upgrade.rs: a released sidecar streams while the database is upgraded under
# it). Usage: scripts/release-sidecar.sh 0.1.0 [0.2.0 …]  → target/releases/<version>/cqrs-sidecar
# (no version: every release in scripts/releases). A second run reuses the builds.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh

versions=("$@")
[ ${#versions[@]} -gt 0 ] || mapfile -t versions < <(awk '!/^#/ && NF { print $1 }' scripts/releases)

# One build directory for all of them: releases share most of their dependencies, which are then
# compiled once (measured here: two releases in 209 s one after the other, each from nothing).
# No debug info and no incremental cache: only the binaries are kept, and the build directory
# (about 2 GB) is removed once they are copied.
build_dir=target/releases/target
trap 'rm -rf "$build_dir"' EXIT
for version in "${versions[@]}"; do
    commit=$(awk -v v="$version" '$1 == v { print $2 }' scripts/releases)
    [ -n "$commit" ] || die "version $version is not in scripts/releases"
    out="target/releases/$version"
    if [ -x "$out/cqrs-sidecar" ] && [ "$(cat "$out/commit" 2>/dev/null)" = "$commit" ]; then
        note "cqrs-sidecar $version already built ($out/cqrs-sidecar)"
        continue
    fi
    git cat-file -e "$commit^{commit}" 2>/dev/null \
        || die "commit $commit of release $version is not in this clone's history (a shallow clone? git fetch --unshallow)"
    step "building cqrs-sidecar $version from commit ${commit:0:12}"
    rm -rf "$out/src"
    mkdir -p "$out/src"
    git archive "$commit" | tar -x -C "$out/src"
    # its own target directory: the release's workspace must not overwrite this one's binaries
    CARGO_PROFILE_DEV_DEBUG=0 CARGO_INCREMENTAL=0 \
        cargo build --locked -p cqrs-sidecar --manifest-path "$out/src/Cargo.toml" --target-dir "$build_dir"
    cp "$build_dir/debug/cqrs-sidecar" "$out/cqrs-sidecar"
    echo "$commit" > "$out/commit"
    rm -rf "$out/src"
done
