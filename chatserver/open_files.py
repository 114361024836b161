"""The broker's open-file limit: every connection is a descriptor.

A shell's soft limit is usually 1,024 while the hard limit is far higher (systemd's default is 524,288),
so a broker left at the soft limit refuses its ~1,000th phone (``accept`` fails with EMFILE) long before
``listeners.*.max_connections``. At start-up the soft limit is raised to what the listeners may hold,
as far as the hard limit allows; if the hard limit is short, a warning says how many connections fit
and how to raise it. Nothing is raised past what is needed, and nothing is lowered.

``plan`` is the rule (pure); ``raise_limit`` applies it to the process.
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

RESERVED = 256
"""Descriptors besides the connections: databases and their WAL files, logs, the metrics and media
listeners, Redis connections, files being uploaded."""
UNLIMITED_WANTS = 1_048_576
"""What a listener with ``max_connections: 0`` (no limit) asks for: Linux's default ``fs.nr_open``."""


@dataclass(frozen=True, slots=True)
class Plan:
    soft: int
    """The soft limit to set (the current one when nothing changes)."""
    wanted: int
    """Descriptors the listeners may need, with ``RESERVED``."""

    @property
    def fit(self) -> int:
        """Connections the soft limit leaves room for."""
        if self.soft == resource.RLIM_INFINITY:
            return self.wanted - RESERVED
        return max(self.soft - RESERVED, 0)

    @property
    def short(self) -> bool:
        return self.soft != resource.RLIM_INFINITY and self.soft < self.wanted


def plan(soft: int, hard: int, max_connections: Sequence[int]) -> Plan:
    """The soft limit for listeners that hold at most ``max_connections`` each (0: no limit), given the
    current ``soft`` and ``hard`` limits (``resource.RLIM_INFINITY``: none)."""
    wanted = sum(UNLIMITED_WANTS if n == 0 else n for n in max_connections) + RESERVED
    ceiling = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    return Plan(soft if soft == resource.RLIM_INFINITY else max(soft, ceiling), wanted)


def raise_limit(max_connections: Sequence[int]) -> Plan:
    """Raise this process's soft ``RLIMIT_NOFILE`` for its listeners (``plan``), and log what came of it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    chosen = plan(soft, hard, max_connections)
    if chosen.soft != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (chosen.soft, hard))
        except (ValueError, OSError) as exc:  # fs.nr_open below the hard limit, or a sandbox refusing it
            log.warning("open files: cannot raise the limit from %d to %d (%s)", soft, chosen.soft, exc)
            chosen = plan(soft, soft, max_connections)
        else:
            log.info("open files: limit raised from %d to %d", soft, chosen.soft)
    if chosen.short:
        log.warning("open files: the limit of %d leaves room for about %d connections, fewer than "
                    "listeners.*.max_connections allow (%d): raise the hard limit (systemd LimitNOFILE=, "
                    "ulimit -Hn, docker --ulimit nofile=) or lower max_connections",
                    chosen.soft, chosen.fit, chosen.wanted - RESERVED)
    return chosen
