"""Web Push (issue #18): RFC 8030 delivery, the payload encrypted for the browser's subscription
(RFC 8291, aes128gcm) and the sender identified by VAPID (RFC 8292, an ES256 JWT per push
service). Written on ``cryptography`` rather than pywebpush, which brings requests and aiohttp and
sends synchronously or through its own session (docs/PUSH-PROVIDERS.md)."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from bridge.push.provider import Outcome, PushResult, PushTarget, WakeUp
from providers.push import common, jws

RECORD_SIZE = 4096  # one record: push services take at least 4096 bytes of body (RFC 8030 7.2)
HEADER_SIZE = 16 + 4 + 1 + 65  # salt, rs, idlen, the sender's public key (RFC 8291 4)
MAX_PLAINTEXT = RECORD_SIZE - HEADER_SIZE - 1 - 16  # the padding delimiter and the GCM tag
VAPID_LIFETIME_S = 12 * 3600  # RFC 8292 allows at most 24 h
VAPID_RENEW_S = 3600  # a cached JWT is replaced when less than this is left
VAPID_CACHE = 64  # push services (origins) remembered; there are a handful in practice


@dataclass(frozen=True, slots=True)
class Subscription:
    endpoint: str
    origin: str  # the endpoint's origin (RFC 6454: lower-case host, no default port): VAPID's aud
    p256dh: bytes  # the browser's P-256 public key, uncompressed (65 bytes)
    auth: bytes  # its 16-byte authentication secret

    @classmethod
    def parse(cls, token: str) -> Subscription | None:
        """A PushSubscription's JSON ({"endpoint", "keys": {"p256dh", "auth"}}), or None."""
        try:
            data = json.loads(token)
            endpoint, keys = str(data["endpoint"]), data["keys"]
            p256dh, auth = jws.b64url_decode(str(keys["p256dh"])), jws.b64url_decode(str(keys["auth"]))
            url = httpx.URL(endpoint)
            if len(p256dh) != 65:  # uncompressed, as browsers give it
                return None
            ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), p256dh)  # on the curve
        except (ValueError, KeyError, TypeError, httpx.InvalidURL):
            return None
        if url.scheme != "https" or not url.host or url.userinfo or len(auth) != 16:
            return None
        return cls(endpoint, f"https://{url.netloc.decode('ascii')}", p256dh, auth)


def _hkdf(salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
    return HKDF(hashes.SHA256(), length, salt, info).derive(ikm)


def content_keys(
    ecdh_secret: bytes, auth: bytes, ua_public: bytes, as_public: bytes, salt: bytes
) -> tuple[bytes, bytes]:
    """(CEK, nonce) of RFC 8291 3.3-3.4 and RFC 8188 2.2-2.3 (one record, sequence number 0)."""
    ikm = _hkdf(auth, ecdh_secret, b"WebPush: info\x00" + ua_public + as_public, 32)
    return (_hkdf(salt, ikm, b"Content-Encoding: aes128gcm\x00", 16),
            _hkdf(salt, ikm, b"Content-Encoding: nonce\x00", 12))


def public_point(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The key's public half as Web Push writes it: the uncompressed point (65 bytes)."""
    return key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def encrypt(
    plaintext: bytes, ua_public: bytes, auth: bytes, *,
    as_key: ec.EllipticCurvePrivateKey | None = None, salt: bytes | None = None,
) -> bytes:
    """The aes128gcm body for a subscription: a fresh sender key and salt each time (given only by
    the RFC 8291 test vector), a single record ending in the 0x02 delimiter."""
    if len(plaintext) > MAX_PLAINTEXT:
        raise ValueError(f"{len(plaintext)} bytes do not fit one {RECORD_SIZE}-byte record")
    as_key = as_key or ec.generate_private_key(ec.SECP256R1())
    salt = salt or os.urandom(16)
    ua_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), ua_public)
    as_public = public_point(as_key)
    cek, nonce = content_keys(as_key.exchange(ec.ECDH(), ua_key), auth, ua_public, as_public, salt)
    header = salt + RECORD_SIZE.to_bytes(4, "big") + bytes([len(as_public)]) + as_public
    return header + AESGCM(cek).encrypt(nonce, plaintext + b"\x02", None)


