"""Who the client behind a load balancer is: the PROXY protocol header and X-Forwarded-For (pure: no I/O).

A TCP load balancer (HAProxy, nginx stream) connects to the broker from its own address. With
``send-proxy-v2`` (HAProxy) or ``proxy_protocol on`` (nginx) it first writes one header naming
the client's address: HAProxy's PROXY protocol, v1 (a text line) or v2 (binary), as specified in
https://www.haproxy.org/download/2.6/doc/proxy-protocol.txt. ``parse_proxy_header`` reads it from
the bytes received so far; the caller reads exactly the bytes it asks for, so nothing after the
header (the TLS handshake or the MQTT CONNECT) is consumed. For WebSocket behind an HTTP proxy,
``forwarded_client`` reads X-Forwarded-For instead.

Only ``TrustedProxies`` may speak for a client: the caller refuses a header from any other peer.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX_BYTES = 107
"""The spec's longest v1 line, CRLF included."""
MAX_HEADER_BYTES = 2048
"""A v2 header (with its TLVs) longer than this is refused: HAProxy's are well under 300 bytes."""

_V2_FIXED = 16  # signature, version/command, family/transport, length
_LOCAL, _PROXY = 0x0, 0x1
_UNSPEC, _INET, _INET6, _UNIX = 0x0, 0x1, 0x2, 0x3
_STREAM = 0x1
_V2_ADDRESS_BYTES = {_UNSPEC: 0, _INET: 12, _INET6: 36, _UNIX: 216}

Address = tuple[str, int]


class ProxyHeaderError(ValueError):
    """The bytes are not a valid PROXY protocol header; the connection is refused."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    consumed: int
    """The header's length: the connection's own bytes start after it."""
    source: Address | None
    """The client's (address, port); None for a LOCAL or UNKNOWN header (the proxy's own
    connection, e.g. a health check): the connection's peer is then the client."""


@dataclass(frozen=True, slots=True)
class NeedMore:
    at_least: int
    """Bytes that are surely still part of the header: read exactly these, never past its end."""


def parse_proxy_header(data: bytes) -> ProxyHeader | NeedMore:
    """The header at the start of ``data``, or how much more to read; raises ``ProxyHeaderError``.

    Bytes that cannot start a header are refused at once (a client that speaks MQTT straight to
    the listener is told at its first byte), so a peer cannot hold the connection by sending
    garbage; it can only be slow, which the caller's deadline bounds.
    """
    if not data:
        return NeedMore(1)
    if data[:len(V2_SIGNATURE)] == V2_SIGNATURE[:len(data)]:
        return _parse_v2(data)
    if data[:len(V1_PREFIX)] == V1_PREFIX[:len(data)]:
        return _parse_v1(data)
    raise ProxyHeaderError("no PROXY protocol header")


def _parse_v1(data: bytes) -> ProxyHeader | NeedMore:
    if len(data) < len(V1_PREFIX):
        return NeedMore(len(V1_PREFIX) - len(data))
    end = data.find(b"\r\n", 0, V1_MAX_BYTES)
    if end < 0:
        head = data[:V1_MAX_BYTES]
        if len(head) >= V1_MAX_BYTES or not _printable(head.removesuffix(b"\r")):
            raise ProxyHeaderError("PROXY v1 line longer than 107 bytes or not printable")
        return NeedMore(1)  # the line's end is unknown: one byte at a time (it is buffered anyway)
    line = data[:end]
    if not _printable(line):
        raise ProxyHeaderError("PROXY v1 line not printable")
    fields = line.decode("ascii").split(" ")
    if fields[1] == "UNKNOWN":
        return ProxyHeader(end + 2, None)  # the rest of the line is to be ignored (spec 2.1)
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError(f"PROXY v1: bad line {line[:60]!r}")
    version = 4 if fields[1] == "TCP4" else 6
    source = _ip(fields[2], version)
    _ip(fields[3], version), _port(fields[5])  # the destination: checked, not used (the broker knows its own)
    return ProxyHeader(end + 2, (source, _port(fields[4])))


