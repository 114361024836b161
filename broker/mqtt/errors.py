"""What ends a connection: a client's protocol violation, a CONNECT refused with a return code.

Not amqtt's ``MQTTError`` on purpose: amqtt's reader loop logs those and reads on, while any
other exception ends the connection (broker/wire.py raises these through amqtt).
"""

from __future__ import annotations

# CONNACK return codes (section 3.2.2.3).
ACCEPTED = 0x00
UNACCEPTABLE_PROTOCOL_VERSION = 0x01
IDENTIFIER_REJECTED = 0x02
SERVER_UNAVAILABLE = 0x03
BAD_USER_NAME_OR_PASSWORD = 0x04
NOT_AUTHORIZED = 0x05


class ProtocolViolation(Exception):
    """The client broke MQTT 3.1.1: close the connection without an answer [MQTT-4.8.0-1].

    ``rule`` cites the normative statement or section; the conformance tests cite the same.
    """

    def __init__(self, reason: str, rule: str) -> None:
        super().__init__(f"{reason} [{rule}]")
        self.reason = reason
        self.rule = rule


class ConnectRefused(ProtocolViolation):
    """A CONNECT refused with a CONNACK return code (section 3.2.2.3), then closed."""

    def __init__(self, code: int, reason: str, rule: str) -> None:
        super().__init__(reason, rule)
        self.code = code


class LocalProtocolError(ValueError):
    """The caller (our side) asked for something MQTT forbids: a bug in the shell, not the client's fault."""
