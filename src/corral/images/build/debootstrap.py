"""Debian and Ubuntu trees: debootstrap, then apt inside the tree."""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import ClassVar

from corral.images.build.engine import PlanBuilder, latest_file, layer_steps, package_steps
from corral.images.build.errors import BuildError
from corral.images.build.spec import BuildSpec, Step
from corral.images.build.tree import HostDns, empty_dir, strip_identity, write_file
from corral.images.layers import install_argv
from corral.images.templates import render_template

APT_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")

#: Releases whose systemd package still contains systemd-resolved (later ones split it out).
RESOLVED_IN_SYSTEMD = frozenset({"buster", "bullseye", "bionic", "focal", "jammy"})


def default_mirror(sources: Path = APT_SOURCES) -> str | None:
    """The Debian archive this machine's apt uses: the first ``deb`` source that is not
    a security archive (deb822 ``debian.sources``, else one-line ``sources.list``)."""
    if sources.is_file():
        for stanza in re.split(r"\n\s*\n", sources.read_text()):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                key, sep, value = line.partition(":")
                if sep and not line.startswith(("#", " ", "\t")):
                    fields[key.strip().lower()] = value.strip()
            suites = fields.get("suites", "").split()
            if (
                "deb" in fields.get("types", "").split()
                and fields.get("enabled", "yes").lower() != "no"
                and fields.get("uris")
                and not all(s.endswith("-security") for s in suites)
            ):
                return fields["uris"].split()[0].rstrip("/")
    one_line = sources.parent.parent / "sources.list"
    if one_line.is_file():
        for line in one_line.read_text().splitlines():
            words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb" and not words[2].endswith("-security"):
                return words[1].rstrip("/")
    return None


