"""A recording MQTT proxy for tests: every byte relayed in either direction is kept.

It is ``testkit.proxy.MqttProxy`` with a rule that records each packet and never cuts,
so a test can assert on everything that crossed the wire between clients and broker.
"""

from __future__ import annotations

import threading

from testkit.proxy import MqttProxy, Packet


class CapturingProxy(MqttProxy):
    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self._lock = threading.Lock()
        self._seen = bytearray()
        self.packets = 0
        self.rule = self._record

    def _record(self, packet: Packet) -> bool:
        with self._lock:
            self._seen += packet.data
            self.packets += 1
        return False  # never cut: the rule stays installed

    def captured(self) -> bytes:
        """Everything relayed so far, both directions, in relay order."""
        with self._lock:
            return bytes(self._seen)
