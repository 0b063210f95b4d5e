#!/usr/bin/env bash
# The arm64 test lane: run the test suite inside the cached arm64 Debian root (build-root.sh)
# under qemu-user emulation. See docs/arm64.md.
#
#   images/arm64/run-tests.sh [--ci] [PYTEST ARGS...]
#     --ci          only the named subset in images/arm64/ci-tests.txt (.ci/run runs this)
#     PYTEST ARGS   passed to pytest (default: the suite's own testpaths and options)
#   EDGEOS_ARM64_RESULTS=DIR   where the log and junit XML go (default /var/tmp/edgeos-arm64/…)
#   EDGEOS_ARM64_TIMEOUT=S     per-test timeout under emulation (default 600; the suite's is 120)
#   EDGEOS_TEST_ROOT=DIR       run in this prepared root instead (images/jammy/build-root.sh's)
#
# Each run gets a throw-away overlay on the cached root (the root itself is never changed), a
# fresh copy of the checkout, its own network namespace (its own loopback: the PostgreSQL inside
# listens on 127.0.0.1:5432 without meeting the host's) and a fake ARM /proc/cpuinfo.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

subset=()
if [ "${1:-}" = --ci ]; then
    shift
    mapfile -t subset < <(grep -v '^[[:space:]]*\(#\|$\)' "$ARM64_DIR/ci-tests.txt")
fi

ROOT=${EDGEOS_TEST_ROOT:-$("$ARM64_DIR/build-root.sh")}
[ -f "$ROOT/.edgeos-root-ready" ] || die "$ROOT is not a finished test root"
arm64_hold_use_lock
RESULTS=${EDGEOS_ARM64_RESULTS:-/var/tmp/edgeos-arm64/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$RESULTS"
RUN=$(mktemp -d /var/tmp/edgeos-arm64-run.XXXXXX)
trap 'rm -rf "$RUN"' EXIT
mkdir -p "$RUN"/{upper,work,merged}
arm64_fake_cpuinfo "$RUN/cpuinfo"
# A root of the host's own architecture runs natively: it gets the host's real cpuinfo.
[ "$(arm64_chroot "$ROOT" uname -m)" != "$(uname -m)" ] || cp /proc/cpuinfo "$RUN/cpuinfo"

args=(--timeout="${EDGEOS_ARM64_TIMEOUT:-600}" -p no:cacheprovider
      --junitxml=/opt/edgeos-results/junit.xml --durations=25 "${subset[@]}" "$@")
log "root $ROOT; results in $RESULTS"
started=$(date +%s)
rc=0
# --kill-child: when this script is killed, everything started inside goes with it.
unshare --mount --propagation private --net --pid --fork --kill-child bash -euc '
    source "$1"; root=$2; run=$3; results=$4; shift 4
    ip link set lo up
    m=$run/merged
    mount -t overlay overlay -o "lowerdir=$root,upperdir=$run/upper,workdir=$run/work" "$m"
    arm64_sync_src "$m$ROOT_SRC"
    arm64_mount_kernel_fs "$m" "$run/cpuinfo"
    mkdir -p "$m/opt/edgeos-results"
    mount --bind "$results" "$m/opt/edgeos-results"
    arm64_chroot "$m" /bin/bash "$ROOT_SRC/images/arm64/in-root.sh" "$@"
' _ "$ARM64_DIR/lib.sh" "$ROOT" "$RUN" "$RESULTS" "${args[@]}" 2>&1 | tee "$RESULTS/pytest.log" \
    || rc=$?
log "arm64 ${subset:+CI subset }run finished in $(($(date +%s) - started)) s (exit $rc);" \
    "log and junit.xml in $RESULTS"
exit $rc
