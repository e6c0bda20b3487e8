#!/usr/bin/env python3
"""Write corral's table of settings (corral.config.SETTINGS) into README.md, between its
``<!-- settings:begin -->`` and ``<!-- settings:end -->`` lines.

Run it after changing a setting: .venv/bin/python scripts/readme_settings.py
"""

from __future__ import annotations

import sys
from pathlib import Path

from corral.config import settings_markdown

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN = "<!-- settings:begin -->\n"
END = "<!-- settings:end -->\n"


def main() -> int:
    text = README.read_text()
    head, begin, rest = text.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not (begin and end):
        print(f"error: {README} lacks the lines {BEGIN.strip()} and {END.strip()}", file=sys.stderr)
        return 1
    README.write_text(f"{head}{BEGIN}{settings_markdown()}{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
