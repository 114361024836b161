"""ClientOptions: one set of settings, defaults and checks for both client faces (no network)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from client_sdk import AsyncClient, Client, ClientOptions, IdentifierRejected
from client_sdk.options import ClientSettings


def test_the_keyword_settings_are_exactly_the_option_fields() -> None:
    assert set(ClientSettings.__annotations__) == {f.name for f in dataclasses.fields(ClientOptions)}


def test_keywords_override_an_options_object() -> None:
    base = ClientOptions(device="laptop", port=1884, encryption=False)
    assert ClientOptions.of(base, {}) is base
    assert ClientOptions.of(base, {"port": 1999}) == dataclasses.replace(base, port=1999)
    assert ClientOptions.of(None, {"device": "phone"}) == ClientOptions(device="phone")


@pytest.mark.parametrize("bad", [
    {"heartbeat_interval": 0.0},
    {"reconnect_delay": (0.0, 1.0)},
    {"reconnect_delay": (2.0, 1.0)},
    {"hold_retry": (5.0, 1.0)},
    {"transport": "udp"},
])
def test_unusable_settings_are_refused(bad: ClientSettings) -> None:
    with pytest.raises(ValueError):
        ClientOptions(**bad)


def test_the_device_is_no_longer_positional() -> None:
    with pytest.raises(TypeError, match="as keywords"):
        Client("alice", "pw", "laptop")  # type: ignore[arg-type]


def test_both_faces_take_keywords_or_an_options_object(tmp_path: Path) -> None:
    options = ClientOptions(device="laptop", store=tmp_path / "a.db", encryption=False)
    by_object = Client("alice", "pw", options=options)
    by_object.close()
    by_keywords = Client("alice", "pw", device="laptop", store=tmp_path / "a.db", encryption=False)
    assert (by_keywords.user, by_keywords.device) == ("alice", "laptop")
    by_keywords.close()
    aio = AsyncClient("alice", "pw", options, device="tablet", store=tmp_path / "b.db")
    assert aio.device == "tablet"
    asyncio.run(aio.close())
    with pytest.raises(IdentifierRejected):
        Client("alice", "pw", options, device="not a device")
