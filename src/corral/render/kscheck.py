"""Checking generated kickstarts with pykickstart, fast.

A full sync renders thousands of files, so both checks are built for throughput.

Kickstarts are parsed by pykickstart. Building a version handler is slow (tens of
milliseconds), so each process keeps one :class:`KickstartValidator` per version and
reuses its handler, restoring every command a file touched to its pristine state
afterwards. Option parsers that pykickstart rebuilds for every section header and
``@group`` line depend only on static definitions, so they are built once, and the
shlex splitting of lines (mostly identical from one file to the next) is memoised.
Large batches are spread over a process pool.

GRUB scripts are checked by the real ``grub-script-check``. Rather than spawning it once
per file, files are concatenated, each followed by a guard, and checked in batches; only
a failing batch is looked at file by file.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import os
import shlex
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from types import SimpleNamespace
from typing import Any

import pykickstart.parser as _ks_parser
from pykickstart.constants import GROUP_ALL, GROUP_DEFAULT, GROUP_REQUIRED
from pykickstart.errors import (
    KickstartError,
    KickstartParseError,
    KickstartVersionError,
    KickstartWarning,
)
from pykickstart.options import KSOptionParser
from pykickstart.parser import Group, KickstartParser, Packages, PutBackIterator
from pykickstart.version import DEVEL, makeVersion, stringToVersion, versionToString

from corral.render.problem import Problem, one_line

__all__ = ["PARALLEL_THRESHOLD", "KickstartValidator", "check_kickstarts", "get_validator"]


_VERSION_EXAMPLES = "RHEL8, RHEL9, RHEL10, F40"

# Section option parsers, keyed by (section class, syntax version). They are built from
# static definitions, and argparse keeps no state between parse_args calls (the
# kickstart line number is set on every call), so sharing them is safe.
_SECTION_PARSERS: dict[tuple[type[Any], int], Any] = {}
_CACHED_SECTION_CLASSES: dict[type[Any], type[Any]] = {}


class _MemoParse:
    """A KSOptionParser's parse_known_args, memoised on the argument list.

    Installed on the parsers a validator owns. A result is stored only after a parse
    that neither failed nor warned (under check() a kickstart warning is an exception),
    and every call gets a new Namespace whose containers are copies, so callers can
    change what they get. The parser's ``lineno`` is still set on every call, for the
    errors a caller may raise through it.
    """

    LIMIT = 512  # entries per parser; the memo starts over when full

    def __init__(self, parser: Any) -> None:
        self.parser = parser
        self.memo: dict[tuple[str, ...], tuple[dict[str, Any], list[_Copy], list[str]]] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[argparse.Namespace, list[str]]:
        parser = self.parser
        if "lineno" in kwargs:
            parser.lineno = kwargs.pop("lineno")
        argv = args[0] if args else kwargs.get("args")
        namespace = args[1] if len(args) > 1 else kwargs.get("namespace")
        if argv is None or namespace is not None:
            result: tuple[argparse.Namespace, list[str]]
            result = argparse.ArgumentParser.parse_known_args(parser, *args, **kwargs)
            return result
        key = tuple(argv)
        entry = self.memo.get(key)
        if entry is None:
            ns, extra = argparse.ArgumentParser.parse_known_args(parser, list(argv))
            plain: dict[str, Any] = {}
            copied: list[_Copy] = []
            for name, value in vars(ns).items():
                if _is_immutable(value):
                    plain[name] = value
                else:
                    saved = copy.deepcopy(value)
                    copied.append((name, saved, _copier(saved)))
            if len(self.memo) >= self.LIMIT:
                self.memo.clear()
            entry = self.memo[key] = (plain, copied, list(extra))
        plain, copied, extra = entry
        ns = argparse.Namespace()
        state = vars(ns)
        state.update(plain)
        for name, value, copier in copied:
            state[name] = copier(value)
        return ns, list(extra)


def _memoise(parser: Any) -> Any:
    if not isinstance(parser.__dict__.get("parse_known_args"), _MemoParse):
        parser.parse_known_args = _MemoParse(parser)
    return parser


class _CachedParserMixin:
    """Builds a section's option parser once per (class, version) instead of per header."""

    version: int

    def _getParser(self) -> Any:
        key = (type(self), self.version)
        parser = _SECTION_PARSERS.get(key)
        if parser is None:
            parser = _memoise(super()._getParser())  # type: ignore[misc]
            _SECTION_PARSERS[key] = parser
        return parser


def _cached_section_class(cls: type[Any]) -> type[Any]:
    sub = _CACHED_SECTION_CLASSES.get(cls)
    if sub is None:
        sub = type(f"Cached{cls.__name__}", (_CachedParserMixin, cls), {})
        _CACHED_SECTION_CLASSES[cls] = sub
    return sub


@lru_cache(maxsize=8192)
def _split_cached(line: str, comments: bool) -> tuple[str, ...]:
    return tuple(shlex.split(line, comments=comments))


def _memo_split(line: str, comments: bool = False) -> list[str]:
    return list(_split_cached(line, comments))


