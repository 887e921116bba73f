"""Figure 2: peak memory of a fill from a file, 1,000,000 items against 100,000.

Each fill runs in a child process of its own (`bench.child fill`): declare the queues, stream
the items from a text file (one per line) through `fill_queue`, and report the child's peak
resident set size (``ru_maxrss``). The 100,000-item fill is the baseline: a fill whose memory
does not grow with the number of items peaks at the same size for both.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from bench.common import (
    BenchError,
    Context,
    FigureResult,
    child_env,
    queue_name,
    rounds,
    run_child,
    say,
)
from queuejob.flows.adapters import broker as broker_io

KEY = "memory"
TITLE = "Memory: peak RSS of a fill from a file, 1,000,000 vs 100,000 items"

TARGET_PEAK_MB = 150.0
TARGET_FLAT = 1.10  # peak(1M) / peak(100k): at most 10 % more for ten times the items


def _sizes(quick: bool) -> tuple[int, int]:
    return (20_000, 200_000) if quick else (100_000, 1_000_000)


def write_items(path: Path, n: int) -> Path:
    """A text file of ``n`` small items, one per line, written in chunks."""
    with path.open("w") as fh:
        for start in range(0, n, 100_000):
            fh.write("".join(f"item-{i:08d}\n" for i in range(start, min(n, start + 100_000))))
    return path


def measure_fill(ctx: Context, path: Path, n: int) -> dict[str, float]:
    """One child fill of the file; its time, rate and peak RSS (MB)."""
    cfg = broker_io.BrokerConfig(url=ctx.broker_url)
    name = queue_name(KEY)
    try:
        out = run_child(
            ["fill", "--file", str(path), "--queue", name, "--queue-type", "quorum"],
            env=child_env(),
            timeout_s=900,
            what=f"the fill of {n:,} items",
        )
    finally:
        with contextlib.suppress(Exception):
            broker_io.delete_queues(cfg, broker_io.QueueSettings(name=name), only_if_empty=False)
    if out["confirmed"] != n:
        raise BenchError(f"the fill confirmed {out['confirmed']} of {n} items")
    return {
        "elapsed_s": float(out["elapsed_s"]),
        "rate": n / float(out["elapsed_s"]),
        "peak_mb": out["max_rss_kb"] * 1024 / 1e6,
        "start_mb": out["rss_start_kb"] * 1024 / 1e6,
    }


def run(ctx: Context) -> FigureResult:
    """Both sizes in every round, the small one first."""
    small, large = _sizes(ctx.quick)
    fig = FigureResult(key=KEY, number=2, title=TITLE, runs=ctx.runs)
    fig.params = {"small": small, "large": large, "queue_type": "quorum", "window": 1000}
    peak_small = fig.new_series("peak_small", f"peak RSS, fill of {small:,} items", "MB")
    peak_large = fig.new_series("peak_large", f"peak RSS, fill of {large:,} items", "MB")
    start_rss = fig.new_series("start_rss", "RSS before the fill (imports, connection)", "MB")
    rate_large = fig.new_series("rate_large", f"fill rate from the file, {large:,} items", "msg/s")
    work = ctx.scratch(KEY)
    say(f"{KEY}: writing {small:,} and {large:,} items to files")
    small_file = write_items(work / "small.txt", small)
    large_file = write_items(work / "large.txt", large)
    for _ in rounds(ctx, KEY):
        a = measure_fill(ctx, small_file, small)
        peak_small.add(a["peak_mb"])
        start_rss.add(a["start_mb"])
        say(f"  {small:,} items: peak {a['peak_mb']:.1f} MB, {a['rate']:,.0f} msg/s")
        b = measure_fill(ctx, large_file, large)
        peak_large.add(b["peak_mb"])
        rate_large.add(b["rate"])
        say(f"  {large:,} items: peak {b['peak_mb']:.1f} MB, {b['rate']:,.0f} msg/s")
    for path in (small_file, large_file):
        path.unlink()
    flat = fig.ratio(f"peak {large:,} / peak {small:,}", "peak_large", "peak_small")
    fig.target(
        f"peak RSS filling {large:,} items",
        peak_large.median,
        "<=",
        TARGET_PEAK_MB,
        "MB",
        measured="fill child process",
    )
    fig.target(
        "flat from 100k to 1M items" if not ctx.quick else "flat (quick sizes)",
        flat,
        "<=",
        TARGET_FLAT,
        "x",
        measured=f"peak {large:,} / peak {small:,}",
    )
    return fig
