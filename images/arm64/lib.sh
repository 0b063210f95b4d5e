# Shared by images/arm64/*.sh (sourced). The arm64 test root: where it is cached and how to enter
# it. Everything here runs as root on the build host.

ARM64_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$ARM64_DIR/../.." && pwd)
ARM64_CACHE=${EDGEOS_ARM64_CACHE:-/var/cache/edgeos}
ARM64_SUITE=${EDGEOS_ARM64_SUITE:-bookworm}
ARM64_MIRROR=${EDGEOS_ARM64_MIRROR:-http://deb.debian.org/debian}
ARM64_SECURITY=${EDGEOS_ARM64_SECURITY:-http://deb.debian.org/debian-security}
# Where the checkout and the venv live inside the root.
ROOT_SRC=/opt/edgeos-src
ROOT_VENV=/opt/edgeos-venv
PYPROJECTS=(pyproject.toml cloud/pyproject.toml sim/pyproject.toml testsupport/pyproject.toml)

log() { printf '[arm64 %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# The cache key: what decides what is inside the root (the package list, the script that builds
# it, and of the four pyproject files the [project] and [build-system] tables: dependencies,
# extras, scripts and entry points, which the editable installs bake in — not the [tool.*]
# settings of ruff, mypy, pytest or setuptools' file lists, which change nothing in the root and
# would cost a 15–30 min rebuild). Bump ARM64_ROOT_FORMAT when a change to this file changes
# how the root is built.
ARM64_ROOT_FORMAT=1
arm64_root_key() {
    (cd "$REPO" && echo "format $ARM64_ROOT_FORMAT" && cat images/arm64/packages.txt \
        images/arm64/build-root.sh && arm64_pyproject_digest "${PYPROJECTS[@]}" \
        && echo "$ARM64_SUITE $ARM64_MIRROR $(arm64_pip_targets)") | sha256sum | cut -c1-16
}

# The [project] and [build-system] tables of each pyproject file, canonical JSON (Python ≥ 3.11).
arm64_pyproject_digest() {
    python3 - "$@" <<'PY'
import json
import sys
import tomllib

for path in sys.argv[1:]:
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    keep = {k: doc[k] for k in ("project", "build-system") if k in doc}
    print(path, json.dumps(keep, sort_keys=True))
PY
}

# What the development venv installs (the Makefile's `pip install -e …` line, so the two stay in
# step when someone adds an extra there), e.g. -e '.[dev,speed]' -e './cloud[postgres]' …
arm64_pip_targets() {
    sed -n "s/^[[:space:]]*\$(PY) -m pip install --quiet \(-e .*\)\$/\1/p" "$REPO/Makefile" | head -1
}

arm64_root_path() { echo "$ARM64_CACHE/arm64-root-$(arm64_root_key)"; }

arm64_packages() { grep -v '^[[:space:]]*\(#\|$\)' "$ARM64_DIR/packages.txt" | paste -sd, -; }

# Can this machine run arm64 binaries? (binfmt_misc + qemu-user-static, or a real arm64 host.)
arm64_can_exec() {
    [ "$(uname -m)" = aarch64 ] && return 0
    [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || return 1
    grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64
}

# Install and enable the tools when missing (Debian/Ubuntu host, root). Returns non-zero with a
# reason on stderr when that is not possible, so callers can skip the lane instead of failing.
arm64_ensure_tools() {
    [ "$(id -u)" = 0 ] || { log "needs root (mmdebstrap, mount namespaces, chroot)"; return 1; }
    local missing=()
    command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
    # mmdebstrap only recommends it, but refuses a foreign --arch without it ("install arch-test
    # for foreign architecture support"); --no-install-recommends below would leave it out.
    command -v arch-test >/dev/null || missing+=(arch-test)
    command -v unshare >/dev/null || missing+=(util-linux)
    if [ "$(uname -m)" != aarch64 ]; then
        [ -x /usr/bin/qemu-aarch64-static ] || missing+=(qemu-user-static)
        command -v update-binfmts >/dev/null || missing+=(binfmt-support)
    fi
    if [ ${#missing[@]} -gt 0 ]; then
        command -v apt-get >/dev/null || { log "no apt-get to install: ${missing[*]}"; return 1; }
        log "installing ${missing[*]}"
        apt-get update -qq >/dev/null 2>&1 || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null || { log "could not install ${missing[*]}"; return 1; }
    fi
    if ! arm64_can_exec; then
        [ -e /proc/sys/fs/binfmt_misc/register ] \
            || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null || true
        update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
    fi
    arm64_can_exec || { log "binfmt_misc cannot run arm64 binaries on this host"; return 1; }
}

# A fake /proc/cpuinfo of a Raspberry Pi 4 (Cortex-A72) with one entry per possible CPU of this
# host. XNNPACK (inside ai-edge-litert) parses /proc/cpuinfo with the cpuinfo library and
# crashes in Interpreter() when it finds an x86 one; under qemu-user the guest sees the host's.
arm64_fake_cpuinfo() {
    local out=$1 n
    n=$(nproc --all 2>/dev/null || echo 1)
    : >"$out"
    for ((i = 0; i < n; i++)); do
        printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n' "$i"
        printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\n'
        printf 'CPU part\t: 0xd08\nCPU revision\t: 3\n\n'
    done >>"$out"
    printf 'Hardware\t: BCM2835\nRevision\t: c03111\nModel\t\t: Raspberry Pi 4 Model B Rev 1.1\n' >>"$out"
}

# Mount the kernel file systems, the fake cpuinfo and fresh tmpfs for /tmp, /run, /dev/shm under
# $1. Call only inside a private mount namespace (unshare --mount): everything goes away with it.
arm64_mount_kernel_fs() {
    local root=$1 cpuinfo=$2
    mount -t proc proc "$root/proc"
    mount --bind "$cpuinfo" "$root/proc/cpuinfo"
    mount --rbind /sys "$root/sys"
    mount --rbind /dev "$root/dev"
    mount -t tmpfs -o mode=1777 tmpfs "$root/dev/shm"
    mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
    mount -t tmpfs -o mode=0755 tmpfs "$root/run"
}

# Copy the checkout (what git would see: tracked and untracked files, minus .gitignore'd ones such
# as .venv, build/ and *.egg-info) to $1. Files the destination has but the checkout no longer
# has are deleted, except the egg-info directories the editable installs keep there.
arm64_sync_src() {
    local dst=$1
    mkdir -p "$dst"
    rsync -a --delete --exclude=/.git --exclude='*.egg-info' --filter=':- .gitignore' \
        "$REPO/" "$dst/"
}

# The Python side of a test root ($1): a venv $ROOT_VENV made by the root's interpreter $2
# (python3 on Debian, python3.11 on jammy) with the Makefile's editable installs from a copy of
# the checkout; $3 is the cpuinfo to bind (arm64_fake_cpuinfo). pip inside the root trusts what
# pip on this host trusts (PIP_CERT / pip.conf `cert`, else the host's CA bundle): behind a
# TLS-inspecting proxy that is the only way to reach the index. (Not in the roots' cache key:
# bump ARM64_ROOT_FORMAT when a change here changes what a root holds.)
arm64_install_venv() {
    local root=$1 python=$2 cpuinfo=$3 host_ca targets
    arm64_sync_src "$root$ROOT_SRC"
    rm -f "$root/etc/resolv.conf"  # on Ubuntu a symlink to systemd-resolved's stub
    cp -L /etc/resolv.conf "$root/etc/resolv.conf"
    host_ca=$(pip3 config get global.cert 2>/dev/null || true)
    host_ca=${PIP_CERT:-${host_ca:-/etc/ssl/certs/ca-certificates.crt}}
    [ -f "$host_ca" ] && install -D -m 0644 "$host_ca" "$root/etc/edgeos-build/pip-ca.crt"
    targets=$(arm64_pip_targets)
    [ -n "$targets" ] || die "no \`pip install -e …\` line found in the Makefile"
    log "pip install $targets ($python)"
    unshare --mount --propagation private --fork bash -euc '
        source "$1"; root=$2; cpuinfo=$3; targets=$4; python=$5
        arm64_mount_kernel_fs "$root" "$cpuinfo"
        arm64_chroot "$root" /bin/bash -euc "
            [ -f /etc/edgeos-build/pip-ca.crt ] && export PIP_CERT=/etc/edgeos-build/pip-ca.crt
            $python -m venv $ROOT_VENV
            $ROOT_VENV/bin/pip install --quiet --upgrade pip
            cd $ROOT_SRC
            $ROOT_VENV/bin/pip install --quiet $targets
            $ROOT_VENV/bin/pip freeze --exclude-editable > /opt/edgeos-freeze.txt
        "
    ' _ "$ARM64_DIR/lib.sh" "$root" "$cpuinfo" "$targets" "$python" >&2
}

# A clean environment for the chroot: none of the host's PIP_*, VIRTUAL_ENV or PYTHON* settings
# (they point at host paths and host-only package indexes).
arm64_chroot() {
    local root=$1; shift
    env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        LANG=C.UTF-8 LC_ALL=C.UTF-8 TERM=dumb PIP_DISABLE_PIP_VERSION_CHECK=1 \
        PIP_DEFAULT_TIMEOUT=180 ${ARM64_CHROOT_ENV:-} chroot "$root" "$@"
}

# Runs hold a shared lock on this file while they use a root (run-tests.sh, test-stage.sh), so a
# new root never removes an older one from under a run that is still using it.
ARM64_USE_LOCK="$ARM64_CACHE/.arm64-in-use.lock"

arm64_hold_use_lock() {
    mkdir -p "$ARM64_CACHE"
    exec 8>"$ARM64_USE_LOCK"
    flock -s 8
}

# Remove cached roots other than $1, unless a run is using one (then the next build does it).
arm64_prune_roots() {
    local keep=$1 old
    (
        flock -n 7 || { log "a run is using a cached root: not removing older roots now"; exit 0; }
        for old in "$ARM64_CACHE"/arm64-root-*; do
            [ "$old" = "$keep" ] || { log "removing stale root $old"; rm -rf "$old"; }
        done
    ) 7>"$ARM64_USE_LOCK"
}
