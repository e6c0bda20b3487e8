from __future__ import annotations

import pickle

import pytest

from corral.errors import (
    CommandFailed,
    CorralError,
    InvalidBootFile,
    NotFound,
    RenderError,
    UsageError,
)


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
