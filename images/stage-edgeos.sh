#!/bin/bash
# Image builder chroot step: run INSIDE the target's arm64 root filesystem (pi-gen
# `00-run-chroot.sh`, `mmdebstrap --customize-hook='chroot "$1" …'`, `systemd-nspawn -D`).
# Tested in the emulated Debian bookworm arm64 root by images/arm64/test-stage.sh (docs/arm64.md).
#
# Lays out the service (units enabled, user and directories declared the systemd way), the base
# venv, the trusted root, and provisions slot a from the factory bundle. Expects:
#   /tmp/edgeos/root.json               trusted TUF root (edgeos-cloud ota trusted-root)
#   /tmp/edgeos/factory.tar.zst         full bundle for this hardware target
#   /tmp/edgeos/edgeos.toml             device config template ([device] hardware, [ota] …)
#   /tmp/edgeos/wheels/                 wheels for the base venv (edgeos + deps, aarch64); the
#                                       edgeos wheel carries the systemd units that
#                                       `edgeos install-service` installs (share/edgeos/systemd)
#
# Users and ownership: nothing here picks a uid. The service user is declared in
# /usr/lib/sysusers.d/edgeos.conf and created by systemd-sysusers from the *target's*
# /etc/passwd and /etc/group (and again at every boot, a no-op once it exists); the directories
# are declared in /usr/lib/tmpfiles.d/edgeos.conf and created by systemd-tmpfiles, and every file
# below /var/lib/edgeos is written by a process already running as that user (runuser), so no
# name is ever resolved against the build host's user database and no numeric id is baked in.
set -euo pipefail

IN=/tmp/edgeos
STATE=/var/lib/edgeos
PY=/usr/lib/edgeos/python

for f in root.json factory.tar.zst edgeos.toml wheels; do
    [ -e "$IN/$f" ] || { echo "stage-edgeos: missing $IN/$f" >&2; exit 1; }
done
for tool in systemd-sysusers systemd-tmpfiles systemctl runuser; do
    command -v "$tool" >/dev/null || { echo "stage-edgeos: $tool not in the root" >&2; exit 1; }
done

# 1. base interpreter for the boot check (independent of the slots, so a broken slot can never
#    break the code that chooses the slot)
python3 -m venv "$PY"
"$PY/bin/pip" install --quiet --no-index --find-links "$IN/wheels" edgeos

# 2. units, sysusers.d/tmpfiles.d entries, the plant config (root:edgeos 0640), user, groups and
#    directories, edgeos.service enabled. `install-service` takes its unit files from the
#    installed wheel (the venv's share/edgeos/systemd); in a chroot `systemctl enable` only
#    writes the multi-user.target.wants link, which is all an image needs.
report=$("$PY/bin/python" -m edgeos.cli install-service --root / \
    --config-template "$IN/edgeos.toml" 2>&1)
printf '%s\n' "$report"
# The one expected note in a chroot: there is no running systemd to daemon-reload.
if grep '^note' <<<"$report" | grep -v 'daemon-reload' | grep -q .; then
    echo "stage-edgeos: install-service did not finish cleanly (notes above)" >&2
    exit 1
fi
id edgeos >/dev/null
[ -L /etc/systemd/system/multi-user.target.wants/edgeos.service ] \
    || { echo "stage-edgeos: edgeos.service not enabled" >&2; exit 1; }

# 3. trusted root: a read-only root-owned copy baked into the image, the working copy in state
install -D -o root -g root -m 0644 "$IN/root.json" /usr/lib/edgeos/root.json
runuser -u edgeos -- install -d -m 0750 "$STATE/ota"
runuser -u edgeos -- install -m 0644 /usr/lib/edgeos/root.json "$STATE/ota/root.json"

# 4. provision slot a (verifies every file, writes state.json, points current at a); the bundle
#    is read by the service user, so copy it where that user may read it
HW=$(sed -n 's/^hardware *= *"\([^"]*\)".*/\1/p' /etc/edgeos/edgeos.toml | head -1)
work=$(runuser -u edgeos -- mktemp -d "$STATE/.stage.XXXXXX")
install -o edgeos -g edgeos -m 0640 "$IN/factory.tar.zst" "$work/factory.tar.zst"
runuser -u edgeos -- "$PY/bin/python" -m edgeos ota provision \
    "$work/factory.tar.zst" --root "$STATE/slots" --hardware "${HW:?hardware missing}"
runuser -u edgeos -- "$PY/bin/python" -m edgeos ota boot-check \
    --root "$STATE/slots" --hardware "$HW"
rm -rf "$work"

# 5. nothing under the state directory may belong to anyone but the service user
stray=$(find "$STATE" \( ! -user edgeos -o ! -group edgeos \) -print -quit)
[ -z "$stray" ] || { echo "stage-edgeos: $stray is not owned by edgeos:edgeos" >&2; exit 1; }

rm -rf "$IN"
