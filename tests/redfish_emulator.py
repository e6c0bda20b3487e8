"""sushy-tools' Redfish emulator, its fake driver serving the systems of a config file, as
the power tests and bench/power.py run it (stdlib and sushy-tools only: it runs as a
program of its own)::

    python tests/redfish_emulator.py --config FILE --port N [--journal FILE]
                                     [--answer-delay S] [--prompt]

- ``--journal``: every request is appended to FILE as a JSON line (method, path, body),
  so that a test sees what corral sent (the emulator keeps no record of a boot
  override's frequency, for one).
- ``--answer-delay``: every power request (a POST to a ComputerSystem.Reset action) is
  answered S seconds after it arrives, as a BMC that takes that long to acknowledge.
- ``--prompt``: the fake driver applies a power change at random 1 to 11 s after the
  request (hardware is not instant either); with --prompt, as soon as the system is read
  again, so that a test that waits for the new state is quick. The answer to the reset
  itself still comes before the change.
"""

from __future__ import annotations

import argparse
import io
import json
import threading
import time
import types
from collections.abc import Callable, Iterable
from typing import Any

from sushy_tools.emulator import main as emulator
from sushy_tools.emulator.resources.systems import fakedriver

Wsgi = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class Journal:
    """WSGI middleware: each request, as a JSON line in ``path``."""

    def __init__(self, app: Wsgi, path: str) -> None:
        self.app = app
        self.path = path
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        entry = {
            "method": environ["REQUEST_METHOD"],
            "path": environ.get("PATH_INFO", ""),
            "body": json.loads(body) if body.strip() else None,
        }
        with self.lock, open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        return self.app(environ, start_response)


class SlowResets:
    """WSGI middleware: a power request is answered ``delay`` seconds after it arrives."""

    def __init__(self, app: Wsgi, delay: float) -> None:
        self.app = app
        self.delay = delay

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ["REQUEST_METHOD"] == "POST" and environ.get("PATH_INFO", "").endswith(
            "/Actions/ComputerSystem.Reset"
        ):
            time.sleep(self.delay)
        return self.app(environ, start_response)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--journal")
    parser.add_argument("--answer-delay", type=float, default=0.0)
    parser.add_argument("--prompt", action="store_true")
    args = parser.parse_args()
    if args.prompt:
        fakedriver.random = types.SimpleNamespace(randint=lambda low, high: 0)  # type: ignore[assignment]
    app = emulator.app
    app.configure(config_file=args.config)
    app.config["SUSHY_EMULATOR_FAKE_DRIVER"] = True
    if args.answer_delay:
        app.wsgi_app = SlowResets(app.wsgi_app, args.answer_delay)  # type: ignore[method-assign]
    if args.journal:
        app.wsgi_app = Journal(app.wsgi_app, args.journal)  # type: ignore[method-assign]
    app.run(host="127.0.0.1", port=args.port, threaded=True)


if __name__ == "__main__":
    main()
