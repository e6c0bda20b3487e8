"""A kernel and a tiny busybox initramfs for PXE-boot tests.

:func:`build_test_boot_assets` takes the current Debian cloud kernel from the machine's
apt sources and builds an initramfs whose ``/init`` loads the virtio NIC driver, gets an
address with ``udhcpc``, reports to corral's server and powers the VM off.

What ``/init`` reads from the kernel command line:

``corral.server=URL``
    base URL of corral's server; without it nothing is posted.
``corral.node=NAME``
    the node's name, used in the event URL and in the console marker.
``corral.event_path=PATH``
    optional; the path (below ``corral.server``) to post the event to, instead of
    ``/api/v1/nodes/<node>/events``.
``corral.discover=1``
    post a hardware report to ``<server>/api/v1/discover`` instead of a boot event.
``corral.phase=PHASE``
    optional; the phase the boot event reports (default ``booted``), e.g.
    ``install-finished`` to play a node whose install succeeded.

A bearer token is read from ``/etc/corral/node-token`` when present; it usually arrives
as a second initrd (see :func:`build_overlay_initrd`). What ``/init`` prints on the
serial console:

- ``CORRAL-TEST-BOOTED node=<node> ip=<ip>`` after the boot event was posted (or not);
- ``CORRAL-TEST-DISCOVERED mac=<mac>`` after the discovery report;
- ``CORRAL-TEST-POST ok`` or ``CORRAL-TEST-POST failed <url>`` before either marker;
- ``CORRAL-TEST-FAILED <reason>`` when it gives up (no NIC, no DHCP lease).

The boot event body is ``{"phase": "<phase>", "message": "ip=<ip> mac=<mac>"}``; the
discovery body is ``{"mac": ..., "cpus": N, "memory_mb": N, "disks": [{"name": ...,
"size_bytes": N}], "nics": [{"name": ..., "mac": ...}]}``.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from corral.cpio import CpioWriter
from corral.errors import CorralError
from corral.kmod import COMPRESSED_SUFFIXES, builtin_modules, load_order, read_modules_dep
from corral.run import run

#: Bump when the layout of the initramfs changes in a way the inputs below do not show.
FORMAT_VERSION = "1"

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX = Path("/bin/busybox")

#: Modules loaded at boot (their dependencies come first, read from modules.dep).
MODULE_ROOTS: tuple[str, ...] = ("virtio_pci", "virtio_net", "virtio_blk")

#: Where ``/init`` looks for the node's bearer token.
TOKEN_PATH = "etc/corral/node-token"

INIT_SCRIPT = r"""#!/bin/busybox sh
# corral test initramfs: NIC up, report to corral's server, power off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /run /tmp

log() { echo "corral-init: $*"; }
stop() { sync; poweroff -f; while :; do sleep 60; done; }
fail() { echo "CORRAL-TEST-FAILED $*"; stop; }
json_str() { printf '"%s"' "$(printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g')"; }

while read -r mod; do
  [ -n "$mod" ] || continue
  insmod "/lib/modules/$mod.ko" || log "insmod $mod failed"
done < /lib/modules/load-order

