"""MQTT 3.1.1 packets from bytes: a framer over a receive buffer and a decoder per type (encoding.py: the other way).

Parsing reads each packet in one pass over the buffer it arrived in: the fixed header is
read where it lies, the fields by index (no read call per field, no copy of the body; only
the strings and the payload become objects of their own). ``Decoder`` keeps the received
chunks as they came: a chunk holding whole packets is parsed in place, and the chunks of a
packet that arrives in pieces are joined once, when it is whole (not once per piece, which
would be quadratic in a 4 MiB packet's size). A packet over the size limit, or of a type or
fixed-header flags the sender may not use, is refused on its fixed header, before its body
arrives.

Every violation raises ``ProtocolViolation`` (``ConnectRefused`` where the spec names a
CONNACK return code), citing its rule; nothing else is raised for any input.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from broker.mqtt.errors import (
    IDENTIFIER_REJECTED,
    UNACCEPTABLE_PROTOCOL_VERSION,
    ConnectRefused,
    ProtocolViolation,
)
from broker.mqtt.events import (
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PingReq,
    PingResp,
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

# Packet types (section 2.2.1: the high nibble of the first byte).
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14
CONNECT_BYTE = 0x10  # type 1, flags 0 [MQTT-2.2.2-2]
FROM_CLIENT = frozenset({PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBSCRIBE, UNSUBSCRIBE, PINGREQ, DISCONNECT})
"""What a client may send once connected (CONNECT only first)."""
FROM_SERVER = frozenset({CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, UNSUBACK, PINGRESP})
MAX_PACKET_ID = 65535
SUBACK_FAILURE = 0x80

# Fixed-header flags each type must carry (section 2.2.2); None: PUBLISH's are DUP, QoS, RETAIN.
_FLAGS: tuple[int | None, ...] = (None, 0, 0, None, 0, 0, 2, 0, 2, 0, 2, 0, 0, 0, 0, None)
_FLAG_RULES = {PUBREL: "MQTT-3.6.1-1", SUBSCRIBE: "MQTT-3.8.1-1", UNSUBSCRIBE: "MQTT-3.10.1-1"}
_NAMES = ("reserved 0", "CONNECT", "CONNACK", "PUBLISH", "PUBACK", "PUBREC", "PUBREL", "PUBCOMP", "SUBSCRIBE",
          "SUBACK", "UNSUBSCRIBE", "UNSUBACK", "PINGREQ", "PINGRESP", "DISCONNECT", "reserved 15")


def check_first_byte(first: int, kinds: frozenset[int] | None) -> None:
    """The fixed header's first byte: a type this side may receive (``None``: CONNECT first), with its flags."""
    kind = first >> 4
    if kinds is None:
        if first != CONNECT_BYTE:
            # Refused on its first byte: nothing more is read from a client that did not start
            # with CONNECT [MQTT-3.1.0-1] (a CONNECT has flags 0, MQTT-2.2.2-2).
            raise ProtocolViolation(f"first packet is type {kind}, not CONNECT", "MQTT-3.1.0-1")
        return
    if kind not in kinds:
        if kind == CONNECT:
            raise ProtocolViolation("a second CONNECT", "MQTT-3.1.0-2")
        # CONNACK, SUBACK, UNSUBACK, PINGRESP go to clients only; 0 and 15 are reserved.
        raise ProtocolViolation(f"packet type {kind} ({_NAMES[kind]}) may not be sent here", "section 2.2.1, 4.8")
    expected = _FLAGS[kind]
    if expected is not None and first & 0x0F != expected:
        raise ProtocolViolation(f"{_NAMES[kind]} with flags {first & 0x0F:#x}", _FLAG_RULES.get(kind, "MQTT-2.2.2-2"))


@functools.cache
def _first_bytes(kinds: frozenset[int] | None) -> frozenset[int]:
    """The first bytes check_first_byte lets through (one set per kind of sender, shared by every decoder)."""
    return frozenset(first for first in range(256) if _first_byte_ok(first, kinds))


def _first_byte_ok(first: int, kinds: frozenset[int] | None) -> bool:
    try:
        check_first_byte(first, kinds)
    except ProtocolViolation:
        return False
    return True


def check_size(size: int, limit: int, limit_name: str) -> None:
    if size > limit:
        what = "CONNECT" if limit_name == "mqtt.max_connect_bytes" else "packet"
        raise ProtocolViolation(f"{what} of {size} bytes exceeds {limit_name} ({limit})",
                                f"section 2.2.3, {limit_name}")


