#!/usr/bin/env bash
# Makes a Debian 12 base image from Debian's own packages, for building pg_cqrs's images where
# Docker Hub is out of reach (the container test uses it): debootstrap --variant=minbase, then
# docker import. Skips when the image exists.
#
#   scripts/docker-base.sh [IMAGE]        (default pg_cqrs-local/debian:bookworm)
#   docker build -f docker/sidecar.Dockerfile --build-arg BASE=pg_cqrs-local/debian:bookworm …
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh

image=${1:-pg_cqrs-local/debian:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
docker=${DOCKER:-docker}
if "$docker" image inspect "$image" >/dev/null 2>&1; then
    note "$image exists"
    exit 0
fi
command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install debootstrap)"
root=$(mktemp -d /tmp/pg_cqrs-debootstrap.XXXXXX)
trap 'rm -rf "$root"' EXIT
step "debootstrap --variant=minbase bookworm ($mirror) → $image"
debootstrap --variant=minbase bookworm "$root" "$mirror" >/dev/null
# what an image needs and a chroot does not: no apt caches kept, no docs
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | "$docker" import --change 'CMD ["/bin/bash"]' - "$image" >/dev/null
note "$image: $("$docker" image inspect -f '{{.Size}}' "$image" | awk '{ printf "%.0f MB", $1 / 1e6 }')"
