#!/usr/bin/env bash
# Runs a command with its temporary files in RAM: TMPDIR on a tmpfs that only the command
# sees (a mount namespace of its own, so the tmpfs goes when the command ends, even when it
# is killed). `make test` runs the tests of real parts this way beside the VM tests: their
# testbed's loop-device disks, databases and logs then never wait on the host's disk, where
# an fsync waits for everything the image builds and the VMs wrote before it (one after the
# other 588 s; beside the VM tests 928 s on disk). Needs root.
set -euo pipefail
if [[ $# -eq 0 ]]; then
    echo "usage: $0 COMMAND [ARG...]" >&2
    exit 2
fi
ram=$(mktemp -d /tmp/corral-ram.XXXXXX)
trap 'rmdir "$ram"' EXIT
unshare --mount --propagation private -- bash -c \
    'mount -t tmpfs -o size=8g,mode=1777 corral-ram "$0" && TMPDIR="$0" "$@"' "$ram" "$@"
