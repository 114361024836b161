"""Push, as the SDK's two faces share it (docs/SDK.md "Push"): the ``push.register`` arguments,
checked here as the server checks them (but for loopback endpoints, which the server decides), and
the pace of ``fetch_pending``: ask the server how many items still wait for this device
(``push.pending``) until none do, handing each over (and acking it) meanwhile."""

from __future__ import annotations

from typing import Any

from chatproto import PushRegister

FETCH_POLL_S = 0.05  # between two push.pending questions while items are still being taken


def register_args(platform: str, registration: dict[str, Any], preview_key: dict[str, str]) -> dict[str, Any]:
    """The ``push.register`` arguments (``preview_key``: the preview key and its signature, or {});
    raises ``DecodeError`` (a ``ValueError``) naming a bad one."""
    return PushRegister.from_args({"platform": platform, **registration, **preview_key}, allow_loopback=True).args()


def items_left(result: Any) -> int:
    """The ``push.pending`` answer: items staged for this device and not acked yet."""
    return int(result["items"])
