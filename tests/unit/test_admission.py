"""``AddressSlots``: unauthenticated connections per address (broker/admission.py)."""

from __future__ import annotations

from broker.admission import AddressSlots


def test_the_cap_holds_per_address_and_slots_come_back() -> None:
    slots = AddressSlots(2)
    assert slots.take("10.0.0.1") and slots.take("10.0.0.1")
    assert not slots.take("10.0.0.1"), "a third one from the same address"
    assert slots.held("10.0.0.1") == 2, "a refusal takes nothing"
    assert slots.take("10.0.0.2"), "another address has its own slots"
    slots.give("10.0.0.1")
    assert slots.take("10.0.0.1")


def test_given_back_addresses_leave_no_entry_and_zero_means_no_cap() -> None:
    slots = AddressSlots(1)
    for index in range(1000):
        assert slots.take(f"10.0.{index // 256}.{index % 256}")
        slots.give(f"10.0.{index // 256}.{index % 256}")
    assert slots._held == {}
    unlimited = AddressSlots(0)
    assert all(unlimited.take("10.0.0.1") for _ in range(10_000))
