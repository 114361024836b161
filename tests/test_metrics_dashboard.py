"""The Grafana dashboard (docs/grafana/) is valid JSON, and every metric that it and the alert rules of
docs/OPERATIONS.md query exists in a real scrape of the broker; docs/OPERATIONS.md explains every
metric the broker exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, BrokerThread
from tests.observe import scrape

DOCS = ROOT / "docs"
# Names made by Prometheus itself, not by the broker.
PROMETHEUS_OWN = {"up"}
FUNCTIONS = {"sum", "rate", "max", "histogram_quantile", "clamp_min", "increase", "avg_over_time", "by", "on",
             "and", "le"}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (identifiers that are not functions, keywords or labels)."""
    without_labels = re.sub(r"\{[^}]*\}", "{}", expr)
    without_strings = re.sub(r'"[^"]*"', '""', without_labels)
    names = {m for m in re.findall(r"[a-z_][a-z0-9_]*", without_strings) if "_" in m or m == "up"}
    return {n for n in names if n not in FUNCTIONS and not n.startswith("__")}


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((DOCS / "grafana" / "chat-broker.json").read_text(encoding="utf-8"))
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert len(exprs) >= 20
    return exprs


def alert_exprs() -> list[str]:
    text = (DOCS / "OPERATIONS.md").read_text(encoding="utf-8")
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    rules = next(b for b in blocks if isinstance(b, dict) and "groups" in b)
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    assert len(exprs) >= 8
    return exprs


@pytest.fixture(scope="module")
def exposed(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    broker = BrokerThread(tmp_path_factory.mktemp("dash") / "data",
                          {"metrics.bind": "127.0.0.1:0", "push.enabled": True, "push.unifiedpush": {}}).start()
    try:
        return set(scrape(broker).samples)
    finally:
        broker.stop()


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_queried_metric_exists(exposed: set[str], source: str) -> None:
    exprs = dashboard_exprs() if source == "dashboard" else alert_exprs()
    queried = set().union(*(metric_names(e) for e in exprs))
    assert {"chat_staged_oldest_age_seconds", "chat_errors_total"} <= queried  # the parser finds names
    assert queried - exposed - PROMETHEUS_OWN == set()


def test_operations_doc_explains_every_metric(exposed: set[str]) -> None:
    text = (DOCS / "OPERATIONS.md").read_text(encoding="utf-8")
    families = {re.sub(r"_(bucket|count|sum|gcount|gsum)$", "", n) for n in exposed}
    missing = {f for f in families if f.startswith("chat_") and f"`{f}`" not in text}
    assert missing == set()


def test_metric_name_parser() -> None:
    assert metric_names('histogram_quantile(0.99, sum by (le) (rate(chat_x_bucket{job="a", code="b"}[5m])))') == {
        "chat_x_bucket"}
    assert metric_names("up{job=\"x\"} == 0") == {"up"}


def test_dashboard_is_json() -> None:
    json.loads(Path(DOCS / "grafana" / "chat-broker.json").read_text(encoding="utf-8"))