class DebootstrapBuilder(PlanBuilder):
    """Debian and Ubuntu trees, made by debootstrap and finished with apt in a chroot."""

    name = "debootstrap"
    families: ClassVar[tuple[str, ...]] = ("debian", "ubuntu")
    tool = "apt"
    program = "debootstrap"
    host_package = "debootstrap"

    def mirror(self, spec: BuildSpec) -> str:
        if spec.mirror:
            return spec.mirror.rstrip("/")
        if spec.family == "debian":
            found = default_mirror()
            if found:
                return found
            raise BuildError(
                f"no mirror for {spec.distro}, and none in {APT_SOURCES}",
                "give the image a mirror (a Debian archive URL)",
            )
        raise BuildError(
            f"{spec.family} images need a mirror ({spec.distro} has none)",
            "give the image a mirror, e.g. the URL of an Ubuntu archive",
        )

    def boot_packages(self, spec: BuildSpec) -> list[str]:
        if not spec.bootable:
            return []
        kernel = "linux-image-generic" if spec.family == "ubuntu" else "linux-image-amd64"
        packages = [
            kernel,
            "initramfs-tools",
            "zstd",  # initramfs-tools compresses with it (else falls back to slow gzip)
            "grub-pc-bin",  # the BIOS GRUB modules and grub-install; grub-pc's postinst
            "grub-efi-amd64-bin",  # would install to a disk, these do not
            "grub2-common",
            "systemd-sysv",
            "udev",
            "dbus",
            "iproute2",
            "openssh-server",
        ]
        if spec.release not in RESOLVED_IN_SYSTEMD:
            packages.append("systemd-resolved")
        return packages

    def binds(self, spec: BuildSpec) -> dict[str, Path]:
        cache = spec.cache_for(self.name)
        if cache is None:
            return {}
        return {
            "/var/cache/apt/archives": cache / "archives",
            "/var/lib/apt/lists": cache / "lists",
        }

    def plan(self, spec: BuildSpec, root: Path) -> list[Step]:
        cache = spec.cache_for(self.name)
        include = self.boot_packages(spec)  # the spec's packages: by apt, below
        debootstrap = [
            "debootstrap",
            "--variant=minbase",
            "--arch=amd64",
            f"--components={','.join(spec.components)}",
        ]
        if include:
            debootstrap.append(f"--include={','.join(include)}")
        if cache is not None:
            debootstrap.append(f"--cache-dir={cache / 'archives'}")
        debootstrap += [spec.release, str(root), self.mirror(spec)]
        units = ["systemd-networkd.service", "systemd-resolved.service", "corral-ssh-keys.service"]
        dns = HostDns(root)
        steps = [
            Step("let dpkg skip fsync while building", action=partial(self._unsafe_io, root)),
            # INITRD=No: the kernel's postinst makes no initramfs, update-initramfs below
            # makes it once (debootstrap would make it twice: for the kernel, then again
            # when initramfs-tools' trigger runs; about 30 s each).
            Step(
                "bootstrap the base system",
                tuple(debootstrap),
                timeout=3600,
                env={"INITRD": "No"},
            ),
        ]
        if spec.bootable:
            steps += [
                Step("configure the network and SSH", action=partial(self.write_config, root)),
                Step(
                    "enable networkd, resolved and SSH host keys",
                    ("systemctl", "enable", *units),
                    inside=True,
                    mounts="base",
                ),
                Step(
                    "make the initramfs",
                    ("update-initramfs", "-c", "-k", "all"),
                    inside=True,
                    mounts="base",
                    timeout=1800,
                ),
            ]
        apt = bool(spec.packages) or any(layer.packages for layer in spec.layers)
        if apt:
            steps += [
                Step("use the build host's DNS resolver", action=dns.use),
                Step(
                    "update the package lists",
                    ("apt-get", "update"),
                    inside=True,
                    mounts="cache",
                    timeout=1800,
                ),
            ]
        steps += package_steps(spec, partial(install_argv, "apt"), inside=True, mounts="cache")
        steps += layer_steps(spec.layers, root, lambda layer: install_argv("apt", layer.packages))
        if apt:
            steps.append(Step("restore the image's resolv.conf", action=dns.restore))
        steps += [
            Step("remove downloaded packages", ("apt-get", "clean"), inside=True),
            Step("remove the machine's identity and caches", action=partial(self._clean, root)),
        ]
        return steps

    UNSAFE_IO = "etc/dpkg/dpkg.cfg.d/corral-unsafe-io"

    @classmethod
    def _unsafe_io(cls, root: Path) -> None:
        # A build that crashes is thrown away, so dpkg need not sync every file it writes.
        write_file(root / cls.UNSAFE_IO, "force-unsafe-io\n")

    @staticmethod
    def write_config(root: Path) -> None:
        """Every wired interface asks DHCP (replaced per node when deployed), and a unit
        makes the SSH host keys at first boot if there are none."""
        write_file(
            root / "etc/systemd/network/80-corral-dhcp.network",
            render_template("image-dhcp.network.j2"),
        )
        write_file(
            root / "etc/systemd/system/corral-ssh-keys.service",
            render_template("image-ssh-keys.service.j2"),
        )

    @classmethod
    def _clean(cls, root: Path) -> None:
        (root / cls.UNSAFE_IO).unlink(missing_ok=True)
        empty_dir(root / "var/lib/apt/lists")
        for binary in (root / "var/cache/apt").glob("*.bin"):
            binary.unlink()
        strip_identity(root)

    def installed_packages(self, root: Path) -> dict[str, str]:
        packages: dict[str, str] = {}
        status = root / "var/lib/dpkg/status"
        for stanza in status.read_text().split("\n\n"):
            fields = {}
            for line in stanza.splitlines():
                key, sep, value = line.partition(":")
                if sep and line[:1] not in (" ", "\t"):
                    fields[key] = value.strip()
            if fields.get("Status", "").endswith(" installed") and "Package" in fields:
                packages[fields["Package"]] = fields.get("Version", "")
        return packages

    def boot_files(self, root: Path) -> tuple[str, str]:
        kernel = latest_file(list((root / "boot").glob("vmlinuz-*")))
        initrd = latest_file(list((root / "boot").glob("initrd.img-*")))
        if kernel is None or initrd is None:
            raise BuildError(f"the image in {root} has no kernel or no initramfs in /boot")
        if not (root / "usr/sbin/grub-install").exists():
            raise BuildError(f"the image in {root} has no grub-install")
        return kernel, initrd
