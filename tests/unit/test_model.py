"""bench/model.py: the transports' model obeys the physics, refuses bad input, and checks
itself against the recorded runs."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import pytest

PATH = Path(__file__).resolve().parents[2] / "bench" / "model.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_model", PATH)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_model"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


model = _load()
GIB = 1 << 30
BASE = model.Cluster(nodes=100, size=4 * GIB, node_link=10e9, server_link=25e9)


def t(transport: str, cluster: model.Cluster = BASE, **changes: object) -> float:
    return float(model.predict(transport, replace(cluster, **changes)).t)


@pytest.mark.parametrize("transport", model.TRANSPORTS)
@pytest.mark.parametrize("nodes", [1, 10, 100, 1000, 10_000])
def test_no_transport_beats_one_copy_over_one_link(transport: str, nodes: int) -> None:
    cluster = replace(BASE, nodes=nodes, rack_size=40 if nodes >= 40 else 0, oversubscription=4)
    assert model.predict(transport, cluster).t >= cluster.one_copy


def test_unicast_grows_linearly_past_the_server_bound() -> None:
    for transport in ("http", "rsync"):
        t1000, t2000, t4000 = (t(transport, nodes=n) for n in (1000, 2000, 4000))
        assert t2000 / t1000 == pytest.approx(2, rel=0.05)
        assert t4000 / t2000 == pytest.approx(2, rel=0.05)
        assert t1000 >= 1000 * BASE.size * 8 / BASE.server_link


def test_chain_and_multicast_stay_near_flat_in_n() -> None:
    for transport in ("chain", "multicast"):
        assert t(transport, nodes=100) / t(transport, nodes=10) < 1.2
    assert t("chain", nodes=10_000) / t("chain", nodes=10) < 1.5


def test_multicast_pays_its_fec_and_more_fec_spares_the_resends_under_loss() -> None:
    """More redundancy costs its share of the stream and of egress without loss; under 1 %
    loss at N = 1000 it repairs what the default's resends would carry again."""
    plain, more = (model.predict("multicast", replace(BASE, fec=f)) for f in ("8x4/128", "8x8/128"))
    assert more.egress / plain.egress == pytest.approx(136 / 132, rel=1e-3)  # control aside
    assert more.t > plain.t
    lossy = replace(BASE, nodes=1000, loss=0.01)
    assert t("multicast", lossy, fec="8x8/128") < t("multicast", lossy)
    bare = model.predict("multicast", replace(BASE, fec=""))  # no FEC at all
    assert bare.egress < plain.egress and bare.t < plain.t


def test_egress_is_one_copy_for_multicast_and_n_copies_for_http() -> None:
    n = 1000
    multicast = model.predict("multicast", replace(BASE, nodes=n)).egress / BASE.size
    http = model.predict("http", replace(BASE, nodes=n)).egress / BASE.size
    assert 1 <= multicast < 1.2
    assert n <= http < 1.1 * n


def test_an_oversubscribed_uplink_becomes_unicasts_bottleneck() -> None:
    # a server fast enough that 80 copies cross its link in less time than one rack's
    # 40 copies cross a 16:1 uplink (25 Gbit/s for 40 nodes at 10 Gbit/s)
    fat = replace(BASE, nodes=80, server_link=1e12, rack_size=40)
    flat = t("http", fat, oversubscription=1)
    squeezed = t("http", fat, oversubscription=16)
    assert squeezed > 3 * flat
    assert squeezed >= 40 * fat.size * 8 / 25e9
    # the chain crosses each uplink once, so the same racks barely matter to it
    assert t("chain", fat, oversubscription=16) < 1.1 * t("chain", fat, oversubscription=1)


@pytest.mark.parametrize("transport", model.TRANSPORTS)
def test_loss_raises_t(transport: str) -> None:
    assert t(transport, nodes=1000, loss=0.01) > t(transport, nodes=1000)


def test_stragglers_end_last_but_do_not_hold_the_others() -> None:
    slow = model.predict("multicast", replace(BASE, nodes=1000, stragglers=0.01))
    assert slow.t >= 10 * BASE.one_copy
    assert slow.t_others < 3 * BASE.one_copy


