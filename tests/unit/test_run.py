from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from corral.run import pid_alive, spawn, stop, stop_pids

IGNORES_SIGTERM = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)

UNWINDS_ON_SIGTERM = (
    "import time\n"
    "from corral.run import unwind_on_sigterm\n"
    "unwind_on_sigterm()\n"
    "try:\n"
    "    print('ready', flush=True)\n"
    "    time.sleep(60)\n"
    "finally:\n"
    "    print('cleaned up', flush=True)\n"
)


def test_stop_ends_a_process_that_obeys_sigterm() -> None:
    proc = spawn(["sleep", "60"], stderr=subprocess.DEVNULL)
    assert stop(proc, grace=5) == -signal.SIGTERM
    assert proc.poll() == -signal.SIGTERM


def test_stop_kills_a_process_that_ignores_sigterm_after_the_grace_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    proc = spawn([sys.executable, "-c", IGNORES_SIGTERM], stdout=subprocess.PIPE, stderr=None)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"  # SIGTERM is ignored from here on
    started = time.monotonic()
    assert stop(proc, grace=0.5) == -signal.SIGKILL
    assert 0.5 <= time.monotonic() - started < 10
    program = os.path.basename(sys.executable)
    assert f"{program} (pid {proc.pid}) ignored SIGTERM for 0.5 s: killing it" in caplog.text
    proc.stdout.close()


def test_stop_leaves_an_ended_process_alone() -> None:
    proc = spawn(["true"], stderr=subprocess.DEVNULL)
    proc.wait()
    assert stop(proc) == 0


def test_pid_alive_is_false_for_a_zombie_and_for_a_reaped_process() -> None:
    assert pid_alive(os.getpid())
    proc = spawn(["true"], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while pid_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not pid_alive(proc.pid)  # exited, not yet reaped
    proc.wait()
    assert not pid_alive(proc.pid)


def test_stop_names_the_program_it_was_told(caplog: pytest.LogCaptureFixture) -> None:
    proc = spawn([sys.executable, "-c", IGNORES_SIGTERM], stdout=subprocess.PIPE, stderr=None)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    stop(proc, grace=0.1, name="dnsmasq")
    assert f"dnsmasq (pid {proc.pid}) ignored SIGTERM for 0.1 s: killing it" in caplog.text
    proc.stdout.close()


def test_stop_pids_ends_processes_known_by_pid_whether_or_not_they_obey_sigterm() -> None:
    obeys = spawn(["sleep", "60"], stderr=subprocess.DEVNULL)
    ignores = spawn([sys.executable, "-c", IGNORES_SIGTERM], stdout=subprocess.PIPE, stderr=None)
    assert ignores.stdout is not None
    assert ignores.stdout.readline() == b"ready\n"
    try:
        assert stop_pids([obeys.pid, ignores.pid, obeys.pid], grace=0.5) == []
        assert obeys.wait(5) == -signal.SIGTERM  # its status is still its parent's
        assert ignores.wait(5) == -signal.SIGKILL
    finally:
        for proc in (obeys, ignores):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        ignores.stdout.close()


def test_sigterm_unwinds_through_finally_as_ctrl_c_does() -> None:
    # corral's CLI and the benches: kill unmounts a chroot, takes a testbed down
    proc = spawn([sys.executable, "-c", UNWINDS_ON_SIGTERM], stdout=subprocess.PIPE, stderr=None)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        stop(proc, grace=1)
    assert out == b"cleaned up\n"
    assert proc.returncode != 0
