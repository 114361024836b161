"""What the outbox thread publishes for an outbox message when encryption is on (the engine's
``_publish_due``): its Olm form, one ciphertext per device (``e2e``); for a group, its Megolm
form after the key shares it needs (``groupflow``); or why nothing goes out now (``Unsent``).
A refusal leaves the outbox and is reported to the app, unless it was one of the SDK's own
key shares (then the key is shared again with the next group message).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable

from chatproto import OLM_TYPE, ChatMessage, ErrorCode, is_group_id
from client_sdk.e2e import E2E, SendRefused
from client_sdk.errors import ClientClosed, NotConnected, RequestError, RequestTimeout
from client_sdk.events import ErrorEvent, Event
from client_sdk.groupflow import GroupChannel
from client_sdk.localstore import OutMessage
from client_sdk.outbox import TRANSIENT_CODES, Outbox

log = logging.getLogger("client_sdk.engine")  # its lines have always been the engine's


class Unsent(enum.Enum):
    """Why ``Preparer.encrypted`` has no message to publish now."""

    REFUSED = "refused"
    """It can never be sent: dropped from the outbox and reported as an ``ErrorEvent``."""
    LATER = "later"
    """The keys could not be fetched now: retry it (and the messages after it) later."""
    HELD = "held"
    """The recipient has no device with keys yet (``outbox`` rule 8)."""


class Preparer:
    """Runs in the outbox thread; ``report`` hands an event to the app (the dispatcher)."""

    def __init__(self, e2e: E2E, groups: GroupChannel, outbox: Outbox, report: Callable[[Event], None],
                 cid: str) -> None:
        self._e2e, self._groups, self._outbox, self._report, self._cid = e2e, groups, outbox, report, cid

    def encrypted(self, message: OutMessage) -> list[ChatMessage] | Unsent:
        """The olm form of ``message`` (a group message: its megolm form, after its new key shares),
        or why it is not published now."""
        try:
            if is_group_id(message.to):
                group_message, shares = self._groups.seal(message)
                ready = [self.encrypted(share) for share in shares]  # one not ready now goes on its own later
                return [chat for each in ready if isinstance(each, list) for chat in each] + [group_message]
            sealed = self._e2e.bodies_for(message)
        except SendRefused as exc:
            if exc.code == ErrorCode.NO_KEYS:
                return Unsent.HELD
            self.refuse(message, exc.code, exc.detail)
            return Unsent.REFUSED
        except RequestError as exc:
            if exc.code in TRANSIENT_CODES:
                log.info("%s: message %s: %s; encrypting later", self._cid, message.id, exc)
                return Unsent.LATER
            self.refuse(message, exc.code, f"cannot encrypt for {message.to}: {exc.detail}")
            return Unsent.REFUSED
        except (RequestTimeout, ClientClosed, NotConnected) as exc:
            log.info("%s: message %s: %s; encrypting later", self._cid, message.id, exc)
            return Unsent.LATER
        return [ChatMessage(message.id, message.to, "", OLM_TYPE, message.ts, sealed.bodies, sealed.keys,
                            sealed.previews)]

    def share_failed(self, message: OutMessage | None) -> bool:
        """A key share message was refused for good: shared again with the next message, not reported."""
        return self._groups.failed(message)

    def refuse(self, message: OutMessage, code: str, detail: str) -> None:
        if self._outbox.confirmed([message.id]) and not self.share_failed(message):
            log.warning("%s: message %s not sent: %s: %s", self._cid, message.id, code, detail)
            self._report(ErrorEvent(code, detail, message.id))
