"""What both builders share: the steps every plan has (the spec's packages, the layers),
and running a plan, with all of a build around it."""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import ClassVar

from corral.errors import CommandFailed
from corral.images.build.errors import BuildError, DiskFull
from corral.images.build.explain import explain
from corral.images.build.spec import ROOT_PLACEHOLDER, BuildResult, BuildSpec, Mounts, Step
from corral.images.build.tree import cache_lock, discard, image_size
from corral.images.chroot import MOUNTINFO, Runner, chroot_run, mounted
from corral.images.layers import Layer, PackageTool, copy_overlay, validate_layers
from corral.run import run

log = logging.getLogger("corral.images")


class PlanBuilder:
    """What both builders share: running a plan, and all of a build around it."""

    name: ClassVar[str]
    families: ClassVar[tuple[str, ...]]
    tool: ClassVar[PackageTool]
    program: ClassVar[str]
    host_package: ClassVar[str]

    def __init__(self, runner: Runner = run, mountinfo: Path = MOUNTINFO) -> None:
        self.runner = runner
        self.mountinfo = mountinfo

    # Subclasses define these.
    def plan(self, spec: BuildSpec, root: Path) -> list[Step]:
        raise NotImplementedError

    def binds(self, spec: BuildSpec) -> dict[str, Path]:
        raise NotImplementedError

    def boot_packages(self, spec: BuildSpec) -> list[str]:
        raise NotImplementedError

    def installed_packages(self, root: Path) -> dict[str, str]:
        raise NotImplementedError

    def boot_files(self, root: Path) -> tuple[str, str]:
        raise NotImplementedError

    # Shared.
    def check(self, spec: BuildSpec) -> None:
        """Everything that can be found wrong before the first command runs."""
        if spec.family not in self.families:
            raise BuildError(
                f"the {self.name} builder cannot build {spec.family} images",
                f"it builds: {', '.join(self.families)}; see builder_for()",
            )
        if spec.arch not in ("amd64", "x86_64"):
            raise BuildError(f"unsupported architecture '{spec.arch}'", "supported: amd64 (x86_64)")
        validate_layers(spec.layers)

    def commands(self, spec: BuildSpec, root: Path = ROOT_PLACEHOLDER) -> list[list[str]]:
        self.check(spec)
        return [step.command(root) for step in self.plan(spec, root) if step.argv]

    def build(self, spec: BuildSpec, staging: Path) -> BuildResult:
        started = time.monotonic()
        self.check(spec)
        if shutil.which(self.program) is None:
            raise BuildError(
                f"{self.program} is not installed on this machine",
                f"install it: apt-get install {self.host_package}",
            )
        if os.uname().machine != "x86_64":
            raise BuildError(f"cannot build {spec.arch} images on {os.uname().machine}")
        staging = Path(staging)
        staging.mkdir(parents=True, exist_ok=True)
        root = staging.resolve()
        if any(root.iterdir()):
            raise BuildError(
                f"staging directory {root} is not empty", "builds start from an empty directory"
            )
        root.chmod(0o755)  # it becomes the image's /
        plan = self.plan(spec, root)
        try:
            with cache_lock(spec.cache_for(self.name)):
                self._execute(plan, spec, root)
            kernel, initrd = self.boot_files(root) if spec.bootable else (None, None)
            packages = self.installed_packages(root)
        except BaseException:
            discard(root, runner=self.runner, mountinfo=self.mountinfo)
            raise
        result = BuildResult(
            root=root,
            spec=spec,
            kernel=kernel,
            initrd=initrd,
            packages=packages,
            size_bytes=image_size(root),
            seconds=time.monotonic() - started,
            commands=[step.command(root) for step in plan if step.argv],
        )
        mib = result.size_bytes / 2**20
        log.info(
            "built %s: %d packages, %.0f MiB, %.0f s", root, len(packages), mib, result.seconds
        )
        return result

    def _execute(self, plan: Sequence[Step], spec: BuildSpec, root: Path) -> None:
        binds = self.binds(spec)
        for path in binds.values():
            path.mkdir(parents=True, exist_ok=True)
            if self.tool == "apt":
                (path / "partial").mkdir(exist_ok=True)
        with ExitStack() as stack:
            state: Mounts = "none"
            for step in plan:
                if step.mounts != state:
                    stack.close()
                    if step.mounts != "none":
                        stack.enter_context(
                            mounted(
                                root,
                                binds=binds if step.mounts == "cache" else None,
                                runner=self.runner,
                                mountinfo=self.mountinfo,
                            )
                        )
                    state = step.mounts
                log.info("%s: %s", spec.distro, step.what)
                self._step(step, spec, root, binds)

    def _step(self, step: Step, spec: BuildSpec, root: Path, binds: dict[str, Path]) -> None:
        try:
            if step.action is not None:
                step.action()
                return
            if step.inside:
                proc = chroot_run(
                    root,
                    step.argv,
                    env=step.env,
                    check=False,
                    timeout=step.timeout,
                    runner=self.runner,
                )
            else:
                env = {"LC_ALL": "C", **step.env}
                proc = self.runner(step.argv, check=False, env=env, timeout=step.timeout)
        except CommandFailed as exc:  # a timeout
            raise BuildError(f"{step.what}: {exc}") from exc
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DiskFull(root, step.what) from exc
            raise
        if proc.returncode != 0:
            output = f"{proc.stdout}\n{proc.stderr}"
            tool_log = root / "debootstrap/debootstrap.log"
            if tool_log.is_file():
                output += "\n" + "\n".join(tool_log.read_text(errors="replace").splitlines()[-40:])
            log.debug("%s failed:\n%s", step.what, output)
            raise explain(
                output,
                what=step.what,
                returncode=proc.returncode,
                spec=spec,
                root=root,
                binds=binds,
                bound=step.mounts == "cache",
                layer=step.layer,
                boot_packages=self.boot_packages(spec),
            )
        log.debug("%s:\n%s", step.what, proc.stdout[-2000:])


def _dedupe(names: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(names))


def latest_file(paths: Sequence[Path]) -> str | None:
    """The name of the newest of ``paths``, numbers compared as numbers (``vmlinuz-6.1.0-10``
    comes after ``vmlinuz-6.1.0-9``); None for none."""

    def key(path: Path) -> list[int | str]:
        return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.name)]

    return sorted(paths, key=key)[-1].name if paths else None


def layer_steps(
    layers: Sequence[Layer], root: Path, install: Callable[[Layer], list[str]]
) -> list[Step]:
    """Each layer's package install (``install`` gives its argv), then its overlay."""
    steps: list[Step] = []
    for layer in layers:
        if layer.packages:
            steps.append(
                Step(
                    f"install the packages of layer '{layer.name}'",
                    tuple(install(layer)),
                    inside=True,
                    mounts="cache",
                    layer=layer.name,
                    timeout=3600,
                )
            )
        if layer.overlay is not None:
            steps.append(
                Step(
                    f"copy the overlay of layer '{layer.name}'",
                    action=partial(copy_overlay, layer.overlay, root),
                    layer=layer.name,
                )
            )
    return steps


def package_steps(
    spec: BuildSpec, install: Callable[[list[str]], list[str]], *, inside: bool, mounts: Mounts
) -> list[Step]:
    """The install of the spec's own packages (``install`` gives its argv) after the base
    system, as a step of its own like a layer's; none when the spec has none."""
    if not spec.packages:
        return []
    argv = install(_dedupe(spec.packages))
    return [
        Step(
            "install the image's packages",
            tuple(argv),
            inside=inside,
            mounts=mounts,
            timeout=3600,
        )
    ]
