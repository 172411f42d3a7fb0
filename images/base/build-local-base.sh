#!/bin/sh
# A local base image for machines with no registry: Debian bookworm (Python 3.11) from debootstrap, imported
# into Docker. The stage images default to CUDA bases from a registry; this is what builds them here (CPU).
#   images/base/build-local-base.sh [TAG]      (needs root, debootstrap and a Debian mirror)
set -eu
tag=${1:-tunectl-base:bookworm}
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "$tag exists"; exit 0
fi
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
root=$(mktemp -d /tmp/tunectl-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
# minbase keeps it small; python3-venv for the image's virtualenv; libgomp1 for torch's CPU kernels.
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,libgomp1 bookworm "$root" "$mirror"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import --change 'ENV LANG=C.UTF-8' - "$tag"
docker image ls "$tag"
