#!/usr/bin/env bash
# Installs what corral needs on a Debian 12 machine: the Debian packages of the real
# parts it drives, and a virtual environment with its pinned Python dependencies.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(
    grub-common        # grub-script-check validates generated GRUB files
    python3-venv
    iproute2           # network namespaces for the integration tests
    postgresql         # the PostgreSQL test runs a throwaway server
    dnsmasq-base       # DHCP (corral serve --dhcp)
    ipxe               # undionly.kpxe, ipxe.efi
    pxelinux           # pxelinux.0
    syslinux-common    # ldlinux.c32
    grub-efi-amd64-bin # grubnetx64.efi
    tftp-hpa atftp curl          # real TFTP clients for the tests
    busybox-static cpio          # the test VMs' initramfs, udhcpc
    qemu-system-x86 ipxe-qemu ovmf   # the VMs that PXE-boot in the tests
    debootstrap debian-archive-keyring squashfs-tools zstd rsync acl   # images, ramdisk
    openssh-client openssh-server   # image capture over SSH; node host keys (ssh-keygen)
    fdisk gdisk e2fsprogs xfsprogs dosfstools   # the agent partitions and formats disks
    grub-pc-bin grub2-common        # the agent installs GRUB on a node's disk
    udpcast                         # multicast image transfer (udp-sender, udp-receiver)
    prometheus                      # a real Prometheus scrapes /metrics in a test (not its unit)
    chromium chromium-driver        # the dashboard's test runs a real headless browser
    ipmitool                        # the ipmi power driver talks to BMCs through it
    openipmi                        # ipmi_sim: the BMC emulator the power tests drive
)

missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "error: missing Debian packages: ${missing[*]}; run 'sudo apt-get install ${missing[*]}' or run make as root" >&2
        exit 2
    fi
    echo "+ apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    echo "+ $PYTHON -m venv .venv"
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.corral-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp || requirements.lock -nt $stamp ]]; then
    echo "+ pip install -e .[dev,postgres,bench] (pinned by requirements.lock)"
    .venv/bin/python -m pip install -q --disable-pip-version-check -c requirements.lock -e '.[dev,postgres,bench]'
    touch "$stamp"
fi
