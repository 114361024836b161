"""The chaos results as Markdown: bench/results/chaos.md and the table in docs/RELIABILITY.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import REPO, fmt, machine_line, md_table, write_text_atomic

DOC = REPO / "docs" / "RELIABILITY.md"
START, END = "<!-- chaos-table:start -->", "<!-- chaos-table:end -->"
COLUMNS = ("scenario", "messages", "faults injected", "lost", "duplicated", "reordered", "false `sent`",
           "misrouted", "honest p99 during fault (ms)")


def table(result: dict[str, Any]) -> str:
    rows = []
    for r in result["rows"]:
        rows.append([r["scenario"], r["messages"], f'{r["faults"]}: {r["fault"]}', r["lost"], r["duplicated"],
                     r["reordered"], r["false_sent"], r["misrouted"] + r["unknown"], fmt(r["honest_p99_ms"])])
    m = result["machine"]
    lines = [f"Run {result['date']} with `{result['command']}` ({result['size']} sizes), "
             f"{result['seconds']:.0f} s, on {machine_line(m)}.", "",
             *md_table(COLUMNS, rows, "lrlrrrrrr"), ""]
    notes = result.get("notes", [])
    if notes:
        lines += ["Notes on this run:", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(lines)


def details(result: dict[str, Any]) -> str:
    """chaos.md: the table, then each scenario's own figures."""
    out = ["# Chaos: faults, floods and hostile input", "", table(result)]
    for r in result["rows"]:
        extra = {k: v for k, v in r.items() if k not in {"scenario", "messages", "fault", "examples", "rss_series"}}
        out += [f"## {r['scenario']}", "", "```", *(f"{k}: {v}" for k, v in extra.items()), "```", ""]
        if r.get("examples"):
            out += ["Failures seen:", "", *(f"- {e}" for e in r["examples"]), ""]
    return "\n".join(out)


def update_doc(result: dict[str, Any], doc: Path = DOC) -> bool:
    """Replace the table between the markers of ``doc``; False if the markers are missing."""
    if not doc.exists():
        return False
    text = doc.read_text(encoding="utf-8")
    if START not in text or END not in text:
        return False
    head, rest = text.split(START, 1)
    _old, tail = rest.split(END, 1)
    write_text_atomic(doc, f"{head}{START}\n{table(result)}\n{END}{tail}")
    return True
