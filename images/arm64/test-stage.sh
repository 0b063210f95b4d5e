#!/usr/bin/env bash
# Run images/stage-edgeos.sh the way an image builder would -- as a chroot step inside an arm64
# root -- and check what it leaves behind: edgeos.service enabled, the service user created by
# systemd-sysusers with a uid of its own, everything under /var/lib/edgeos owned by it, slot a
# provisioned. Uses a throw-away overlay on the cached test root (build-root.sh); the inputs the
# stage expects (aarch64 wheelhouse, factory bundle, config, unit files) are built inside it from
# the checkout. `make test-arm64-image` runs this.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

ROOT=$("$ARM64_DIR/build-root.sh")
arm64_hold_use_lock
RUN=$(mktemp -d /var/tmp/edgeos-arm64-stage.XXXXXX)
trap 'rm -rf "$RUN"' EXIT
mkdir -p "$RUN"/{upper,work,merged}
arm64_fake_cpuinfo "$RUN/cpuinfo"
started=$(date +%s)
# No --net here: `pip wheel` may fetch what the root's pip cache lacks from the index.
unshare --mount --propagation private --pid --fork --kill-child bash -euc '
    source "$1"; root=$2; run=$3
    m=$run/merged
    mount -t overlay overlay -o "lowerdir=$root,upperdir=$run/upper,workdir=$run/work" "$m"
    arm64_sync_src "$m$ROOT_SRC"
    arm64_mount_kernel_fs "$m" "$run/cpuinfo"
    arm64_chroot "$m" /bin/bash -euc "
        [ -f /etc/edgeos-build/pip-ca.crt ] && export PIP_CERT=/etc/edgeos-build/pip-ca.crt
        V=$ROOT_VENV/bin; IN=/tmp/edgeos
        cd $ROOT_SRC
        echo \"== inputs: aarch64 wheelhouse, factory bundle, config, source tree\"
        mkdir -p \$IN/wheels \$IN/src /tmp/dist
        \$V/pip wheel --quiet --no-build-isolation -w \$IN/wheels .
        \$V/python -m edgeos bundle build --kind full --version 1.0.0 --target rpi4-aarch64 \
            --package edgeos --package drivers --package protocol/edgeos_protocol \
            --out /tmp/dist --quiet
        cp /tmp/dist/*.tar.zst \$IN/factory.tar.zst
        echo {} > \$IN/root.json
        sed \"s/^hardware *=.*/hardware = \\\"rpi4-aarch64\\\"/\" examples/small-line.toml \
            > \$IN/edgeos.toml
        cp -a edgeos systemd examples \$IN/src/
        echo \"== images/stage-edgeos.sh\"
        bash images/stage-edgeos.sh
        echo \"== checks\"
        fail() { echo \"FAIL: \$*\" >&2; exit 1; }
        [ \"\$(systemctl is-enabled edgeos.service)\" = enabled ] || fail \"edgeos.service not enabled\"
        getent passwd edgeos >/dev/null || fail \"no edgeos user\"
        dup=\$(cut -d: -f3 /etc/passwd | sort | uniq -d)
        [ -z \"\$dup\" ] || fail \"uid \$dup is used twice in /etc/passwd\"
        id -nG edgeos | grep -qw dialout || fail \"edgeos is not in dialout\"
        stray=\$(find /var/lib/edgeos \\( ! -user edgeos -o ! -group edgeos \\) -print)
        [ -z \"\$stray\" ] || fail \"not owned by edgeos: \$stray\"
        [ \"\$(readlink /var/lib/edgeos/slots/current)\" = a ] || fail \"slot a is not current\"
        [ \"\$(stat -c %U:%G:%a /etc/edgeos/edgeos.toml)\" = root:edgeos:640 ] \
            || fail \"/etc/edgeos/edgeos.toml is not root:edgeos 0640\"
        [ ! -e /tmp/edgeos ] || fail \"/tmp/edgeos left behind\"
        echo \"edgeos uid \$(id -u edgeos), service \$(systemctl is-enabled edgeos.service),\" \
            \"\$(find /var/lib/edgeos | wc -l) files under /var/lib/edgeos, all edgeos:edgeos\"
    "
' _ "$ARM64_DIR/lib.sh" "$ROOT" "$RUN"
log "stage test passed in $(($(date +%s) - started)) s"
