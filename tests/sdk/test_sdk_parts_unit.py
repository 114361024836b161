"""The SDK's small pure parts and its local store, without a network: login
secret choice and token fallback, backoff with jitter, CONNACK -> exception
mapping, the exception tree, and the store's identity, schema and permissions."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from client_sdk import errors
from client_sdk.backoff import Backoff, backoff_delay
from client_sdk.engine import validate_identity
from client_sdk.localstore import MIGRATIONS, LocalStore
from client_sdk.login import PASSWORD, TOKEN, LoginPlan, Refusal


def test_login_uses_token_then_falls_back_to_password_once() -> None:
    plan = LoginPlan("pw", "dt1.tok")
    first = plan.next()
    assert first is not None and first.kind == TOKEN and not plan.accepted(first)
    assert plan.refused(first) is Refusal.RETRY_NOW
    second = plan.next()
    assert second is not None and second.kind == PASSWORD and second.value == "pw"
    assert plan.accepted(second)  # a password login asks for a new token
    plan.token_issued("dt1.new")
    third = plan.next()
    assert third is not None and third.kind == TOKEN and third.value == "dt1.new"


def test_refused_password_is_final() -> None:
    plan = LoginPlan("wrong", None)
    secret = plan.next()
    assert secret is not None and plan.refused(secret) is Refusal.FINAL


def test_refused_token_without_password_is_final() -> None:
    plan = LoginPlan(None, "dt1.tok")
    secret = plan.next()
    assert secret is not None and plan.refused(secret) is Refusal.FINAL
    assert plan.next() is None


def test_secret_repr_hides_the_value() -> None:
    secret = LoginPlan("hunter2", None).next()
    assert "hunter2" not in repr(secret)


def test_backoff_grows_caps_and_jitters() -> None:
    assert backoff_delay(0, 0.5, 30, rng=lambda: 0.0) == 0.5
    assert backoff_delay(3, 0.5, 30, rng=lambda: 0.0) == 4.0
    assert backoff_delay(60, 0.5, 30, rng=lambda: 0.0) == 30.0
    assert backoff_delay(3, 0.5, 30, jitter=0.5, rng=lambda: 1.0) == 2.0
    backoff = Backoff(1.0, 8.0)
    delays = [backoff.next() for _ in range(6)]
    assert all(0.5 * cap <= d <= cap for d, cap in zip(delays, [1, 2, 4, 8, 8, 8], strict=True))
    backoff.reset()
    assert backoff.next() <= 1.0


@pytest.mark.parametrize(("value", "kind"), [
    (5, errors.AuthError), (135, errors.AuthError), (4, errors.AuthError), (134, errors.AuthError),
    (2, errors.IdentifierRejected), (133, errors.IdentifierRejected),
    (3, errors.ConnectError), (1, errors.ConnectError),
])
def test_connack_mapping(value: int, kind: type[errors.ConnectError]) -> None:
    error = errors.connack_error(value)
    assert type(error) is kind
    assert error.code == errors.connack_code(value)


def test_exception_tree() -> None:
    assert issubclass(errors.AuthError, errors.ConnectError)
    assert issubclass(errors.IdentifierRejected, errors.ConnectError)
    assert issubclass(errors.IdentifierRejected, ValueError)
    assert issubclass(errors.ConnectTimeout, errors.ConnectError)
    assert issubclass(errors.ConnectTimeout, TimeoutError)
    assert issubclass(errors.RequestTimeout, errors.ChatTimeout)
    for name in ("ConnectError", "RequestError", "ClientClosed", "StoreError", "NotConnected", "ChatTimeout"):
        assert issubclass(getattr(errors, name), errors.ChatError)
    failure = errors.RequestError("ping", "bad_envelope", "no args")
    assert (failure.op, failure.code, failure.detail) == ("ping", "bad_envelope", "no args")


@pytest.mark.parametrize(("user", "device"), [("Alice", "phone"), ("alice", "ph.one"), ("alice", ""), ("", "x")])
def test_identity_is_checked_locally(user: str, device: str) -> None:
    with pytest.raises(errors.IdentifierRejected):
        validate_identity(user, device)


def test_store_belongs_to_one_identity(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    LocalStore(path, "alice", "phone").close()
    with pytest.raises(errors.StoreError, match=r"belongs to alice\.phone"):
        LocalStore(path, "alice", "laptop")
    LocalStore(path, "alice", "phone").close()


def test_store_is_private_and_versioned(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = LocalStore(path, "alice", "phone")
    store.set_token("dt1.secret")
    store.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(errors.StoreError, match="upgrade the SDK"):
        LocalStore(path, "alice", "phone")


def test_store_token_roundtrip_and_memory_store() -> None:
    store = LocalStore(None, "alice", "phone")
    assert store.token() is None
    store.set_token("dt1.x")
    assert store.token() == "dt1.x"
    store.set_token(None)
    assert store.token() is None and store.last_seq() == 0
    store.close()


def test_unusable_store_path_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(errors.StoreError):
        LocalStore(tmp_path / "dir.db", "alice", "phone")
