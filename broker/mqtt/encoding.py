"""MQTT 3.1.1 packets to bytes (codec.py: the other way); the caller checks what MQTT asks of the values.

``encode`` takes any packet; ``encode_publish`` and ``encode_puback`` are the hot paths, used
as they are by the chat downlink (broker/downlink.py, broker/handler.py) and ServerConnection.
"""

from __future__ import annotations

import struct

from broker.mqtt.errors import LocalProtocolError
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
)

MAX_REMAINING_LENGTH = 268_435_455  # four bytes of seven bits (section 2.2.3)


def remaining_length(size: int) -> bytes:
    """Section 2.2.3: the variable-length size of what follows the fixed header."""
    if size < 128:
        return _BYTE[size]
    if size < 16_384:
        return bytes((size & 0x7F | 0x80, size >> 7))
    if size > MAX_REMAINING_LENGTH:
        raise LocalProtocolError(f"a packet body of {size} bytes is over MQTT's limit")
    out = bytearray()
    while True:
        size, digit = divmod(size, 128)
        out.append(digit | 0x80 if size else digit)
        if not size:
            return bytes(out)


_BYTE = tuple(bytes((value,)) for value in range(256))
_U16 = struct.Struct(">H").pack


def encode_publish(topic: bytes, payload: bytes, qos: int = 0, packet_id: int | None = None, retain: bool = False,
                   dup: bool = False) -> bytes:
    """A PUBLISH with a UTF-8 ``topic`` (section 3.3) and ``packet_id`` when ``qos`` > 0."""
    first = _BYTE[0x30 | qos << 1 | retain | dup << 3]
    if qos:
        if not packet_id:
            raise LocalProtocolError("a QoS 1/2 PUBLISH needs a packet id")
        return b"".join((first, remaining_length(len(topic) + len(payload) + 4), _U16(len(topic)), topic,
                         _U16(packet_id), payload))
    return b"".join((first, remaining_length(len(topic) + len(payload) + 2), _U16(len(topic)), topic, payload))


def encode_puback(packet_id: int) -> bytes:
    return bytes((0x40, 2, packet_id >> 8, packet_id & 0xFF))


def _utf8(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    if len(data) > 65535:
        raise LocalProtocolError("a string longer than 65,535 bytes")
    return len(data).to_bytes(2, "big") + data


def _frame(first: int, body: bytes) -> bytes:
    return bytes((first,)) + remaining_length(len(body)) + body


def _encode_connect(p: Connect) -> bytes:
    flags = 0x02 if p.clean_session else 0
    payload = _utf8(p.client_id)
    if p.will is not None:
        flags |= 0x04 | p.will.qos << 3 | (0x20 if p.will.retain else 0)
        payload += _utf8(p.will.topic) + _utf8(p.will.message)
    if p.username is not None:
        flags |= 0x80
        payload += _utf8(p.username)
    if p.password is not None:
        flags |= 0x40
        payload += _utf8(p.password)
    return _frame(0x10, _utf8("MQTT") + bytes((4, flags)) + p.keepalive.to_bytes(2, "big") + payload)


def _encode_subscribe(p: Subscribe) -> bytes:
    body = p.packet_id.to_bytes(2, "big") + b"".join(_utf8(f) + bytes((qos,)) for f, qos in p.filters)
    return _frame(0x82, body)


def _encode_unsubscribe(p: Unsubscribe) -> bytes:
    return _frame(0xA2, p.packet_id.to_bytes(2, "big") + b"".join(_utf8(f) for f in p.filters))


def encode(packet: Packet) -> bytes:
    """The bytes of any packet (the caller checks what MQTT asks of the values; see ServerConnection)."""
    match packet:
        case Publish():
            return encode_publish(packet.topic.encode(), packet.payload, packet.qos, packet.packet_id, packet.retain,
                                  packet.dup)
        case PubAck():
            return encode_puback(packet.packet_id)
        case Connect():
            return _encode_connect(packet)
        case ConnAck():
            return bytes((0x20, 2, packet.session_present, packet.code))
        case PubRec() | PubRel() | PubComp() | UnsubAck():
            return bytes((_ID_FIRST[type(packet)], 2, packet.packet_id >> 8, packet.packet_id & 0xFF))
        case Subscribe():
            return _encode_subscribe(packet)
        case SubAck():
            return _frame(0x90, packet.packet_id.to_bytes(2, "big") + bytes(packet.codes))
        case Unsubscribe():
            return _encode_unsubscribe(packet)
        case PingReq():
            return b"\xc0\x00"
        case PingResp():
            return b"\xd0\x00"
        case Disconnect():
            return b"\xe0\x00"


_ID_FIRST = {PubRec: 0x50, PubRel: 0x62, PubComp: 0x70, UnsubAck: 0xB0}
