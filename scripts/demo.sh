#!/usr/bin/env bash
# The main job on a built-in default: the sample 100-node cluster of examples/,
# applied to a fresh inventory and rendered into a boot tree.
set -euo pipefail
cd "$(dirname "$0")/.."
demo=${1:-/tmp/corral-demo}
export CORRAL_HOME=$demo/home
corral=.venv/bin/corral

rm -rf "$demo"
mkdir -p "$demo"
echo "== corral apply -f examples/cluster.yaml   (inventory in $CORRAL_HOME)"
$corral apply -f examples/cluster.yaml
echo "== corral apply again: nothing changes"
$corral apply -f examples/cluster.yaml
echo "== corral sync --root $demo/tftpboot"
$corral sync --root "$demo/tftpboot"
echo "== change one node, sync again: only its files are written"
$corral node set n042 --var rack=r7 --gateway 10.0.0.254
$corral sync --root "$demo/tftpboot"
echo "== corral profile show gpu --node g01"
$corral profile show gpu --node g01
echo "== corral render n001 --kind ipxe"
$corral render n001 --kind ipxe
echo "== the tree"
(cd "$demo/tftpboot" && for d in */; do printf '%-14s %5d files\n' "$d" "$(find "$d" -type f | wc -l)"; done)
echo "demo done: files in $demo/tftpboot, inventory in $CORRAL_HOME"
