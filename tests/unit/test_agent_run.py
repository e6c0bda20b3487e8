from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time

import pytest

from corral.agent.run import SubprocessRunner, spawn, stop

IGNORES_SIGTERM = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)


def test_stop_kills_a_process_that_ignores_sigterm_after_the_grace_time() -> None:
    proc = spawn([sys.executable, "-c", IGNORES_SIGTERM], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    started = time.monotonic()
    stop(proc, grace=0.5)
    assert 0.5 <= time.monotonic() - started < 10
    assert proc.returncode == -signal.SIGKILL
    proc.stdout.close()


def test_stop_ends_a_process_that_obeys_sigterm() -> None:
    proc = spawn(["sleep", "60"])
    stop(proc)
    assert proc.returncode == -signal.SIGTERM


def test_spawn_closes_stdin() -> None:
    proc = spawn(["cat"], stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=10)
    assert (out, proc.returncode) == (b"", 0)


def test_the_runner_says_127_for_a_missing_program_and_124_after_its_timeout() -> None:
    run = SubprocessRunner(poll=0.05)
    assert run(["corral-no-such-program"]).returncode == 127
    late = run(["sleep", "60"], timeout=0.2)
    assert late.returncode == 124
    assert late.reason() == "sleep did not finish in time"


def test_the_input_reaches_the_program_when_the_runner_gets_no_cpu_for_its_poll(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The agent's first wait ends before anything is written, as when the host gives it no
    # CPU for the poll's 0.2 s: sfdisk then waited on its stdin for its whole 120 s. The
    # script must arrive all the same, whole, and end with its EOF.
    real = subprocess.Popen.communicate
    calls: list[float | None] = []

    def starved(
        self: subprocess.Popen[str], input: str | None = None, timeout: float | None = None
    ) -> tuple[str, str]:
        calls.append(timeout)
        return real(self, input, 0 if len(calls) == 1 else timeout)

    monkeypatch.setattr(subprocess.Popen, "communicate", starved)
    script = "label: gpt\n" + "".join(f"start={i}, name=p{i}\n" for i in range(20000))
    result = SubprocessRunner(poll=0.05)(["sha256sum"], input=script, timeout=5)
    assert len(calls) > 1  # the first wait did time out
    assert result.ok, result.reason()
    assert result.stdout.split()[0] == hashlib.sha256(script.encode()).hexdigest()


def test_no_input_is_an_empty_stdin_and_text_is_sent_as_utf8() -> None:
    run = SubprocessRunner(poll=0.05)
    assert run(["cat"]).stdout == ""
    assert run(["cat"], input="naïve ✓\n").stdout == "naïve ✓\n"
