"""One MQTT 3.1.1 connection, server side, as a state machine without I/O (docs/MQTT.md, "The sans-IO core").

The shell (a protocol object over a transport) drives it::

    conn = ServerConnection(limits, now)
    conn.receive_data(data, now)          # b"": the client closed its side
    while (event := conn.next_event()) is not None:
        ...                               # Connect -> conn.accept(...) or conn.refuse(code)
    transport.write(conn.data_to_send())  # answers and commands, in order
    # and at conn.deadline(): conn.check_time(now) -> Closed | None

``next_event`` raises ``ProtocolViolation`` when the client breaks a rule (the CONNACK of a
``ConnectRefused`` is already in ``data_to_send``); the shell then writes what is there,
closes the connection and publishes ``conn.will`` if it is set. ``Closed`` events (end of
stream, a deadline, ``close``) carry the will to publish. Commands that MQTT forbids our side
to send raise ``LocalProtocolError``: a bug in the shell, not the client's fault.

Times are the caller's clock (seconds, monotonic); nothing here reads one.
"""

from __future__ import annotations

import enum
import math

from broker.mqtt.codec import FROM_CLIENT, MAX_PACKET_ID, SUBACK_FAILURE, Decoder
from broker.mqtt.encoding import encode, encode_puback, encode_publish
from broker.mqtt.errors import (
    ACCEPTED,
    IDENTIFIER_REJECTED,
    ConnectRefused,
    LocalProtocolError,
    ProtocolViolation,
)
from broker.mqtt.events import (
    Closed,
    ConnAck,
    Connect,
    Disconnect,
    Event,
    NotHandled,
    Packet,
    PingReq,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
    Will,
)
from broker.mqtt.limits import MAX_UNACKED, NO_KEEPALIVE_LIMIT, WireLimits

PINGRESP_BYTES = b"\xd0\x00"


def keepalive_deadline(keepalive_s: int) -> int:
    """Seconds of silence after which a client is dropped [MQTT-3.1.2-24] (0: keepalive off)."""
    return math.ceil(keepalive_s * 1.5) if keepalive_s > 0 else 0


def check_keepalive(keepalive: int, limits: WireLimits) -> None:
    """Raise ConnectRefused (0x02) for a keepalive outside the configured bounds.

    MQTT 3.1.1 has no way for a server to impose another keepalive (MQTT 5 has "server keep
    alive"), and enforcing a shorter one than the client's would drop well-behaved clients, a
    longer one breaks [MQTT-3.1.2-24]. So a value outside the bounds is refused, with 0x02 like
    mosquitto's max_keepalive.
    """
    if keepalive == 0:
        if limits.keepalive_max_s < NO_KEEPALIVE_LIMIT:
            raise ConnectRefused(IDENTIFIER_REJECTED, "keepalive 0 (never time out) exceeds mqtt.keepalive_max_s",
                                 "section 3.1.2.10")
        return
    if keepalive > limits.keepalive_max_s or keepalive < limits.keepalive_min_s:
        raise ConnectRefused(
            IDENTIFIER_REJECTED,
            f"keepalive {keepalive}s outside mqtt.keepalive_min_s..keepalive_max_s "
            f"({limits.keepalive_min_s}..{limits.keepalive_max_s})",
            "section 3.1.2.10",
        )


class State(enum.Enum):
    AWAIT_CONNECT = "await-connect"  # nothing but a CONNECT is read
    CONNECTING = "connecting"  # CONNECT read; the shell logs in, then accept() or refuse(); later packets wait
    CONNECTED = "connected"
    CLOSED = "closed"  # nothing more is read or sent


