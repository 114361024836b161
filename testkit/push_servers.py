"""Local stand-ins for FCM (with Google's OAuth token endpoint), APNs and a Web Push service, for
the provider tests. Each checks a request the way the real service does (path, headers, the JWT's
signature against the PUBLIC key and its claims, HTTP/2 for APNs, the Web Push body decrypted with
the subscription's private key) and answers it: from ``script`` (canned replies, in order) once
the request passed, else success. What a check found wrong is answered as the service would and
kept in ``faults``: a test asserts it empty. Serve one with ``testkit.https_server.HttpsServer``.

Time is the test's ``Clock`` (shared with the provider), so token lifetimes can be stepped over."""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from providers.push.webpush import content_keys
from testkit.https_server import Reply, Request


@dataclass
class Clock:
    now: float = field(default_factory=lambda: float(int(time.time())))  # whole seconds: exact TTLs

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def verify_jwt(token: str, key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, claims) of a compact JWT whose signature ``key`` verifies (RS256 or ES256, by the
    key's type, and the header must say so); ValueError otherwise."""
    try:
        head, body, signature = token.split(".")
        header, claims = json.loads(unb64(head)), json.loads(unb64(body))
        signed, raw = f"{head}.{body}".encode(), unb64(signature)
        if isinstance(key, rsa.RSAPublicKey):
            if header.get("alg") != "RS256":
                raise ValueError("alg is not RS256")
            key.verify(raw, signed, padding.PKCS1v15(), hashes.SHA256())
        else:
            if header.get("alg") != "ES256" or len(raw) != 64:
                raise ValueError("alg is not ES256 with a 64-byte signature")
            der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
            key.verify(der, signed, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise ValueError("bad signature") from None
    except (TypeError, KeyError, AttributeError, json.JSONDecodeError) as exc:
        raise ValueError(f"malformed JWT: {exc}") from None
    return header, claims


class FakeService:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.script: list[Reply] = []  # answers to the next accepted requests, before success
        self.faults: list[str] = []

    def fault(self, what: str, reply: Reply) -> Reply:
        self.faults.append(what)
        return reply

    def scripted(self, success: Reply) -> Reply:
        return self.script.pop(0) if self.script else success


def fcm_error(status: int, grpc: str, code: str = "") -> Reply:
    details = [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}] if code else []
    return Reply.json(status, {"error": {"code": status, "message": grpc, "status": grpc, "details": details}})


class FakeFcm(FakeService):
    """FCM HTTP v1 at ``/v1/projects/{project}/messages:send`` and the OAuth2 token endpoint at
    ``/token`` (the service account file's ``token_uri``)."""

    SCOPE = "https://www.googleapis.com/auth/firebase.messaging"

    def __init__(self, clock: Clock, project_id: str, client_email: str, public_key: rsa.RSAPublicKey,
                 *, token_lifetime_s: int = 3600) -> None:
        super().__init__(clock)
        self.project_id, self.client_email, self.public_key = project_id, client_email, public_key
        self.token_lifetime_s = token_lifetime_s
        self.token_uri = ""  # set once the server's port is known
        self.token_script: list[Reply] = []
        self.access_tokens: dict[str, float] = {}  # issued -> expires at
        self.messages: list[dict[str, Any]] = []  # accepted message bodies
        self._serial = itertools.count(1)

    def revoke_all(self) -> None:
        self.access_tokens.clear()

    async def handle(self, request: Request) -> Reply:
        if request.path == "/token":
            return self._token(request)
        if request.path != f"/v1/projects/{self.project_id}/messages:send" or request.method != "POST":
            return self.fault(f"unknown {request.method} {request.path}", fcm_error(404, "NOT_FOUND"))
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
        if self.access_tokens.get(bearer, 0.0) <= self.clock():
            return fcm_error(401, "UNAUTHENTICATED")  # expired or revoked: the client's to handle
        try:
            msg = json.loads(request.body)["message"]
            android = msg["android"]
            ok = (isinstance(msg["token"], str) and all(isinstance(v, str) for v in msg["data"].values())
                  and android["priority"] == "HIGH" and re.fullmatch(r"\d+(\.\d{1,9})?s", android["ttl"])
                  and isinstance(android["collapse_key"], str))
        except (ValueError, KeyError, TypeError, AttributeError):
            ok = False
        if not ok or request.headers.get("content-type") != "application/json":
            return self.fault(f"invalid message {request.body!r}", fcm_error(400, "INVALID_ARGUMENT"))
        self.messages.append(msg)
        return self.scripted(Reply.json(200, {"name": f"projects/{self.project_id}/messages/{next(self._serial)}"}))

    def _token(self, request: Request) -> Reply:
        form = {k: v[0] for k, v in parse_qs(request.body.decode()).items()}
        invalid = Reply.json(400, {"error": "invalid_grant", "error_description": "Invalid JWT"})
        if request.headers.get("content-type") != "application/x-www-form-urlencoded":
            return self.fault("token request is not a form", invalid)
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return self.fault(f"grant_type {form.get('grant_type')}", invalid)
        try:
            _, claims = verify_jwt(form.get("assertion", ""), self.public_key)
        except ValueError as exc:
            return self.fault(f"assertion: {exc}", invalid)
        now = self.clock()
        if (claims.get("iss") != self.client_email or claims.get("aud") != self.token_uri
                or self.SCOPE not in str(claims.get("scope", "")).split()
                or not claims["iat"] - 300 <= now <= claims["exp"] or claims["exp"] - claims["iat"] > 3600):
            return self.fault(f"assertion claims {claims}", invalid)
        if self.token_script:
            return self.token_script.pop(0)
        token = f"ya29.test-{next(self._serial)}"
        self.access_tokens[token] = now + self.token_lifetime_s
        return Reply.json(200, {"access_token": token, "expires_in": self.token_lifetime_s, "token_type": "Bearer"})


def apns_error(status: int, reason: str, headers: dict[str, str] | None = None) -> Reply:
    return Reply.json(status, {"reason": reason}, headers)


class FakeApns(FakeService):
    """APNs ``/3/device/{token}`` with token authentication, HTTP/2 only."""

    def __init__(self, clock: Clock, team_id: str, key_id: str, public_key: ec.EllipticCurvePublicKey,
                 topic: str) -> None:
        super().__init__(clock)
        self.team_id, self.key_id, self.public_key, self.topic = team_id, key_id, public_key, topic
        self.provider_tokens: list[str] = []  # distinct, in the order first seen
        self.pushes: list[tuple[dict[str, str], dict[str, Any]]] = []  # accepted (headers, payload)

    async def handle(self, request: Request) -> Reply:
        if request.http_version != "HTTP/2":
            return self.fault("not HTTP/2", apns_error(400, "BadRequest"))
        match = re.fullmatch(r"/3/device/([0-9a-fA-F]{64,200})", request.path)
        if request.method != "POST" or match is None:
            return self.fault(f"bad path {request.method} {request.path}", apns_error(400, "BadPath"))
        token = request.headers.get("authorization", "").removeprefix("bearer ")
        try:
            header, claims = verify_jwt(token, self.public_key)
        except ValueError as exc:
            return self.fault(f"provider token: {exc}", apns_error(403, "InvalidProviderToken"))
        if header.get("kid") != self.key_id or claims.get("iss") != self.team_id:
            return self.fault(f"provider token {header} {claims}", apns_error(403, "InvalidProviderToken"))
        if self.clock() - claims["iat"] > 3600:
            return self.fault("provider token older than an hour", apns_error(403, "ExpiredProviderToken"))
        if token not in self.provider_tokens:
            self.provider_tokens.append(token)
        problem = self._check(request.headers, request.body)
        if problem:
            return self.fault(problem, apns_error(400, "BadRequest"))
        self.pushes.append((request.headers, json.loads(request.body)))
        return self.scripted(Reply(200, {"apns-id": "3f4a0b0e-0000-4000-8000-000000000000"}))

    def _check(self, headers: dict[str, str], body: bytes) -> str:
        if headers.get("apns-topic") != self.topic:
            return f"apns-topic {headers.get('apns-topic')}"
        if len(body) > 4096:
            return "payload over 4096 bytes"
        if not headers.get("apns-expiration", "").isdigit() or len(headers.get("apns-collapse-id", "")) > 64:
            return "apns-expiration or apns-collapse-id"
        aps = json.loads(body).get("aps", {})
        kind, priority = headers.get("apns-push-type"), headers.get("apns-priority")
        if kind == "background" and (priority != "5" or aps.get("content-available") != 1 or "alert" in aps):
            return f"background push with priority {priority} and aps {aps}"
        if kind == "alert" and (priority not in ("5", "10") or "alert" not in aps):
            return f"alert push with priority {priority} and aps {aps}"
        return "" if kind in ("background", "alert") else f"apns-push-type {kind}"


@dataclass(frozen=True)
class Subscriber:
    """A browser's push subscription: its keys, and what its service worker would decrypt."""

    endpoint: str
    key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    auth: bytes = field(default_factory=lambda: os.urandom(16))

    @property
    def public(self) -> bytes:
        return self.key.public_key().public_bytes(serialization.Encoding.X962,
                                                  serialization.PublicFormat.UncompressedPoint)

    def subscription(self) -> str:
        keys = {"p256dh": base64.urlsafe_b64encode(self.public).rstrip(b"=").decode(),
                "auth": base64.urlsafe_b64encode(self.auth).rstrip(b"=").decode()}
        return json.dumps({"endpoint": self.endpoint, "keys": keys})

    def decrypt(self, body: bytes) -> bytes:
        """RFC 8291 as a browser does it: header, ECDH with our key, one record, padding removed."""
        salt, rs, idlen = body[:16], int.from_bytes(body[16:20], "big"), body[20]
        sender, record = body[21:21 + idlen], body[21 + idlen:]
        if idlen != 65 or len(record) > rs or len(record) < 17:
            raise ValueError(f"bad aes128gcm header: idlen {idlen}, rs {rs}, record {len(record)}")
        secret = self.key.exchange(ec.ECDH(), ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), sender))
        cek, nonce = content_keys(secret, self.auth, self.public, sender, salt)
        padded = AESGCM(cek).decrypt(nonce, record, None).rstrip(b"\x00")
        if not padded.endswith(b"\x02"):
            raise ValueError("no last-record delimiter")
        return padded[:-1]


