"""The exceptions the node agent raises on purpose.

The agent cannot import :mod:`corral.errors` (it is stdlib-only and copied alone into the
ramdisk), so it has its own tree. The classes shared by several modules are here, the
others live next to the code that raises them; an :class:`InstallError`'s message is the
one-line reason a node reports with ``failed``.

    AgentError
    ├── InstallError               the installation failed (raised by corral.agent.deploy)
    │   ├── DiskError              the disk cannot take the plan (corral.agent.disk)
    │   │   └── DiskTooSmall
    │   ├── CommandFailed          a program the installer ran exited non-zero (corral.agent.run)
    │   ├── ReceiveError           the image could not be received (the receivers)
    │   │   └── Cancelled          the deployment was cancelled meanwhile
    │   └── IdentityError          the node's identity cannot be written (identity)
    ├── ReportError                a report did not reach the server (corral.agent.report)
    │   └── Rejected               the server refused it (a 4xx)
    ├── NetworkError               no interface could be brought up (corral.agent.network)
    └── the chain's wire (corral.agent.wire.chain), caught where they are raised:
        ProtocolError              the other side broke the protocol
        Gone                       a chunk older than the relay's window
        Closed                     the relay is shutting down

One name is the server's too, for the same thing in a layer that cannot share its code:
``CommandFailed``, a command that exited non-zero (:class:`corral.errors.CommandFailed`).
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class InstallError(AgentError):
    """The installation failed; the message is the one-line reason."""


class DiskError(InstallError):
    """The disk cannot take the plan; the message is the one-line reason."""


class ReceiveError(InstallError):
    """The image could not be received; the message is the one-line reason."""


class Cancelled(ReceiveError):
    """The deployment was cancelled while the image was arriving."""

    def __init__(self) -> None:
        super().__init__("cancelled")