server=
node=
event_path=
discover=
phase=
set -f
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    corral.server=*) server=${arg#corral.server=} ;;
    corral.node=*) node=${arg#corral.node=} ;;
    corral.event_path=*) event_path=${arg#corral.event_path=} ;;
    corral.discover=*) discover=${arg#corral.discover=} ;;
    corral.phase=*) phase=${arg#corral.phase=} ;;
  esac
done
set +f
server=${server%/}

iface=eth0
n=0
while [ ! -e "/sys/class/net/$iface" ]; do
  n=$((n + 1))
  [ "$n" -le 100 ] || fail "no network interface $iface"
  usleep 100000
done
ifconfig lo 127.0.0.1 up
ifconfig "$iface" up
udhcpc -i "$iface" -s /bin/dhcp.sh -q -n -t 10 -T 2 || fail "no DHCP lease on $iface"
ip=$(cat /run/corral-ip)
mac=$(cat "/sys/class/net/$iface/address")
log "$iface ip=$ip mac=$mac"

token=
if [ -r /etc/corral/node-token ]; then
  token=$(tr -d ' \t\r\n' < /etc/corral/node-token)
fi

post() {
  tries=0
  while :; do
    if [ -n "$token" ]; then
      timeout 20 wget -q -O /tmp/response --header "Content-Type: application/json" \
        --header "Authorization: Bearer $token" --post-data "$2" "$1" && return 0
    else
      timeout 20 wget -q -O /tmp/response --header "Content-Type: application/json" \
        --post-data "$2" "$1" && return 0
    fi
    tries=$((tries + 1))
    [ "$tries" -lt 5 ] || return 1
    sleep 1
  done
}

report() {
  if [ -z "$server" ]; then
    log "no corral.server= on the command line: nothing posted"
  elif post "$1" "$2"; then
    echo "CORRAL-TEST-POST ok"
  else
    echo "CORRAL-TEST-POST failed $1"
  fi
}

if [ "$discover" = 1 ]; then
  cpus=$(grep -c '^processor' /proc/cpuinfo)
  mem_kb=$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo)
  disks=
  sep=
  for dev in /sys/block/*; do
    [ -e "$dev/size" ] || continue
    name=${dev##*/}
    case "$name" in loop*|ram*|zram*|sr*|fd*) continue ;; esac
    sectors=$(cat "$dev/size")
    disks="$disks$sep{\"name\": $(json_str "$name"), \"size_bytes\": $((sectors * 512))}"
    sep=", "
  done
  nics=
  sep=
  for dev in /sys/class/net/*; do
    name=${dev##*/}
    [ "$name" = lo ] && continue
    nics="$nics$sep{\"name\": $(json_str "$name"), \"mac\": $(json_str "$(cat "$dev/address")")}"
    sep=", "
  done
  body=$(printf '{"mac": %s, "cpus": %d, "memory_mb": %d, "disks": [%s], "nics": [%s]}' \
    "$(json_str "$mac")" "$cpus" "$((mem_kb / 1024))" "$disks" "$nics")
  report "$server/api/v1/discover" "$body"
  echo "CORRAL-TEST-DISCOVERED mac=$mac"
else
  body=$(printf '{"phase": "%s", "message": %s}' "${phase:-booted}" "$(json_str "ip=$ip mac=$mac")")
  report "$server${event_path:-/api/v1/nodes/$node/events}" "$body"
  echo "CORRAL-TEST-BOOTED node=$node ip=$ip"
fi
stop
"""

DHCP_SCRIPT = r"""#!/bin/sh
# udhcpc event script: configure the interface and the default route.
case "$1" in
  deconfig)
    ifconfig "$interface" 0.0.0.0
    ;;
  bound|renew)
    ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}"
    if [ -n "$router" ]; then
      while route del default dev "$interface" 2>/dev/null; do :; done
      for gw in $router; do
        route add default gw "$gw" dev "$interface"
        break
      done
    fi
    echo "$ip" > /run/corral-ip
    ;;
