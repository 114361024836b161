"""Which receipts reach the app: each status once per message, never a lower one after a higher one.

The server sends ``sent`` -> ``delivered`` -> ``seen`` per message and device
(PROTOCOL.md delivery rule 11), but the app can still meet repeats: a ``sent``
for a re-published message after ``delivered`` made the SDK report ``sent``
itself, a ``seen`` reported twice by the peer, a ``delivered`` that a ``seen``
already implied. ``ReceiptLedger`` is pure (no I/O, one thread: the
dispatcher's) and remembers, per message id, the highest status handed over.

Rules:
1. ``sent`` < ``delivered`` < ``seen``: an id whose status is not above the one
   already handed over is dropped from the receipt (a receipt left with no id
   is not handed over at all).
2. ``seen`` implies ``delivered``: ids not yet ``delivered`` get a ``delivered``
   receipt first (same peer and ts), so the app never sees ``seen`` without it.
3. ``expired`` is handed over once per id, whatever else was.
4. At most ``max_ids`` ids are remembered, the least recently touched forgotten
   first (a receipt for a forgotten id is handed over again).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

from chatproto import RECEIPT_DELIVERED, RECEIPT_EXPIRED, RECEIPT_SEEN, RECEIPT_SENT
from client_sdk.events import Receipt

RANKS: Final = {RECEIPT_SENT: 1, RECEIPT_DELIVERED: 2, RECEIPT_SEEN: 3}
EXPIRED_BIT: Final = 4  # kept beside the rank (1-3) in one int per id
DEFAULT_MAX_IDS: Final = 20_000


class ReceiptLedger:
    def __init__(self, max_ids: int = DEFAULT_MAX_IDS) -> None:
        self._max = max_ids
        self._handed: OrderedDict[str, int] = OrderedDict()  # id -> rank | EXPIRED_BIT

    def admit(self, receipt: Receipt) -> list[Receipt]:
        """The receipts to hand over for ``receipt``, in order (possibly none)."""
        if receipt.status == RECEIPT_EXPIRED:
            fresh = [i for i in dict.fromkeys(receipt.ids) if not self._get(i) & EXPIRED_BIT]
            for msg_id in fresh:
                self._set(msg_id, self._get(msg_id) | EXPIRED_BIT)
            return [_with_ids(receipt, RECEIPT_EXPIRED, fresh)] if fresh else []
        rank = RANKS.get(receipt.status)
        if rank is None:  # a status this SDK does not know: pass it on untouched
            return [receipt]
        fresh = [i for i in dict.fromkeys(receipt.ids) if self._get(i) & ~EXPIRED_BIT < rank]
        out: list[Receipt] = []
        if receipt.status == RECEIPT_SEEN:
            implied = [i for i in fresh if self._get(i) & ~EXPIRED_BIT < RANKS[RECEIPT_DELIVERED]]
            if implied:
                out.append(_with_ids(receipt, RECEIPT_DELIVERED, implied))
        if fresh:
            out.append(_with_ids(receipt, receipt.status, fresh))
        for msg_id in fresh:
            self._set(msg_id, rank | (self._get(msg_id) & EXPIRED_BIT))
        return out

    def _get(self, msg_id: str) -> int:
        return self._handed.get(msg_id, 0)

    def _set(self, msg_id: str, value: int) -> None:
        self._handed[msg_id] = value
        self._handed.move_to_end(msg_id)
        while len(self._handed) > self._max:
            self._handed.popitem(last=False)


def _with_ids(receipt: Receipt, status: str, ids: list[str]) -> Receipt:
    return Receipt(status, tuple(ids), receipt.peer, receipt.ts)