# pykickstart.parser splits every line with shlex.split, which is about 40% of the parse
# time. Most lines (%end, %packages, clearpart ...) are the same in every generated file,
# so during a check the module sees this stand-in, whose split is shlex.split memoised
# (same result, a fresh list each call). parser.py uses nothing else from shlex.
_MEMO_SHLEX = SimpleNamespace(split=_memo_split)


@lru_cache(maxsize=1)
def _group_parser() -> Any:
    parser = KSOptionParser(prog="", description="", version=DEVEL)
    parser.add_argument("--nodefaults", action="store_true", default=False, help="", version=DEVEL)
    parser.add_argument("--optional", action="store_true", default=False, help="", version=DEVEL)
    return _memoise(parser)


class _Packages(Packages):  # type: ignore[misc]
    """pykickstart's %packages data, minus a new option parser for every ``@group`` line.

    Same behaviour as Packages._processGroup in pykickstart 3.78, with the (static)
    parser of a group line's options built once.
    """

    def _processGroup(self, line: str) -> None:
        options, rest = _group_parser().parse_known_args(args=line.split())
        if options.nodefaults and options.optional:
            raise KickstartParseError("Group cannot specify both --nodefaults and --optional")
        name = " ".join(rest)  # a group name may contain spaces
        if any(group.name == name for group in self.groupList):
            return
        if options.nodefaults:
            include = GROUP_REQUIRED
        elif options.optional:
            include = GROUP_ALL
        else:
            include = GROUP_DEFAULT
        self.groupList.append(Group(name=name, include=include))


class _LineTracker(PutBackIterator):  # type: ignore[misc]
    """pykickstart's line iterator, also counting the line being processed.

    Warnings and a few errors carry no line number; this supplies it.
    """

    def __init__(self, lines: list[str]) -> None:
        super().__init__(lines)
        self.lineno = 0

    def put(self, s: str) -> None:
        super().put(s)
        self.lineno -= 1

    def next(self) -> str:
        line: str = super().next()
        self.lineno += 1
        return line


class _Parser(KickstartParser):  # type: ignore[misc]
    """A KickstartParser with cached section parsers and line tracking.

    ``%include`` is not followed: the included file does not exist when the kickstart is
    generated (it is typically written by ``%pre`` on the installing machine).
    """

    def __init__(self, handler: Any) -> None:
        self.tracker = _LineTracker([])
        super().__init__(handler, followIncludes=False)

    def setupSections(self) -> None:
        super().setupSections()
        for section in self._sections.values():
            cls = type(section)
            if hasattr(cls, "_getParser"):
                section.__class__ = _cached_section_class(cls)

    def readKickstartFromString(self, s: str, reset: bool = True) -> None:
        if reset:
            self._reset()
        self.tracker = _LineTracker([*s.splitlines(True), ""])
        self._stateMachine(self.tracker)


def _resolve_version(version: str) -> int:
    fix = (
        f"unknown kickstart version {version!r}: use a pykickstart syntax version name "
        f"such as {_VERSION_EXAMPLES} (any key of pykickstart.version.versionMap)"
    )
    try:
        number = stringToVersion(version)
    except (KickstartVersionError, AttributeError, TypeError):
        raise ValueError(fix) from None
    return int(number)


_SHARED_ATTRS = ("op", "handler")
_Copy = tuple[str, Any, Callable[[Any], Any]]
_IMMUTABLE = (type(None), bool, int, float, str, bytes)


def _is_immutable(value: Any) -> bool:
    return isinstance(value, _IMMUTABLE) or (
        type(value) is tuple and all(_is_immutable(item) for item in value)
    )


def _copier(value: Any) -> Callable[[Any], Any]:
    """The cheapest way to copy ``value`` so that the copy shares nothing mutable."""
    if type(value) in (list, set) and all(_is_immutable(item) for item in value):
        return copy.copy
    if type(value) is dict and all(_is_immutable(v) for v in value.values()):
        return copy.copy  # keys are hashable, hence immutable in practice
    return copy.deepcopy


class _Pristine:
    """One command's attributes as first built, ready to be written back quickly."""

    def __init__(self, command: Any) -> None:
        self.plain: dict[str, Any] = {}  # immutable values, shared as they are
        self.copied: list[_Copy] = []  # containers, copied on every restore
        for key, value in vars(command).items():
            if key in _SHARED_ATTRS:
                continue
            if _is_immutable(value):
                self.plain[key] = value
            else:
                saved = copy.deepcopy(value)
                self.copied.append((key, saved, _copier(saved)))

    def restore(self, command: Any) -> None:
        state = command.__dict__
        shared = {key: state[key] for key in _SHARED_ATTRS if key in state}
        state.clear()
        state.update(shared)
        state.update(self.plain)
        for key, value, copier in self.copied:
            state[key] = copier(value)