esac
exit 0
"""


@dataclass(frozen=True)
class BootAssets:
    """A kernel and an initramfs, ready to be served."""

    kernel: Path
    initrd: Path
    kernel_version: str


class AssetError(CorralError):
    """The test kernel or initramfs could not be built."""


def build_overlay_initrd(dest: Path, files: Mapping[str, bytes]) -> Path:
    """Write a gzip'd cpio holding ``files`` (path inside the VM -> content), e.g. a token.

    Given as a second initrd, it is unpacked over the first one.
    """
    with dest.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        cpio = CpioWriter(gz)
        for name, data in sorted(files.items()):
            cpio.file(name, data, 0o600)
        cpio.finish()
    return dest


def build_token_initrd(dest: Path, token: str) -> Path:
    """An overlay initrd that gives ``/init`` its bearer token."""
    return build_overlay_initrd(dest, {TOKEN_PATH: token.encode() + b"\n"})


# --- the kernel package ----------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def current_kernel_package() -> str:
    """The kernel package ``linux-image-cloud-amd64`` depends on right now."""
    out = run(["apt-cache", "depends", KERNEL_METAPACKAGE], check=False)
    for line in out.stdout.splitlines():
        m = re.match(r"\s*\|?Depends:\s*(linux-image-\S+)", line)
        if m and not m.group(1).startswith("<"):
            return m.group(1)
    raise AssetError(
        f"cannot find the kernel package {KERNEL_METAPACKAGE} depends on",
        "run 'apt-get update' (apt-cache says: " + (out.stderr.strip() or "nothing") + ")",
    )


@dataclass(frozen=True)
class _Candidate:
    package: str
    version: str
    architecture: str
    sha256: str

    @property
    def filename(self) -> str:
        # apt-get download's name for the file; an epoch's ':' becomes '%3a'.
        return f"{self.package}_{self.version.replace(':', '%3a')}_{self.architecture}.deb"


def _candidate(package: str) -> _Candidate:
    out = run(["apt-cache", "show", "--no-all-versions", package])
    fields: dict[str, str] = {}
    for line in out.stdout.splitlines():
        key, sep, value = line.partition(":")
        if sep and not line.startswith(" ") and key not in fields:
            fields[key] = value.strip()
    try:
        return _Candidate(
            package, fields["Version"], fields["Architecture"], fields["SHA256"].lower()
        )
    except KeyError as exc:
        raise AssetError(f"apt-cache show {package}: no {exc.args[0]} field") from exc


def download_kernel_package(cache: Path) -> tuple[Path, str]:
    """The current cloud kernel's .deb in ``cache/debs`` (downloaded once) and its SHA-256."""
    cand = _candidate(current_kernel_package())
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    deb = debs / cand.filename
    if deb.exists() and _sha256_file(deb) == cand.sha256:
        return deb, cand.sha256
    deb.unlink(missing_ok=True)
    # apt-get download writes to the current directory; env -C gives it one.
    run(
        [
            "env",
            "-C",
            str(debs),
            "apt-get",
            "-q",
            "-o",
            "APT::Sandbox::User=root",
            "download",
            f"{cand.package}={cand.version}",
        ],
        timeout=600,
    )
    if not deb.exists():
        raise AssetError(f"apt-get download did not write {deb}")
    if _sha256_file(deb) != cand.sha256:
        deb.unlink()
        raise AssetError(f"{deb.name}: SHA-256 differs from the apt index")
    return deb, cand.sha256


# --- kernel modules --------------------------------------------------------------------


def decompress_module(path: Path) -> Path:
    """Replace ``x.ko.xz``/``x.ko.gz`` by ``x.ko`` (busybox insmod reads plain ELF only)."""
    name = path.name
    if name.endswith(".ko.xz"):
        data = lzma.decompress(path.read_bytes())
    elif name.endswith(".ko.gz"):
        data = gzip.decompress(path.read_bytes())
    elif name.endswith(".ko.zst"):
        raise AssetError(f"{path}: zstd-compressed modules are not supported")
    else:
        return path
    plain = path.with_name(name.rsplit(".", 1)[0])
    plain.write_bytes(data)
    path.unlink()
    return plain


def _prepare_modules(root: Path, version: str) -> dict[str, tuple[str, list[str]]]:
    moddir = root / "lib" / "modules" / version
    compressed = [p for s in COMPRESSED_SUFFIXES for p in moddir.rglob("*" + s)]
    for path in compressed:
        decompress_module(path)
    if compressed or not (moddir / "modules.dep").exists():
        # Debian's kernel packages ship no modules.dep (postinst makes it); busybox
        # has a depmod applet, so the host needs no kmod.
        depmod = shutil.which("depmod")
        argv = [depmod] if depmod else [str(BUSYBOX), "depmod"]
        run([*argv, "-b", str(root), version])
    return read_modules_dep(moddir)


