"""The exceptions corral raises.

Everything the library raises on purpose derives from :class:`CorralError`; the CLI
turns one into ``error: <message>`` (plus a hint) and the exit code it carries, the
HTTP API into ``{"detail": <message>, "hint": <hint>}`` and the HTTP status it carries.

    CorralError                    exit 1, HTTP 500
    ├── UsageError                 bad input from the user (exit 2, HTTP 422)
    │   ├── InvalidValue           a field fails validation (MAC, IP, name, ...)
    │   ├── NodeRangeError         a noderange that cannot be expanded
    │   ├── NotFound               an unknown node, profile, distro or group (HTTP 404)
    │   ├── AlreadyExists          a name, MAC or IP that is taken (HTTP 409)
    │   ├── InvalidClusterFile     malformed YAML or an unknown field in a cluster file
    │   └── LimitReached           a request over a configured limit (HTTP 429)
    ├── RenderError                a template that fails to render (exit 2, HTTP 422)
    │   └── InvalidBootFile        a rendered file that fails validation
    ├── ConfigError                a bad configuration file (exit 2)
    └── CommandFailed              an external command exited non-zero

Other modules add their own subclasses next to the code that raises them (for example
``corral.serve.boot.Forbidden``, HTTP 403); each inherits both numbers unless it sets one.
"""

from __future__ import annotations


class CorralError(Exception):
    """Base of every error corral raises on purpose."""

    exit_code = 1
    http_status = 500  # what went wrong is on the server's side, unless a subclass says

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
    http_status = 422  # the request's content is wrong


class InvalidValue(UsageError):
    pass


class NodeRangeError(UsageError):
    pass


class NotFound(UsageError):
    http_status = 404

    def __init__(self, kind: str, name: str, hint: str | None = None) -> None:
        super().__init__(
            f"unknown {kind} '{name}'", hint or f"see 'corral {kind} list' for the known ones"
        )
        self.kind = kind
        self.name = name
        self.args = (kind, name, hint)


class AlreadyExists(UsageError):
    http_status = 409


class InvalidClusterFile(UsageError):
    pass


class LimitReached(UsageError):
    http_status = 429


class ConfigError(CorralError):
    exit_code = 2


class RenderError(CorralError):
    exit_code = 2
    http_status = 422  # a change that would break a node's boot files


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
