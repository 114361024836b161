"""The health of a cluster node's per-device rounds (a device's ack, a read of its queue) as the
supervisor, and so /readyz, sees it. Such a round fails for one device; the devices whose last one
failed are kept, because once those are gone no later round can report success (a node cut off
from Redis loses all its connections), so it is reported then, or /readyz would fail for good
(tests/test_cluster_cutoff.py). ``ClusterMessaging`` (bridge/cluster/messaging.py) reports to it."""

from __future__ import annotations

from bridge.background import Supervisor
from bridge.cluster.window import Windows
from bridge.store import StoreError


class RoundHealth:
    def __init__(self, supervisor: Supervisor, windows: Windows) -> None:
        self._supervisor = supervisor
        self._windows = windows
        self._failing: dict[str, set[str]] = {"ack": set(), "queue_read": set()}

    def failed(self, task: str, client_id: str, exc: StoreError) -> None:
        self._supervisor.failed(task, exc)
        if client_id in self._windows:
            self._failing[task].add(client_id)
        elif not self._failing[task]:  # it left while its round waited on Redis: failing for nobody
            self._supervisor.succeeded(task)

    def succeeded(self, task: str) -> None:
        self._failing[task].clear()
        self._supervisor.succeeded(task)

    def gone(self, client_id: str) -> None:
        """The device left this node: a round failing for it alone fails for nobody now."""
        for task, devices in self._failing.items():
            if client_id in devices:
                devices.discard(client_id)
                if not devices:  # failing for nobody now; the store's own probe tells whether Redis answers
                    self._supervisor.succeeded(task)
