#!/usr/bin/env bash
# Build (once) and cache an Ubuntu 22.04 (jammy, JetPack 6's base) root with Ubuntu's own
# python3.11 and edgeos installed into a venv made from it, and print its path: the Jetson
# decision of docs/arm64.md ("Jetson (JetPack 6)") run the same way as the Debian arm64 lane.
#
#   images/jammy/build-root.sh                  arm64 root from ports.ubuntu.com (the Jetson case)
#   EDGEOS_JAMMY_ARCH=amd64 images/jammy/…      the host-native root from archive.ubuntu.com: the
#                                               same source package of python3.11, built for amd64
#                                               (for hosts that cannot reach ports.ubuntu.com)
#   EDGEOS_JAMMY_MIRROR=URL                     another mirror of that architecture's archive
#   EDGEOS_ARM64_CACHE=DIR                      cache directory (default /var/cache/edgeos)
#
# Tests run in it with `make test-jammy` (images/arm64/run-tests.sh on this root).
#
# Trust: Ubuntu's archive key is not in Debian. The ubuntu-keyring package is fetched from the
# mirror and only the key whose fingerprint is pinned below (Ubuntu Archive Automatic Signing Key
# (2018), which signs jammy's Release files) is taken from it; mmdebstrap then checks the archive
# against that key alone, so a tampered keyring package or mirror is refused.
set -euo pipefail
source "$(dirname "$0")/../arm64/lib.sh"
JAMMY_DIR=$(cd "$(dirname "$0")" && pwd)
log() { printf '[jammy %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

ARCH=${EDGEOS_JAMMY_ARCH:-arm64}
case $ARCH in
    arm64) MIRROR=${EDGEOS_JAMMY_MIRROR:-http://ports.ubuntu.com/ubuntu-ports}; UNAME=aarch64 ;;
    amd64) MIRROR=${EDGEOS_JAMMY_MIRROR:-http://archive.ubuntu.com/ubuntu}; UNAME=x86_64 ;;
    *) die "EDGEOS_JAMMY_ARCH=$ARCH: use arm64 (a Jetson) or amd64 (this host's own)" ;;
esac
ARCHIVE_KEY=F6ECB3762474EDA9D21B7022871920D1991BC93C
KEYRING_DEB=pool/main/u/ubuntu-keyring/ubuntu-keyring_2021.03.26_all.deb
COMPONENTS="main universe"

if [ "$ARCH" = arm64 ]; then
    arm64_ensure_tools || die "arm64 tooling unavailable on this host"
else
    [ "$(uname -m)" = x86_64 ] || die "an amd64 root needs an x86_64 host"
    command -v mmdebstrap >/dev/null \
        || { apt-get update -qq >/dev/null 2>&1 || true; apt-get install -y -qq mmdebstrap >/dev/null; }
fi
curl -fsS -m 30 -o /dev/null "$MIRROR/dists/jammy/Release" \
    || die "$MIRROR is unreachable from this host (jammy/$ARCH needs it; see docs/arm64.md" \
           "\"Jetson\"; EDGEOS_JAMMY_ARCH=amd64 proves the interpreter on the host's own arch)"

key=$( (echo "jammy $ARCH $MIRROR $COMPONENTS $ARCHIVE_KEY"; cat "$JAMMY_DIR/packages.txt" \
        "$JAMMY_DIR/build-root.sh"; arm64_pyproject_digest "${PYPROJECTS[@]}"; arm64_pip_targets) \
      | sha256sum | cut -c1-16)
ROOT="$ARM64_CACHE/jammy-$ARCH-root-$key"
if [ -f "$ROOT/.edgeos-root-ready" ]; then
    log "cached root $ROOT"
    echo "$ROOT"
    exit 0
fi
mkdir -p "$ARM64_CACHE"
exec 9>"$ARM64_CACHE/.jammy-build.lock"
flock 9
if [ -f "$ROOT/.edgeos-root-ready" ]; then echo "$ROOT"; exit 0; fi

started=$(date +%s)
PARTIAL="$ROOT.partial"
WORK=$(mktemp -d)
chmod 0755 "$WORK"  # apt reads the keyring as its own unprivileged user
trap 'rm -rf "$WORK"' EXIT
if [ ! -f "$PARTIAL/.edgeos-ubuntu-ready" ]; then
    rm -rf "$PARTIAL"
    curl -fsS -m 120 -o "$WORK/keyring.deb" "$MIRROR/$KEYRING_DEB"
    dpkg-deb -x "$WORK/keyring.deb" "$WORK/keyring"
    export GNUPGHOME="$WORK/gnupg"
    mkdir -m 0700 "$GNUPGHOME"
    gpg -q --import "$WORK/keyring/usr/share/keyrings/ubuntu-archive-keyring.gpg" 2>/dev/null
    gpg -q --export "$ARCHIVE_KEY" >"$WORK/ubuntu-archive.gpg"
    chmod 0644 "$WORK/ubuntu-archive.gpg"
    [ -s "$WORK/ubuntu-archive.gpg" ] \
        || die "the ubuntu-keyring package from $MIRROR does not hold key $ARCHIVE_KEY: refusing it"
    log "building $ROOT (Ubuntu jammy $ARCH from $MIRROR)"
    packages=$(grep -v '^[[:space:]]*\(#\|$\)' "$JAMMY_DIR/packages.txt" | paste -sd,)
    mmdebstrap --mode=root --arch="$ARCH" --variant=apt --format=directory \
        --keyring="$WORK/ubuntu-archive.gpg" --components="$COMPONENTS" \
        --include="$packages" --aptopt='APT::Install-Recommends "false"' \
        jammy "$PARTIAL" \
        "deb $MIRROR jammy $COMPONENTS" \
        "deb $MIRROR jammy-updates $COMPONENTS" \
        "deb $MIRROR jammy-security $COMPONENTS" >&2
    touch "$PARTIAL/.edgeos-ubuntu-ready"
fi
log "ubuntu root done after $(($(date +%s) - started)) s"

# The venv from Ubuntu's python3.11 (the decision), the same editable installs as the Debian lane.
arm64_fake_cpuinfo "$WORK/cpuinfo"
[ "$ARCH" = arm64 ] || cp /proc/cpuinfo "$WORK/cpuinfo"
arm64_install_venv "$PARTIAL" python3.11 "$WORK/cpuinfo"
uname_m=$(arm64_chroot "$PARTIAL" uname -m)
[ "$uname_m" = "$UNAME" ] || die "the root's uname -m is $uname_m, not $UNAME"
pyver=$(arm64_chroot "$PARTIAL" "$ROOT_VENV/bin/python" -c 'import sys; print(sys.version.split()[0])')
pkgver=$(arm64_chroot "$PARTIAL" dpkg-query -W -f '${Version}' python3.11)

echo "built $(date -u +%FT%TZ) in $(($(date +%s) - started)) s, key $key," \
    "python $pyver (Ubuntu python3.11 $pkgver)" >"$PARTIAL/.edgeos-root-ready"
mv "$PARTIAL" "$ROOT"
for old in "$ARM64_CACHE"/jammy-"$ARCH"-root-*; do
    [ "$old" = "$ROOT" ] || [ "${old%.partial}" != "$old" ] || rm -rf "$old"
done
log "root ready after $(($(date +%s) - started)) s: $ROOT (python $pyver, Ubuntu $pkgver)"
echo "$ROOT"
