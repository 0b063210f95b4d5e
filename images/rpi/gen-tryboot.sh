#!/usr/bin/env bash
# Raspberry Pi 4/5 A/B boot with the firmware's tryboot, for RAUC. NOT TESTED HERE (no Pi and no
# emulator for the Pi firmware; images/test-boot.sh tests the GRUB variant in QEMU). Writes into
# OUTDIR the files a Pi image needs (docs/ota.md "Raspberry Pi: tryboot"):
#
#   autoboot.txt          -> first FAT partition (p1, the firmware reads it before anything else)
#   cmdline-a.txt         -> p2 (boot A) as cmdline.txt       config.txt: your usual one, both
#   cmdline-b.txt         -> p3 (boot B) as cmdline.txt
#   system.conf           -> /etc/rauc/system.conf (bootloader=custom, this backend)
#   rauc-tryboot-backend  -> /usr/lib/edgeos/image/rauc-tryboot-backend
#
# Layout: p1 autoboot (tiny FAT), p2 boot-a (FAT), p3 boot-b (FAT), p4 rootfs-a, p5 rootfs-b,
# p6 data (/var/lib/edgeos). A RAUC slot is a boot+root pair (boot-a is rootfs-a's parent).
#
#   gen-tryboot.sh OUTDIR [--compatible edgeos-rpi4-arm64] [--partuuid-prefix 1234abcd]
set -euo pipefail
out=${1:?usage: gen-tryboot.sh OUTDIR [--compatible C] [--partuuid-prefix P]}; shift
compatible=edgeos-rpi4-arm64
prefix=${EDGEOS_RPI_DISKID:-}
while [ $# -gt 0 ]; do
    case $1 in
        --compatible) compatible=$2; shift 2;;
        --partuuid-prefix) prefix=$2; shift 2;;
        *) echo "gen-tryboot: unknown argument $1" >&2; exit 2;;
    esac
done
[[ $prefix =~ ^[0-9a-f]{8}$ ]] || { echo "gen-tryboot: --partuuid-prefix must be the MBR disk id (8 hex digits)" >&2; exit 2; }
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)

# The firmware boots [all]'s partition; after `reboot "0 tryboot"` it boots [tryboot]'s once. A
# trial that never commits is left by the next plain reboot or power cycle: one attempt.
cat > "$out/autoboot.txt" <<TXT
[all]
tryboot_a_b=1
boot_partition=2
[tryboot]
boot_partition=3
TXT
for slot in a b; do
    case $slot in a) root=05 name=A;; b) root=06 name=B;; esac
    echo "console=serial0,115200 console=tty1 root=PARTUUID=$prefix-$root rootfstype=ext4 rootwait rw rauc.slot=$name" \
        > "$out/cmdline-$slot.txt"
done
cat > "$out/system.conf" <<CONF
[system]
compatible=$compatible
bootloader=custom
statusfile=/var/lib/edgeos/rauc/central.raucs
bundle-formats=-plain

[handlers]
bootloader-custom-backend=/usr/lib/edgeos/image/rauc-tryboot-backend
pre-install=/usr/lib/edgeos/image/rauc-pre-install
post-install=/usr/lib/edgeos/image/rauc-post-install

[keyring]
path=/etc/rauc/keyring.pem

[slot.boot.0]
device=/dev/disk/by-partuuid/$prefix-02
type=vfat
bootname=A
[slot.rootfs.0]
device=/dev/disk/by-partuuid/$prefix-05
type=ext4
parent=boot.0

[slot.boot.1]
device=/dev/disk/by-partuuid/$prefix-03
type=vfat
bootname=B
[slot.rootfs.1]
device=/dev/disk/by-partuuid/$prefix-06
type=ext4
parent=boot.1
CONF
install -m 0755 "$here/rauc-tryboot-backend" "$out/rauc-tryboot-backend"
echo "$out"
