"""The exceptions corral raises.

Everything the library raises on purpose derives from :class:`CorralError`; the CLI
turns one into ``error: <message>`` (plus a hint) and the exit code it carries.

    CorralError
    ├── UsageError                 bad input from the user (exit 2)
    │   ├── InvalidValue           a field fails validation (MAC, IP, name, ...)
    │   ├── NodeRangeError         a noderange that cannot be expanded
    │   ├── NotFound               an unknown node, profile, distro or group
    │   ├── AlreadyExists          a name, MAC or IP that is taken
    │   ├── InvalidClusterFile     malformed YAML or an unknown field in a cluster file
    │   └── LimitReached           a request over a configured limit (HTTP 429)
    ├── RenderError                a template that fails to render (exit 2)
    │   └── InvalidBootFile        a rendered file that fails validation (exit 2)
    ├── ConfigError                a bad configuration file (exit 2)
    └── CommandFailed              an external command exited non-zero (exit 1)
"""

from __future__ import annotations


class CorralError(Exception):
    """Base of every error corral raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        # What pickle passes back to __init__: errors cross process boundaries (sync workers).
        self.args = (message, hint)

    def __str__(self) -> str:
        return self.message


class UsageError(CorralError):
    exit_code = 2


class InvalidValue(UsageError):
    pass


class NodeRangeError(UsageError):
    pass


class NotFound(UsageError):
    def __init__(self, kind: str, name: str, hint: str | None = None) -> None:
        super().__init__(
            f"unknown {kind} '{name}'", hint or f"see 'corral {kind} list' for the known ones"
        )
        self.kind = kind
        self.name = name
        self.args = (kind, name, hint)


class AlreadyExists(UsageError):
    pass


class InvalidClusterFile(UsageError):
    pass


class LimitReached(UsageError):
    pass


class ConfigError(CorralError):
    exit_code = 2


class RenderError(CorralError):
    exit_code = 2


class InvalidBootFile(RenderError):
    def __init__(self, node: str, path: str, line: int, message: str) -> None:
        where = f"{path}:{line}" if line else path
        super().__init__(
            f"node {node}: {where}: {message}",
            "fix the template or the profile that produced it; nothing was written for this node",
        )
        self.node = node
        self.path = path
        self.line = line
        self.args = (node, path, line, message)


class CommandFailed(CorralError):
    def __init__(self, argv: list[str], returncode: int, stderr: str) -> None:
        tail = " | ".join(stderr.strip().splitlines()[-3:])
        super().__init__(f"command failed with exit code {returncode}: {' '.join(argv)}: {tail}")
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr
        self.args = (argv, returncode, stderr)
