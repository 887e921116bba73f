"""Turning figures into ``bench/results.json``, ``bench/RESULTS.md`` and the README's section.

``python -m bench.report`` writes the tables again from ``bench/results.json`` (after a change to
their layout, say), provided it holds a full run.
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import ROOT

RESULTS_JSON = ROOT / "bench" / "results.json"
RESULTS_MD = ROOT / "bench" / "RESULTS.md"
README = ROOT / "README.md"
SECTION = "## Benchmarks"
FIGURE_COUNT = 6
WIDTH = 100  # prose is wrapped like the rest of the README; table rows are not


def fmt(value: float | None, unit: str = "") -> str:
    """A number for a table: thousands separators, few decimals, the unit after it."""
    if value is None:
        return "n/a"
    a = abs(value)
    if value == int(value) and (a >= 100 or a == 0):
        text = f"{int(value):,}"
    elif a >= 100:
        text = f"{value:,.0f}"
    elif a >= 10:
        text = f"{value:,.1f}"
    elif a >= 0.1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3f}"
    if not unit:
        return text
    return f"{text}{unit}" if unit == "x" else f"{text} {unit}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def machine_line(machine: dict[str, Any]) -> str:
    """One sentence naming the machine the figures ran on."""
    load = machine.get("loadavg_at_start") or []
    load_text = f"; load average {load[0]:g} at the start" if load else ""
    ram = machine.get("ram_gib")
    return (
        f"{machine.get('date', '?')}, on {machine.get('nproc', '?')} CPUs "
        f"({machine.get('cpu', '?')}), {ram if ram is not None else '?'} GiB RAM, "
        f"{machine.get('rabbitmq', '?')}, Python {machine.get('python', '?')}, "
        f"{machine.get('os', '?')}{load_text}"
    )


def targets_table(figures: Sequence[dict[str, Any]]) -> list[str]:
    """One row per target: what, the value, the requirement, pass or MISSED."""
    lines = [
        "| # | target | measured | value | required | result |",
        "|---|---|---|---|---|---|",
    ]
    for fig in figures:
        if fig.get("error"):
            lines.append(
                f"| {fig['number']} | {_cell(fig['title'])} | - | n/a | - | "
                f"**ERROR**: {_cell(fig['error'].splitlines()[0][:160])} |"
            )
            continue
        for t in fig["targets"]:
            result = "pass" if t["passed"] else "**MISSED**"
            if not t["passed"] and t.get("detail"):
                result += f" ({_cell(t['detail'][:120])})"
            lines.append(
                f"| {fig['number']} | {_cell(t['label'])} | {_cell(t['measured'])} | "
                f"{fmt(t['value'], t['unit'])} | {t['op'].replace('>=', '≥').replace('<=', '≤')} "
                f"{fmt(t['threshold'], t['unit'])} | {result} |"
            )
    return lines


def measurements_table(figures: Sequence[dict[str, Any]]) -> list[str]:
    """Every series (median, range, runs) and every ratio of medians."""
    lines = ["| # | measurement | median | min - max | runs |", "|---|---|---|---|---|"]
    for fig in figures:
        for s in fig["series"]:
            if s["median"] is None:
                continue
            label = s["label"] + (f" ({s['note']})" if s["note"] else "")
            lines.append(
                f"| {fig['number']} | {_cell(label)} | {fmt(s['median'], s['unit'])} | "
                f"{fmt(s['min'])} - {fmt(s['max'])} | {len(s['values'])} |"
            )
        for r in fig["ratios"]:
            lines.append(
                f"| {fig['number']} | ratio: {_cell(r['label'])} | {fmt(r['value'], 'x')} | "
                "(of the medians) | |"
            )
    return lines


def body(results: dict[str, Any], level: int) -> list[str]:
    """The tables with their headings, headings at ``level``."""
    h = "#" * level
    figures = results["figures"]
    runs = results["runs"]
    lines = [
        _wrap(
            f"Measured by `make bench` {machine_line(results['machine'])}. Each figure is the "
            f"median of {runs} runs; in every run queuejob and its baseline are measured side by "
            f"side. Whole run: {results['total_s'] / 60:.1f} min."
        ),
        "",
        f"{h} Targets",
        "",
        *targets_table(figures),
        "",
        f"{h} Measurements",
        "",
        *measurements_table(figures),
    ]
    notes = [(f["number"], n) for f in figures for n in f["notes"]]
    if notes:
        lines += ["", f"{h} Notes", ""]
        lines += [textwrap.fill(f"- {num}: {n}", WIDTH, subsequent_indent="  ") for num, n in notes]
    return lines


def _wrap(text: str) -> str:
    return textwrap.fill(text, WIDTH, break_on_hyphens=False, break_long_words=False)


def results_markdown(results: dict[str, Any]) -> str:
    """The whole ``bench/RESULTS.md``."""
    lines = [
        "# queuejob benchmarks",
        "",
        _wrap(
            "Written by `make bench` (`python -m bench`); the raw numbers are in "
            "`bench/results.json`. What each figure measures and against what is described in "
            "the docstring of its module (`bench/fill.py`, `memory.py`, `detection.py`, "
            "`overhead.py`, `flow_overhead.py`, `scale.py`)."
        ),
        "",
        *body(results, 2),
    ]
    return "\n".join(lines) + "\n"


def readme_section(results: dict[str, Any]) -> str:
    """The README's ``## Benchmarks`` section."""
    lines = [
        SECTION,
        "",
        _wrap(
            "`make bench` measures seven figures, each beside its baseline (the docs' own way, or "
            "the obvious alternative) in the same run, and exits non-zero when one misses its "
            "target; `make bench BENCH_ARGS='--only fill,detection'` runs some of them, "
            "`--quick` runs smaller sizes. The latest full run (method: `bench/RESULTS.md` and "
            "the modules' docstrings):"
        ),
        "",
        *body(results, 3),
    ]
    return "\n".join(lines) + "\n"


def replace_section(text: str, section: str) -> str:
    """``text`` with its ``## Benchmarks`` section (up to the next ``## `` heading) replaced
    by ``section``, or with ``section`` appended when there is none."""
    match = re.search(r"^## Benchmarks[ \t]*$", text, flags=re.M)
    if match is None:
        return text.rstrip("\n") + "\n\n" + section
    nxt = re.search(r"^## ", text[match.end() :], flags=re.M)
    end = match.end() + nxt.start() if nxt else len(text)
    tail = text[end:]
    return text[: match.start()] + section + ("\n" + tail if tail else "")


def write_json(results: dict[str, Any], path: Path = RESULTS_JSON) -> None:
    """The raw results."""
    path.write_text(json.dumps(results, indent=2) + "\n")


def write_tables(results: dict[str, Any]) -> None:
    """``bench/RESULTS.md`` and the README's section."""
    RESULTS_MD.write_text(results_markdown(results))
    README.write_text(replace_section(README.read_text(), readme_section(results)))


def main() -> int:
    """Write the tables again from ``bench/results.json``."""
    try:
        results = json.loads(RESULTS_JSON.read_text())
    except (OSError, ValueError) as exc:
        print(f"cannot read {RESULTS_JSON}: {exc}; run `make bench` first", file=sys.stderr)
        return 2
    if results.get("quick") or len(results.get("figures") or []) < FIGURE_COUNT:
        print(
            f"{RESULTS_JSON} holds a partial or --quick run; the tables show full runs only",
            file=sys.stderr,
        )
        return 2
    write_tables(results)
    print("wrote bench/RESULTS.md and the README's Benchmarks section", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
