"""Client SDK for the chat server: ``Client`` (threads and callbacks) and
``AsyncClient`` (asyncio). Depends on paho-mqtt and the standard library only.

``protocol`` is the wire contract shared with the server; see docs/SDK.md for
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
)
from client_sdk.events import ErrorEvent, Event, Message, Presence, Receipt
from client_sdk.presence import Privacy

__all__ = [
    "AsyncClient",
    "AuthError",
    "ChatError",
    "ChatTimeout",
    "Client",
    "ClientClosed",
    "ConnectError",
    "ConnectTimeout",
    "ErrorEvent",
    "Event",
    "IdentifierRejected",
    "Message",
    "NotConnected",
    "Presence",
    "Privacy",
    "Receipt",
    "RequestError",
    "RequestTimeout",
    "StoreError",
]