class Decoder:
    """Frames and decodes packets from received chunks: ``feed`` bytes, then ``next_packet`` until None.

    ``kinds`` are the packet types accepted (None: only a CONNECT, the first packet of a
    client); ``max_bytes`` bounds a packet, fixed header included. The owner may change
    both between packets.
    """

    __slots__ = ("_buf", "_firsts", "_have", "_kinds", "_need", "_parts", "_pos", "limit_name", "max_bytes")

    def __init__(self, kinds: frozenset[int] | None, max_bytes: int, limit_name: str = "mqtt.max_packet_bytes") -> None:
        self.kinds = kinds
        self.max_bytes = max_bytes
        self.limit_name = limit_name
        self._buf = b""  # the chunk being parsed, from _pos on
        self._pos = 0
        self._parts: list[bytes] = []  # chunks received after it
        self._have = 0  # bytes not parsed yet: _buf[_pos:] and _parts
        self._need = 1  # bytes needed before a parse can get further

    @property
    def kinds(self) -> frozenset[int] | None:
        return self._kinds

    @kinds.setter
    def kinds(self, kinds: frozenset[int] | None) -> None:
        self._kinds = kinds
        self._firsts = _first_bytes(kinds)

    @property
    def buffered(self) -> int:
        """Bytes received and not yet part of a decoded packet."""
        return self._have

    def feed(self, data: bytes) -> None:
        if data:
            self._parts.append(data)
            self._have += len(data)

    def next_packet(self) -> Packet | None:
        """The next whole packet, or None until more bytes are fed; raises ProtocolViolation."""
        if self._have < self._need:
            return None
        buf, pos = self._buf, self._pos
        if self._parts:
            parts = self._parts
            # The common case, one chunk after the last whole packet, is used as it is: no copy.
            buf = parts[0] if pos == len(buf) and len(parts) == 1 else b"".join([buf[pos:], *parts])
            pos = 0
            parts.clear()
            self._buf = buf
        end = len(buf)
        first = buf[pos]
        if first not in self._firsts:
            check_first_byte(first, self._kinds)  # raises
        length, shift, index = 0, 0, pos + 1
        while True:  # section 2.2.3: seven bits a byte, at most four bytes
            if index >= end:
                self._wait(pos, index - pos + 1)
                return None
            digit = buf[index]
            index += 1
            length |= (digit & 0x7F) << shift
            if not digit & 0x80:
                break
            shift += 7
            if shift == 28:
                raise ProtocolViolation("remaining length longer than four bytes", "section 2.2.3")
        size = index - pos + length
        if size > self.max_bytes:
            check_size(size, self.max_bytes, self.limit_name)  # raises
        if pos + size > end:
            self._wait(pos, size)
            return None
        packet = _DECODERS[first >> 4](first & 0x0F, buf, index, pos + size)
        pos += size
        self._have = end - pos
        self._need = 1
        if pos == end:
            self._buf, self._pos = b"", 0  # drop the chunk
        else:
            self._pos = pos
        return packet

    def _wait(self, pos: int, need: int) -> None:
        self._pos = pos
        self._need = need


def decode(first: int, buf: bytes, start: int, end: int) -> Packet:
    """The packet whose first byte is ``first`` and whose body is ``buf[start:end]``; raises ProtocolViolation.

    The first byte's type and fixed flags are ``check_first_byte``'s business (the framer
    checks them before the body arrives); this checks the rest.
    """
    return _DECODERS[first >> 4](first & 0x0F, buf, start, end)


def _overrun() -> ProtocolViolation:
    return ProtocolViolation("a field runs past the packet's remaining length", "section 2.2.3, 4.8")


def _u16(buf: bytes, pos: int, end: int) -> int:
    if pos + 2 > end:
        raise _overrun()
    return buf[pos] << 8 | buf[pos + 1]


def _binary(buf: bytes, pos: int, end: int) -> tuple[bytes, int]:
    stop = pos + 2 + _u16(buf, pos, end)
    if stop > end:
        raise _overrun()
    return buf[pos + 2:stop], stop


def _text(buf: bytes, pos: int, end: int, what: str) -> tuple[str, int]:
    """Section 1.5.3: a UTF-8 string with its two-byte length."""
    raw, stop = _binary(buf, pos, end)
    try:
        value = raw.decode()  # strict: refuses overlong forms and surrogates too
    except UnicodeDecodeError:
        raise ProtocolViolation(f"{what} is not well-formed UTF-8", "MQTT-1.5.3-1") from None
    if "\x00" in value:
        raise ProtocolViolation(f"{what} contains U+0000", "MQTT-1.5.3-2")
    return value, stop


