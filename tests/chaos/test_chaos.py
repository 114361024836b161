"""The chaos harness in its CI size: every fault scenario of bench/chaos, each on a fresh broker process.

Each test runs the shared SDK workload (pairs chatting both ways, tablets going
offline and back) while one fault is injected -- broker SIGKILLs, a faulty
network (cuts, half-open stalls, slow links, cuts between PUBLISH and PUBACK and
between a delivery and its ack), SDK processes SIGKILLed with unsent outboxes,
a full and a read-only data directory, a broker node SIGKILLed in cluster mode, slow consumers, floods, Hypothesis-made
hostile input, and the abuse floods (seen reports, new devices, concurrent
guesses, unfinished 4 MiB CONNECTs, lone surrogates in every field) -- and then
proves from the ledger that no accepted message was lost, duplicated or
reordered at any target device, that no ``sent`` was given for a lost message,
and that nobody received a message not meant for them or under a false sender.
Scenario-specific checks follow each, and every check a scenario reports
(``checks``: each abuse flood held within its bound) must pass. The full-size
run is ``python -m bench chaos --full``, and ``--cluster --full`` for the cluster faults
(docs/RELIABILITY.md); here cluster mode runs its central fault only (~25 s).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.chaos.cluster import CLUSTER_SCENARIOS
from bench.chaos.scenarios import MountFailed, all_scenarios

SCENARIOS = {**all_scenarios(), **CLUSTER_SCENARIOS}


def run(name: str, tmp_path: Path) -> dict[str, Any]:
    try:
        r = SCENARIOS[name]("ci", tmp_path / name, lambda line: None)
    except MountFailed as exc:
        pytest.skip(f"needs a tmpfs mount (root): {exc}")
    failures = {k: r[k] for k in ("lost", "duplicated", "reordered", "false_sent", "misrouted", "unknown") if r[k]}
    assert not failures, f"{name}: {failures}; {r['examples']}"
    assert r["messages"] > 0 and r["faults"] > 0, r
    assert r["broker_alive_after"], "the broker died"
    failed = {check: v["figure"] for check, v in r.get("checks", {}).items() if not v["ok"]}
    assert not failed, f"{name}: did not hold: {failed}"
    return r


@pytest.mark.timeout(240)
def test_broker_sigkill(tmp_path: Path) -> None:
    r = run("kill", tmp_path)
    assert r["broker_starts"] == r["faults"] + 1


@pytest.mark.timeout(240)
def test_faulty_network(tmp_path: Path) -> None:
    r = run("network", tmp_path)
    assert r["stall"] > 0 and r["cut"] > 0 and r["cut_after_publish"] + r["cut_after_delivery"] > 0


@pytest.mark.timeout(240)
def test_clients_killed_with_unsent_outboxes(tmp_path: Path) -> None:
    r = run("clients", tmp_path)
    assert r["unsent_at_kill"] > 0, "the kills must hit non-empty outboxes"


@pytest.mark.timeout(240)
def test_disk_full_and_read_only(tmp_path: Path) -> None:
    r = run("disk", tmp_path)
    assert all(r["alive_while_full"]), "the broker must ride out a full disk"
    assert r["broker_starts"] >= 2


@pytest.mark.timeout(240)
def test_slow_consumers_are_bounded(tmp_path: Path) -> None:
    r = run("slow", tmp_path)
    assert r["staged_for_slow_max"] <= 2 * r["max_queue"], "a device's queue is capped at delivery.max_queue"
    assert r["spam"]["answers"].get("queue_full", 0) > 0, "the spammer is told queue_full"


@pytest.mark.timeout(300)
def test_floods(tmp_path: Path) -> None:
    r = run("flood", tmp_path)
    floods = r["floods"]
    assert floods["badpw"]["attempts"] > 0 and "0" not in floods["badpw"]["connack_codes"]
    assert floods["spam"]["answers"].get("rate_limited", 0) > 0
    assert floods["seen"]["answers"].get("rate_limited", 0) > 0, "seen reports cost send tokens"
    assert set(floods["deep"]["answers"]) == {"bad_json"}


@pytest.mark.timeout(300)
def test_hostile_input(tmp_path: Path) -> None:
    r = run("hostile", tmp_path)
    hostile = r["hostile"]
    assert hostile["leaked_items"] == 0 and hostile["subscribes_granted_to_others"] == 0
    assert hostile["subscribes_refused"] > 0 and sum(hostile["examples"].values()) > 0


@pytest.mark.timeout(120)
def test_cluster_node_sigkill(tmp_path: Path) -> None:
    """Three node processes behind HAProxy on a Redis Cluster; one SIGKILLed mid-stream, its devices
    go on through the others, it comes back once its lease ran out."""
    r = run("cluster-node", tmp_path)
    assert r["broker_starts"] == 3 + r["faults"]
    assert all(s < 5 for s in r["haproxy_down_s"]), "HAProxy marks a dead node DOWN within seconds"
