#!/bin/bash
# Runs INSIDE the arm64 root (mmdebstrap --customize-hook 'chroot "$1" …', build-image.sh), after
# the packages, the overlay (images/qemu/rootfs) and the stage inputs (/tmp/edgeos) are in place.
set -euo pipefail
B=/tmp/edgeos-build
PY=/usr/lib/edgeos/python
log() { echo "[customize] $*" >&2; }

# 1. The base venv from the wheels (stage-edgeos.sh does the same; it is a no-op there after
#    this), used here first to build the factory application bundle from the same sources.
python3 -m venv "$PY"
"$PY/bin/pip" install --quiet --no-index --find-links /tmp/edgeos/wheels edgeos
HW=$(sed -n 's/^hardware *= *"\([^"]*\)".*/\1/p' /tmp/edgeos/edgeos.toml | head -1)
mkdir -p /tmp/edgeos-dist
( cd /tmp/edgeos/src && "$PY/bin/python" -m edgeos bundle build --kind full \
    --version "$(cat /etc/edgeos-image-version)" --target "$HW" \
    --package edgeos --package drivers --package protocol/edgeos_protocol \
    --out /tmp/edgeos-dist --quiet )
cp /tmp/edgeos-dist/*.tar.zst /tmp/edgeos/factory.tar.zst
rm -rf /tmp/edgeos-dist

# 2. The service: units from the wheel, user and directories by sysusers/tmpfiles in this root,
#    trusted root, application slot a provisioned (images/stage-edgeos.sh, tested on its own by
#    images/arm64/test-stage.sh). It removes /tmp/edgeos when done.
log "stage-edgeos.sh"
bash "$B/stage-edgeos.sh"

# 3. The image's units: first boot, RAUC mark-good, console readiness, the opt-in test shell,
#    DHCP on the wired interface.
systemctl enable edgeos-firstboot.service edgeos-rauc-mark-good.service \
    edgeos-console-ready.service edgeos-test-shell.service systemd-networkd.service >/dev/null
# Names resolve in this root only: the mark-good state directory is root's.
install -d -m 0755 /boot/efi
chmod 0755 /usr/lib/edgeos/image/rauc-pre-install /usr/lib/edgeos/image/rauc-post-install

# 4. Kernel and initramfs at fixed paths in the root (grub.cfg loads /vmlinuz, /initrd.img).
kver=$(ls /lib/modules | sort -V | tail -1)
[ -e /vmlinuz ] || ln -s "boot/vmlinuz-$kver" /vmlinuz
[ -e /initrd.img ] || ln -s "boot/initrd.img-$kver" /initrd.img
[ -f "/boot/initrd.img-$kver" ] || update-initramfs -c -k "$kver"
# build-image.sh turned off initramfs *updates* while the packages went in (each trigger rebuilt
# the whole initramfs, 15 min under emulation); the kernel's own postinst built it once. Back on.
sed -i 's/^update_initramfs=no/update_initramfs=yes/' /etc/initramfs-tools/update-initramfs.conf
rm -f /boot/*.dpkg-bak /boot/*.new

# 5. The ESP: a standalone GRUB (its modules inside the EFI binary) at the removable-media
#    path, which finds grub.cfg and grubenv next to it on the same partition.
esp=$B/esp
mkdir -p "$esp/EFI/BOOT" "$esp/EFI/edgeos"
cat > "$B/grub-embed.cfg" <<'CFG'
search --no-floppy --set=root --file /EFI/edgeos/grub.cfg
set prefix=($root)/EFI/edgeos
configfile $prefix/grub.cfg
CFG
grub-mkstandalone -O arm64-efi -o "$esp/EFI/BOOT/BOOTAA64.EFI" \
    --modules="part_gpt fat ext2 normal linux configfile loadenv test echo search search_fs_file regexp gzio" \
    --locales= --themes= --fonts= \
    "boot/grub/grub.cfg=$B/grub-embed.cfg"
cp "$B/grub.cfg" "$esp/EFI/edgeos/grub.cfg"
# Slot A holds the factory root and is good; B is empty until RAUC writes it.
grub-editenv "$esp/EFI/edgeos/grubenv" create
grub-editenv "$esp/EFI/edgeos/grubenv" set ORDER="A B" A_OK=1 A_TRY=0 B_OK=0 B_TRY=0

# 6. Small and reproducible: no machine id (generated at first boot), no apt lists.
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id
log "done: $(du -sm / --exclude=/proc --exclude=/sys --exclude=/dev 2>/dev/null | cut -f1) MiB"