class _HandlerReset:
    """Puts a pykickstart handler back to the state it had when it was made.

    A new handler costs ~20 ms because every command builds its argparse parser. Instead,
    each command's attributes are recorded once (except its parser and its handler link,
    which are kept as they are) and written back into the commands a file used: the
    dispatcher marks every command it calls as ``seen`` before parsing it, and nothing
    else writes to commands, so unseen ones are untouched. Attributes a parse added are
    dropped.
    """

    def __init__(self, handler: Any) -> None:
        self.handler = handler
        commands: dict[int, Any] = {}
        for command in handler.commands.values():
            if command is not None:
                commands.setdefault(id(command), command)
        self.commands = [(command, _Pristine(command)) for command in commands.values()]
        self.handler_keys = frozenset(vars(handler))

    def __call__(self) -> None:
        for command, pristine in self.commands:
            if command.seen:
                pristine.restore(command)
        handler = self.handler
        handler.scripts = []
        handler.certificates = []
        handler.packages = _Packages()
        handler.platform = ""
        handler._null_section_strings = []
        handler.currentLine = ""
        for key in set(vars(handler)) - self.handler_keys:
            delattr(handler, key)


class KickstartValidator:
    """Checks kickstart files against one pykickstart syntax version.

    One instance can check any number of files: its handler is reset after every file,
    so a file's result never depends on the files checked before it. Not thread-safe.
    """

    def __init__(self, version: str) -> None:
        self.version = version
        self._number = _resolve_version(version)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._handler = makeVersion(self._number)
        except KickstartError:
            raise ValueError(
                f"kickstart version {version!r} ({versionToString(self._number)}) has no "
                f"handler in this pykickstart; use one such as {_VERSION_EXAMPLES}"
            ) from None
        self._handler.packages = _Packages()
        self._reset = _HandlerReset(self._handler)
        for command, _ in self._reset.commands:
            if getattr(command, "op", None) is not None:
                _memoise(command.op)

    def check(self, text: str, label: str) -> Problem | None:
        """Parse ``text``; return its first error or warning, or None if it is clean."""
        parser = _Parser(self._handler)
        saved = _ks_parser.shlex
        _ks_parser.shlex = _MEMO_SHLEX
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # Generated files must be clean: a warning stops the parse like an error.
                warnings.simplefilter("error", KickstartWarning)
                parser.readKickstartFromString(text)
        except KickstartError as exc:
            line = exc.lineno if isinstance(exc.lineno, int) else self._line(parser, text)
            message = one_line(str(exc.message or "")) or "kickstart parse error"
            return Problem(label, line, message)
        except KickstartWarning as exc:
            return Problem(label, self._line(parser, text), f"warning: {one_line(str(exc))}")
        except ValueError as exc:  # shlex: unbalanced quotes, trailing escape
            return Problem(label, self._line(parser, text), one_line(str(exc)))
        except Exception as exc:  # a pykickstart crash still means the file is bad
            message = f"pykickstart failed: {type(exc).__name__}: {one_line(str(exc))}"
            return Problem(label, self._line(parser, text), message)
        finally:
            _ks_parser.shlex = shlex if saved is _MEMO_SHLEX else saved
            self._reset()
        return None

    @staticmethod
    def _line(parser: _Parser, text: str) -> int:
        return max(0, min(parser.tracker.lineno, len(text.splitlines())))


_VALIDATORS: dict[str, KickstartValidator] = {}


def get_validator(version: str) -> KickstartValidator:
    """This process's validator for ``version``, created on first use."""
    validator = _VALIDATORS.get(version)
    if validator is None:
        validator = _VALIDATORS[version] = KickstartValidator(version)
    return validator


# Below this many files, a pool costs more than it saves.
PARALLEL_THRESHOLD = 500

_Job = tuple[int, str, str, str]


def _check_chunk(chunk: list[_Job]) -> list[tuple[int, Problem]]:
    found: list[tuple[int, Problem]] = []
    for index, version, label, text in chunk:
        problem = get_validator(version).check(text, label)
        if problem is not None:
            found.append((index, problem))
    return found


def _pool_context() -> Any:
    # fork lets workers inherit the validators already built here. It is only safe
    # while this process runs a single thread; otherwise use the default method.
    if "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


def check_kickstarts(
    items: Sequence[tuple[str, str, str]], workers: int | None = None
) -> list[Problem]:
    """Check ``(version, label, text)`` kickstarts; return the problems, in input order.

    ``workers``: None picks in-process checking for up to PARALLEL_THRESHOLD items and a
    pool of os.cpu_count() processes above; 1 (or less) forces in-process; 2 or more
    forces a pool of that many processes. An unknown version raises ValueError.
    """
    if not items:
        return []
    for version in dict.fromkeys(version for version, _, _ in items):
        get_validator(version)  # fail fast on unknown versions; warms forked workers
    if workers is None:
        workers = (os.cpu_count() or 1) if len(items) > PARALLEL_THRESHOLD else 1
    jobs = [(i, version, label, text) for i, (version, label, text) in enumerate(items)]
    if workers <= 1:
        return [problem for _, problem in _check_chunk(jobs)]
    size = -(-len(jobs) // (workers * 4))  # a few chunks per worker evens out the load
    chunks = [jobs[i : i + size] for i in range(0, len(jobs), size)]
    with ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context()) as pool:
        results = list(pool.map(_check_chunk, chunks))
    return [problem for found in results for _, problem in found]
