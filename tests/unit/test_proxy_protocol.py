"""The PROXY header parser and X-Forwarded-For (broker/proxy_protocol.py), and the exact reads of broker/front.py."""

from __future__ import annotations

import asyncio
import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.front import read_proxy_header
from broker.proxy_protocol import (
    MAX_HEADER_BYTES,
    V2_SIGNATURE,
    NeedMore,
    ProxyHeader,
    ProxyHeaderError,
    TrustedProxies,
    forwarded_client,
    parse_proxy_header,
)

CONNECT = bytes.fromhex("101000044d5154540402003c0004746573740000")  # an MQTT CONNECT, as a client sends it


def v1(source: str, sport: int, dest: str = "10.0.0.1", dport: int = 1883) -> bytes:
    family = "TCP6" if ":" in source else "TCP4"
    return f"PROXY {family} {source} {dest} {sport} {dport}\r\n".encode()


def v2(source: str, sport: int, *, command: int = 1, tlvs: bytes = b"", family: int | None = None) -> bytes:
    ip = ipaddress.ip_address(source)
    dest = ipaddress.ip_address("10.0.0.1" if ip.version == 4 else "2001:db8::1")
    addresses = ip.packed + dest.packed + struct.pack("!HH", sport, 1883)
    fam = family if family is not None else (0x11 if ip.version == 4 else 0x21)
    body = addresses + tlvs
    return V2_SIGNATURE + bytes([0x20 | command, fam]) + struct.pack("!H", len(body)) + body


def parse_all(data: bytes) -> ProxyHeader:
    result = parse_proxy_header(data)
    assert isinstance(result, ProxyHeader), result
    return result


# --- v1 ---------------------------------------------------------------------------------


def test_v1_tcp4_and_tcp6() -> None:
    header = v1("192.0.2.7", 51000)
    assert parse_all(header + CONNECT) == ProxyHeader(len(header), ("192.0.2.7", 51000))
    header6 = v1("2001:db8::7", 443, dest="2001:db8::1")
    assert parse_all(header6) == ProxyHeader(len(header6), ("2001:db8::7", 443))


def test_v1_unknown_means_the_connection_itself() -> None:
    assert parse_all(b"PROXY UNKNOWN\r\n" + CONNECT) == ProxyHeader(15, None)
    assert parse_all(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n").source is None


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 192.0.2.7 10.0.0.1 051000 1883\r\n",  # leading zero
    b"PROXY TCP4 192.0.2.7 10.0.0.1 65536 1883\r\n",
    b"PROXY TCP4 192.0.2.7 10.0.0.1 +1 1883\r\n",
    b"PROXY TCP4 192.0.2.7 10.0.0.1 1 1883 extra\r\n",
    b"PROXY TCP4 192.0.2.7  10.0.0.1 1 1883\r\n",  # two spaces
    b"PROXY TCP4 2001:db8::7 10.0.0.1 1 1883\r\n",  # IPv6 in TCP4
    b"PROXY TCP6 192.0.2.7 2001:db8::1 1 1883\r\n",
    b"PROXY TCP4 192.0.2.300 10.0.0.1 1 1883\r\n",
    b"PROXY UDP4 192.0.2.7 10.0.0.1 1 1883\r\n",
    b"PROXY TCP4 192.0.2.7 10.0.0.1 1 1\xff83\r\n",
    b"PROXY \r\n",
])
def test_v1_bad_lines_are_refused(line: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(line)


def test_v1_without_end_is_refused_at_107_bytes() -> None:
    line = b"PROXY UNKNOWN " + b"x" * 92  # 106 bytes, no CRLF yet
    assert parse_proxy_header(line) == NeedMore(1)
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(line + b"x")
    assert parse_proxy_header(line[:-1] + b"\r") == NeedMore(1)  # the CR may be the 106th byte
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(b"PROXY TCP4 1.2.3.4\n")  # a bare LF: not printable, refused before 107


# --- v2 ---------------------------------------------------------------------------------


def test_v2_inet_inet6_and_mapped() -> None:
    header = v2("192.0.2.7", 51000)
    assert parse_all(header + CONNECT) == ProxyHeader(28, ("192.0.2.7", 51000))
    assert parse_all(v2("2001:db8::7", 1)) == ProxyHeader(52, ("2001:db8::7", 1))
    # An IPv4 client on a dual-stack balancer: one key per client for the per-address limits.
    assert parse_all(v2("::ffff:192.0.2.7", 2)).source == ("192.0.2.7", 2)


def test_v2_tlvs_are_skipped() -> None:
    tlvs = b"\x04\x00\x03abc" + b"\x05\x00\x10" + bytes(16)  # NOOP, UNIQUE_ID
    header = v2("192.0.2.7", 9, tlvs=tlvs)
    assert parse_all(header + CONNECT) == ProxyHeader(len(header), ("192.0.2.7", 9))


def test_v2_local_and_unspec_mean_the_connection_itself() -> None:
    assert parse_all(v2("192.0.2.7", 9, command=0)).source is None
    local = V2_SIGNATURE + b"\x20\x00\x00\x00"  # HAProxy's health check: LOCAL, UNSPEC, no addresses
    assert parse_all(local + CONNECT) == ProxyHeader(16, None)
    assert parse_all(V2_SIGNATURE + b"\x21\x00\x00\x00").source is None


@pytest.mark.parametrize("header", [
    V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12),  # version 1 in a v2 signature
    V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12),  # command 2
    V2_SIGNATURE + b"\x21\x41\x00\x0c" + bytes(12),  # family 4
    V2_SIGNATURE + b"\x21\x13\x00\x0c" + bytes(12),  # transport 3
    V2_SIGNATURE + b"\x21\x11\x00\x0b" + bytes(11),  # too short for IPv4
    V2_SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12),  # too short for IPv6
    V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12),  # a datagram source
    V2_SIGNATURE + b"\x21\x11\xff\xff",  # longer than MAX_HEADER_BYTES: refused before it is read
])
def test_v2_bad_headers_are_refused(header: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(header)


def test_v2_size_cap() -> None:
    fits = v2("192.0.2.7", 9, tlvs=b"\x04" + struct.pack("!H", MAX_HEADER_BYTES - 31) + bytes(MAX_HEADER_BYTES - 31))
    assert len(fits) == MAX_HEADER_BYTES and parse_all(fits).consumed == MAX_HEADER_BYTES
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(v2("192.0.2.7", 9, tlvs=bytes(MAX_HEADER_BYTES - 27)))


# --- anything else ----------------------------------------------------------------------


@pytest.mark.parametrize("first", [CONNECT[:1], b"\x16", b"G", b"\r\n\r\n\x01", b"PROXY\t", b"proxy "])
def test_other_protocols_are_refused_at_their_first_differing_byte(first: bytes) -> None:
    # A client speaking MQTT (or TLS, or HTTP) straight to the listener is refused before more is read.
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(first)


def test_need_more_never_reaches_past_the_header() -> None:
    for header in (v1("192.0.2.7", 1), b"PROXY UNKNOWN\r\n", v2("2001:db8::7", 1, tlvs=b"\x04\x00\x01x")):
        for cut in range(len(header)):
            step = parse_proxy_header(header[:cut])
            assert isinstance(step, NeedMore) and 1 <= step.at_least <= len(header) - cut


# --- property tests: any header, split anywhere; any bytes --------------------------------

addresses = st.one_of(
    st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None).map(str))
