"""Listener addresses in the config: ``HOST:PORT`` (IPv6 in brackets)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator


def parse_bind(value: str) -> tuple[str, int]:
    """``"127.0.0.1:1883"`` -> ``("127.0.0.1", 1883)``; ``[::1]:1883`` works too."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"{value!r} is not HOST:PORT")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port {port} is out of range")
    return host.strip("[]"), port


def _valid_bind(value: str | None) -> str | None:
    if value is not None:
        parse_bind(value)
    return value


Bind = Annotated[str | None, AfterValidator(_valid_bind)]
"""A listener address ``HOST:PORT`` (checked like ``--bind``), or None: off."""
