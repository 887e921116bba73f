"""``python -m bench [--only fill,memory,...] [--quick] [--runs N]``: run the benchmarks.

The broker comes from ``QUEUEJOB_TEST_BROKER_URL`` (``make bench`` finds or starts one). Every
run writes ``bench/results.json``; a full run (all figures, not ``--quick``) also writes
``bench/RESULTS.md`` and the README's "Benchmarks" section. The exit code is 1 when a figure
missed a target or could not be measured (each one is printed), 2 on a usage error, else 0.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from bench import cluster, detection, fill, flow_overhead, memory, overhead, report, scale
from bench.common import BROKER_ENV, MIN_RUNS, Context, FigureResult, machine_info, say

FIGURES: dict[str, ModuleType] = {
    m.KEY: m for m in (fill, memory, detection, overhead, flow_overhead, scale, cluster)
}
NUMBERS = {str(i): key for i, key in enumerate(FIGURES, start=1)}


def _select(only: str | None) -> list[str]:
    if not only:
        return list(FIGURES)
    chosen = []
    for raw in only.split(","):
        name = NUMBERS.get(raw.strip(), raw.strip())
        if name not in FIGURES:
            raise SystemExit(
                f"unknown figure {raw.strip()!r}; choose from {', '.join(FIGURES)} (or 1-7)"
            )
        if name not in chosen:
            chosen.append(name)
    return [k for k in FIGURES if k in chosen]


def run_figure(number: int, module: ModuleType, ctx: Context) -> FigureResult:
    """Run one figure; an exception becomes the figure's error (it then fails)."""
    run: Callable[[Context], FigureResult] = module.run
    start = time.monotonic()
    try:
        fig = run(ctx)
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        fig = FigureResult(key=module.KEY, number=number, title=module.TITLE, runs=ctx.runs)
        fig.error = f"{type(exc).__name__}: {exc}"
    fig.elapsed_s = time.monotonic() - start
    say(f"{module.KEY}: done in {fig.elapsed_s:.0f} s ({'pass' if fig.passed else 'FAILED'})")
    return fig


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run the figures, write the results, return the exit code."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--only", help=f"comma-separated figures to run: {', '.join(FIGURES)} (or 1-7)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smaller sizes, for development; no tables written"
    )
    parser.add_argument(
        "--runs", type=int, default=MIN_RUNS, help=f"runs per figure (at least {MIN_RUNS})"
    )
    parser.add_argument(
        "--no-tables",
        action="store_true",
        help="do not write bench/RESULTS.md and the README section even on a full run",
    )
    args = parser.parse_args(argv)
    if args.runs < MIN_RUNS:
        parser.error(f"--runs must be at least {MIN_RUNS}: every figure is a median of runs")
    keys = _select(args.only)
    broker_url = os.environ.get(BROKER_ENV)
    if not broker_url:
        print(
            f"python -m bench: set {BROKER_ENV} to a RabbitMQ URL, or run `make bench`, which "
            "finds or starts a broker",
            file=sys.stderr,
        )
        return 2

    workdir = Path(tempfile.mkdtemp(prefix="queuejob-bench-"))
    started = time.monotonic()
    try:
        machine = machine_info(broker_url)
        say(f"machine: {report.machine_line(machine)}")
        ctx = Context(broker_url=broker_url, runs=args.runs, quick=args.quick, workdir=workdir)
        figures = [run_figure(list(FIGURES).index(k) + 1, FIGURES[k], ctx).as_dict() for k in keys]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results: dict[str, Any] = {
        "machine": machine,
        "quick": args.quick,
        "runs": args.runs,
        "figures": figures,
        "passed": all(f["passed"] for f in figures),
        "total_s": round(time.monotonic() - started, 1),
    }
    report.write_json(results)
    full = not args.quick and len(keys) == len(FIGURES)
    if full and not args.no_tables:
        report.write_tables(results)
        say("wrote bench/results.json, bench/RESULTS.md and the README's Benchmarks section")
    else:
        say("wrote bench/results.json (tables are written by full runs only)")
    print("\n".join(report.body(results, 2)))

    missed = [
        f"figure {f['number']} ({f['key']}): {t['label']}: "
        f"{report.fmt(t['value'], t['unit'])}, required {t['op']} "
        f"{report.fmt(t['threshold'], t['unit'])}" + (f" [{t['detail']}]" if t["detail"] else "")
        for f in figures
        for t in f["targets"]
        if not t["passed"]
    ]
    missed += [f"figure {f['number']} ({f['key']}): not measured: {f['error']}" for f in figures
               if f["error"]]  # fmt: skip
    if missed:
        print("\nMISSED TARGETS:", file=sys.stderr)
        for line in missed:
            print(f"  - {line}", file=sys.stderr)
        return 1
    print("\nall targets met", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
