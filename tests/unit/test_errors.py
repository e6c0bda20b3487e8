from __future__ import annotations

import pickle

import pytest

from corral.errors import (
    AlreadyExists,
    CommandFailed,
    ConfigError,
    CorralError,
    InvalidBootFile,
    InvalidClusterFile,
    InvalidValue,
    LimitReached,
    NodeRangeError,
    NotFound,
    RenderError,
    UsageError,
)
from corral.images.build import UnknownFamily
from corral.images.store import ImageNotFound, InvalidImageName
from corral.serve.boot import Forbidden


@pytest.mark.parametrize(
    "error",
    [
        CorralError("boom", "try again"),
        UsageError("bad"),
        RenderError("node n1: template x: y", "fix it"),
        NotFound("node", "n1"),
        InvalidBootFile("n1", "kickstart/n1.ks", 7, "unknown command"),
        CommandFailed(["false"], 1, "no\n"),
    ],
)
def test_errors_survive_pickling(error: CorralError) -> None:
    """Sync workers send errors back to the parent process."""
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error)
    assert (back.message, back.hint, back.exit_code) == (error.message, error.hint, error.exit_code)


def test_invalid_boot_file_names_node_file_and_line() -> None:
    error = InvalidBootFile("n1", "kickstart/n1.ks", 7, "unknown command")
    assert str(error) == "node n1: kickstart/n1.ks:7: unknown command"


@pytest.mark.parametrize(
    ("error", "exit_code", "http_status"),
    [
        (CorralError("boom"), 1, 500),
        (CommandFailed(["false"], 1, ""), 1, 500),
        (ConfigError("bad file"), 2, 500),
        (UsageError("bad"), 2, 422),
        (InvalidValue("bad MAC"), 2, 422),
        (NodeRangeError("n[3-1]"), 2, 422),
        (InvalidClusterFile("bad YAML"), 2, 422),
        (RenderError("bad template"), 2, 422),
        (InvalidBootFile("n1", "kickstart/n1.ks", 7, "unknown command"), 2, 422),
        (NotFound("node", "n1"), 2, 404),
        (AlreadyExists("taken"), 2, 409),
        (LimitReached("too many"), 2, 429),
        (Forbidden("wrong token"), 1, 403),
        # two parents: the status of the one that says more
        (ImageNotFound("img", ["other"]), 2, 404),
        (InvalidImageName("bad name"), 2, 422),
        # a CLI exit code of its own does not make it the client's fault
        (UnknownFamily("hurd"), 2, 500),
    ],
)
def test_errors_carry_their_exit_code_and_http_status(
    error: CorralError, exit_code: int, http_status: int
) -> None:
    assert (error.exit_code, error.http_status) == (exit_code, http_status)
