"""Write-back in cluster mode: items a node delivers from memory and writes to the store only if
they are not acked within ``staging.flush_ms`` (the seed's write-back, as one node does it with
SQLite). Pure: the caller passes the time and applies what comes back (bridge/cluster/messaging.py).

Rules:
1. A stage (the items of one message or receipt for one user's devices) is *held* only if every
   target device is connected to this node and caught up (bridge/cluster/window.py rule 4); each
   target gets the item under a local seq at once. A message is first reserved in the store (its
   dedup mark is checked and a pending mark set), so a repeat is recognised on every node.
2. Held stages form *lanes*, one per sending device (receipts: one per receiving user), in the
   order they were held. A held stage is written (staged for the devices that have not acked it
   yet) when its ``flush_ms`` is up, when one of its target devices leaves, or before a later
   item of its lane goes to the store directly; writing one writes every earlier one of its lane
   first, so the store's seqs follow each lane's order.
3. A held stage every target acked is *settled*: it never reaches the store (a message's pending
   mark becomes its dedup mark; a receipt leaves no trace).
4. The first ack by a device of the recipient of a held message with ``delivery`` reports it
   ``delivered``, once (a ``seen`` does too, ``report_seen``); its written copy then keeps no
   delivery record.
5. A device that acks while its stage is being written acked the local seq only: the caller acks
   the written copy for it afterwards (``Held.acked_while_writing``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from bridge.cluster.store import Stage
from chatproto import MsgItem, ReceiptItem


@dataclass(eq=False, slots=True)
class Held:
    stage: Stage  # its ``devices`` are the targets
    lane: str
    seqs: dict[str, int]  # client id -> local seq
    links: dict[str, int]  # client id -> the window link it was sent on
    due: float
    unacked: set[str] = field(default_factory=set)
    reported: bool = False  # rule 4
    writing: bool = False
    acked_while_writing: set[str] = field(default_factory=set)

    def write_stage(self) -> Stage:
        """What goes to the store: the unacked targets, a delivery record unless reported already."""
        return replace(self.stage, devices=tuple(sorted(self.unacked)), writeback=self.stage.message is not None,
                       delivery=self.stage.delivery and not self.reported)


@dataclass(slots=True)
class AckOutcome:
    delivered: list[Held] = field(default_factory=list)  # rule 4: report these now
    settled: list[Held] = field(default_factory=list)  # rule 3


def item_for(stage: Stage, client_id: str, seq: int) -> MsgItem | ReceiptItem | None:
    """The item ``client_id`` gets for ``stage`` (None: an olm message without its ciphertext)."""
    if stage.receipt is not None:
        return replace(stage.receipt, seq=seq)
    message = stage.message
    if message is None:
        raise ValueError("a stage carries a message or a receipt")
    body = message.body if message.bodies is None else message.bodies.get(client_id)
    if body is None:
        return None
    return MsgItem(seq, message.msg_id, message.sender, message.recipient, message.type, body, message.ts,
                   message.dev)


class WriteBack:
    def __init__(self, flush_s: float) -> None:
        self.flush_s = flush_s
        self._lanes: dict[str, list[Held]] = {}
        self._by_seq: dict[tuple[str, int], Held] = {}
        self._by_message: dict[tuple[str, str], list[Held]] = {}  # (sender, msg id) -> its held stages

    def __len__(self) -> int:
        return sum(len(lane) for lane in self._lanes.values())

    def hold(self, stage: Stage, lane: str, seqs: dict[str, int], links: dict[str, int], now: float) -> Held:
        held = Held(stage, lane, dict(seqs), dict(links), now + self.flush_s, unacked=set(seqs))
        self._lanes.setdefault(lane, []).append(held)
        for client_id, seq in seqs.items():
            self._by_seq[(client_id, seq)] = held
        if stage.message is not None:
            self._by_message.setdefault((stage.message.sender, stage.message.msg_id), []).append(held)
        return held

    def acked(self, client_id: str, local_seqs: Iterable[int]) -> AckOutcome:
        out = AckOutcome()
        for seq in local_seqs:
            held = self._by_seq.pop((client_id, seq), None)
            if held is None or client_id not in held.unacked:
                continue
            held.unacked.discard(client_id)
            if held.writing:
                held.acked_while_writing.add(client_id)
            if held.stage.delivery and not held.reported and client_id.partition(".")[0] == held.stage.user:
                held.reported = True
                out.delivered.append(held)
            if not held.unacked and not held.writing:
                self._drop(held)
                out.settled.append(held)
        return out

    def report_seen(self, recipient: str, sender: str, msg_ids: Iterable[str]) -> list[str]:
        """Rule 4 for a ``seen``: the ids of held messages it delivers for the first time."""
        found = []
        for msg_id in dict.fromkeys(msg_ids):
            for held in self._by_message.get((sender, msg_id), ()):
                if held.stage.delivery and not held.reported and held.stage.user == recipient:
                    held.reported = True
                    found.append(msg_id)
        return found

    def holds(self, sender: str, msg_id: str) -> bool:
        """Whether a message is held (a repeat of it waits for its ``sent``)."""
        return (sender, msg_id) in self._by_message

    def busy(self, lane: str) -> bool:
        """Whether some of the lane is being written: nothing of it may be held until that is done
        (a held item would reach a device before the written one, which is older)."""
        return any(held.writing for held in self._lanes.get(lane, ()))

    def next_due(self) -> float | None:
        dues = [h.due for lane in self._lanes.values() for h in lane if not h.writing]
        return min(dues, default=None)

    def due(self, now: float) -> list[Held]:
        """Rule 2: what to write now, lane by lane in order."""
        out: list[Held] = []
        for lane in list(self._lanes):
            last = None
            for held in self._lanes[lane]:
                if held.due <= now:
                    last = held
            if last is not None:
                out += self._take(lane, last)
        return out

    def lane(self, lane: str) -> list[Held]:
        """Rule 2: the whole lane, before an item of it goes to the store directly."""
        held = self._lanes.get(lane)
        return self._take(lane, held[-1]) if held else []

    def gone(self, client_id: str) -> list[Held]:
        """Rule 2: a target device left; what must be written now."""
        out: list[Held] = []
        for lane in list(self._lanes):
            last = None
            for held in self._lanes[lane]:
                if client_id in held.unacked:
                    last = held
            if last is not None:
                out += self._take(lane, last)
        return out

    def written(self, held: Held) -> None:
        self._drop(held)

    def _take(self, lane: str, last: Held) -> list[Held]:
        """The lane's held stages up to ``last`` not being written yet, now marked as being written."""
        out = []
        for held in self._lanes.get(lane, []):
            if not held.writing:
                held.writing = True
                out.append(held)
            if held is last:
                break
        return out

    def _drop(self, held: Held) -> None:
        lane = self._lanes.get(held.lane)
        if lane is not None and held in lane:
            lane.remove(held)
            if not lane:
                del self._lanes[held.lane]
        for client_id, seq in held.seqs.items():
            if self._by_seq.get((client_id, seq)) is held:
                del self._by_seq[(client_id, seq)]
        message = held.stage.message
        if message is not None:
            key = (message.sender, message.msg_id)
            stages = self._by_message.get(key, [])
            if held in stages:
                stages.remove(held)
                if not stages:
                    del self._by_message[key]
