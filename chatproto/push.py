"""Push requests on ``u/{me}/req`` (docs/PROTOCOL.md section 12, "Push"): ``push.register`` as one
frozen dataclass with ``args()`` (what the SDK sends) and ``from_args`` (what the server reads;
``DecodeError`` ``bad_envelope`` naming the fault); ``push.unregister`` and ``push.pending`` take
no arguments.

Rules:
- ``platform`` is one of ``fcm``, ``apns``, ``webpush``, ``unifiedpush``; each takes its own
  argument and no other: ``fcm``: ``token`` (1-4096 of ``[A-Za-z0-9_:.-]``); ``apns``: ``token``
  (64-200 hex digits, an even number; kept lower-case); ``webpush``: ``subscription``
  ``{"endpoint", "keys": {"p256dh", "auth"}}`` as a browser's ``PushSubscription.toJSON()`` gives
  it (its ``expirationTime``, null or ms, is taken and not kept; ``p256dh`` an uncompressed P-256
  point, 65 bytes, ``auth`` 16 bytes, both base64url); ``unifiedpush``: ``endpoint``.
- Any platform may add ``preview_key`` (an X25519 public key, 32 bytes) with ``preview_sig`` (an
  Ed25519 signature, 64 bytes), both base64 or base64url, together or not at all: the key senders
  encrypt push previews to (section 12, "Previews"). The server does not check the signature; the
  senders' SDKs do (``preview_key_object`` is what is signed).
- An endpoint is an absolute ``https`` URL of at most 2048 characters, without user name,
  password or fragment, whose host is not an IP address the server must not be made to connect
  to (``address_refusal``: anything not globally routable, and multicast; an IPv4 address inside
  IPv6 -- mapped, 6to4, NAT64, Teredo -- is judged as that IPv4 address). A loopback host
  (``127.0.0.0/8``, ``::1``, ``localhost``) is refused unless the server allows it
  (``push.allow_loopback_endpoints``, for tests), and then ``http`` is allowed too. A host name is
  checked again, resolved, when a push is sent (providers/push/common.py): what it resolves to
  then is what the rule applies to, and what the connection goes to.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Self
from urllib.parse import urlsplit

from chatproto.errors import DecodeError, ErrorCode
from chatproto.jsonwire import canonical_json

OP_PUSH_REGISTER: Final = "push.register"
OP_PUSH_UNREGISTER: Final = "push.unregister"
OP_PUSH_PENDING: Final = "push.pending"
PUSH_PLATFORMS: Final = ("fcm", "apns", "webpush", "unifiedpush")
MAX_ENDPOINT_CHARS: Final = 2048
MAX_FCM_TOKEN_CHARS: Final = 4096

_FCM_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9_:.\-]{1,4096}")
_APNS_TOKEN_RE: Final = re.compile(r"(?:[0-9a-fA-F]{2}){32,100}")
_B64URL_RE: Final = re.compile(r"[A-Za-z0-9_-]+={0,2}")
_ARG: Final = {"fcm": "token", "apns": "token", "webpush": "subscription", "unifiedpush": "endpoint"}
_B64_RE: Final = re.compile(r"[A-Za-z0-9+/_-]+={0,2}")
PREVIEW_KEY_USAGE: Final = "push_preview_key"
"""The ``usage`` of the object a device signs for its preview key: no other signed object has it."""


def _bad(detail: str) -> DecodeError:
    return DecodeError(ErrorCode.BAD_ENVELOPE, detail)


def check_endpoint(value: object, allow_loopback: bool, name: str = "endpoint") -> str:
    """``value`` if it is an endpoint URL a push may be sent to (the rules above), else DecodeError."""
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_ENDPOINT_CHARS or not value.isascii():
        raise _bad(f"'{name}' must be a URL of 1-{MAX_ENDPOINT_CHARS} ASCII characters")
    try:
        url = urlsplit(value)
        host, _port = url.hostname, url.port  # .port raises ValueError when it is not a number in range
    except ValueError:
        raise _bad(f"'{name}' is not a URL") from None
    if not host or url.username is not None or url.password is not None or url.fragment or any(
            c.isspace() or ord(c) < 0x21 for c in value):
        raise _bad(f"'{name}' must be an absolute URL with a host, without user, password or fragment")
    loopback = _is_loopback(host)
    if loopback and not allow_loopback:
        raise _bad(f"'{name}' must not point at this machine")
    if not loopback and _is_internal(host):
        raise _bad(f"'{name}' must not point at a private or reserved address")
    if url.scheme != "https" and not (loopback and url.scheme == "http"):
        raise _bad(f"'{name}' must be an https URL")
    return value


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


_NAT64: Final = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the last 32 bits are an IPv4 address


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, 6to4, Teredo's server, NAT64), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[0]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_refusal(address: str, allow_loopback: bool) -> str | None:
    """Why the server must not connect to the IP address ``address`` for a push (None: it may):
    loopback (unless ``allow_loopback``), private, link-local, shared (CGNAT), reserved,
    unspecified, multicast -- anything not globally routable. A text that is no IP address is
    refused too (the caller resolved it, so it must be one)."""
    ip = _ip(address.split("%", 1)[0])  # a scoped IPv6 address (fe80::1%eth0) is link-local anyway
    if ip is None:
        return "not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        ip = _embedded_ipv4(ip) or ip
    if ip.is_loopback:
        return None if allow_loopback else "a loopback address"
    if ip.is_multicast:
        return "a multicast address"
    if not ip.is_global:
        return "a private, link-local, reserved or unspecified address"
    return None


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    return _ip(host) is not None and address_refusal(host, False) == "a loopback address"


def _is_internal(host: str) -> bool:
    return _ip(host) is not None and address_refusal(host, True) is not None


def _b64url_bytes(value: object, name: str, size: int) -> str:
    if isinstance(value, str) and len(value) <= 128 and _B64URL_RE.fullmatch(value):
        try:
            raw = base64.urlsafe_b64decode(value.rstrip("=") + "=" * (-len(value.rstrip("=")) % 4))
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) == size and (size != 65 or raw[0] == 4):
            return value
    raise _bad(f"'{name}' must be {size} bytes in base64url")


def _b64_bytes(value: object, name: str, size: int) -> str:
    """``value`` if it is ``size`` bytes in base64 (standard or URL-safe, padded or not)."""
    if isinstance(value, str) and len(value) <= 128 and _B64_RE.fullmatch(value):
        text = value.rstrip("=").replace("-", "+").replace("_", "/")
        try:
            if len(base64.b64decode(text + "=" * (-len(text) % 4), validate=True)) == size:
                return value
        except (binascii.Error, ValueError):
            pass
    raise _bad(f"'{name}' must be {size} bytes in base64")


def preview_key_object(user: str, device: str, key: str) -> dict[str, str]:
    """What a device signs (canonical JSON, section 9) with its Ed25519 key to vouch for its preview key."""
    return {"usage": PREVIEW_KEY_USAGE, "user": user, "device": device, "key": key}


def _subscription(value: object, allow_loopback: bool) -> str:
    if not isinstance(value, dict) or not {"endpoint", "keys"} <= set(value) <= {"endpoint", "keys", "expirationTime"}:
        raise _bad("'subscription' must be {\"endpoint\", \"keys\": {\"p256dh\", \"auth\"}}")
    expiry = value.get("expirationTime")
    if expiry is not None and (not isinstance(expiry, int) or isinstance(expiry, bool)):
        raise _bad("'subscription.expirationTime' must be null or a time in ms (it is not kept)")
    keys = value["keys"]
    if not isinstance(keys, dict) or set(keys) != {"p256dh", "auth"}:
        raise _bad("'subscription.keys' must be {\"p256dh\", \"auth\"}")
    return canonical_json({
        "endpoint": check_endpoint(value["endpoint"], allow_loopback, "subscription.endpoint"),
        "keys": {"p256dh": _b64url_bytes(keys["p256dh"], "subscription.keys.p256dh", 65),
                 "auth": _b64url_bytes(keys["auth"], "subscription.keys.auth", 16)},
    }).decode()


@dataclass(frozen=True, slots=True)
class PushRegister:
    """Wake this device through ``platform``. ``token`` is what the provider needs, in one string:
    the FCM or APNs token, the UnifiedPush endpoint, or the Web Push subscription as canonical JSON."""

    OP: ClassVar[str] = OP_PUSH_REGISTER
    platform: str
    token: str
    preview_key: str | None = None  # X25519, base64: what senders encrypt this device's previews to
    preview_sig: str | None = None  # the device's Ed25519 signature of ``preview_key_object``

    def args(self) -> dict[str, Any]:
        value: Any = json.loads(self.token) if self.platform == "webpush" else self.token
        args = {"platform": self.platform, _ARG[self.platform]: value}
        if self.preview_key is not None:
            args |= {"preview_key": self.preview_key, "preview_sig": self.preview_sig}
        return args

    @classmethod
    def from_args(cls, args: dict[str, Any], allow_loopback: bool = False) -> Self:
        platform = args.get("platform")
        if not isinstance(platform, str) or platform not in _ARG:
            raise _bad(f"'platform' must be one of {', '.join(PUSH_PLATFORMS)}")
        name = _ARG[platform]
        unknown = set(args) - {"platform", name, "preview_key", "preview_sig"}
        if unknown:
            raise _bad(f"unknown argument(s) for {platform}: {', '.join(sorted(map(str, unknown)))}")
        preview_key = preview_sig = None
        if "preview_key" in args or "preview_sig" in args:
            preview_key = _b64_bytes(args.get("preview_key"), "preview_key", 32)
            preview_sig = _b64_bytes(args.get("preview_sig"), "preview_sig", 64)
        return cls(platform, _token(platform, args.get(name), allow_loopback), preview_key, preview_sig)


def _token(platform: str, value: object, allow_loopback: bool) -> str:
    if platform == "fcm":
        if not isinstance(value, str) or not _FCM_TOKEN_RE.fullmatch(value):
            raise _bad(f"'token' must be 1-{MAX_FCM_TOKEN_CHARS} of [A-Za-z0-9_:.-]")
        return value
    if platform == "apns":
        if not isinstance(value, str) or not _APNS_TOKEN_RE.fullmatch(value):
            raise _bad("'token' must be 64-200 hex digits")
        return value.lower()
    if platform == "webpush":
        return _subscription(value, allow_loopback)
    return check_endpoint(value, allow_loopback)
