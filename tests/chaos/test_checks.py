"""The chaos harness's own decisions, without a broker: the hostile-text cases and the floods' pass/fail."""

from __future__ import annotations

import json
from typing import Any

from bench.chaos.abuse import judge_floods, limits
from bench.chaos.text import BAD_TEXTS, cases, examples, spoiled

LIMITS = limits({})  # the shipped defaults


def strings(value: Any) -> int:
    """String values plus field names in a JSON value."""
    if isinstance(value, str):
        return 1
    if isinstance(value, list):
        return sum(strings(v) for v in value)
    if isinstance(value, dict):
        return sum(1 + strings(v) for v in value.values())
    return 0


def bad_count(value: Any) -> int:
    if isinstance(value, str):
        return int(value in BAD_TEXTS)
    if isinstance(value, list):
        return sum(bad_count(v) for v in value)
    if isinstance(value, dict):
        return sum(int(k in BAD_TEXTS) + bad_count(v) for k, v in value.items())
    return 0


def test_every_string_and_field_name_of_every_uplink_gets_one_bad_text() -> None:
    all_cases = cases("mallory", "victim")
    expected = sum(strings(example) for _kind, example in examples("mallory", "victim")) * len(BAD_TEXTS)
    assert len(all_cases) == expected
    assert {c.kind for c in all_cases} == {"out", "seen", "ack", "hb", "req"}
    ops = {json.loads(c.payload).get("op") for c in all_cases if c.kind == "req"}
    assert {"keys.publish", "keys.claim", "devices.remove", "presence.subscribe"} <= ops
    for case in all_cases:
        decoded = json.loads(case.payload)  # valid JSON, ASCII on the wire, exactly one bad string in it
        assert bad_count(decoded) == 1, case
        case.payload.decode("ascii")


def test_messages_get_fresh_ids_so_none_is_a_repeat() -> None:
    ids = [json.loads(c.payload).get("id") for c in cases("m", "v") if c.kind == "out"]
    plain = [i for i in ids if isinstance(i, str) and i not in BAD_TEXTS]
    assert len(plain) == len(set(plain))


def test_spoiled_keeps_the_rest_of_the_payload() -> None:
    got = dict(spoiled({"a": ["x", 1]}, "!"))
    assert got == {"key:a": {"!": ["x", 1]}, "a[0]": {"a": ["!", 1]}}


# What the unfixed broker did in the CI-size run, and what a holding one does.
SEEN_BAD = {"published": 2050, "ids_per_report": 1000, "report_bytes": 10915, "answers": {},
            "staged_receipt_bytes": 16_393_597, "rss_kib_growth": 115_804}
SEEN_OK = {**SEEN_BAD, "answers": {"rate_limited": 1700}, "staged_receipt_bytes": 3_600_000, "rss_kib_growth": 9_000}
DEVICES_BAD = {"attempts": 64, "accepted": 64, "connack_codes": {"0": 64}, "devices_registered": 64}
DEVICES_OK = {"attempts": 64, "accepted": 16, "connack_codes": {"0": 16, "5": 48}, "devices_registered": 16}
GUESS_BAD = {"attempts": 200, "answered": 77, "connack_codes": {"5": 77, "-1": 123}, "passwords_checked": 72,
             "honest_connack": -1, "honest_login_s": 11.16}
GUESS_OK = {"attempts": 200, "answered": 150, "connack_codes": {"5": 150, "-1": 50}, "passwords_checked": 3,
            "honest_connack": 0, "honest_login_s": 0.2}
PREAUTH_BAD = {"connections": 100, "still_open_at_end": 0, "closed_after_s_max": 11.5, "rss_kib_growth": 486_252}
PREAUTH_OK = {"connections": 100, "still_open_at_end": 0, "closed_after_s_max": 0.3, "rss_kib_growth": 5_000}


def test_the_floods_fail_on_the_figures_of_the_unfixed_broker() -> None:
    floods = {"seen": SEEN_BAD, "devices": DEVICES_BAD, "guess": GUESS_BAD, "preauth": PREAUTH_BAD}
    checks = judge_floods(floods, LIMITS, 6.0)
    assert {name: v["ok"] for name, v in checks.items()} == {
        "seen flood": False, "device flood": False, "concurrent guessing": False, "pre-auth buffering": False}


def test_the_floods_hold_within_the_limits() -> None:
    floods = {"seen": SEEN_OK, "devices": DEVICES_OK, "guess": GUESS_OK, "preauth": PREAUTH_OK}
    checks = judge_floods(floods, LIMITS, 6.0)
    assert all(v["ok"] for v in checks.values()), checks


def test_the_device_bound_comes_from_the_broker_config() -> None:
    floods = {"devices": DEVICES_OK}
    assert judge_floods(floods, limits({"limits": {"max_devices_per_user": 16}}), 6.0)["device flood"]["ok"]
    assert not judge_floods(floods, limits({"limits": {"max_devices_per_user": 8}}), 6.0)["device flood"]["ok"]


def test_a_preauth_connection_left_open_fails() -> None:
    floods = {"preauth": {**PREAUTH_OK, "still_open_at_end": 1}}
    assert not judge_floods(floods, LIMITS, 6.0)["pre-auth buffering"]["ok"]


def test_a_guess_that_gets_in_fails() -> None:
    floods = {"guess": {**GUESS_OK, "connack_codes": {"5": 199, "0": 1}}}
    assert not judge_floods(floods, LIMITS, 6.0)["concurrent guessing"]["ok"]
