"""The chaos results as Markdown: bench/results/chaos.md and the table in docs/RELIABILITY.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import REPO, fmt, machine_line, md_table, write_text_atomic

DOC = REPO / "docs" / "RELIABILITY.md"
TITLES = {"chaos": "Chaos: faults, floods and hostile input", "chaos-cluster": "Chaos: cluster mode under faults"}
"""The results' name (``bench/results/{name}.json``, the table's markers in ``DOC``) -> the title of its .md."""


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}-table:start -->", f"<!-- {name}-table:end -->"
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
    found = [line for line in (highlight(r) for r in result["rows"]) if line]
    found += [f"{r['key']}: {'holds' if v['ok'] else '**FAILED**'}: {name}: {v['figure']}"
              for r in result["rows"] for name, v in r.get("checks", {}).items()]
    if found:
        lines += ["Figures of the scenarios:", "", *(f"- {line}" for line in found), ""]
    notes = result.get("notes", [])
    if notes:
        lines += ["Notes on this run:", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(lines)


def details(result: dict[str, Any], name: str = "chaos") -> str:
    """chaos.md (or chaos-cluster.md): the table, then each scenario's own figures."""
    out = [f"# {TITLES[name]}", "", table(result)]
    for r in result["rows"]:
        extra = {k: v for k, v in r.items()
                 if k not in {"scenario", "messages", "fault", "examples", "rss_series", "checks"}}
        out += [f"## {r['scenario']}", "", "```", *(f"{k}: {v}" for k, v in extra.items()), "```", ""]
        if r.get("examples"):
            out += ["Failures seen:", "", *(f"- {e}" for e in r["examples"]), ""]
    return "\n".join(out)


def update_doc(result: dict[str, Any], doc: Path = DOC, name: str = "chaos") -> bool:
    """Replace the table between the markers of ``name`` in ``doc``; False if the markers are missing."""
    if not doc.exists():
        return False
    text = doc.read_text(encoding="utf-8")
    start, end = markers(name)
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    _old, tail = rest.split(end, 1)
    write_text_atomic(doc, f"{head}{start}\n{table(result)}\n{end}{tail}")
    return True


def failed_checks(r: dict[str, Any]) -> list[str]:
    """The names of a row's scenario-specific checks that failed (``checks``: name -> {ok, figure})."""
    return [name for name, verdict in r.get("checks", {}).items() if not verdict["ok"]]


def highlight(r: dict[str, Any]) -> str:
    """One line of the figures that matter for a scenario beyond the table's columns."""
    key = r.get("key")
    if key == "disk":
        return (f"disk: {fmt(r.get('internal_errors_while_full'))} `internal` refusals to senders while full; "
                f"{fmt(r.get('sent_while_full'))} `sent` given while full, all of them survived the SIGKILL that "
                f"followed; broker up while full: {r.get('alive_while_full')}; started on a read-only data dir: "
                f"{r.get('started_read_only')} (refused with an error, then recovered)")
    if key == "slow":
        spam = r.get("spam", {})
        answers = ", ".join(f"{fmt(n)} `{k}`" for k, n in sorted(spam.get("answers", {}).items()))
        return (f"slow consumers: staged for them at most {fmt(r.get('staged_for_slow_max'))} (2 devices x "
                f"`delivery.max_queue` {fmt(r.get('max_queue'))}); the spammer published "
                f"{fmt(spam.get('published'))} and was answered {answers or 'nothing'} (past "
                f"`limits.max_unacked_downlinks` unacknowledged answers it is read slowly); broker RSS "
                f"{fmt(r.get('rss_kib_start'))} KiB at the start, {fmt(r.get('rss_kib_max'))} KiB at most, "
                f"{fmt(r.get('rss_kib_growth_second_half'))} KiB growth over the second half")
    if key == "flood":
        floods = r.get("floods", {})
        parts = [f"{k} {fmt(v.get('honest_p99_ms'))} ms" for k, v in floods.items() if isinstance(v, dict)]
        bad = floods.get("badpw", {})
        return (f"floods: honest p99 before {fmt(floods.get('baseline_p99_ms'))} ms, during each: "
                f"{', '.join(parts)}; {fmt(bad.get('per_s'))} bad-password logins/s, all refused; "
                f"spam {fmt(floods.get('spam', {}).get('per_s'))} msg/s, answered `rate_limited`; seen reports "
                f"{fmt(floods.get('seen', {}).get('per_s'))}/s of 1,000 ids, answered "
                f"{floods.get('seen', {}).get('answers')}, {fmt(floods.get('seen', {}).get('staged_items'))} "
                "items staged for their target after it")
    if key == "hostile":
        h = r.get("hostile", {})
        return (f"hostile: {fmt(h.get('leaked_items'))} items of others reached the attacker, "
                f"{fmt(h.get('subscribes_refused'))} foreign SUBSCRIBEs refused and "
                f"{fmt(h.get('subscribes_granted_to_others'))} granted; examples {h.get('examples')}")
    if key == "cluster-node":
        return f"cluster-node: HAProxy marked the killed node DOWN after {r.get('haproxy_down_s')} s"
    if key == "cluster-redis":
        return (f"cluster-redis: replica promoted (seen by every node) {r.get('promoted_s')} s after each kill; "
                f"refusals to senders: {r.get('errors_seen')}")
    if key == "cluster-cutoff":
        return (f"cluster-cutoff: node2 DOWN {r.get('down_after_s')} s after each cut, UP again within about a second "
                f"of the links' return; `internal` that reached senders: {r.get('internal_during_cut')}, the node's "
                f"\"not staged\" answers: {r.get('refusals_logged')}")
    if key == "clients":
        return f"clients: {fmt(r.get('unsent_at_kill'))} messages were in the killed processes' outboxes"
    return ""
