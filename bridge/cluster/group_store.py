"""The group log of cluster mode: what bridge/cluster/groups.py needs of a Redis Cluster to serve groups
(docs/PROTOCOL.md sections 10 and 11); storage/redis/group_log.py implements it.

A group is one slot. Its *log* is the outbox of the group's changes and messages, in gseq order: a
change's events are appended by the change's own commit (``commit_logged``), a message by ``post``,
which checks membership, remembers (sender, id) and takes the gseq in the same script. So whatever is
committed or answered ``sent`` is in the log, whatever happens next. A *fanner* then moves the log's
entries into the member devices' queues (``QueueStore.stage_group``, one script in each member's slot,
idempotent by a per-user high-water gseq) and drops them from the log (``fanned``), holding a lease of
the group so that one node at a time fans it. A group with entries may be left by a node that died:
``hint`` (written before the log is appended) indexes it, and any node's sweep picks it up (``due``).
A message's body is kept once in the group's slot (with the count of the member users still holding
items of it); the device queues hold references.

Receipts (docs/PROTOCOL.md section 11, "Receipts", the rules of bridge/messaging/group_receipts.py): ``post``
also starts tracking the message, in the group's slot and in the same script: the members at its gseq
but the sender, each with a delivered and a seen time. ``mark`` records, in one script per group and
call, members who acked (``DELIVERED``), reported seen (``SEEN``, by message id) or got no item at all
(``GONE``: every device's queue full); it answers each message it *completed* (the last member had it,
or saw it), and a retry with the same token answers the first run's reply. A completion stays pending,
answered again by every later ``mark`` of that message, until ``receipted`` says its receipts are staged:
then a complete message is forgotten; an incomplete one at its expiry. ``tracked`` answers
``group.receipts`` (complete messages are not tracked any more).

Expiry (section 6 rule 10, as bridge/messaging/core.py rule 7 on one process): a device's item of a message
that expires unacked (``Swept.groups``) is reported to the group's slot (``expire``, which also counts its
user off the body). The first report of a message forgets its tracking and keeps the message *expiring* on
its body (and in the group's expiring set) until ``expired_done`` says its ``expired`` receipt is staged:
each later report, a retry or a sweep (``expiring``) answers it again, and nothing answers it after that.
A completion still pending when it expires (its ``delivered`` / ``seen`` perhaps not staged) is answered
with it, to be staged first; no mark completes anything after it (the tracking is gone).

High-water marks (``stage_group``): a user's mark for a group is kept while a fanout may still stage the
group's old entries for the user; the entry that ends the user's membership (``ends_membership``) drops it
``GW_GRACE_MS`` later (storage/redis/queue_scripts.py), unless a later entry is staged for the user first
(a rejoin).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from bridge.groups.core import Decision, Group
from bridge.groups.store import GroupStore
from bridge.messaging.group_receipts import DEFAULT_MAX_PER_SENDER, DEFAULT_SEEN_MAX, TrackedRow
from chatproto import GROUP_MEMBER_LEFT, GROUP_MEMBER_REMOVED, GroupItem, MsgItem


class PostStatus(StrEnum):
    POSTED = "posted"
    DUPLICATE = "duplicate"  # (sender, id) was posted already: nothing new (it kept its first gseq)
    FORBIDDEN = "forbidden"  # the sender is not a member (or there is no such group)


@dataclass(frozen=True, slots=True)
class GroupPost:
    """A message to a group as its sender's node posts it."""

    group: str
    sender: str
    origin: str  # the sending device's client id: it does not get its own message
    msg_id: str
    wire: str  # the MsgItem every member device gets, seq 0 and no gseq (the store adds both)
    expires_ms: int
    dedup_until_ms: int
    seen_max: int = DEFAULT_SEEN_MAX  # groups.seen_receipts: seen is tracked in groups of at most this many
    max_tracked: int = DEFAULT_MAX_PER_SENDER  # groups.max_tracked_per_user, per sender and group here


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One entry of a group's log: an event (``event`` set) or a message (``event`` None; its body is
    in the store), for ``users`` (the members at its gseq, and for an event those it removed)."""

    group: str
    gseq: int
    users: tuple[str, ...]
    expires_ms: int
    event: GroupItem | None = None
    origin: str = ""  # a message: the sending device (skipped)


@dataclass(frozen=True, slots=True)
class GroupFan:
    """What ``stage_group`` did in one user's slot."""

    targets: tuple[tuple[str, int], ...]  # (client id, seq) of each item staged
    unheld: tuple[int, ...]  # gseqs of messages this user got no item of (their body's count goes down)
    skipped: int  # devices left out because their queue was full
    # The user's devices when an entry had been staged before (a fanout run again): woken again, as the
    # run that staged it may have died (or lost its reply in a failover) before waking them.
    again: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class GroupAck:
    """A device of ``member`` acked its item of the group message ``gseq`` of ``group`` (``QueueStore.ack``)."""

    group: str
    gseq: int
    member: str


def ends_membership(event: GroupItem, user: str) -> bool:
    """``event`` is the one that takes ``user`` out of the group (removed, left; the last to leave deletes it)."""
    return event.event in (GROUP_MEMBER_REMOVED, GROUP_MEMBER_LEFT) and user in event.users


