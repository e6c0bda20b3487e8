"""The dashboard's server side: the phase durations of a node's detail, and the table of
states it follows nodes with, which must say what NodeStates.record does."""

from __future__ import annotations

from corral.agent import phases
from corral.inventory import models as m
from corral.inventory.state import next_state
from corral.serve.dashboard import STATES, lifecycle, phase_durations


def _event(phase: str, at: float) -> m.NodeEvent:
    return m.NodeEvent(node="n1", time=at, phase=phase, message="", source="test")


def test_phase_durations_run_from_event_to_event_of_the_latest_install() -> None:
    events = [
        _event(phases.BOOTED, 10),  # an earlier install: not counted
        _event("armed", 100),
        _event(phases.DHCP, 130),
        _event(phases.BOOTED, 140),
        _event(phases.RECEIVING, 145.5),
    ]
    spans = phase_durations(events, now=200)
    assert [(s["phase"], s["seconds"], s["open"]) for s in spans] == [
        ("armed", 30, False),
        ("dhcp", 10, False),
        ("booted", 5.5, False),
        ("receiving", 54.5, True),  # it is still receiving
    ]


def test_a_phase_that_ends_has_no_duration() -> None:
    spans = phase_durations([_event(phases.BOOTED, 1), _event(phases.FAILED, 5)], now=99)
    assert [(s["phase"], s["seconds"], s["open"]) for s in spans] == [
        ("booted", 4, False),
        ("failed", None, False),
    ]
    assert phase_durations([], now=1) == []


def test_the_page_follows_states_as_nodestates_does() -> None:
    table = lifecycle()
    assert table["states"] == list(STATES)
    for state in STATES:
        for phase in phases.LIFE_CYCLE:
            assert table["next"][state][phase] == next_state(state, phase)
    assert table["next"]["armed"]["booted"] == "installing"
    assert table["next"]["installed"]["dhcp"] is None  # a lease renewal: history only
    assert table["next"]["booting"]["running"] == "running"
