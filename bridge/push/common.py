"""What the push shells share (one process: bridge/push/service.py; cluster mode:
bridge/push/cluster.py): one attempt of a wake-up through its device's provider, counted per
provider; what a ``push.register`` asks for and the preview key it registered; what a device with
a dead token is told."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bridge.counters import LATENCY_BUCKETS, Histogram
from bridge.push.core import QueuedWake
from bridge.push.provider import Outcome, PushProvider, PushResult, PushTarget, WakeUp
from bridge.requests import OpError
from chatproto import Caller, DecodeError, ErrorCode, ErrorItem, PushRegister

log = logging.getLogger(__name__)

COLLAPSE_KEY = "wake"  # every wake-up says the same; never the user's or device's name (docs/PUSH.md)


@dataclass(slots=True)
class ProviderCounters:
    """Per platform, read by chatserver.metrics at scrape time."""

    sent: int = 0
    failed: dict[str, int] = field(default_factory=dict)  # outcome (retry, gone, rejected) -> count
    latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))


async def attempt(providers: Mapping[str, PushProvider], counters: Mapping[str, ProviderCounters],
                  wake: QueuedWake, target: PushTarget) -> PushResult:
    """Send ``wake`` to ``target`` through its platform's provider and count the answer."""
    provider = providers.get(target.platform)
    counted = counters.get(target.platform)
    if provider is None or counted is None:  # its provider is no longer configured: kept for a later start
        return PushResult(Outcome.RETRY, detail=f"no {target.platform} provider configured")
    started = time.perf_counter()
    try:
        result = await provider.send(target, WakeUp(COLLAPSE_KEY, wake.expires_ms, wake.preview))
    except Exception as exc:  # a provider must not raise; if it does, it is a retry, and a bug to log
        log.exception("push provider %s raised", target.platform)
        result = PushResult(Outcome.RETRY, detail=repr(exc))
    counted.latency.observe(time.perf_counter() - started)
    if result.outcome is Outcome.SENT:
        counted.sent += 1
    else:
        counted.failed[result.outcome.value] = counted.failed.get(result.outcome.value, 0) + 1
    return result


def log_failure(target: PushTarget, result: PushResult, retried: bool) -> None:
    if result.outcome is not Outcome.SENT:
        log.info("push to %s via %s: %s (%s)%s", target.client_id, target.platform, result.outcome.value,
                 result.detail, "; retried" if retried else "")


def gone_error() -> ErrorItem:
    """What a device whose token the provider reported dead is told at its next connection (rule 7)."""
    return ErrorItem(ErrorCode.PUSH_GONE, "the push service no longer accepts this device's registration: "
                     "register again (push.register)")


def registration(caller: Caller, args: dict[str, Any], providers: Mapping[str, PushProvider],
                 allow_loopback: bool) -> PushTarget:
    """The caller's device's registration a ``push.register`` asks for; ``OpError`` if refused."""
    try:
        request = PushRegister.from_args(args, allow_loopback)
    except DecodeError as exc:
        raise OpError(exc.code, exc.detail) from None
    if request.platform not in providers:
        raise OpError(ErrorCode.UNSUPPORTED, f"this server does not send {request.platform} pushes")
    return PushTarget(request.platform, request.token, caller.client_id, request.preview_key, request.preview_sig)


def preview_key(target: PushTarget | None) -> dict[str, str] | None:
    """``{"key", "sig"}``: the device's preview key as it registered it (the key directory hands it to
    senders, whose SDK checks the signature), or None."""
    if target is None or target.preview_key is None or target.preview_sig is None:
        return None
    return {"key": target.preview_key, "sig": target.preview_sig}
