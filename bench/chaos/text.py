"""Hostile text: text that cannot be UTF-8 (lone UTF-16 surrogates) in every field of every uplink.

JSON may spell a lone surrogate (``"\\ud800"``); Python's ``json`` reads it into a ``str``
that cannot be encoded as UTF-8, so anything that stores or forwards it fails later, far
from the edge (a staged message made the store's commit raise and killed the flush task).
``cases(...)`` walks a valid example of each uplink kind and request op and yields one
payload per string value and per field name with that string replaced: every one must be
refused at the edge with an ``error`` (or a ``res`` with ``ok:false``), none accepted.
``run(...)`` (``python -m bench.chaos.attacks text``) sends them all and counts the answers.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from bench.chaos.hostile import Attacker

BAD_TEXTS = ("\ud800", "ok\udfffok")  # a lone high and a lone low surrogate, alone and inside text


@dataclass(frozen=True)
class Case:
    kind: str  # the uplink topic's last level: out, seen, ack, hb, req
    field: str  # where the bad text is, e.g. "args.users[0]" or "key:bodies"
    payload: bytes


def examples(user: str, victim: str) -> list[tuple[str, dict[str, Any]]]:
    """One valid uplink of each kind and each request op (PROTOCOL.md sections 4-9)."""
    b64 = "QUJDRA"
    device_keys = {"user": user, "device": "text", "curve25519": b64, "ed25519": b64, "signature": b64}
    ops: list[tuple[str, dict[str, Any] | None]] = [
        ("ping", None), ("auth.token", None), ("auth.revoke", {"device": "text"}),
        ("presence.get", {"users": [victim]}), ("presence.subscribe", {"users": [victim]}),
        ("presence.unsubscribe", {"users": [victim]}), ("privacy.set", {"last_seen": "contacts"}),
        ("privacy.get", None), ("contacts.add", {"users": [victim]}), ("contacts.remove", {"users": [victim]}),
        ("keys.publish", {"device_keys": device_keys, "one_time_keys": {"AAAAAQ": {"key": b64, "signature": b64}},
                          "fallback_key": {"id": "AAAAAg", "key": b64, "signature": b64}}),
        ("keys.count", None), ("keys.list", {"user": victim}), ("keys.claim", {"user": victim, "devices": ["phone"]}),
        ("devices.remove", {"device": "gone"}),
    ]
    target = f"{victim}.phone"
    return [
        ("out", {"id": "t1", "to": victim, "body": "hello", "type": "text"}),
        ("out", {"id": "t2", "to": victim, "type": "olm", "bodies": {target: "Y3Q"}, "keys": {target: b64}}),
        ("seen", {"to": victim, "ids": ["m1", "m2"]}),
        ("ack", {"seqs": [1]}),
        ("hb", {"state": "away"}),
        *(("req", {"rid": f"r-{op}", "op": op, **({"args": args} if args is not None else {})}) for op, args in ops),
    ]


def spoiled(value: Any, bad: str, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(where, copy)`` for each string value and each field name in ``value``, replaced by ``bad``."""
    if isinstance(value, str):
        yield path or "value", bad
    elif isinstance(value, list):
        for i, item in enumerate(value):
            for where, copy in spoiled(item, bad, f"{path}[{i}]"):
                yield where, [*value[:i], copy, *value[i + 1:]]
    elif isinstance(value, dict):
        for key, item in value.items():
            inner = f"{path}.{key}" if path else key
            yield f"key:{inner}", {(bad if k == key else k): v for k, v in value.items()}
            for where, copy in spoiled(item, bad, inner):
                yield where, {**value, key: copy}


def cases(user: str, victim: str) -> list[Case]:
    """Every hostile payload, each with exactly one bad string (as a JSON ``\\u`` escape: valid JSON)."""
    out: list[Case] = []
    for kind, example in examples(user, victim):
        for n, bad in enumerate(BAD_TEXTS):
            for where, copy in spoiled(example, bad):
                fresh = kind == "out" and isinstance(copy.get("id"), str) and where != "id"
                payload = {**copy, "id": f"t{len(out)}"} if fresh else copy  # a fresh id: no case is a repeat
                out.append(Case(kind, f"{where}#{n}", json.dumps(payload).encode("ascii")))
    return out


def refused(item: dict[str, Any]) -> bool:
    return item.get("kind") == "error" or (item.get("kind") == "res" and item.get("ok") is False)


def accepted(item: dict[str, Any]) -> bool:
    return (item.get("kind") == "res" and item.get("ok") is True) or \
        (item.get("kind") == "receipt" and item.get("status") in ("sent", "delivered"))  # rule 11


def run(port: int, seconds: float, user: str, password: str, victim: str) -> dict[str, Any]:
    """Send every case on the attacker's own topics, one at a time, each given ``seconds`` / 10 to be answered
    (an unanswered one was taken: its field is listed)."""
    attacker = Attacker(port, user, password, "text")  # its own device: no items staged for another one

    def answers() -> int:  # receipts of the hostile scenario's own messages, if any, are no answers
        return sum(1 for i in list(attacker.items) if refused(i) or accepted(i))

    time.sleep(0.5)  # the inbox subscription is in place before the first answer
    todo = cases(user, victim)
    unanswered: list[str] = []
    for case in todo:
        if attacker.closed.is_set():  # the broker closed the attacker (or died): the rest are not answered
            unanswered.append(f"{case.kind}:{case.field}")
            continue
        before = answers()
        attacker.publish(f"u/{user}/{case.kind}", case.payload)
        deadline = time.monotonic() + seconds / 10
        while answers() == before and time.monotonic() < deadline:
            time.sleep(0.005)
        if answers() == before:
            unanswered.append(f"{case.kind}:{case.field}")
    time.sleep(0.5)  # late answers
    items = list(attacker.items)
    attacker.sock.close()
    return {"payloads": len(todo), "by_kind": dict(Counter(c.kind for c in todo)),
            "refused": sum(1 for i in items if refused(i)), "accepted": sum(1 for i in items if accepted(i)),
            "unanswered": unanswered,
            "answers": dict(Counter(str(i.get("code") or (i.get("error") or {}).get("code") or i.get("status")
                                        or i.get("kind")) for i in items)),
            "attacker_still_connected": not attacker.closed.is_set()}