@dataclass(frozen=True, slots=True)
class GroupExpiry:
    """A device's item of the group message ``gseq`` of ``group`` expired unacked (``QueueStore.expire``);
    ``released``: it was its user's last item of the message (the user is counted off its body)."""

    group: str
    gseq: int
    released: bool


def group_acks(user: str, items: Iterable[object]) -> list[GroupAck]:
    """The group messages of another user among ``items`` that a device of ``user`` acked."""
    return [GroupAck(item.to, item.gseq, user) for item in items
            if isinstance(item, MsgItem) and item.gseq is not None and item.sender != user]


class MarkKind(StrEnum):
    DELIVERED = "d"  # a device of the member acked the message (``gseq``)
    SEEN = "s"  # the member reported ``msg_id`` seen: every tracked message of the group with that id
    GONE = "x"  # the member got no item of the message (``gseq``): not waited for
    PENDING = "r"  # nobody marked: only the message's (``gseq``) pending completions, answered again


@dataclass(frozen=True, slots=True)
class Mark:
    kind: MarkKind
    member: str
    gseq: int = 0
    msg_id: str = ""


@dataclass(frozen=True, slots=True)
class Completed:
    """A message ``mark`` completed: ``delivered`` (every member has it) and/or ``seen`` (every one saw it);
    or that ``expire`` found expiring: ``expired``, after the ``delivered`` / ``seen`` it had pending."""

    gseq: int
    sender: str
    msg_id: str
    delivered: bool
    seen: bool
    expired: bool = False


class GroupLog(GroupStore, Protocol):
    async def commit_logged(self, before: Group | None, decision: Decision, max_groups_per_user: int,
                            expires_ms: int) -> bool:
        """``commit(before, decision.after, ...)`` and, in the same script, ``decision``'s events appended
        to the log for ``decision.notify``, each item kept until ``expires_ms``. Waits for the
        replicas (``cluster.min_replicas_ack``) like a stage."""

    async def post(self, post: GroupPost) -> tuple[PostStatus, int]:
        """Append a message to the log, once per (sender, id) (the status and its gseq; 0 unless
        POSTED), and track its receipts (above). Raises ``NotReplicated`` (it is posted on the master)
        when the replicas did not confirm."""

    async def mark(self, group: str, marks: list[Mark], token: str) -> list[Completed]:
        """Record ``marks`` (in order); the messages they completed. A mark that changes nothing (a
        member marked already, not waited for, a message not tracked) is ignored. Run again with the
        same ``token`` (within the store's replay time), it answers the first run's reply."""

    async def receipted(self, group: str, done: list[Completed]) -> None:
        """The receipts of ``done`` (``mark``'s completions) are staged: a complete message is forgotten.
        Until then every ``mark`` of it reports it again (a node that died before staging them)."""

    async def pending(self, group: str) -> list[int]:
        """The gseqs with a completion not ``receipted`` yet (its node may have died before staging it)."""

    async def tracked(self, group: str, msg_id: str) -> list[TrackedRow]:
        """The group's tracked messages with id ``msg_id`` (any sender), oldest first; ``mid`` is the gseq."""

    async def expire(self, group: str, expiries: list[GroupExpiry], token: str) -> list[Completed]:
        """Device items of these messages expired unacked: count the released ones' users off the bodies;
        the messages expiring (``expired`` set, above), the first report of each forgetting its tracking.
        Run again with the same ``token`` (within the store's replay time), it answers the first run's reply."""

    async def expiring(self, group: str) -> list[int]:
        """The gseqs whose ``expired`` receipt may not be staged yet (its node may have died first)."""

    async def expired_done(self, group: str, gseqs: list[int]) -> None:
        """The ``expired`` receipts of ``gseqs`` are staged: no report answers them again."""

    async def entries(self, group: str, limit: int) -> list[LogEntry]:
        """The first ``limit`` entries of the log, in gseq order."""

    async def take_lease(self, group: str, token: str, lease_ms: int) -> bool:
        """Become the group's fanner for ``lease_ms`` (False: another token holds it)."""

    async def fanned(self, group: str, token: str, upto: int, unheld: list[int], lease_ms: int) -> bool:
        """The entries up to gseq ``upto`` are in every target's queue: drop them from the log, count
        each gseq of ``unheld`` off its body (once per entry still logged), renew the lease. False
        (nothing done) if ``token`` no longer holds the lease."""

    async def release(self, group: str, token: str) -> bool:
        """Give the lease up, unless entries remain in the log (False: fan them first)."""

    async def hint(self, group: str, at_ms: int) -> None:
        """Index ``group`` as possibly holding entries, due for any node's sweep at ``at_ms`` (before an
        append: a node that dies after appending leaves the hint)."""

    async def clear_hint(self, group: str, at_ms: int) -> None:
        """Drop the hint if it is still due at ``at_ms`` (a newer hint stays)."""

    async def due(self, now_ms: int, limit: int) -> list[tuple[str, int]]:
        """Hinted groups due by ``now_ms``, with the time each is due at."""