@pytest.mark.parametrize(
    "argv",
    [
        ["--transport", "udp"],
        ["--node-link", "10x"],
        ["--server-link", "0mbit"],
        ["--size", "four"],
        ["--nodes", "100", "--rack-size", "40"],
        ["--nodes", "80", "--rack-size", "40", "--oversubscription", "50"],
        ["--loss", "1.5"],
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert model.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert err.count("\n") == 1


def test_the_cli_prints_t_and_egress(capsys: pytest.CaptureFixture[str]) -> None:
    argv = "--transport chain --nodes 1000 --node-link 10g --server-link 25g --rack-size 40"
    argv += " --oversubscription 4 --loss 0.01 --stragglers 0.01 --size 4GiB"
    assert model.main(argv.split()) == 0
    out = capsys.readouterr().out
    assert "T = " in out and "egress = " in out


def test_check_reports_each_recorded_run(capsys: pytest.CaptureFixture[str]) -> None:
    runs = model.load_runs()
    rows = model.check(runs)
    assert len(rows) == len(runs) > 40
    for row in rows:
        assert row["error"] == pytest.approx(row["t_model"] / row["t"] - 1)
    # the error moves with the constants: it is computed, not recorded
    skewed = dict(model.CALIBRATION, t0=model.CALIBRATION["t0"] + 30)
    assert [r["error"] for r in model.check(runs, skewed)] != [r["error"] for r in rows]
    assert model.main(["--check"]) == 0
    out = capsys.readouterr().out
    assert out.count("| deploy: ") + out.count("| diskless: ") == len(runs)
    assert "median" in out


# the testbed's BitTorrent runs: 100 nodes at 2 Mbit/s, a 20 Mbit/s server, S/B = 125 s
TESTBED = model.Cluster(nodes=100, size=29.9 * (1 << 20), node_link=2e6, server_link=20e6)


def test_bittorrent_racks_bring_their_lanes_in_then_trade_inside() -> None:
    flat = model.predict("bittorrent", TESTBED)
    for racks in (2, 4, 5, 10):
        c = replace(TESTBED, rack_size=100 // racks, oversubscription=4)
        p = model.predict("bittorrent", c)
        # each rack takes the others' stripes, (1 - 1/R) S, across its uplink first
        lane = (1 - 1 / racks) * c.size / (c.uplink / 8)
        assert p.t >= lane + c.one_copy
        # then it trades inside: a smaller swarm than the flat one, so the two come close
        assert abs(p.t - flat.t) < lane + 0.1 * c.one_copy
        # the seed sends one copy, as on one switch; the rest is control traffic
        assert _bt_payload(c, p) == pytest.approx(_bt_payload(TESTBED, flat))
    # on one switch, the stripes are one copy and the seed sends nothing twice
    assert _bt_payload(TESTBED, flat) == pytest.approx(TESTBED.size / model.CALIBRATION["eta_tcp"])
    assert 1 < flat.egress / TESTBED.size < 1.5


def _bt_payload(c: model.Cluster, p: model.Prediction) -> float:
    """A BitTorrent prediction's egress without its control traffic."""
    k = model.CALIBRATION
    return float(p.egress - c.nodes * (k["ctl_bytes"] + k["bt_ctl"] * p.t))


def test_in_small_racks_the_bittorrent_seed_sends_lane_pieces_again() -> None:
    # 20 racks of 5: a lane is a fifth of the image, brought in a session of its own
    small = replace(TESTBED, rack_size=5, oversubscription=4)
    rescued = _bt_payload(small, model.predict("bittorrent", small)) - _bt_payload(
        TESTBED, model.predict("bittorrent", TESTBED)
    )
    k = model.CALIBRATION
    assert rescued == pytest.approx(k["bt_rescue"] * TESTBED.size / k["eta_tcp"])


def test_bittorrent_control_traffic_grows_with_the_time_the_deployment_runs() -> None:
    fast = model.predict("bittorrent", TESTBED)
    slow = model.predict("bittorrent", replace(TESTBED, node_link=1e6, server_link=10e6))
    # the same image and nodes at half the rates: the same payload, control for longer
    assert slow.t > 1.9 * fast.t
    assert slow.egress > fast.egress
    extra = TESTBED.nodes * model.CALIBRATION["bt_ctl"] * (slow.t - fast.t)
    assert slow.egress - fast.egress == pytest.approx(extra)


def test_a_late_bittorrent_node_takes_the_image_at_its_own_links_rate() -> None:
    swarm = model.predict("bittorrent", TESTBED).t
    late = model.predict("bittorrent", replace(TESTBED, skew=300)).t
    # its peers are done: S at one link's rate after it starts, not the swarm's time again
    assert late - 300 < swarm
    assert late - 300 >= TESTBED.one_copy


@pytest.mark.parametrize("transport", model.TRANSPORTS)
@pytest.mark.parametrize("scenario", model.SCENARIOS.values())
def test_the_server_sends_no_more_than_its_link_carries(
    transport: str, scenario: tuple[float, float]
) -> None:
    loss, stragglers = scenario
    for n in (1000, 10_000):
        p = model.predict(
            transport, replace(model.SCALE, nodes=n, loss=loss, stragglers=stragglers)
        )
        assert p.egress * 8 <= model.SCALE.server_link * p.t


@pytest.mark.parametrize("transport", ["multicast", "chain", "bittorrent"])
def test_testbed_installs_end_on_one_hosts_disks_for_every_broadcast(transport: str) -> None:
    """N nodes that end together unpack and sync on the testbed's one host: a term of the
    recorded install runs, for BitTorrent as for the others, and never of a prediction."""
    installs = replace(TESTBED, host_disks=True)
    gained = model.predict(transport, installs).t - model.predict(transport, TESTBED).t
    assert gained == pytest.approx(model.CALIBRATION["host_disk"] * TESTBED.nodes)


def test_the_check_leaves_out_bittorrents_old_designs_with_a_reason() -> None:
    runs = [r for r in model.load_runs() if r.transport == "bittorrent"]
    lanes = [r for r in runs if "lane" in r.label]
    given_up = [r for r in lanes if "lanes to every rack" in r.label]  # before 75bff76
    reverted = [
        r
        for r in lanes
        if any(
            tried in r.label
            for tried in (
                "the rack's pieces while importing",
                "the rack's pieces during the lane",
                "lanes even in pieces",
                "lane patience from its first piece",
                "rescues when the rack is quiet",
                "partners unchoked, rack pieces during the lane",
                "spare pieces spread over the turns",
                "rescues at the lane's pace",
                "lanes in a session of their own, 20 racks",
                "(import first here), 4 racks",
            )
        )
    ]
    # the lane first in small racks (before its own session there), and its own session
    # in racks of 25 (where it goes first again since b6cc1d0)
    small = [r for r in lanes if r.cluster.rack_size <= 10]
    apart = ("session of their own", "lane's session")
    moved = [r for r in small if not any(words in r.label for words in apart)] + [
        r for r in lanes if r.cluster.rack_size > 10 and any(words in r.label for words in apart)
    ]
    assert all(r.excluded for r in moved) and len(moved) >= 3 + 6
    assert all(r.excluded for r in given_up + reverted) and len(given_up) >= 3
    assert len(reverted) >= 3 + 5 + 3 + 1 + 3 + 6 + 6 + 3
    lanes = [r for r in lanes if r not in given_up + reverted + moved]
    # what the model keeps of the lanes it leaves out only for the host (a CPU over 90 %)
    assert len(lanes) >= 3 and not any(
        r.excluded and "recorded invalid" not in r.excluded for r in lanes
    )
    unlabelled = [r for r in runs if r.cluster.rack_size and "lane" not in r.label]
    current = [r for r in unlabelled if "current code" in r.label]  # after the lanes came
    assert len(current) >= 3 and not any(
        r.excluded and "recorded invalid" not in r.excluded for r in current
    )
    for r in runs:
        if r in unlabelled and r not in current:
            assert r.excluded  # racks before the doors, the doors and their variants
        if r.egress / r.cluster.size > 10:
            assert r.excluded  # the seed's rescue storms


@pytest.mark.parametrize(
    ("label", "racks", "egress_s", "valid", "measured", "why"),
    [
        ("bittorrent", 0, 1.8, True, "", ""),
        ("bittorrent", 0, 1.8, False, "", "host CPU"),
        ("bittorrent", 0, 25.0, True, "2026-12-03 19:17", "re-sent most pieces"),
        ("bittorrent", 0, 25.0, True, "", "re-sent most pieces"),  # recorded no time
        # the meshed swarm under a start skew sends that much too: the model's to predict
        ("bittorrent", 0, 3.8, True, "2026-12-04 08:40", ""),
        ("bittorrent (4 racks, 4:1; lanes)", 4, 1.8, True, "", ""),
        (
            "bittorrent (20 racks of 5, 4:1; lanes 1, 2, 4, 8 racks away)",
            20,
            2.4,
            True,
            "",
            "first",
        ),
        (
            "bittorrent (lanes in a session of their own, 20 racks of 5)",
            20,
            2.0,
            True,
            "",
            "unequal",
        ),
        (
            "bittorrent (lanes in a session of their own in small racks, 20 racks of 5)",
            20,
            2,
            True,
            "",
            "",
        ),
        (
            "bittorrent (lanes, 4 upload slots in the lane's session, 20 racks of 5, 4:1)",
            20,
            1.7,
            True,
            "",
            "",
        ),
        ("bittorrent (lanes in a session of their own, 4 racks of 25)", 4, 1.7, True, "", "25"),
        ("bittorrent (20 racks of 5, 4:1; lanes to every rack)", 20, 17.6, True, "", "given up"),
        (
            "bittorrent (4 racks, 4:1; lanes along a ring; the rack's pieces while importing)",
            4,
            3.0,
            True,
            "",
            "reverted",
        ),
        ("bittorrent (4 racks, 4:1; one door per rack)", 4, 4.3, True, "", "lanes replaced"),
        ("bittorrent (4 racks, 4:1)", 4, 4.3, True, "2026-12-05 03:18", "one door per rack"),
        ("bittorrent (4 racks, 4:1)", 4, 4.2, True, "", "before the doors"),
        # since the lanes came, a rack run is theirs whatever its label says
        ("bittorrent (4 racks of 25, current code)", 4, 1.4, True, "2026-12-07 23:47", ""),
        (
            "bittorrent (4 racks, 4:1; doors, no rescue behind the door)",
            4,
            2.3,
            True,
            "",
            "variant",
        ),
    ],
)
def test_bittorrents_exclusions(
    label: str, racks: int, egress_s: float, valid: bool, measured: str, why: str
) -> None:
    record = {
        "transport": label, "n": 100, "racks": racks, "valid": valid, "cpu": 0.97,
        "measured": measured or None,
    }  # fmt: skip
    excluded = model._exclusion(record, "bittorrent", egress_s)
    assert (why in excluded) if why else excluded == ""
