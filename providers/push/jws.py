"""Compact JWS (RFC 7515) for the providers' JWTs: RS256 for FCM's service-account assertion, ES256
for APNs provider tokens and VAPID (RFC 8292). Signing only: the services verify."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Unpadded base64url (what Web Push keys and JWT parts are); padded input is accepted too."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_private_key(pem: bytes) -> SigningKey:
    """A PEM private key (PKCS#8 as in a .p8 file or a service account, or SEC1/PKCS#1); the error
    names no key material."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError("not a PEM private key without a password") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError(f"unsupported key type {type(key).__name__}")
    return key


def load_p256_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    """An ES256 key from a PEM file (an APNs .p8, ``openssl ecparam -genkey``)."""
    key = load_private_key(Path(path).read_bytes())
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(f"{path}: not a P-256 (ES256) key")
    return key


def sign(key: SigningKey, claims: dict[str, Any], header: dict[str, str] | None = None) -> str:
    """The compact JWT of ``claims``: RS256 with an RSA key, ES256 (raw r||s, RFC 7518 3.4) with a
    P-256 one."""
    alg = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"
    head = {"alg": alg, "typ": "JWT", **(header or {})}
    signing_input = f"{_json_b64(head)}.{_json_b64(claims)}".encode("ascii")
    if isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    else:
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return f"{signing_input.decode('ascii')}.{b64url(signature)}"


def _json_b64(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode("utf-8"))
