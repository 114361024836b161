"""MQTT 3.1.1 packets as slots dataclasses, and the events of a connection that are not packets.

A packet the client sends comes out of ``ServerConnection.next_event`` as itself; the codec
encodes and decodes every packet type both ways (a test client and the round-trip tests use
the server's half). Strings are decoded text, payloads ``bytes``; a packet id of a QoS 0
PUBLISH is None.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Will:
    topic: str
    message: bytes
    qos: int = 0
    retain: bool = False


@dataclass(slots=True)
class Connect:
    client_id: str
    clean_session: bool = True
    keepalive: int = 60
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None


@dataclass(slots=True)
class ConnAck:
    code: int
    session_present: bool = False


@dataclass(slots=True)
class Publish:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None


@dataclass(slots=True)
class PubAck:
    packet_id: int


@dataclass(slots=True)
class PubRec:
    packet_id: int


@dataclass(slots=True)
class PubRel:
    packet_id: int


@dataclass(slots=True)
class PubComp:
    packet_id: int


@dataclass(slots=True)
class Subscribe:
    packet_id: int
    filters: tuple[tuple[str, int], ...]  # (topic filter, requested QoS)


@dataclass(slots=True)
class SubAck:
    packet_id: int
    codes: tuple[int, ...]  # granted QoS per filter, or 0x80


@dataclass(slots=True)
class Unsubscribe:
    packet_id: int
    filters: tuple[str, ...]


@dataclass(slots=True)
class UnsubAck:
    packet_id: int


@dataclass(slots=True)
class PingReq:
    pass


@dataclass(slots=True)
class PingResp:
    pass


@dataclass(slots=True)
class Disconnect:
    pass


Packet = (Connect | ConnAck | Publish | PubAck | PubRec | PubRel | PubComp | Subscribe | SubAck | Unsubscribe
          | UnsubAck | PingReq | PingResp | Disconnect)


@dataclass(slots=True)
class NotHandled:
    """A valid packet of a flow this core does not run: QoS 2 (PUBLISH QoS 2, PUBREC, PUBREL, PUBCOMP).

    amqtt keeps the sessions that use QoS 2 (docs/MQTT.md); a chat shell that gets one closes
    the connection, as it would for anything its clients never send.
    """

    packet: Publish | PubRec | PubRel | PubComp


@dataclass(slots=True)
class Closed:
    """The connection ended without a protocol violation; ``will`` is what to publish now (if any)."""

    reason: str
    rule: str
    will: Will | None


Event = Packet | NotHandled | Closed
