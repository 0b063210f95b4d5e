#!/usr/bin/env bash
# `make image`: the bootable arm64 A/B disk image of edgeos for QEMU's `virt` machine
# (docs/ota.md "Root filesystem A/B", images/README.md). Everything from Debian bookworm packages
# (mmdebstrap, run under qemu-user-static) and edgeos's own wheels; assembled with genimage:
#
#   p1 esp        FAT  64 MiB   GRUB (BOOTAA64.EFI, grub-efi-arm64), grub.cfg, grubenv
#   p2 rootfs-a   ext4          slot A (RAUC rootfs.0): the whole OS incl. kernel + the base venv
#   p3 rootfs-b   ext4          slot B (RAUC rootfs.1): empty until the first update
#   p4 data       ext4          /var/lib/edgeos: credentials, spool, twin, application slots
#
# Outputs in $EDGEOS_IMAGE_DIR (default /var/cache/edgeos/image), never in the checkout:
#   edgeos-qemu-arm64.img      the disk image (raw, sparse)
#   rootfs.tree/               the root as built (make-bundle.sh makes RAUC bundles from it)
#   pki/                       the dev signing CA + key, generated here on first use (never
#                              committed); the image trusts pki/ca.crt (/etc/rauc/keyring.pem)
#   wheels/                    edgeos's wheel + its aarch64 dependencies (PyPI)
#
#   EDGEOS_IMAGE_VERSION=1.0.0   image version (/etc/edgeos-image-version, RAUC bundle versions)
#   EDGEOS_IMAGE_COMPATIBLE      RAUC compatible string (default edgeos-qemu-arm64)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
OUT=${EDGEOS_IMAGE_DIR:-/var/cache/edgeos/image}
VERSION=${EDGEOS_IMAGE_VERSION:-1.0.0}
COMPATIBLE=${EDGEOS_IMAGE_COMPATIBLE:-edgeos-qemu-arm64}
HARDWARE=qemu-arm64
SUITE=bookworm
MIRROR=${EDGEOS_IMAGE_MIRROR:-http://deb.debian.org/debian}
SECURITY=${EDGEOS_IMAGE_SECURITY:-http://deb.debian.org/debian-security}
# Fixed GPT partition UUIDs: grub.cfg passes root=PARTUUID=… for the slot it boots.
PARTUUID_A=6c0a0f2e-5a1d-4f0e-9d1b-0000000000a1
PARTUUID_B=6c0a0f2e-5a1d-4f0e-9d1b-0000000000b1
ROOT_MB=${EDGEOS_IMAGE_ROOT_MB:-1280}
DATA_MB=${EDGEOS_IMAGE_DATA_MB:-1024}

log() { printf '[image %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (mmdebstrap --mode=root, mkfs of root-owned trees)"
bash "$REPO/images/ensure-image-tools" || die "host tools missing (images/ensure-image-tools)"
started=$(date +%s)
mkdir -p "$OUT"
exec 9>"$OUT/.build.lock"
flock 9

# --- host Python for the build steps (a venv of Debian's python3; never the developer's .venv)
HOSTENV=$OUT/hostenv
if [ ! -x "$HOSTENV/bin/tomli-w-ok" ]; then
    log "host build venv $HOSTENV"
    python3 -m venv "$HOSTENV"
    "$HOSTENV/bin/pip" install --quiet --upgrade pip 'setuptools>=77' wheel tomli-w
    touch "$HOSTENV/bin/tomli-w-ok"
fi
HPY=$HOSTENV/bin/python

# --- dev signing PKI: a CA and a signing certificate issued by it. Private keys stay here.
PKI=$OUT/pki
if [ ! -f "$PKI/signing.crt" ]; then
    log "generating the development RAUC PKI in $PKI (not for production)"
    mkdir -p "$PKI"; chmod 0700 "$PKI"
    openssl req -x509 -newkey rsa:3072 -nodes -days 3650 -keyout "$PKI/ca.key" -out "$PKI/ca.crt" \
        -subj "/O=edgeos development/CN=edgeos dev RAUC CA" \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
    openssl req -newkey rsa:3072 -nodes -keyout "$PKI/signing.key" -out "$PKI/signing.csr" \
        -subj "/O=edgeos development/CN=edgeos dev bundle signer" 2>/dev/null
    printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n' > "$PKI/signing.ext"
    openssl x509 -req -in "$PKI/signing.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" \
        -CAcreateserial -days 3650 -extfile "$PKI/signing.ext" -out "$PKI/signing.crt" 2>/dev/null
fi

# --- wheels: edgeos (the gateway wheel carries ./protocol) + its dependencies for aarch64/cp311
WORK=$OUT/work
rm -rf "$WORK"; mkdir -p "$WORK"
WHEELS=$OUT/wheels
rm -rf "$WHEELS"; mkdir -p "$WHEELS"
log "building the edgeos wheel"
src=$WORK/src
mkdir -p "$src"
(cd "$REPO" && git ls-files -co --exclude-standard -- edgeos drivers protocol systemd examples \
    pyproject.toml README.md | tar -cf - -T - ) | tar -xf - -C "$src"
"$HPY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$WHEELS" "$src"
edgeos_whl=$(ls "$WHEELS"/edgeos-*.whl)
log "downloading aarch64 dependency wheels"
plat=(--platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64
      --platform manylinux_2_28_aarch64 --platform linux_aarch64)
for attempt in 1 2 3 4 5 6; do
    if err=$("$HPY" -m pip download --quiet --only-binary=:all: --find-links "$WHEELS" "${plat[@]}" \
            --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none \
            -d "$WHEELS" "$edgeos_whl" 2>&1); then
        break
    fi
    # A dependency published only as an sdist (sdnotify): build its (pure Python) wheel here.
    sdist=$(sed -n 's/.*No matching distribution found for \([^ ]*\).*/\1/p' <<<"$err" | head -1)
    [ -n "$sdist" ] && [ "$attempt" -lt 6 ] || { printf '%s\n' "$err" >&2; die "pip download failed"; }
    log "no aarch64 wheel for $sdist: building it (pure Python) on the host"
    "$HPY" -m pip wheel --quiet --no-deps -w "$WHEELS" "$sdist"
    whl=$(ls -t "$WHEELS"/*.whl | head -1)
    case $whl in *-none-any.whl) ;; *) die "$sdist is not pure Python ($whl)";; esac
done

# --- inputs of images/stage-edgeos.sh and the image's own files
IN=$WORK/in               # becomes /tmp/edgeos in the root
mkdir -p "$IN"
cp -a "$WHEELS" "$IN/wheels"
mkdir -p "$IN/src"
cp -a "$src/edgeos" "$src/drivers" "$src/protocol" "$IN/src/"
echo '{}' > "$IN/root.json"     # no OTA repository for this image: an empty trusted root
"$HPY" "$HERE/make-config.py" "$REPO/examples/small-line.toml" "$IN/edgeos.toml" --hardware "$HARDWARE"
GEN=$WORK/overlay         # generated files for the root
mkdir -p "$GEN/etc/rauc" "$GEN/tmp/edgeos-build"
sed "s/@COMPATIBLE@/$COMPATIBLE/" "$HERE/system.conf.in" > "$GEN/etc/rauc/system.conf"
cp "$PKI/ca.crt" "$GEN/etc/rauc/keyring.pem"
echo "$VERSION" > "$GEN/etc/edgeos-image-version"
sed -e "s/@PARTUUID_A@/$PARTUUID_A/" -e "s/@PARTUUID_B@/$PARTUUID_B/" "$HERE/grub.cfg" \
    > "$GEN/tmp/edgeos-build/grub.cfg"
cp "$HERE/customize.sh" "$GEN/tmp/edgeos-build/"

# --- the root: Debian packages, then the customize hooks (all inside the arm64 root)
ROOT=$OUT/rootfs.tree
# An interrupted mmdebstrap can leave /proc, /sys, /dev mounted inside: never rm -rf through them.
grep -q " $ROOT/" /proc/mounts && { awk -v r="$ROOT/" 'index($2, r) == 1 {print $2}' /proc/mounts \
    | sort -r | xargs -r -n1 umount -l; }
grep -q " $ROOT/" /proc/mounts && die "file systems still mounted under $ROOT"
rm -rf --one-file-system "$ROOT" "$WORK/esp" "$WORK/data"
mkdir -p "$OUT/aptcache" "$WORK/esp" "$WORK/data"
log "mmdebstrap $SUITE arm64 ($(grep -cv '^\s*\(#\|$\)' "$HERE/packages.txt") packages)"
mmdebstrap --mode=root --arch=arm64 --variant=apt --format=directory \
    --include="$(grep -v '^[[:space:]]*\(#\|$\)' "$HERE/packages.txt" | paste -sd, -)" \
    --aptopt='APT::Install-Recommends "false"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --skip=essential/unlink \
    --setup-hook='mkdir -p "$1"/var/cache/apt/archives/' \
    --setup-hook="sync-in $OUT/aptcache /var/cache/apt/archives/" \
    --customize-hook="sync-out /var/cache/apt/archives $OUT/aptcache" \
    --customize-hook="sync-in $HERE/rootfs /" \
    --customize-hook="sync-in $GEN /" \
    --customize-hook='mkdir -p "$1/tmp/edgeos"' \
    --customize-hook="sync-in $IN /tmp/edgeos" \
    --customize-hook="copy-in $REPO/images/stage-edgeos.sh /tmp/edgeos-build" \
    --customize-hook='chroot "$1" /bin/bash /tmp/edgeos-build/customize.sh' \
    --customize-hook="sync-out /tmp/edgeos-build/esp $WORK/esp" \
    --customize-hook="sync-out /var/lib/edgeos $WORK/data" \
    --customize-hook='find "$1/var/lib/edgeos" -mindepth 1 -delete; rm -rf "$1/tmp/edgeos-build" "$1"/var/lib/apt/lists/*' \
    "$SUITE" "$ROOT" \
    "deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main" \
    "deb $SECURITY $SUITE-security main" >&2
log "root done after $(($(date +%s) - started)) s ($(du -sm "$ROOT" | cut -f1) MiB)"

# --- file systems and the disk
log "file systems"
mkfs_root() {  # TREE IMAGE LABEL MB
    rm -f "$2"; truncate -s "$4M" "$2"
    mkfs.ext4 -q -L "$3" -E root_owner=0:0 -d "$1" "$2"
}
mkfs_root "$ROOT" "$WORK/rootfs-a.ext4" rootfs "$ROOT_MB"
rm -f "$WORK/data.ext4"; truncate -s "${DATA_MB}M" "$WORK/data.ext4"
mkfs.ext4 -q -L data -d "$WORK/data" "$WORK/data.ext4"
rm -f "$WORK/esp.vfat"; truncate -s 64M "$WORK/esp.vfat"
mkfs.vfat -n ESP "$WORK/esp.vfat" >/dev/null
mcopy -s -i "$WORK/esp.vfat" "$WORK/esp"/* ::/

cat > "$WORK/genimage.cfg" <<CFG
image edgeos-qemu-arm64.img {
    hdimage {
        partition-table-type = "gpt"
    }
    partition esp {
        image = "$WORK/esp.vfat"
        partition-type-uuid = "U"
        bootable = true
    }
    partition rootfs-a {
        image = "$WORK/rootfs-a.ext4"
        partition-type-uuid = "L"
        partition-uuid = "$PARTUUID_A"
        size = ${ROOT_MB}M
    }
    partition rootfs-b {
        partition-type-uuid = "L"
        partition-uuid = "$PARTUUID_B"
        size = ${ROOT_MB}M
    }
    partition data {
        image = "$WORK/data.ext4"
        partition-type-uuid = "L"
    }
}
CFG
rm -rf "$WORK/genimage-tmp" "$WORK/genimage-root"; mkdir -p "$WORK/genimage-root"
genimage --config "$WORK/genimage.cfg" --rootpath "$WORK/genimage-root" \
    --tmppath "$WORK/genimage-tmp" --inputpath "$WORK" --outputpath "$OUT" >&2
rm -rf "$WORK/genimage-tmp" "$WORK/rootfs-a.ext4" "$WORK/data.ext4" "$WORK/esp.vfat"
log "image $OUT/edgeos-qemu-arm64.img ($(du -h --apparent-size "$OUT/edgeos-qemu-arm64.img" | cut -f1)" \
    "apparent, $(du -h "$OUT/edgeos-qemu-arm64.img" | cut -f1) on disk) in $(($(date +%s) - started)) s"
echo "$OUT/edgeos-qemu-arm64.img"
