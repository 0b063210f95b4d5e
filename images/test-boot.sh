#!/usr/bin/env bash
# `make test-boot`: boot the arm64 A/B image (`make image`, images/qemu/build-image.sh) in
# qemu-system-aarch64 and check it end to end -- first boot to edgeos READY with samples reaching
# a receiver on the host, a signed RAUC update committed after health, bad bundles refused, and
# an unhealthy release rolled back. Prints the figures as JSON. Not part of `make test` (it takes
# tens of minutes under TCG). See images/qemu/test_boot.py and docs/ota.md.
#
#   images/test-boot.sh [--steps boot,update,bad,rollback] [--health-window S] [--smp N] ...
#   EDGEOS_IMAGE_DIR   where the image was built (default /var/cache/edgeos/image)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${EDGEOS_IMAGE_DIR:-/var/cache/edgeos/image}
[ "$(id -u)" = 0 ] || { echo "test-boot: needs root (bundles are built from a root-owned tree)" >&2; exit 1; }
bash "$REPO/images/ensure-image-tools"
[ -f "$OUT/edgeos-qemu-arm64.img" ] || bash "$REPO/images/qemu/build-image.sh" >/dev/null
# The host side (simulator, Mosquitto, receiver, credentials) is the project's own test support.
make -C "$REPO" --no-print-directory venv >/dev/null
cd "$REPO"
exec .venv/bin/python images/qemu/test_boot.py --image "$OUT/edgeos-qemu-arm64.img" "$@"
