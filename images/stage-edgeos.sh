#!/bin/bash
# pi-gen custom stage step (00-run-chroot.sh style) – UNTESTED recipe, see images/README.md.
#
# Lays out the OTA slots, the service user and the trusted root, and provisions slot a from
# the factory bundle. Expects, inside the chroot:
#   /tmp/edgeos/root.json               trusted TUF root (edgeos-receiver ota trusted-root)
#   /tmp/edgeos/factory.tar.zst         full bundle for this hardware target
#   /tmp/edgeos/edgeos.toml             device config template ([device] hardware, [ota] …)
#   /tmp/edgeos/wheels/                 wheels for the bootstrap venv (edgeos + deps, aarch64)
set -euo pipefail

STATE=/var/lib/edgeos
PY=/usr/lib/edgeos/python

# 1. service user: no login, serial access through dialout
if ! id edgeos >/dev/null 2>&1; then
    useradd --system --home-dir "$STATE" --shell /usr/sbin/nologin --user-group edgeos
fi
usermod -a -G dialout edgeos

# 2. bootstrap interpreter for the boot check (independent of the slots, so a broken slot
#    can never break the code that chooses the slot)
python3 -m venv "$PY"
"$PY/bin/pip" install --no-index --find-links /tmp/edgeos/wheels edgeos

# 3. state directory and trusted root
install -d -o edgeos -g edgeos -m 0750 "$STATE" "$STATE/ota" "$STATE/slots"
install -o root -g root -m 0644 /tmp/edgeos/root.json /usr/lib/edgeos/root.json
install -o edgeos -g edgeos -m 0644 /usr/lib/edgeos/root.json "$STATE/ota/root.json"
install -d -m 0755 /etc/edgeos
install -o root -g edgeos -m 0640 /tmp/edgeos/edgeos.toml /etc/edgeos/edgeos.toml

# 4. provision slot a (verifies every file, writes state.json, points current at a)
HW=$(sed -n 's/^hardware *= *"\(.*\)"/\1/p' /etc/edgeos/edgeos.toml | head -1)
runuser -u edgeos -- "$PY/bin/python" -m edgeos.ota.cli ota provision \
    /tmp/edgeos/factory.tar.zst --root "$STATE/slots" --hardware "${HW:?hardware missing}"
runuser -u edgeos -- "$PY/bin/python" -m edgeos.ota.cli ota boot-check \
    --root "$STATE/slots" --hardware "$HW"

rm -rf /tmp/edgeos
