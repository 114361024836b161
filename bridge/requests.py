"""Request operations on ``u/{me}/req``: ``{"rid","op","args"}`` -> one ``res`` item.

Each op is an async function of (caller, args) returning a JSON-able result or
raising ``OpError``; the table maps op names to them. Other features add their
ops to the same table (presence: ``bridge/presence/service.py``; see chatserver/app.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from bridge.clock import Clock
from chatproto import Caller, ErrorCode, is_device_id


class TokenIssuer(Protocol):
    async def issue_token(self, user: str, device: str) -> str: ...

    async def revoke_tokens(self, user: str, device: str | None) -> int: ...


class OpError(Exception):
    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


Op = Callable[[Caller, dict[str, Any]], Awaitable[Any]]


def check_args(args: dict[str, Any], allowed: set[str]) -> None:
    """Refuse (``bad_envelope``) any argument not in ``allowed``."""
    unknown = set(args) - allowed
    if unknown:
        raise OpError(ErrorCode.BAD_ENVELOPE, f"unknown argument(s): {', '.join(sorted(unknown))}")


def build_ops(tokens: TokenIssuer, clock: Clock) -> dict[str, Op]:

    async def ping(caller: Caller, args: dict[str, Any]) -> Any:
        check_args(args, set())
        return {"pong": clock.wall_ms()}

    async def auth_token(caller: Caller, args: dict[str, Any]) -> Any:
        check_args(args, set())
        return {"token": await tokens.issue_token(caller.user, caller.device), "device": caller.device}

    async def auth_revoke(caller: Caller, args: dict[str, Any]) -> Any:
        check_args(args, {"device"})
        device = args.get("device", caller.device)
        if not is_device_id(device):
            raise OpError(ErrorCode.BAD_ENVELOPE, "'device' must be a device id")
        return {"revoked": await tokens.revoke_tokens(caller.user, device)}

    return {"ping": ping, "auth.token": auth_token, "auth.revoke": auth_revoke}
