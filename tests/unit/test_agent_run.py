from __future__ import annotations

import signal
import subprocess
import sys
import time

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