ports = st.integers(0, 65535)
headers = st.one_of(
    st.builds(lambda a, p: (v1(a, p, dest="10.0.0.1" if ":" not in a else "::1"), (a, p)), addresses, ports),
    st.builds(lambda a, p, t: (v2(a, p, tlvs=t), (a, p)), addresses, ports, st.binary(max_size=64)),
)


def _read_in_chunks(stream: bytes, sizes: list[int]) -> tuple[ProxyHeader, bytes]:
    """``read_proxy_header`` over a socket that returns at most the asked bytes, in ``sizes``-long pieces."""
    rest = bytearray(stream)
    sizes = list(sizes)

    async def recv(n: int) -> bytes:
        size = min(n, sizes.pop(0) if sizes else n)
        piece = bytes(rest[:size])
        del rest[:size]
        return piece

    return asyncio.run(read_proxy_header(recv)), bytes(rest)


@given(headers, st.binary(max_size=40), st.lists(st.integers(1, 200), max_size=200))
def test_any_header_in_any_pieces(header_and_source: tuple[bytes, tuple[str, int]], after: bytes,
                                  sizes: list[int]) -> None:
    header, source = header_and_source
    parsed, left = _read_in_chunks(header + after, sizes)
    assert parsed == ProxyHeader(len(header), source)
    assert left == after  # not one byte of the TLS handshake or CONNECT behind it was read


@given(st.binary(max_size=300))
def test_any_bytes_parse_or_refuse(data: bytes) -> None:
    try:
        result = parse_proxy_header(data)
    except ProxyHeaderError:
        return
    if isinstance(result, NeedMore):
        assert result.at_least >= 1 and len(data) + result.at_least <= MAX_HEADER_BYTES
    else:
        assert 0 < result.consumed <= min(len(data), MAX_HEADER_BYTES)


@given(headers, st.integers(0, 200))
def test_truncated_headers_end_in_a_refusal(header_and_source: tuple[bytes, tuple[str, int]], cut: int) -> None:
    header = header_and_source[0][:cut]
    if len(header) == len(header_and_source[0]):
        return
    with pytest.raises(ProxyHeaderError):
        _read_in_chunks(header, [])  # the peer closes after a part of it


# --- trusted proxies and X-Forwarded-For -------------------------------------------------


def test_trusted_proxies() -> None:
    trusted = TrustedProxies(["10.0.0.0/8", "127.0.0.1", "2001:db8::/32"])
    assert "10.1.2.3" in trusted and "127.0.0.1" in trusted and "2001:db8::5" in trusted
    assert "::ffff:10.1.2.3" in trusted  # a dual-stack socket's spelling of an IPv4 peer
    assert "127.0.0.2" not in trusted and "11.0.0.1" not in trusted and "fe80::1%eth0" not in trusted
    assert "not an address" not in trusted and None not in trusted
    assert not TrustedProxies([])


def test_forwarded_client_reads_from_the_right_past_trusted_proxies() -> None:
    trusted = TrustedProxies(["10.0.0.0/8"])
    assert forwarded_client(["203.0.113.9"], trusted) == "203.0.113.9"
    # The client wrote a header of its own; the proxy appended the address it came from.
    assert forwarded_client(["1.1.1.1, 203.0.113.9"], trusted) == "203.0.113.9"
    assert forwarded_client(["garbage", "203.0.113.9, 10.0.0.2"], trusted) == "203.0.113.9"
    assert forwarded_client(["10.0.0.3, 10.0.0.2"], trusted) == "10.0.0.3"  # every hop a proxy
    assert forwarded_client(["::ffff:203.0.113.9"], trusted) == "203.0.113.9"
    assert forwarded_client([], trusted) is None
    assert forwarded_client(["203.0.113.9, garbage"], trusted) is None
    assert forwarded_client([""], trusted) is None
