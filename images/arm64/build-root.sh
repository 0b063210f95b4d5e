#!/usr/bin/env bash
# Build (once) and cache the arm64 Debian bookworm root the arm64 test lane runs in, and print
# its path. Debian's own tools: mmdebstrap fetches arm64 packages from the Debian mirror and runs
# their maintainer scripts under qemu-user-static (binfmt_misc); the Python dependencies are
# PyPI's aarch64 wheels, installed by pip inside the root (emulated too). See docs/arm64.md.
#
# The root is cached outside the clone, keyed by a hash of its inputs (lib.sh: the package
# list, these scripts, the four pyproject files); a second run with unchanged inputs returns at
# once. Older roots are removed when a new one is complete.
#
#   images/arm64/build-root.sh            build if needed, print the root's path
#   EDGEOS_ARM64_CACHE=DIR                cache directory (default /var/cache/edgeos)
set -euo pipefail
source "$(dirname "$0")/lib.sh"

arm64_ensure_tools || die "arm64 tooling unavailable on this host"
ROOT=$(arm64_root_path)
if [ -f "$ROOT/.edgeos-root-ready" ]; then
    log "cached root $ROOT"
    echo "$ROOT"
    exit 0
fi

mkdir -p "$ARM64_CACHE"
exec 9>"$ARM64_CACHE/.arm64-build.lock"
flock 9  # one build at a time; a second caller waits and then finds the root ready
if [ -f "$ROOT/.edgeos-root-ready" ]; then echo "$ROOT"; exit 0; fi

started=$(date +%s)
PARTIAL="$ROOT.partial"
if [ -f "$PARTIAL/.edgeos-debian-ready" ]; then
    # an earlier attempt got through the Debian part and failed later (e.g. PyPI): go on from there
    log "reusing the Debian part of $PARTIAL"
else
    rm -rf "$PARTIAL"
    log "building $ROOT (Debian $ARM64_SUITE arm64 from $ARM64_MIRROR)"
    # --variant=apt: essential + apt, then only what packages.txt asks for (no recommends).
    mmdebstrap --mode=root --arch=arm64 --variant=apt --format=directory \
        --include="$(arm64_packages)" \
        --aptopt='APT::Install-Recommends "false"' \
        "$ARM64_SUITE" "$PARTIAL" \
        "deb $ARM64_MIRROR $ARM64_SUITE main" \
        "deb $ARM64_MIRROR $ARM64_SUITE-updates main" \
        "deb $ARM64_SECURITY $ARM64_SUITE-security main" >&2
    touch "$PARTIAL/.edgeos-debian-ready"
fi
log "debian root done after $(($(date +%s) - started)) s"

# The Python side: a venv from Debian's python3 with the four distributions installed editable
# from a copy of the checkout (run-tests.sh refreshes that copy before every run, so the installed
# metadata -- dependencies, entry points -- only has to change when a pyproject file does, which
# changes the cache key).
cpuinfo=$(mktemp)
arm64_fake_cpuinfo "$cpuinfo"
arm64_install_venv "$PARTIAL" python3 "$cpuinfo"
rm -f "$cpuinfo"
uname_m=$(arm64_chroot "$PARTIAL" uname -m)
[ "$uname_m" = aarch64 ] || die "the root's uname -m is $uname_m, not aarch64"

echo "built $(date -u +%FT%TZ) in $(($(date +%s) - started)) s, key $(arm64_root_key)" \
    >"$PARTIAL/.edgeos-root-ready"
mv "$PARTIAL" "$ROOT"
arm64_prune_roots "$ROOT"
log "root ready after $(($(date +%s) - started)) s: $ROOT"
echo "$ROOT"
