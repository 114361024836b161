"""The SDK's one exception tree. Catch ``ChatError`` for everything the SDK raises.

::

    ChatError
    ├── ConnectError              connect() could not establish a session
    │   ├── AuthError             CONNACK 4/5: wrong password or token, or logins throttled
    │   ├── IdentifierRejected    CONNACK 2, or a malformed user/device id (also a ValueError)
    │   └── ConnectTimeout        not connected within the timeout (also a ChatTimeout)
    ├── ChatTimeout               base of the timeouts (also builtins.TimeoutError)
    │   ├── ConnectTimeout
    │   └── RequestTimeout        no ``res`` for a request within its timeout
    ├── RequestError              the server answered a request with ``ok: false``
    ├── NotConnected              request() before connect() was ever called
    ├── ClientClosed              the client was closed (before or during the call)
    ├── StoreError                the local store cannot be used
    ├── UnknownDevice             no published keys for that device (fingerprints, safety numbers)
    ├── MediaError                a media transfer failed or was refused (client_sdk.mediahttp)
    ├── MediaBodyError            a media message's body is malformed (client_sdk.mediabody)
    └── MediaCryptoError          a media file does not decrypt (client_sdk.mediacrypto)

Foreign errors (``OSError``, ``sqlite3.Error``) are mapped at the boundary with
``raise ... from exc``, so the original stays available as ``__cause__``.
"""

from __future__ import annotations

from typing import Final


class ChatError(Exception):
    """Base of every exception the SDK raises on purpose."""


class ConnectError(ChatError):
    """No session could be established. ``code`` is the CONNACK code when the server refused."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class AuthError(ConnectError):
    """Bad credentials (CONNACK 4 or 5). Do not retry with the same password: fix it."""


class IdentifierRejected(ConnectError, ValueError):
    """The user or device id is not acceptable (CONNACK 2, or refused before connecting)."""


class ChatTimeout(ChatError, TimeoutError):
    """Something did not happen in time; ``except TimeoutError`` catches it too."""


class ConnectTimeout(ConnectError, ChatTimeout):
    """connect() gave up; ``__cause__`` is the last network error, if there was one."""


class RequestTimeout(ChatTimeout):
    """No answer to a request within its timeout (the connection may have dropped)."""


class RequestError(ChatError):
    """The server refused a request: ``code`` (an ``ErrorCode`` value) and ``detail``."""

    def __init__(self, op: str, code: str, detail: str) -> None:
        super().__init__(f"{op}: {code}: {detail}")
        self.op = op
        self.code = code
        self.detail = detail


class NotConnected(ChatError):
    """The call needs a connection and connect() was never called."""


class ClientClosed(ChatError):
    """The client is closed; make a new one to continue."""


class StoreError(ChatError):
    """The local SQLite store cannot be used (another identity, a newer schema, a wrong secret, I/O)."""


class UnknownDevice(ChatError, LookupError):
    """No trusted keys are known (or published) for that user or device."""


# MQTT 3.1.1 CONNACK return codes, and the MQTT 5 reason codes paho reports for them.
CONNACK_PROTOCOL: Final = 1
CONNACK_IDENTIFIER: Final = 2
CONNACK_UNAVAILABLE: Final = 3
CONNACK_BAD_CREDENTIALS: Final = 4
CONNACK_NOT_AUTHORIZED: Final = 5
_FROM_REASON_CODE: Final = {132: 1, 133: 2, 136: 3, 134: 4, 135: 5}


def connack_code(value: int) -> int:
    """The MQTT 3.1.1 CONNACK code for a paho reason code value (or a 3.1.1 code)."""
    return _FROM_REASON_CODE.get(value, value)


def connack_error(value: int) -> ConnectError:
    """The exception for a refused CONNACK (``value`` as paho reports it)."""
    code = connack_code(value)
    if code in (CONNACK_BAD_CREDENTIALS, CONNACK_NOT_AUTHORIZED):
        return AuthError(
            f"the server refused the credentials (CONNACK {code}): wrong password or device token, "
            "or too many failed logins", code)
    if code == CONNACK_IDENTIFIER:
        return IdentifierRejected(
            "the server refused the client id (CONNACK 2): it must be '<user>.<device>' with valid ids", code)
    if code == CONNACK_PROTOCOL:
        return ConnectError("the server does not speak MQTT 3.1.1 (CONNACK 1)", code)
    if code == CONNACK_UNAVAILABLE:
        return ConnectError("the server is unavailable (CONNACK 3)", code)
    return ConnectError(f"the server refused the connection (CONNACK {value})", code)
