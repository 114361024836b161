"""The store contract suite: every test here runs once per backend of tests/stores/backends.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.stores.backends import BACKENDS, Backend, open_backend


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """One backend with data of its own; each test module's ``store`` fixture opens its store on it."""
    return open_backend(str(request.param), tmp_path)