# --- building --------------------------------------------------------------------------


def _build_initramfs(
    dest: Path, busybox: bytes, modules: Sequence[tuple[str, bytes]], extra: Mapping[str, bytes]
) -> None:
    with dest.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        cpio = CpioWriter(gz)
        for d in ("dev", "proc", "sys", "run", "tmp", "etc/corral", "lib/modules"):
            cpio.directory(d)
        cpio.char_device("dev/console", 5, 1)
        cpio.file("bin/busybox", busybox, 0o755)
        cpio.file("init", INIT_SCRIPT.encode(), 0o755)
        cpio.file("bin/dhcp.sh", DHCP_SCRIPT.encode(), 0o755)
        for name, data in modules:
            cpio.file(f"lib/modules/{name}.ko", data)
        cpio.file("lib/modules/load-order", "".join(f"{n}\n" for n, _ in modules).encode())
        for name, data in sorted(extra.items()):
            cpio.file(name, data)
        cpio.finish()


def _build_into(out: Path, deb: Path, busybox: bytes) -> None:
    with tempfile.TemporaryDirectory(prefix="kernel-", dir=out.parent) as tmp:
        root = Path(tmp)
        run(["dpkg", "-x", str(deb), str(root)], timeout=600)
        kernels = sorted((root / "boot").glob("vmlinuz-*"))
        if len(kernels) != 1:
            raise AssetError(f"{deb.name}: expected one boot/vmlinuz-*, found {len(kernels)}")
        version = kernels[0].name.removeprefix("vmlinuz-")
        table = _prepare_modules(root, version)
        moddir = root / "lib" / "modules" / version
        order = load_order(table, MODULE_ROOTS, builtin_modules(moddir))
        modules = [(name, (moddir / table[name][0]).read_bytes()) for name in order]
        shutil.copyfile(kernels[0], out / "vmlinuz")
        _build_initramfs(out / "initrd.gz", busybox, modules, {})
        (out / "kernel-version").write_text(version + "\n")


def _cache_key(deb_sha256: str, busybox: bytes) -> str:
    digest = hashlib.sha256()
    for part in (
        FORMAT_VERSION,
        deb_sha256,
        hashlib.sha256(busybox).hexdigest(),
        INIT_SCRIPT,
        DHCP_SCRIPT,
        ",".join(MODULE_ROOTS),
    ):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:20]


def build_test_boot_assets(dest: Path, cache: Path) -> BootAssets:
    """Put ``vmlinuz`` and ``initrd.gz`` for test VMs into ``dest``.

    The kernel package and the built files are kept in ``cache``, keyed by a hash of every
    input, so a second call only copies two files.
    """
    if not BUSYBOX.is_file():
        raise AssetError(f"{BUSYBOX} not found", "apt-get install busybox-static")
    cache.mkdir(parents=True, exist_ok=True)
    dest.mkdir(parents=True, exist_ok=True)
    busybox = BUSYBOX.read_bytes()
    deb, deb_sha256 = download_kernel_package(cache)
    built = cache / f"assets-{_cache_key(deb_sha256, busybox)}"
    if not (built / "kernel-version").exists():
        staging = Path(tempfile.mkdtemp(prefix="assets-", suffix=".tmp", dir=cache))
        try:
            _build_into(staging, deb, busybox)
            try:
                staging.rename(built)
            except OSError:
                # Another process built it meanwhile: keep theirs.
                if not (built / "kernel-version").exists():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    kernel = dest / "vmlinuz"
    initrd = dest / "initrd.gz"
    shutil.copyfile(built / "vmlinuz", kernel)
    shutil.copyfile(built / "initrd.gz", initrd)
    version = (built / "kernel-version").read_text().strip()
    return BootAssets(kernel=kernel, initrd=initrd, kernel_version=version)


def default_cache_dir() -> Path:
    """``$CORRAL_TESTBED_CACHE``, else ``~/.cache/corral-testbed``."""
    env = os.environ.get("CORRAL_TESTBED_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "corral-testbed"
