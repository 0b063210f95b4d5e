#!/usr/bin/env bash
# A RAUC bundle (verity format) of the root built by build-image.sh, for images/test-boot.sh and
# for whoever wants to update a running image by hand:
#
#   make-bundle.sh OUT.raucb --version V [--variant good|unhealthy]
#                  [--compatible C] [--cert PEM --key PEM]
#
#   --variant good       the image's root with /etc/edgeos-image-version = V (default)
#   --variant unhealthy  the same root, but edgeos.service may not reach the broker's address
#                        (a drop-in with IPAddressDeny=10.0.2.100): the runtime starts, reads the
#                        line and spools, yet never becomes healthy (no acks) -- a release that
#                        must be rolled back without losing a sample
#   --variant stub       a 16 MiB root holding only /etc/edgeos-image-version, for bundles that
#                        must be refused before anything is written (another signer, another
#                        compatible): a valid bundle in every other respect, built in seconds
#                        instead of a minute; never bootable, so one that got installed would
#                        show at once
#   --compatible C       default: the image's (edgeos-qemu-arm64); another one must be refused
#   --cert/--key         default: the build's dev signing key (pki/); another CA's must be refused
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${EDGEOS_IMAGE_DIR:-/var/cache/edgeos/image}
PKI=$OUT/pki
bundle=${1:?usage: make-bundle.sh OUT.raucb --version V [...]}; shift
version="" variant=good compatible=${EDGEOS_IMAGE_COMPATIBLE:-edgeos-qemu-arm64}
cert=$PKI/signing.crt key=$PKI/signing.key
while [ $# -gt 0 ]; do
    case $1 in
        --version) version=$2; shift 2;;
        --variant) variant=$2; shift 2;;
        --compatible) compatible=$2; shift 2;;
        --cert) cert=$2; shift 2;;
        --key) key=$2; shift 2;;
        *) echo "make-bundle: unknown argument $1" >&2; exit 2;;
    esac
done
[ -n "$version" ] || { echo "make-bundle: --version is required" >&2; exit 2; }
case $variant in good|unhealthy|stub) ;; *) echo "make-bundle: --variant good|unhealthy|stub" >&2; exit 2;; esac
TREE=$OUT/rootfs.tree
[ -d "$TREE/usr/lib/edgeos/python" ] || { echo "make-bundle: no built root at $TREE (make image)" >&2; exit 1; }

work=$(mktemp -d "$OUT/bundle.XXXXXX")
cleanup() { umount "$work/merged" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
mkdir -p "$work"/{upper,ovl,merged,content}
if [ "$variant" = stub ]; then
    mkdir -p "$work/stub/etc"
    echo "$version" > "$work/stub/etc/edgeos-image-version"
    # RAUC refuses a bundle whose squashfs is not larger than 4096 bytes, which an almost empty
    # ext4 compresses to: some incompressible bytes keep the stub a valid bundle.
    head -c 65536 /dev/urandom > "$work/stub/etc/edgeos-stub-padding"
    truncate -s 16M "$work/content/rootfs.ext4"
    mkfs.ext4 -q -L rootfs -E root_owner=0:0 -d "$work/stub" "$work/content/rootfs.ext4"
else
    # The built root stays untouched: the variant's changes go to an overlay's upper layer.
    mount -t overlay overlay -o "lowerdir=$TREE,upperdir=$work/upper,workdir=$work/ovl" "$work/merged"
    echo "$version" > "$work/merged/etc/edgeos-image-version"
    if [ "$variant" = unhealthy ]; then
        install -d "$work/merged/etc/systemd/system/edgeos.service.d"
        cat > "$work/merged/etc/systemd/system/edgeos.service.d/50-test-unhealthy.conf" <<'CONF'
# make-bundle.sh --variant unhealthy: a release whose runtime cannot reach the broker.
[Service]
IPAddressDeny=10.0.2.100
CONF
    fi
    # The slot's size (build-image.sh's partitions): RAUC refuses an image larger than its slot,
    # and the free space inside costs nothing in the (compressed) bundle.
    truncate -s "${EDGEOS_IMAGE_ROOT_MB:-1280}M" "$work/content/rootfs.ext4"
    mkfs.ext4 -q -L rootfs -E root_owner=0:0 -d "$work/merged" "$work/content/rootfs.ext4"
    umount "$work/merged"
fi
cat > "$work/content/manifest.raucm" <<MANIFEST
[update]
compatible=$compatible
version=$version
description=edgeos QEMU arm64 root ($variant)

[bundle]
format=verity

[image.rootfs]
filename=rootfs.ext4
MANIFEST
rm -f "$bundle"
rauc bundle --cert "$cert" --key "$key" "$work/content" "$bundle" >/dev/null
echo "$bundle"
