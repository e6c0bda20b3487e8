"""What a receiver raises: :class:`ReceiveError` and its :class:`Cancelled`."""

from __future__ import annotations

from corral.agent.errors import InstallError


class ReceiveError(InstallError):
    """The image could not be received; the message is the one-line reason."""


class Cancelled(ReceiveError):
    """The deployment was cancelled while the image was arriving."""

    def __init__(self) -> None:
        super().__init__("cancelled")