def _topic_name(topic: str, what: str) -> None:
    """Section 4.7.3 and 3.3.2.1: a topic name is not empty and has no wildcard."""
    if not topic:
        raise ProtocolViolation(f"empty {what}", "MQTT-4.7.3-1")
    if "+" in topic or "#" in topic:
        raise ProtocolViolation(f"wildcard in {what} {topic!r}", "MQTT-3.3.2-2")


def _packet_id(buf: bytes, pos: int, end: int) -> int:
    packet_id = _u16(buf, pos, end)
    if not packet_id:
        raise ProtocolViolation("packet identifier 0", "MQTT-2.3.1-1")
    return packet_id


def _connect(flags: int, buf: bytes, pos: int, end: int) -> Connect:
    """Section 3.1."""
    name, pos = _text(buf, pos, end, "protocol name")
    if pos >= end:
        raise _overrun()
    level = buf[pos]
    if name == "MQIsdp":
        raise ConnectRefused(UNACCEPTABLE_PROTOCOL_VERSION, "MQTT 3.1 (MQIsdp) is not supported", "MQTT-3.1.2-2")
    if name != "MQTT":
        raise ProtocolViolation(f"protocol name {name!r}", "MQTT-3.1.2-1")
    if level != 4:
        raise ConnectRefused(UNACCEPTABLE_PROTOCOL_VERSION, f"protocol level {level} (only 4)", "MQTT-3.1.2-2")
    if pos + 4 > end:
        raise _overrun()
    connect_flags, keepalive = buf[pos + 1], buf[pos + 2] << 8 | buf[pos + 3]
    _check_connect_flags(connect_flags)
    client_id, pos = _text(buf, pos + 4, end, "client id")  # [MQTT-3.1.3-4]
    will = None
    if connect_flags & 0x04:
        # [MQTT-3.1.2-9]: the will topic and message MUST be present; the will topic is
        # published like a PUBLISH topic name, so it must be one (section 4.7.3).
        topic, pos = _text(buf, pos, end, "will topic")
        _topic_name(topic, "will topic")
        message, pos = _binary(buf, pos, end)
        will = Will(topic, message, (connect_flags >> 3) & 0x03, bool(connect_flags & 0x20))
    username = password = None
    if connect_flags & 0x80:
        username, pos = _text(buf, pos, end, "user name")  # [MQTT-3.1.3-11]
    if connect_flags & 0x40:
        password, pos = _binary(buf, pos, end)
    if pos != end:
        raise ProtocolViolation("bytes after the last field the CONNECT flags announce", "section 3.1.3, 4.8")
    clean = bool(connect_flags & 0x02)
    if not client_id and not clean:
        raise ConnectRefused(IDENTIFIER_REJECTED, "empty client id with clean_session=0", "MQTT-3.1.3-8")
    return Connect(client_id, clean, keepalive, username, password, will)


def _check_connect_flags(flags: int) -> None:
    """Section 3.1.2.3: the connect flags byte."""
    if flags & 0x01:
        raise ProtocolViolation("CONNECT reserved flag is set", "MQTT-3.1.2-3")
    will, will_qos, will_retain = flags & 0x04, (flags >> 3) & 0x03, flags & 0x20
    if not will and will_qos:
        raise ProtocolViolation("will QoS without will flag", "MQTT-3.1.2-13")
    if not will and will_retain:
        raise ProtocolViolation("will retain without will flag", "MQTT-3.1.2-15")
    if will_qos == 3:
        raise ProtocolViolation("will QoS 3", "MQTT-3.1.2-14")
    if flags & 0x40 and not flags & 0x80:
        raise ProtocolViolation("password flag without user name flag", "MQTT-3.1.2-22")


def _connack(flags: int, buf: bytes, pos: int, end: int) -> ConnAck:
    if end - pos != 2 or buf[pos] & 0xFE:
        raise ProtocolViolation("CONNACK with a body other than 2 bytes, or reserved bits set", "section 3.2")
    return ConnAck(buf[pos + 1], bool(buf[pos]))


