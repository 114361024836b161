"""The store contract suite: every test here runs once per backend of tests/stores/backends.py
(``BACKENDS``, or the module's own ``STORE_BACKENDS``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.stores.backends import BACKENDS, Backend, open_backend


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", getattr(metafunc.module, "STORE_BACKENDS", BACKENDS), indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """One backend with data of its own; each test module's ``store`` fixture opens its store on it."""
    return open_backend(str(request.param), request, tmp_path)
