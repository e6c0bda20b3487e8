"""RHEL-like and Fedora trees: ``dnf --installroot`` from the spec's mirror."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import ClassVar

from corral.images.build.engine import PlanBuilder, latest_file, layer_steps, package_steps
from corral.images.build.errors import BuildError
from corral.images.build.spec import BuildResult, BuildSpec, Step
from corral.images.build.tree import HostDns, empty_dir, strip_identity, write_file
from corral.images.layers import Layer, install_argv
from corral.images.templates import render_template

log = logging.getLogger("corral.images")


def _dnf_layer_argv(layer: Layer) -> list[str]:
    argv = install_argv("dnf", layer.packages)
    argv[1:1] = ["--repo=corral-*"]  # only the image's own repositories, not the host's
    return argv


class DnfBuilder(PlanBuilder):
    """RHEL-like and Fedora trees, made by ``dnf --installroot`` from the spec's mirror."""

    name = "dnf"
    families: ClassVar[tuple[str, ...]] = ("rhel", "fedora")
    tool = "dnf"
    program = "dnf"
    host_package = "dnf"

    REPO_FILE = "etc/yum.repos.d/corral.repo"

    def boot_packages(self, spec: BuildSpec) -> list[str]:
        if not spec.bootable:
            return ["@core"]
        return [
            "@core",
            "kernel",
            "grub2-pc",
            "grub2-efi-x64",
            "shim-x64",
            "efibootmgr",
            "dracut",
            "openssh-server",
        ]

    def binds(self, spec: BuildSpec) -> dict[str, Path]:
        cache = spec.cache_for(self.name)
        return {} if cache is None else {"/var/cache/dnf": cache}

    def build(self, spec: BuildSpec, staging: Path) -> BuildResult:
        if not spec.gpg_key:
            log.warning("%s: no gpg_key, packages are not signature-checked", spec.distro)
        return super().build(spec, staging)

    def repo_file(self, spec: BuildSpec) -> str:
        """The ``.repo`` file that points dnf at the spec's mirror."""
        if not spec.mirror:
            raise BuildError(
                f"{spec.family} images need a mirror ({spec.distro} has none)",
                "give the image a mirror: the URL of a tree with BaseOS/ and AppStream/ "
                "(RHEL-like) or releases/ and updates/ (Fedora)",
            )
        base = spec.mirror.rstrip("/")
        if spec.family == "fedora":
            repos = {
                "fedora": f"{base}/releases/$releasever/Everything/$basearch/os/",
                "updates": f"{base}/updates/$releasever/Everything/$basearch/",
            }
        else:
            repos = {
                "baseos": f"{base}/BaseOS/$basearch/os/",
                "appstream": f"{base}/AppStream/$basearch/os/",
            }
        return render_template(
            "image-dnf.repo.j2", distro=spec.distro, repos=repos, gpg_key=spec.gpg_key
        )

    def plan(self, spec: BuildSpec, root: Path) -> list[Step]:
        cache = spec.cache_for(self.name)
        repo_text = self.repo_file(spec)
        dnf = [
            "dnf",
            f"--installroot={root}",
            f"--releasever={spec.release}",
            f"--setopt=reposdir={root / 'etc/yum.repos.d'}",
            "--repo=corral-*",
            "--setopt=install_weak_deps=False",
        ]
        if cache is not None:
            dnf += [f"--setopt=cachedir={cache}", "--setopt=keepcache=True"]
        base = [*dnf, "-y", "install", *self.boot_packages(spec)]
        dns = HostDns(root)
        steps = [
            Step(
                "write the repository file",
                action=partial(write_file, root / self.REPO_FILE, repo_text),
            ),
            # Package scripts (dracut, grub2) run chrooted into the tree: it needs /proc...
            Step("install the base system", tuple(base), mounts="base", timeout=3600),
        ]
        # ...and so do those of the spec's packages, installed into the tree the same way.
        steps += package_steps(
            spec, lambda names: [*dnf, "-y", "install", *names], inside=False, mounts="base"
        )
        steps.append(Step("use the build host's DNS resolver", action=dns.use))
        steps += layer_steps(spec.layers, root, _dnf_layer_argv)
        steps += [
            Step("restore the image's resolv.conf", action=dns.restore),
            Step("remove the machine's identity and caches", action=partial(self._clean, root)),
        ]
        return steps

    @staticmethod
    def _clean(root: Path) -> None:
        empty_dir(root / "var/cache/dnf")
        strip_identity(root)

    def installed_packages(self, root: Path) -> dict[str, str]:
        proc = self.runner(
            ["rpm", f"--root={root}", "-qa", "--queryformat", r"%{NAME}\t%{VERSION}-%{RELEASE}\n"]
        )
        return dict(line.split("\t", 1) for line in proc.stdout.splitlines() if "\t" in line)

    def boot_files(self, root: Path) -> tuple[str, str]:
        kernel = latest_file(list((root / "boot").glob("vmlinuz-*")))
        initrd = latest_file(
            [p for p in (root / "boot").glob("initramfs-*.img") if "rescue" not in p.name]
        )
        if kernel is None or initrd is None:
            raise BuildError(f"the image in {root} has no kernel or no initramfs in /boot")
        if not (root / "usr/sbin/grub2-install").exists():
            raise BuildError(f"the image in {root} has no grub2-install")
        return kernel, initrd