def classify(response: httpx.Response, now: float) -> PushResult:
    # 413 (too large) and other 4xx (a VAPID fault) are REJECTED
    status = response.status_code
    return common.outcome(response, now, common.detail(response, response.reason_phrase),
                          sent=status in (200, 201, 202), gone=status in (404, 410))


def load_vapid_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    """A PEM P-256 key, or the raw base64url private key `web-push generate-vapid-keys` prints."""
    data = Path(path).read_bytes()
    if b"-----BEGIN" in data:
        return jws.load_p256_key(path)
    raw = data.strip()
    if not re.fullmatch(rb"[A-Za-z0-9_-]{43}", raw):  # 32 bytes, unpadded base64url
        raise ValueError(f"{path}: neither a PEM key nor a base64url P-256 private key")
    return ec.derive_private_key(int.from_bytes(jws.b64url_decode(raw.decode("ascii")), "big"), ec.SECP256R1())


class WebPushProvider:
    platform = "webpush"

    def __init__(
        self,
        *,
        vapid_private_key_file: str | Path,
        subject: str,
        verify: bool | str = True,
        timeout_s: float = common.DEFAULT_TIMEOUT_S,
        clock: Callable[[], float] = time.time,
        allow_loopback_endpoints: bool = False,
    ) -> None:
        if not subject.startswith(("mailto:", "https:")):
            raise ValueError("the VAPID subject must be a mailto: or https: URI (RFC 8292 2.1)")
        self._key = load_vapid_key(vapid_private_key_file)
        self.public_key = jws.b64url(public_point(self._key))  # the applicationServerKey browsers need
        self._subject = subject
        # The endpoint is a URL a client chose: connections go only to checked addresses.
        self._client = common.make_client(verify=verify, timeout_s=timeout_s,
                                          guard=common.EndpointGuard(allow_loopback_endpoints))
        self._clock = clock
        self._jwts: dict[str, tuple[str, float]] = {}  # origin -> (JWT, its exp)

    def vapid(self, origin: str) -> str:
        """The Authorization header for one push service, its JWT reused until an hour is left."""
        now = self._clock()
        jwt, exp = self._jwts.get(origin, ("", 0.0))
        if exp - now < VAPID_RENEW_S:
            if len(self._jwts) >= VAPID_CACHE:
                self._jwts.clear()
            exp = int(now) + VAPID_LIFETIME_S
            jwt = jws.sign(self._key, {"aud": origin, "exp": exp, "sub": self._subject})
            self._jwts[origin] = (jwt, exp)
        return f"vapid t={jwt}, k={self.public_key}"

    async def send(self, target: PushTarget, wake: WakeUp) -> PushResult:
        subscription = Subscription.parse(target.token)
        if subscription is None:
            return PushResult(Outcome.REJECTED, detail="not a Web Push subscription (https endpoint, p256dh, auth)")
        plaintext = common.payload(wake)
        if len(plaintext) > MAX_PLAINTEXT:
            return PushResult(Outcome.REJECTED, detail=f"payload of {len(plaintext)} bytes is over {MAX_PLAINTEXT}")
        now = self._clock()
        headers = {
            "authorization": self.vapid(subscription.origin),
            "content-encoding": "aes128gcm",
            "content-type": "application/octet-stream",
            "ttl": str(common.ttl_s(wake.expires_at_ms, now)),
            "urgency": "high",  # a wake-up the user waits for, even on a phone saving battery
            "topic": common.collapse_tag(wake.collapse_key),
        }
        body = encrypt(plaintext, subscription.p256dh, subscription.auth)
        response = await common.post(self._client, subscription.endpoint, headers=headers, content=body)
        if isinstance(response, PushResult):
            return response
        return classify(response, self._clock())

    async def close(self) -> None:
        await self._client.aclose()


def from_settings(settings: Mapping[str, Any]) -> WebPushProvider:
    return WebPushProvider(
        vapid_private_key_file=common.setting(settings, "vapid_private_key_file", str),
        subject=common.setting(settings, "subject", str),
        allow_loopback_endpoints=common.loopback_allowed(settings),
        **common.client_settings(settings),
    )
