"""The protocol's numeric limits (docs/PROTOCOL.md sections 4-9)."""

from __future__ import annotations

from typing import Final

MAX_JSON_DEPTH: Final = 32
"""Deepest nesting of arrays/objects accepted in a payload."""
MAX_IDS_PER_ITEM: Final = 1000
"""Seqs in one ack, ids in one seen report or receipt."""
DEFAULT_MAX_DEVICES_PER_MESSAGE: Final = 64
"""Default of ``limits.max_devices_per_message``: entries allowed in one message's ``bodies``."""
MAX_USERS_PER_REQUEST: Final = 256
"""Users named in one presence.get/subscribe/unsubscribe or contacts.add/remove request."""
MAX_ONE_TIME_KEYS_PER_PUBLISH: Final = 100
MAX_ONE_TIME_KEYS_STORED: Final = 200
"""Unclaimed one-time keys the server keeps per device; a publish beyond it is refused."""

DEFAULT_MAX_GROUP_MEMBERS: Final = 1024
"""Default of ``limits.max_group_members`` (WhatsApp's cap; Signal's is 1,000)."""
DEFAULT_MAX_GROUPS_PER_USER: Final = 512
"""Default of ``limits.max_groups_per_user``."""
MAX_MEMBERS_PER_GROUP_REQUEST: Final = 1024
"""Users named in one ``group.*`` request (about 35 KB of ids, within ``limits.max_request_bytes``)."""
MAX_GROUP_NAME_CHARS: Final = 100

MAX_PREVIEW_CHARS: Final = 1024
"""A push preview in a message's ``previews`` (base64url): the SDK's are 578 characters, so push
payloads stay far below APNs's and FCM's 4 KB (docs/PROTOCOL.md section 12)."""
MAX_ACK_BYTES: Final = 64 * 1024
MAX_SEEN_BYTES: Final = 128 * 1024
MAX_HEARTBEAT_BYTES: Final = 1024
MAX_DOWNLINK_BYTES: Final = 16 * 1024 * 1024
"""Largest downlink item a client reads."""


def chat_envelope_bytes(max_body_bytes: int) -> int:
    """Largest accepted ``u/{me}/out`` payload: a body of ``max_body_bytes`` JSON-escaped
    (x 6) plus 1 KiB of fields. It bounds an olm message's ``bodies`` all together too."""
    return max_body_bytes * 6 + 1024
