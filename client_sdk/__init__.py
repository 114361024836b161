"""Client SDK for the chat server: ``Client`` (threads and callbacks) and
``AsyncClient`` (asyncio). Depends on paho-mqtt, vodozemac (end-to-end
encryption, on by default) and cryptography (the local store sealed at rest).

``ClientOptions`` holds a client's settings (also accepted as keywords). Files go with
``send_media``/``download_media`` (encrypted here, uploaded over HTTP: docs/SDK.md, *Media*).
``chatproto`` is the wire contract shared with the server; see docs/SDK.md for
the guide and docs/PROTOCOL.md for the wire format.
"""

from client_sdk.aio import AsyncClient
from client_sdk.client import Client
from client_sdk.errors import (
    AuthError,
    ChatError,
    ChatTimeout,
    ClientClosed,
    ConnectError,
    ConnectTimeout,
    IdentifierRejected,
    NotConnected,
    RequestError,
    RequestTimeout,
    StoreError,
    UnknownDevice,
)
from client_sdk.events import (
    ErrorEvent,
    Event,
    GroupEvent,
    IdentityChanged,
    Message,
    Presence,
    Receipt,
    Undecryptable,
)
from client_sdk.groups import GroupInfo, GroupReceiptInfo, GroupSummary, MemberReceipt
from client_sdk.mediabody import MediaBody, MediaBodyError
from client_sdk.mediacrypto import MediaCryptoError
from client_sdk.mediahttp import MediaError
from client_sdk.options import ClientOptions
from client_sdk.presence import Privacy
from client_sdk.preview import PushPreview

__all__ = [
    "AsyncClient",
    "AuthError",
    "ChatError",
    "ChatTimeout",
    "Client",
    "ClientClosed",
    "ClientOptions",
    "ConnectError",
    "ConnectTimeout",
    "ErrorEvent",
    "Event",
    "GroupEvent",
    "GroupInfo",
    "GroupReceiptInfo",
    "GroupSummary",
    "IdentifierRejected",
    "IdentityChanged",
    "MediaBody",
    "MediaBodyError",
    "MediaCryptoError",
    "MediaError",
    "MemberReceipt",
    "Message",
    "NotConnected",
    "Presence",
    "Privacy",
    "PushPreview",
    "Receipt",
    "RequestError",
    "RequestTimeout",
    "StoreError",
    "Undecryptable",
    "UnknownDevice",
]