class FakeWebPush(FakeService):
    """A push service (RFC 8030) for subscribers at ``/push/{id}``, requiring VAPID (RFC 8292) with
    ``vapid_public`` (what the browser subscribed with, the applicationServerKey)."""

    def __init__(self, clock: Clock, vapid_public: bytes) -> None:
        super().__init__(clock)
        self.vapid_public = vapid_public
        self.origin = ""  # set once the server's port is known
        self.subscribers: dict[str, Subscriber] = {}
        self.received: list[tuple[dict[str, str], bytes]] = []  # (headers, decrypted payload)
        self.jwts: list[str] = []  # distinct, in the order first seen

    def subscribe(self, name: str) -> Subscriber:
        self.subscribers[name] = Subscriber(f"{self.origin}/push/{name}")
        return self.subscribers[name]

    async def handle(self, request: Request) -> Reply:
        subscriber = self.subscribers.get(request.path.removeprefix("/push/"))
        if request.method != "POST" or subscriber is None:
            return self.fault(f"unknown {request.method} {request.path}", Reply(404))
        vapid = dict(part.strip().split("=", 1) for part in
                     request.headers.get("authorization", "").removeprefix("vapid ").split(",") if "=" in part)
        try:
            if unb64(vapid.get("k", "")) != self.vapid_public:
                raise ValueError("k is not the subscription's applicationServerKey")
            key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), self.vapid_public)
            _, claims = verify_jwt(vapid.get("t", ""), key)
            now = self.clock()
            if claims.get("aud") != self.origin or not now < claims["exp"] <= now + 86400:
                raise ValueError(f"claims {claims}")
            if not str(claims.get("sub", "")).startswith(("mailto:", "https:")):
                raise ValueError(f"sub {claims.get('sub')}")
        except (ValueError, KeyError, TypeError) as exc:
            return self.fault(f"VAPID: {exc}", Reply(403))
        if vapid["t"] not in self.jwts:
            self.jwts.append(vapid["t"])
        headers = request.headers
        if not headers.get("ttl", "").isdigit() or headers.get("content-encoding") != "aes128gcm":
            return self.fault("TTL or Content-Encoding", Reply(400))
        if headers.get("urgency", "normal") not in ("very-low", "low", "normal", "high"):
            return self.fault("Urgency", Reply(400))
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", headers.get("topic", "x")):
            return self.fault("Topic", Reply(400))
        if len(request.body) > 4096:
            return self.fault("body over 4096 bytes", Reply(413))
        try:
            self.received.append((headers, subscriber.decrypt(request.body)))
        except (ValueError, InvalidTag) as exc:
            return self.fault(f"decrypt: {exc!r}", Reply(400))
        return self.scripted(Reply(201, {"location": f"{self.origin}/message/{len(self.received)}"}))
