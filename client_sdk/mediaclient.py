"""``send_media`` and ``download_media`` for ``Client`` and ``AsyncClient``: the checks, the
endpoint and its credentials from the engine, then the transfers of ``client_sdk.media``."""

from __future__ import annotations

import mimetypes
import os
import threading
from pathlib import Path
from typing import BinaryIO

from chatproto import is_group_id, is_user_id
from client_sdk.engine import Engine
from client_sdk.events import Message
from client_sdk.media import Progress, Upload, download
from client_sdk.mediabody import DEFAULT_MIME, MEDIA_TYPE, MediaBody, parse_media_body
from client_sdk.mediacrypto import MediaKey
from client_sdk.mediahttp import MediaError, MediaHTTP, basic_auth

MediaFile = str | os.PathLike[str] | BinaryIO
"""A path, or a binary file object open for reading and seekable (it is read from its start)."""


def media_http(engine: Engine) -> MediaHTTP:
    """The media endpoint of ``engine``'s options with this device's token; raises ``MediaError``
    when media cannot be used (no ``media_url``, encryption off, no token yet)."""
    options = engine.options
    if not options.encryption:
        raise MediaError("encryption_required", "media needs end-to-end encryption (encryption=True): "
                         "the file's key travels in the message and must not reach the server")
    if options.media_url is None:
        raise MediaError("not_configured", "set media_url (the server's media endpoint) in the options")
    token = engine.store.token()
    if token is None:
        raise MediaError("unauthorized", "this device has no device token yet: connect() first "
                         "(it is requested after a password login)")
    return MediaHTTP(options.media_url, basic_auth(engine.user, engine.device, token),
                     options.media_tls, options.media_timeout)


def send_media(engine: Engine, to: str, file: MediaFile, mime: str | None, name: str | None,
               thumbnail: bytes | None, progress: Progress | None, stop: threading.Event | None = None) -> str:
    """Encrypt and upload ``file`` for ``to``, then send the media message; returns its id."""
    engine.check_open()
    if not is_user_id(to) and not is_group_id(to):
        raise ValueError(f"{to!r} is not a user id or a group id")
    http = media_http(engine)
    if isinstance(file, (str, os.PathLike)):
        path = Path(file)
        with open(path, "rb") as source:
            return send_media(engine, to, source, mime, name or path.name, thumbnail, progress, stop)
    size = os.fstat(file.fileno()).st_size if _has_fileno(file) else file.seek(0, os.SEEK_END)
    if name is None and isinstance(getattr(file, "name", None), str):
        name = os.path.basename(file.name)
    if mime is None:
        mime = (mimetypes.guess_type(name)[0] if name else None) or DEFAULT_MIME
    key = MediaKey.random()
    # Checked before the upload: a bad name, mime or thumbnail must not cost a transfer.
    MediaBody("/v1/media/blobs/" + "0" * 64, key, "0" * 64, size, mime, name, thumbnail).encode()
    url, sha = Upload(http, to, file, size, key, progress, stop).run()
    return engine.send(to, MediaBody(url, key, sha, size, mime, name, thumbnail).encode(), MEDIA_TYPE)


def _has_fileno(file: BinaryIO) -> bool:
    try:
        file.fileno()
    except (AttributeError, OSError, ValueError):  # io.BytesIO raises io.UnsupportedOperation (an OSError)
        return False
    return True


def media_body(message_or_body: Message | MediaBody | str) -> MediaBody:
    """The ``MediaBody`` of a received media message (or its body); ``MediaBodyError`` if it is not one."""
    if isinstance(message_or_body, MediaBody):
        return message_or_body
    if isinstance(message_or_body, Message):
        if message_or_body.type != MEDIA_TYPE:
            raise ValueError(f"message {message_or_body.id} is of type {message_or_body.type!r}, not 'media'")
        if not message_or_body.encrypted:  # a plain-mode sender: the key went through the server
            raise MediaError("encryption_required", f"media message {message_or_body.id} arrived without "
                             "end-to-end encryption: its key passed through the server in plaintext")
        return parse_media_body(message_or_body.body)
    return parse_media_body(message_or_body)


def download_media(engine: Engine, message_or_body: Message | MediaBody | str, dest: str | os.PathLike[str],
                   progress: Progress | None, stop: threading.Event | None = None) -> MediaBody:
    """Download, verify and decrypt a media message's file into ``dest``; returns its body."""
    engine.check_open()
    body = media_body(message_or_body)
    download(media_http(engine), body, Path(dest), progress, stop)
    return body