def _publish(flags: int, buf: bytes, pos: int, end: int) -> Publish:
    """Section 3.3."""
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise ProtocolViolation("PUBLISH with QoS 3", "MQTT-3.3.1-4")
    dup = bool(flags & 0x08)
    if dup and not qos:
        raise ProtocolViolation("PUBLISH QoS 0 with DUP set", "MQTT-3.3.1-2")
    # The hot path: the topic read inline ([MQTT-3.3.2-1]; _text's rules, and _topic_name's).
    if pos + 2 > end:
        raise _overrun()
    stop = pos + 2 + (buf[pos] << 8 | buf[pos + 1])
    if stop > end:
        raise _overrun()
    try:
        topic = buf[pos + 2:stop].decode()
    except UnicodeDecodeError:
        raise ProtocolViolation("topic name is not well-formed UTF-8", "MQTT-1.5.3-1") from None
    if not topic or "+" in topic or "#" in topic or "\x00" in topic:
        if "\x00" in topic:
            raise ProtocolViolation("topic name contains U+0000", "MQTT-1.5.3-2")
        _topic_name(topic, "topic name")
    if qos:
        if stop + 2 > end:
            raise _overrun()
        packet_id = buf[stop] << 8 | buf[stop + 1]
        if not packet_id:
            raise ProtocolViolation("packet identifier 0", "MQTT-2.3.1-1")
        return Publish(topic, buf[stop + 2:end], qos, bool(flags & 0x01), dup, packet_id)
    return Publish(topic, buf[stop:end], qos, bool(flags & 0x01), dup, None)


def _ack(make: Callable[[int], Packet]) -> Callable[[int, bytes, int, int], Packet]:
    """PUBACK, PUBREC, PUBREL, PUBCOMP, UNSUBACK: a packet id and nothing else (sections 3.4-3.7, 3.11)."""

    def decode_ack(flags: int, buf: bytes, pos: int, end: int) -> Packet:
        if end - pos != 2:
            raise ProtocolViolation(f"remaining length {end - pos}, not 2", "section 3.4-3.7, 3.11")
        return make(buf[pos] << 8 | buf[pos + 1])

    return decode_ack


def _subscribe(flags: int, buf: bytes, pos: int, end: int) -> Subscribe:
    """Section 3.8."""
    packet_id = _packet_id(buf, pos, end)
    pos += 2
    filters = []
    while pos < end:
        topic_filter, pos = _text(buf, pos, end, "topic filter")  # [MQTT-3.8.3-1]
        if not topic_filter:
            raise ProtocolViolation("empty topic filter", "MQTT-4.7.3-1")
        if pos >= end:
            raise _overrun()
        options = buf[pos]
        pos += 1
        if options & 0xFC or options & 0x03 == 3:
            raise ProtocolViolation(f"requested QoS byte {options:#x}", "MQTT-3-8.3-4")
        filters.append((topic_filter, options))
    if not filters:
        raise ProtocolViolation("SUBSCRIBE without a topic filter", "MQTT-3.8.3-3")
    return Subscribe(packet_id, tuple(filters))


def _suback(flags: int, buf: bytes, pos: int, end: int) -> SubAck:
    packet_id = _u16(buf, pos, end)
    codes = tuple(buf[pos + 2:end])
    if not codes or any(code not in (0, 1, 2, SUBACK_FAILURE) for code in codes):
        raise ProtocolViolation("SUBACK without return codes or with a reserved one", "MQTT-3.9.3-2")
    return SubAck(packet_id, codes)


def _unsubscribe(flags: int, buf: bytes, pos: int, end: int) -> Unsubscribe:
    """Section 3.10."""
    packet_id = _packet_id(buf, pos, end)
    pos += 2
    filters = []
    while pos < end:
        topic_filter, pos = _text(buf, pos, end, "topic filter")
        if not topic_filter:
            raise ProtocolViolation("empty topic filter", "MQTT-4.7.3-1")
        filters.append(topic_filter)
    if not filters:
        raise ProtocolViolation("UNSUBSCRIBE without a topic filter", "MQTT-3.10.3-2")
    return Unsubscribe(packet_id, tuple(filters))


def _empty(make: Callable[[], Packet]) -> Callable[[int, bytes, int, int], Packet]:
    """PINGREQ, PINGRESP, DISCONNECT: no body (sections 3.12-3.14)."""

    def decode_empty(flags: int, buf: bytes, pos: int, end: int) -> Packet:
        if end != pos:
            raise ProtocolViolation(f"{make.__name__} with a body", "MQTT-2.2.2-2, section 3.12-3.14")
        return make()

    return decode_empty


def _reserved(flags: int, buf: bytes, pos: int, end: int) -> Packet:
    raise ProtocolViolation("reserved packet type", "section 2.2.1")


_DECODERS: tuple[Callable[[int, bytes, int, int], Packet], ...] = (
    _reserved, _connect, _connack, _publish, _ack(PubAck), _ack(PubRec), _ack(PubRel), _ack(PubComp), _subscribe,
    _suback, _unsubscribe, _ack(UnsubAck), _empty(PingReq), _empty(PingResp), _empty(Disconnect), _reserved,
)
