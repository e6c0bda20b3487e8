#!/usr/bin/env bash
# The main job on a built-in default: a virtual cluster of 20 nodes on this machine
# (network namespaces, shaped links, loop-device disks, corral serve in its own namespace),
# a bootable Debian 12 image built from scratch (once; later runs reuse it), deployed to
# every node with live progress. Before that, a taste of the inventory: the sample
# 100-node cluster applied and rendered into a boot tree. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
demo=${1:-/tmp/corral-demo}
nodes=${DEMO_NODES:-20}
export CORRAL_HOME=$demo/home
corral=.venv/bin/corral

if [[ $(id -u) -ne 0 ]]; then
    echo "error: the demo builds namespaces and loop devices; run it as root" >&2
    exit 2
fi
# the demo empties its directory: never the one that holds this clone
if [[ "$(pwd -P)/" == "$(realpath -m "$demo")/"* ]]; then
    echo "error: $demo holds this clone, and the demo empties it first; give it another" \
        "directory (make demo DEMO_DIR=/tmp/somewhere-else)" >&2
    exit 2
fi
trap '$corral testbed down --forget >/dev/null 2>&1 || true' EXIT
$corral testbed down --forget >/dev/null 2>&1 || true
# Start afresh, but keep the image store and package cache: the image is built once.
mkdir -p "$CORRAL_HOME"
find "$demo" -mindepth 1 -maxdepth 1 ! -name home -exec rm -rf {} +
find "$CORRAL_HOME" -mindepth 1 -maxdepth 1 ! -name images ! -name cache -exec rm -rf {} +

echo "== 1. the inventory: corral apply -f examples/cluster.yaml, twice (the second changes nothing)"
$corral apply -f examples/cluster.yaml
$corral apply -f examples/cluster.yaml
echo "== corral sync --root $demo/tftpboot, then one node changes and only its files are rewritten"
$corral sync --root "$demo/tftpboot"
$corral node set n042 --var row=7 --gateway 10.0.0.254
$corral sync --root "$demo/tftpboot"
$corral node rm 'n[001-100],g[01-08]' >/dev/null 2>&1 || true

echo "== 2. an image: Debian 12 built from scratch in a chroot (reused when it exists)"
if ! $corral image show demo >/dev/null 2>&1; then
    $corral image build demo --distro debian-12
fi
$corral image list

echo "== 3. a virtual cluster of $nodes nodes: corral testbed up"
$corral testbed up --nodes "$nodes" --link 200mbit --server-link 1gbit --disk-size 2G
# The testbed's nodes mount their disks with this machine's kernel: one without vfat
# cannot mount an EFI system partition, so there they take an MBR table (GRUB for BIOS).
esp=()
if ! grep -qw vfat /proc/filesystems && ! compgen -G "/lib/modules/$(uname -r)/kernel/fs/fat/vfat.ko*" >/dev/null; then
    echo "(this kernel cannot mount vfat: the nodes' disks get an MBR table, no EFI partition)"
    esp=(--var disk_label=dos)
fi
$corral profile add demo --image demo "${esp[@]}"
$corral group set testbed --profile demo

echo "== 4. corral deploy 'tb[001-$(printf %03d "$nodes")]' --image demo --wait"
status=0
$corral deploy "tb[001-$(printf %03d "$nodes")]" --image demo --transport http --wait || status=$?
$corral deployment show 1 | head -12

echo "== 5. what tb001's disk holds now"
loop=$($corral testbed status | awk '$1 == "tb001" {print $4}')
mnt=$demo/tb001
mkdir -p "$mnt"
root=$(for p in "$loop"p*; do [[ $(blkid -o value -s LABEL "$p") == root ]] && echo "$p"; done | head -1)
if [[ -n $root ]]; then
    mount -o ro "$root" "$mnt"
    echo "hostname: $(cat "$mnt/etc/hostname"); $(grep PRETTY_NAME "$mnt/etc/os-release")"
    echo "fstab: $(grep -v '^#' "$mnt/etc/fstab" | head -1)"
    echo "boot: $(ls "$mnt/boot" | tr '\n' ' ')"
    echo "GRUB in the disk's first sectors: $(dd if="$loop" bs=512 count=1 2>/dev/null | grep -ac GRUB) match"
    umount "$mnt"
fi
echo "demo done (status $status): logs in $CORRAL_HOME/testbed, image in $CORRAL_HOME/images"
exit $status
