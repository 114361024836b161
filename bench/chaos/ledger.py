"""The ledger: what every sender was promised and what every device got, and the verdict.

Pure bookkeeping (no I/O, thread-safe), shared by ``bench/chaos`` and ``tests/chaos``.
A message is identified by its body, ``"{sender}:{n}"``, with ``n`` increasing per
sender, so a delivery can be matched to its send even when the sender process died
before it could report the id the SDK gave it.

The rules it checks (docs/RELIABILITY.md):
- every *accepted* message (``send()`` returned) reaches every target device exactly
  once (lost / duplicated);
- per target device, messages of one sender arrive in the order they were sent (reordered);
- a message that got ``sent`` is never lost (false_sent);
- a device only gets messages addressed to its user, from the user named in the body
  (misrouted / spoofed): nobody reads or speaks for someone else.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from bench.common import percentile


def body_of(sender: str, n: int, pad: int = 0) -> str:
    """The body of message ``n`` of ``sender``; ``pad`` filler bytes make it bigger (disk scenarios)."""
    return f"{sender}:{n}" + ("|" + "x" * pad if pad else "")


def parse_body(body: str) -> tuple[str, int] | None:
    sender, _, number = body.split("|", 1)[0].rpartition(":")
    if not sender or not number.isdigit():
        return None
    return sender, int(number)


@dataclass
class Sent:
    sender: str
    n: int
    to: str
    targets: tuple[str, ...]  # device keys "user.device" that must get it
    at: float  # monotonic time of send()
    mid: str | None = None  # the SDK's id, once send() returned
    accepted: bool = False
    sent_receipt: bool = False


@dataclass
class Verdict:
    messages: int = 0
    deliveries_expected: int = 0
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0
    false_sent: int = 0
    misrouted: int = 0
    unknown: int = 0
    sent_receipts: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.lost or self.duplicated or self.reordered or self.false_sent or self.misrouted
                    or self.unknown)

    def as_dict(self) -> dict[str, Any]:
        return {"messages": self.messages, "deliveries_expected": self.deliveries_expected, "lost": self.lost,
                "duplicated": self.duplicated, "reordered": self.reordered, "false_sent": self.false_sent,
                "misrouted": self.misrouted, "unknown": self.unknown, "sent_receipts": self.sent_receipts,
                "examples": self.examples[:10]}


class Ledger:
    """Record sends, ``sent`` receipts and deliveries from any thread; ``verdict()`` at the end."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._sent: dict[tuple[str, int], Sent] = {}
        self._by_mid: dict[str, tuple[str, int]] = {}
        self._pending_receipts: set[str] = set()  # 'sent' that arrived before send() returned its id
        # device -> list of (sender, n, at) in hand-over order
        self._got: dict[str, list[tuple[str, str, str, float]]] = defaultdict(list)  # (from, to, body, at)
        self._bad: list[str] = []
        # For missing(): (device, sender, n) named by the bodies delivered so far, and how many of
        # each device's deliveries are in it, so that each body is parsed once, not at every call.
        self._arrived: set[tuple[str, str, int]] = set()
        self._arrived_upto: dict[str, int] = {}

    # --- sender side ---------------------------------------------------------------------

    def intend(self, sender: str, n: int, to: str, targets: tuple[str, ...], pad: int = 0) -> str:
        """Call just before ``send()``; returns the body to send."""
        with self._lock:
            self._sent[(sender, n)] = Sent(sender, n, to, targets, self._clock())
        return body_of(sender, n, pad)

    def accepted(self, sender: str, n: int, mid: str) -> None:
        """``send()`` returned ``mid``: from now on the message must arrive."""
        with self._lock:
            entry = self._sent[(sender, n)]
            entry.mid, entry.accepted = mid, True
            self._by_mid[mid] = (sender, n)
            if mid in self._pending_receipts:
                entry.sent_receipt = True

    def sent_receipt(self, mids: list[str]) -> None:
        with self._lock:
            for mid in mids:
                key = self._by_mid.get(mid)
                if key is None:
                    self._pending_receipts.add(mid)
                else:
                    self._sent[key].sent_receipt = True

    # --- receiver side -------------------------------------------------------------------

    def delivered(self, device: str, sender: str, to: str, body: str) -> None:
        """A message handed over to the app of ``device`` ("user.device").

        Checked only in ``verdict()``: a child process's report of its send may reach us after
        the message reached its recipient in this process.
        """
        now = self._clock()
        with self._lock:
            self._got[device].append((sender, to, body, now))

    def _valid(self) -> dict[str, list[tuple[str, int, float]]]:
        """Per device, (sender, n, at) of the deliveries that match a send; the rest go to ``_bad``."""
        valid: dict[str, list[tuple[str, int, float]]] = {}
        self._bad = []
        for device, got in self._got.items():
            user = device.split(".", 1)[0]
            rows = valid[device] = []
            for sender, to, body, at in got:
                parsed = parse_body(body)
                entry = self._sent.get(parsed) if parsed is not None else None
                if entry is None:
                    self._bad.append(f"unknown: {device} got {body[:40]!r} from {sender}")
                elif sender != entry.sender or user not in (to, sender) or device not in entry.targets:
                    self._bad.append(f"misrouted: {device} got {body!r} claimed from {sender} to {to}")
                else:
                    rows.append((entry.sender, entry.n, at))
        return valid

    # --- figures -------------------------------------------------------------------------

    def counts(self) -> tuple[int, int]:
        """(accepted messages, deliveries so far)."""
        with self._lock:
            return sum(1 for s in self._sent.values() if s.accepted), sum(len(v) for v in self._got.values())

    def missing(self) -> int:
        """Deliveries of accepted messages not yet seen (for waiting until quiet).

        Called every quarter second while settling: it parses only the deliveries that came
        since the last call, not all of them again under the lock the SDK threads report
        through (~36,000 at full size). Misrouted deliveries are ``verdict()``'s business.
        """
        with self._lock:
            for device, got in self._got.items():
                start = self._arrived_upto.get(device, 0)
                for _sender, _to, body, _at in got[start:]:
                    parsed = parse_body(body)
                    if parsed is not None:
                        self._arrived.add((device, *parsed))
                self._arrived_upto[device] = len(got)
            return sum(1 for e in self._sent.values() if e.accepted for d in e.targets
                       if (d, e.sender, e.n) not in self._arrived)

    def unsent(self, sender: str) -> int:
        """Accepted messages of ``sender`` without a ``sent`` receipt so far (its outbox, as far as we know)."""
        with self._lock:
            return sum(1 for e in self._sent.values() if e.sender == sender and e.accepted and not e.sent_receipt)

    def latencies(self, since: float = 0.0, until: float = float("inf")) -> list[float]:
        """Seconds from send() to first hand-over, for messages sent in [since, until)."""
        with self._lock:
            first: dict[tuple[str, str, int], float] = {}
            for device, got in self._valid().items():
                for sender, n, at in got:
                    first.setdefault((device, sender, n), at)
            out = []
            for (_device, sender, n), at in first.items():
                entry = self._sent[(sender, n)]
                if since <= entry.at < until:
                    out.append(at - entry.at)
        return sorted(out)

    def p99_ms(self, since: float = 0.0, until: float = float("inf")) -> float | None:
        samples = self.latencies(since, until)
        return round(percentile(samples, 0.99) * 1000, 1) if samples else None

    def verdict(self) -> Verdict:
        with self._lock:
            valid = self._valid()
            v = Verdict(unknown=sum(1 for b in self._bad if b.startswith("unknown")))
            v.misrouted = len(self._bad) - v.unknown
            v.examples.extend(self._bad[:5])
            seen: dict[tuple[str, str, int], int] = defaultdict(int)
            for device, got in valid.items():
                last: dict[str, int] = {}
                for sender, n, _ in got:
                    seen[(device, sender, n)] += 1
                    if seen[(device, sender, n)] > 1:
                        v.duplicated += 1
                        v.examples.append(f"duplicate: {device} got {sender}:{n} again")
                        continue
                    if n < last.get(sender, -1):
                        v.reordered += 1
                        v.examples.append(f"reordered: {device} got {sender}:{n} after {sender}:{last[sender]}")
                    last[sender] = max(n, last.get(sender, -1))
            for entry in self._sent.values():
                v.sent_receipts += entry.sent_receipt
                if not entry.accepted:
                    continue
                v.messages += 1
                v.deliveries_expected += len(entry.targets)
                missing = [d for d in entry.targets if (d, entry.sender, entry.n) not in seen]
                if missing:
                    v.lost += len(missing)
                    v.false_sent += entry.sent_receipt
                    v.examples.append(f"lost: {entry.sender}:{entry.n} (sent={entry.sent_receipt}) "
                                      f"never reached {', '.join(missing)}")
        return v