class ServerConnection:
    """The rules of docs/MQTT.md for one client connection; see the module's docstring for the driving loop."""

    __slots__ = (
        "_ack_head",
        "_deadline_s",
        "_decoder",
        "_eof",
        "_inflight",
        "_last_data_at",
        "_last_packet_at",
        "_limits",
        "_max_unacked",
        "_next_id",
        "_opened_at",
        "_out",
        "_partial_since",
        "_subscribes",
        "_to_ack",
        "_unsubscribes",
        "close_reason",
        "connect",
        "connect_timeout_s",
        "state",
        "will",
    )

    def __init__(self, limits: WireLimits, now: float, *, connect_timeout_s: float = 10.0,
                 max_unacked: int = MAX_UNACKED) -> None:
        if not 0 < max_unacked <= MAX_PACKET_ID:
            raise ValueError(f"max_unacked must be 1..{MAX_PACKET_ID}")
        self._limits = limits
        self._max_unacked = max_unacked
        self.connect_timeout_s = connect_timeout_s
        # Before CONNECT the client has not logged in: it may make us buffer only max_connect_bytes.
        if limits.max_connect_bytes <= limits.max_packet_bytes:
            self._decoder = Decoder(None, limits.max_connect_bytes, "mqtt.max_connect_bytes")
        else:
            self._decoder = Decoder(None, limits.max_packet_bytes)
        self.state = State.AWAIT_CONNECT
        self.connect: Connect | None = None
        """The CONNECT while it is being answered; dropped once accepted (its credentials are not kept)."""
        self.will: Will | None = None
        """The will to publish if the connection ends now (set by accept(), dropped by DISCONNECT)."""
        self.close_reason: str | None = None
        self._out: list[bytes] = []
        self._opened_at = self._last_data_at = self._last_packet_at = now
        self._partial_since = math.inf  # when the first byte of an incomplete packet arrived
        self._deadline_s = 0  # keepalive_deadline of the CONNECT (0: off)
        self._eof = False
        # Dicts, not sets: an empty dict is 64 bytes, an empty set 216, and most connections sit idle.
        self._inflight: dict[int, None] = {}  # our QoS 1 PUBLISHes awaiting PUBACK
        self._next_id = 0
        self._to_ack: list[int] = []  # the client's QoS 1 PUBLISHes awaiting our PUBACK, in arrival order,
        self._ack_head = 0  # from this index on (a list, not a deque: 56 bytes empty, not 624)
        self._subscribes: dict[int, tuple[int, ...]] = {}  # SUBSCRIBEs awaiting SUBACK: requested QoS per filter
        self._unsubscribes: dict[int, None] = {}

    # Bytes in, events out.

    def receive_data(self, data: bytes, now: float) -> None:
        """Bytes read from the client (``b""``: it closed its side). Then call next_event until None."""
        if self.state is State.CLOSED:
            return
        self._last_data_at = now
        if data:
            self._decoder.feed(data)
        else:
            self._eof = True

    def next_event(self) -> Event | None:
        """The next event, or None: more bytes are needed, or the shell must accept/refuse the CONNECT first."""
        state = self.state
        if state is State.CONNECTING:  # nothing is parsed until the shell answers the CONNECT
            return self._closed("the client closed the connection", "MQTT-3.1.2-8") if self._eof else None
        if state is State.CLOSED:
            return None
        try:
            while True:
                packet = self._decoder.next_packet()
                if packet is None:
                    return self._no_packet()
                self._partial_since = math.inf
                self._last_packet_at = self._last_data_at
                event = self._on_packet(packet)
                if event is not None:
                    return event
        except ConnectRefused as exc:
            self._out.append(encode(ConnAck(exc.code)))  # session present 0 [MQTT-3.2.2-4], then close
            self._end(str(exc))
            raise
        except ProtocolViolation as exc:
            self._end(str(exc))
            raise

    def _no_packet(self) -> Closed | None:
        if self._eof:
            partial = self._decoder.buffered > 0
            reason = "the client closed the connection" + (" in the middle of a packet" if partial else "")
            return self._closed(reason, "MQTT-3.1.2-8")  # closed without DISCONNECT: the will goes out
        if self._decoder.buffered and self._partial_since == math.inf:
            self._partial_since = self._last_data_at  # the latest feed: never earlier than the first byte
        return None

    def _on_packet(self, packet: Packet) -> Event | None:
        if isinstance(packet, Publish):
            return self._on_publish(packet)
        if isinstance(packet, PubAck):
            if packet.packet_id in self._inflight:
                del self._inflight[packet.packet_id]
                return packet
            return None  # not ours (e.g. of an earlier connection): nothing to complete
        if isinstance(packet, PingReq):
            self._out.append(PINGRESP_BYTES)  # [MQTT-3.12.4-1]
            return None
        if isinstance(packet, Subscribe):
            self._subscribes[packet.packet_id] = tuple(qos for _, qos in packet.filters)
            return packet
        if isinstance(packet, Unsubscribe):
            self._unsubscribes[packet.packet_id] = None
            return packet
        if isinstance(packet, Disconnect):
            self.will = None  # [MQTT-3.1.2-10]: a DISCONNECT discards the will
            self._end("the client sent DISCONNECT")
            return packet
        if isinstance(packet, Connect):
            return self._on_connect(packet)
        if isinstance(packet, PubRec | PubRel | PubComp):
            return NotHandled(packet)  # QoS 2 flows
        raise AssertionError(f"the decoder let {packet} through")  # FROM_CLIENT holds no other type

    def _on_connect(self, connect: Connect) -> Connect:
        check_keepalive(connect.keepalive, self._limits)  # on the CONNECT's bytes, before authentication
        self.connect = connect
        self.state = State.CONNECTING
        self._decoder.kinds = FROM_CLIENT  # a second CONNECT is a violation [MQTT-3.1.0-2]
        self._decoder.max_bytes = self._limits.max_packet_bytes
        self._decoder.limit_name = "mqtt.max_packet_bytes"
        return connect

    def _on_publish(self, publish: Publish) -> Event | None:
        if publish.qos == 1:
            # A PUBLISH that reuses an id we have not acknowledged yet (a re-send with DUP) is
            # delivered again and acknowledged again: QoS 1 is at least once (section 4.3.2).
            self._to_ack.append(publish.packet_id or 0)  # QoS 1 has one
        elif publish.qos == 2:
            return NotHandled(publish)
        return publish

    # Commands in, bytes out.

    def data_to_send(self) -> bytes:
        """Everything queued for the client since the last call, in order (b"": nothing)."""
        out, self._out = self._out, []
        return b"".join(out)

    def accept(self, session_present: bool = False) -> None:
        """Answer the CONNECT with CONNACK 0 [MQTT-3.2.2-1..3]; the packets after it come out of next_event."""
        if self._closed_already("accept"):
            return
        connect: Connect = self.connect  # type: ignore[assignment]  # set in CONNECTING
        self.connect = None  # not kept for the connection's life: ~100 bytes, the device token among them
        self._out.append(encode(ConnAck(ACCEPTED, session_present and not connect.clean_session)))
        self.state = State.CONNECTED
        self.will = connect.will
        self._deadline_s = keepalive_deadline(connect.keepalive)

    def refuse(self, code: int) -> None:
        """Answer the CONNECT with CONNACK ``code`` (1-5), then nothing more [MQTT-3.2.2-4, -5]."""
        if self._closed_already("refuse"):
            return
        if not 1 <= code <= 5:
            raise LocalProtocolError(f"CONNACK refusal code {code} (1..5)")
        self._out.append(encode(ConnAck(code)))
        self._end(f"CONNECT refused with {code:#04x}")

    def publish(self, topic: str | bytes, payload: bytes, qos: int = 0, retain: bool = False) -> int | None:
        """Send a PUBLISH; its packet id (0 for QoS 0), or None: not sent (the unacked cap, or closed).

        QoS 1 PUBLISHes awaiting PUBACK are capped at ``max_unacked``; the caller keeps what
        must be re-sent (the core keeps ids only).
        """
        if self.state is not State.CONNECTED:
            self._refused_command("publish")
            return None
        name = topic.encode() if isinstance(topic, str) else topic
        if qos == 0:
            self._out.append(encode_publish(name, payload, 0, None, retain))
            return 0
        if qos != 1:
            raise LocalProtocolError("QoS 2 is not handled here (amqtt keeps those sessions)")
        if len(self._inflight) >= self._max_unacked:
            return None
        packet_id = self._next_id
        while True:  # the next id not in flight [MQTT-2.3.1-2]; fewer than 65535 are
            packet_id = packet_id % MAX_PACKET_ID + 1
            if packet_id not in self._inflight:
                break
        self._next_id = packet_id
        self._inflight[packet_id] = None
        self._out.append(encode_publish(name, payload, 1, packet_id, retain))
        return packet_id

    def republish(self, packet_id: int, topic: str | bytes, payload: bytes, retain: bool = False) -> None:
        """Send again, with DUP=1, a QoS 1 PUBLISH not acknowledged [MQTT-3.3.1-1, MQTT-4.4.0-1] (same id)."""
        if self.state is not State.CONNECTED:
            self._refused_command("republish")
            return
        if not 0 < packet_id <= MAX_PACKET_ID:
            raise LocalProtocolError(f"packet id {packet_id}")
        self._inflight[packet_id] = None
        name = topic.encode() if isinstance(topic, str) else topic
        self._out.append(encode_publish(name, payload, 1, packet_id, retain, dup=True))

    def puback(self, packet_id: int) -> None:
        """Acknowledge the client's QoS 1 PUBLISH, in the order they came [MQTT-4.6.0-2]."""
        if self.state is not State.CONNECTED:
            self._refused_command("puback")
            return
        to_ack, head = self._to_ack, self._ack_head
        if head >= len(to_ack) or to_ack[head] != packet_id:
            raise LocalProtocolError(f"PUBACK {packet_id}: the next PUBLISH to acknowledge is "
                                     f"{to_ack[head] if head < len(to_ack) else None}")
        if head + 1 == len(to_ack):
            to_ack.clear()
            self._ack_head = 0
        else:
            self._ack_head = head + 1
        self._out.append(encode_puback(packet_id))

    def suback(self, packet_id: int, codes: tuple[int, ...] | list[int]) -> None:
        """Answer a SUBSCRIBE [MQTT-3.8.4-1, -2]: a granted QoS (at most the requested one) or 0x80 per filter
        [MQTT-3.8.4-5, MQTT-3.9.3-1]."""
        if self.state is not State.CONNECTED:
            self._refused_command("suback")
            return
        requested = self._subscribes.get(packet_id)
        if requested is None:
            raise LocalProtocolError(f"SUBACK {packet_id} answers no SUBSCRIBE")
        if len(codes) != len(requested) or not all(
                code == SUBACK_FAILURE or 0 <= code <= asked for code, asked in zip(codes, requested, strict=True)):
            raise LocalProtocolError(f"SUBACK codes {list(codes)} for requested QoS {list(requested)}")
        del self._subscribes[packet_id]
        self._out.append(encode(SubAck(packet_id, tuple(codes))))

    def unsuback(self, packet_id: int) -> None:
        """Answer an UNSUBSCRIBE [MQTT-3.10.4-4, -5]."""
        if self.state is not State.CONNECTED:
            self._refused_command("unsuback")
            return
        if packet_id not in self._unsubscribes:
            raise LocalProtocolError(f"UNSUBACK {packet_id} answers no UNSUBSCRIBE")
        del self._unsubscribes[packet_id]
        self._out.append(encode(UnsubAck(packet_id)))

    def close(self, reason: str, rule: str = "") -> Closed | None:
        """Our side ends the connection (a takeover, a shutdown); None if it had ended already."""
        if self.state is State.CLOSED:
            return None
        return self._closed(reason, rule)

    # Time.

    def deadline(self) -> float:
        """When check_time must run next (``math.inf``: no deadline)."""
        if self.state is State.CLOSED:
            return math.inf
        due = self._partial_since + self._limits.packet_deadline_s
        if self.state is not State.CONNECTED:
            return min(due, self._opened_at + self.connect_timeout_s)
        if self._deadline_s:
            return min(due, self._last_packet_at + self._deadline_s)
        return due

    def check_time(self, now: float) -> Closed | None:
        """Closed if a deadline has passed at ``now``: CONNECT not done in time, a packet left incomplete
        (``mqtt.packet_deadline_s``), or silence past 1.5 x keepalive [MQTT-3.1.2-24]."""
        if now < self.deadline():
            return None
        if self.state is not State.CONNECTED and now >= self._opened_at + self.connect_timeout_s:
            return self._closed("CONNECT not completed within limits.connect_timeout_s", "section 3.1.2.10")
        if now >= self._partial_since + self._limits.packet_deadline_s:
            return self._closed("a packet not completed within mqtt.packet_deadline_s", "mqtt.packet_deadline_s")
        return self._closed("silent for 1.5 x keepalive", "MQTT-3.1.2-24")

    # Figures for the shell.

    @property
    def unacked(self) -> int:
        """Our QoS 1 PUBLISHes the client has not acknowledged."""
        return len(self._inflight)

    @property
    def over_unacked(self) -> bool:
        """True while publish() would refuse a QoS 1 PUBLISH (the shell may read this client slowly)."""
        return len(self._inflight) >= self._max_unacked

    @property
    def buffered(self) -> int:
        """Bytes received and not yet part of an event (what the client makes us hold)."""
        return self._decoder.buffered

    def _closed_already(self, command: str) -> bool:
        """accept/refuse: True if the connection ended meanwhile (the client went, or a deadline passed, while
        the shell was logging it in); only CONNECTING may be answered."""
        if self.state is State.CLOSED:
            return True
        if self.state is not State.CONNECTING:
            raise LocalProtocolError(f"{command} in state {self.state.value}")
        return False

    def _refused_command(self, command: str) -> None:
        """A command after the end is dropped (the shell may race with a close); before CONNACK it is a bug."""
        if self.state is not State.CLOSED:
            raise LocalProtocolError(f"{command} before the CONNECT was accepted")

    def _end(self, reason: str) -> None:
        self.state = State.CLOSED
        self.close_reason = reason

    def _closed(self, reason: str, rule: str) -> Closed:
        self._end(reason)
        return Closed(reason, rule, self.will)

