"""A local HTTPS server on 127.0.0.1 for tests of clients of external services (the push providers):
TLS with a throwaway CA made here, ALPN ``h2`` and/or ``http/1.1`` (HTTP/2 served with the ``h2``
library, HTTP/1.1 by hand), each request handed whole to an async handler that answers it.

``make_tls(dir)`` writes the CA (the client's ``verify``) and a certificate for 127.0.0.1;
``HttpsServer(handler, tls, alpn=...)`` serves until ``close()``. A server without ``h2`` answers an
HTTP/2 preface with 505 and keeps it in ``refused`` (a client that must not fall back to HTTP/1.1)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

READ_CHUNK = 65536


@dataclass(frozen=True, slots=True)
class Tls:
    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self, alpn: tuple[str, ...]) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        context.set_alpn_protocols(list(alpn))
        return context


def pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    """A private key as PKCS#8 PEM (a .p8 file's form)."""
    encoding, pkcs8 = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    return key.private_bytes(encoding, pkcs8, serialization.NoEncryption())


def make_tls(directory: Path) -> Tls:
    """A CA and a server certificate for 127.0.0.1 and localhost, valid for a day, in ``directory``."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "push test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(san, critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    tls = Tls(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    tls.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    tls.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tls.key_file.write_bytes(pem(key))
    return tls


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names lower-case
    body: bytes
    http_version: str  # "HTTP/2" or "HTTP/1.1"


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @classmethod
    def json(cls, status: int, value: Any, headers: dict[str, str] | None = None) -> Reply:
        return cls(status, {"content-type": "application/json", **(headers or {})}, json.dumps(value).encode())


Handler = Callable[[Request], Awaitable[Reply]]


class HttpsServer:
    def __init__(self, handler: Handler, tls: Tls, *, alpn: tuple[str, ...] = ("h2", "http/1.1")) -> None:
        self._handler, self._context = handler, tls.server_context(alpn)
        self.requests: list[Request] = []
        self.refused: list[str] = []  # request lines answered 505 (an HTTP/2 preface to HTTP/1.1)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections = 0  # accepted so far
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def start(self) -> HttpsServer:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, ssl=self._context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()

    async def _answer(self, request: Request) -> Reply:
        self.requests.append(request)
        return await self._handler(request)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # our own task, not asyncio's: close() cancels and awaits it
        self.connections += 1
        task = asyncio.create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        try:
            if ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
                await self._serve_h2(reader, writer)
            else:
                await self._serve_http1(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, ValueError):
            pass  # the client went away or spoke nonsense: its test sees the outcome
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()

    async def _serve_h2(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        streams: dict[int, tuple[dict[str, str], bytearray]] = {}
        while data := await reader.read(READ_CHUNK):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived) and event.stream_id is not None:
                    streams[event.stream_id] = ({str(k): str(v) for k, v in event.headers or []}, bytearray())
                elif isinstance(event, h2.events.DataReceived) and event.stream_id is not None:
                    streams[event.stream_id][1].extend(event.data or b"")
                    conn.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id is not None:
                    head, body = streams.pop(event.stream_id)
                    pseudo = {k: v for k, v in head.items() if k.startswith(":")}
                    headers = {k: v for k, v in head.items() if not k.startswith(":")}
                    request = Request(pseudo[":method"], pseudo[":path"], headers, bytes(body), "HTTP/2")
                    reply = await self._answer(request)
                    fields = [(":status", str(reply.status)), ("content-length", str(len(reply.body)))]
                    conn.send_headers(event.stream_id, fields + list(reply.headers.items()))
                    conn.send_data(event.stream_id, reply.body, end_stream=True)
                elif isinstance(event, h2.events.ConnectionTerminated):
                    return
            writer.write(conn.data_to_send())
            await writer.drain()

    async def _serve_http1(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            method, path, version = line.decode("latin-1").split()
            if version != "HTTP/1.1":
                self.refused.append(line.decode("latin-1").strip())
                writer.write(b"HTTP/1.1 505 Not Supported\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                await writer.drain()
                return
            headers: dict[str, str] = {}
            while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = header.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            reply = await self._answer(Request(method, path, headers, body, "HTTP/1.1"))
            head = [f"HTTP/1.1 {reply.status} -", f"content-length: {len(reply.body)}"]
            head += [f"{k}: {v}" for k, v in reply.headers.items()]
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + reply.body)
            await writer.drain()