def _printable(data: bytes) -> bool:
    return all(0x20 <= byte < 0x7F for byte in data)


def _ip(text: str, version: int) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyHeaderError(f"PROXY v1: {text[:40]!r} is not an IP address") from None
    if address.version != version:
        raise ProxyHeaderError(f"PROXY v1: {text!r} is not an IPv{version} address")
    return _canonical(address)


def _port(text: str) -> int:
    # Decimal, 0..65535, no leading zero (spec 2.1); int() alone would take "+1", " 1", "1_0".
    if not text.isdigit() or not text.isascii() or (len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise ProxyHeaderError(f"PROXY v1: bad port {text[:10]!r}")
    return int(text)


def _parse_v2(data: bytes) -> ProxyHeader | NeedMore:
    if len(data) < _V2_FIXED:
        return NeedMore(_V2_FIXED - len(data))
    version_command, family_transport, length = struct.unpack_from("!BBH", data, len(V2_SIGNATURE))
    version, command = version_command >> 4, version_command & 0xF
    family, transport = family_transport >> 4, family_transport & 0xF
    if version != 2 or command not in (_LOCAL, _PROXY):
        raise ProxyHeaderError(f"PROXY v2: version/command byte {version_command:#04x}")
    if family not in _V2_ADDRESS_BYTES or transport > 2:
        raise ProxyHeaderError(f"PROXY v2: family/transport byte {family_transport:#04x}")
    total = _V2_FIXED + length
    if total > MAX_HEADER_BYTES:
        raise ProxyHeaderError(f"PROXY v2: header of {total} bytes (at most {MAX_HEADER_BYTES})")
    if length < _V2_ADDRESS_BYTES[family]:
        raise ProxyHeaderError(f"PROXY v2: {length} bytes cannot hold the addresses of family {family}")
    if len(data) < total:
        return NeedMore(total - len(data))
    # LOCAL: the proxy's own connection; UNSPEC and UNIX sources mean nothing here. The receiver
    # then uses the connection's real endpoints (spec 2.2). TLVs after the addresses are skipped.
    if command == _LOCAL or family in (_UNSPEC, _UNIX):
        return ProxyHeader(total, None)
    if transport != _STREAM:
        raise ProxyHeaderError("PROXY v2: a datagram source on a stream connection")
    if family == _INET:
        source: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(data[16:20])
        (port,) = struct.unpack_from("!H", data, 24)
    else:
        source = ipaddress.IPv6Address(data[16:32])
        (port,) = struct.unpack_from("!H", data, 48)
    return ProxyHeader(total, (_canonical(source), port))


def _canonical(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """One spelling per client: an IPv4-mapped IPv6 address is its IPv4 address (one per-address key)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


class TrustedProxies:
    """The networks (CIDRs) whose connections may name another client address."""

    def __init__(self, cidrs: Iterable[str]) -> None:
        self._networks = tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, str):
            return False
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 peer may carry a zone
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == net.version and ip in net for net in self._networks)

    def __bool__(self) -> bool:
        return bool(self._networks)


def forwarded_client(values: Sequence[str], trusted: TrustedProxies) -> str | None:
    """The client's address from the X-Forwarded-For headers a trusted proxy passed on, or None.

    Each proxy appends the address it was connected from, so the list is read from the right,
    past the trusted proxies: the first other address is the client (what is left of it, the
    client could have written itself). None if there is no header or that hop is not an address.
    """
    hops = [hop.strip() for value in values for hop in value.split(",")]
    if not hops:
        return None
    for hop in reversed(hops):
        try:
            address = _canonical(ipaddress.ip_address(hop))
        except ValueError:
            return None
        if address not in trusted:
            return address
    return _canonical(ipaddress.ip_address(hops[0]))  # every hop a proxy: the first is the client
