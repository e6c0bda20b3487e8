"""corral ramdisk build"""

from __future__ import annotations

from pathlib import Path

import typer

from corral.cli.common import out, settings

app = typer.Typer(
    help="The deploy ramdisk that image installs and discovery boot.", no_args_is_help=True
)

AddOpt = typer.Option(
    None, "--add-package", help="Debian package to add, with its dependencies (repeatable)"
)
MirrorOpt = typer.Option(None, help="Debian mirror URL instead of this machine's apt sources")
KernelOpt = typer.Option(
    "linux-image-amd64",
    help="kernel metapackage: linux-image-amd64 (physical servers and VMs: e1000e, igb, "
    "ixgbe, i40e, ice, mlx5, bnxt, tg3, ahci, nvme, megaraid_sas, mpt3sas...) or "
    "linux-image-cloud-amd64 (VMs and clouds only, smaller)",
)
DestOpt = typer.Option(None, help="where vmlinuz and initrd.img go [config: ramdisk_dir]")
CacheOpt = typer.Option(None, help="packages and built ramdisks [default: $CORRAL_HOME/cache]")


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


@app.command("build")
def build(
    add_package: list[str] | None = AddOpt,
    mirror: str | None = MirrorOpt,
    kernel: str = KernelOpt,
    dest: Path | None = DestOpt,
    cache: Path | None = CacheOpt,
) -> None:
    """Build the ramdisk from Debian packages: `corral ramdisk build --add-package lvm2`.

    An unchanged ramdisk comes from the cache in seconds.
    """
    from corral.images.ramdisk import build_ramdisk

    cfg = settings()
    result = build_ramdisk(
        dest or cfg.ramdisk,
        cache=cache or cfg.home / "cache" / "ramdisk",
        extra_packages=tuple(add_package or ()),
        mirror=mirror,
        kernel_metapackage=kernel,
    )
    out.print(f"kernel {result.kernel_version}: {result.kernel} ({_mb(result.kernel_size)})")
    out.print(
        f"initrd: {result.initrd} ({_mb(result.initrd_size)}, "
        f"{_mb(result.initrd_unpacked_size)} unpacked)"
    )
    how = "taken from the cache" if result.cached else "built"
    out.print(f"{how}: ramdisk {result.key}, {len(result.packages)} packages", markup=False)
