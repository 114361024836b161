"""Test helpers for the metrics listener: its URL on a running broker, plain GETs, parsed scrapes."""

from __future__ import annotations

import urllib.error
import urllib.request

from broker.status import Snapshot
from tests.helpers import BrokerThread


def base_url(broker: BrokerThread) -> str:
    host, port = broker.address("metrics")
    return f"http://{host}:{port}"


def get(url: str) -> tuple[int, str]:
    """(HTTP status, body) of a GET; error statuses are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return int(reply.status), reply.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def scrape(broker: BrokerThread) -> Snapshot:
    status, text = get(base_url(broker) + "/metrics")
    assert status == 200, text
    return Snapshot.parse(text)
