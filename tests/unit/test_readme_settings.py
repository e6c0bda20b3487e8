"""The README's list of settings is the one corral.config's table makes."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.config import SETTINGS, main, settings_markdown

README = Path(__file__).parents[2] / "README.md"
BEGIN = "<!-- settings:begin -->\n"
END = "<!-- settings:end -->\n"


def _readme_settings() -> str:
    text = README.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1, f"{README} lacks its markers"
    return text.partition(BEGIN)[2].partition(END)[0]


def test_the_readme_lists_the_settings_of_the_table() -> None:
    assert _readme_settings() == settings_markdown(), (
        "README.md's settings list differs from corral.config's table: "
        "run .venv/bin/python scripts/readme_settings.py and commit README.md"
    )


def test_the_list_has_a_row_for_every_setting() -> None:
    rows = settings_markdown().splitlines()[2:]
    assert [row.split("`")[1] for row in rows] == [s.name for s in SETTINGS]
    assert any(row.startswith("| `rsync_port` | `873` |") for row in rows)
    assert any(row.startswith("| `deploy_boot_timeout` | `900.0` |") for row in rows)


def test_python_m_corral_config_prints_the_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--markdown"]) == 0
    assert capsys.readouterr().out == settings_markdown()
    assert main([]) == 2
