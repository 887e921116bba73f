"""Figure 6: a 1,000,000-item flow run in fine mode on the local backend, and the ledger's pace.

Each run is a child process with a warm Prefect home: a warm-up flow run on 8 items, then runs
of 10,000, 100,000 and 1,000,000 items, each a whole flow run (fill, Job, wait with the results
queue feeding the ledger, post-checks, the final ledger in the storage, cleanup). The pods call
a no-op function (``--call bench.trivial:noop``) so what is measured is queuejob's own cost per
item. After each run the child records its peak RSS so far (``ru_maxrss``); the runs ascend, so
the largest run's peak is its own. The report gives the most outcome records the flow held
unacknowledged at once.

A second child measures the flow's side of the results alone: 100,000 outcome records already
in a results queue, taken by the flow's own monitor (results consumer, a checkpoint segment in
the ledger storage per batch, the SQLite store, one ack per batch), in records/s.

A third child runs the largest size again with item results: the pods call
``bench.trivial:result100``, which returns a 100-byte string made from the item, so every
outcome record, checkpoint segment, store row and ledger row carries one. Its throughput is
compared with the run without results of the same round (the two alternate going first), its
peak RSS is its own, and every ledger row's result is checked against the function.

Targets: the 1,000,000-item run ends within 6 minutes with two worker pods; every item of the
largest run has a ``succeeded`` row in the ledger; the flow's memory is flat: its peak at
1,000,000 items below an absolute ceiling and at most a little above its peak at 100,000 (the
ledger lives on disk; nothing in memory grows with the items); the unacknowledged records stay
within their bound; and the results are absorbed faster than the workers can produce them.
With 100-byte results: at least 0.8x the throughput without, the same memory ceiling, and
exactly one correct result per item.

``QUEUEJOB_BENCH_SCALE_SIZES=SMALL,MID,LARGE`` replaces the three sizes (for a short trial of
the figure; its targets are stated for the full sizes).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bench.common import (
    Context,
    FigureResult,
    Series,
    prefect_env,
    queue_name,
    rounds,
    run_child,
    say,
)

KEY = "scale"
TITLE = "Scale: 1,000,000 items in fine mode on the local backend (whole flow)"

PARALLELISM = 2  # two worker pods, as on this 2-core machine
TARGET_WALL_S = 360.0  # 1,000,000 items end to end (fill, work, ledger): 2,800+ items/s
TARGET_PEAK_MB = 300.0
TARGET_PEAK_RATIO = 1.2  # peak at the largest size / peak at a tenth of it
MAX_UNACKED = 10_000  # the flow's default bound (QUEUEJOB_MAX_UNACKED_RECORDS)
TARGET_ABSORB_RATE = 5_000.0  # records/s
ABSORB_RECORDS = 100_000
CALL = "bench.trivial:noop"
RESULT_CALL = "bench.trivial:result100"  # 100-byte results
TARGET_RESULTS_RATIO = 0.8  # throughput with results / without
SIZES_ENV = "QUEUEJOB_BENCH_SCALE_SIZES"


def _sizes(quick: bool) -> tuple[int, int, int]:
    raw = os.environ.get(SIZES_ENV, "").strip()
    if raw:
        sizes = sorted(int(x) for x in raw.split(","))
        if len(sizes) != 3 or sizes[0] < 1 or len(set(sizes)) != 3:
            raise ValueError(f"{SIZES_ENV}={raw!r}: give three sizes, e.g. 2000,5000,20000")
        return sizes[0], sizes[1], sizes[2]
    return (2_000, 10_000, 100_000) if quick else (10_000, 100_000, 1_000_000)


def run(ctx: Context) -> FigureResult:
    """``ctx.runs`` child processes, each running the three flow runs in ascending size, and
    as many children measuring the results' absorption."""
    sizes = _sizes(ctx.quick)
    small, mid, large = sizes
    fig = FigureResult(key=KEY, number=6, title=TITLE, runs=ctx.runs)
    fig.params = {
        "sizes": [small, mid, large],
        "mode": "fine",
        "parallelism": PARALLELISM,
        "call": CALL,
        "results_call": RESULT_CALL,
        "absorb_records": ABSORB_RECORDS,
    }
    s = _new_series(fig, sizes)
    work = ctx.scratch(KEY)
    full_ledgers = True
    for round_no in rounds(ctx, KEY):
        out = run_child(
            ["results-absorb", "--records", str(ABSORB_RECORDS), "--max-unacked",
             str(MAX_UNACKED), "--queue", queue_name(f"{KEY}-absorb")],
            env=prefect_env(ctx.broker_url, work),
            timeout_s=900,
            what="the results absorption",
        )  # fmt: skip
        s["absorb_rate"].add(out["records"] / out["wall_s"])
        # The runs without and with results alternate going first.
        if round_no % 2:
            out = _flow_child(ctx, work, f"{small},{mid},{large}", CALL)
            res = _flow_child(ctx, work, str(large), RESULT_CALL)
        else:
            res = _flow_child(ctx, work, str(large), RESULT_CALL)
            out = _flow_child(ctx, work, f"{small},{mid},{large}", CALL)
        if not _add_round(fig, s, sizes, out):
            full_ledgers = False
        _add_results_round(fig, s, large, res)
    _add_targets(fig, s, sizes, quick=ctx.quick, full_ledgers=full_ledgers)
    _add_results_targets(fig, s, large)
    return fig


def _flow_child(ctx: Context, work: Path, sizes: str, call: str) -> dict[str, Any]:
    """A child process: a warm-up flow run, then one fine-mode run per size (ascending)."""
    return run_child(
        [
            "flow-scale",
            "--items",
            sizes,
            "--parallelism",
            str(PARALLELISM),
            "--call",
            call,
            "--timeout",
            "5400",
            "--queue-prefix",
            queue_name(KEY),
        ],
        env=prefect_env(ctx.broker_url, work),
        timeout_s=7200,
        what=f"the {int(sizes.rsplit(',', 1)[-1]):,}-item flow run ({call})",
    )


def _new_series(fig: FigureResult, sizes: tuple[int, int, int]) -> dict[str, Series]:
    small, mid, large = sizes
    specs = [
        ("rate_large", f"{large:,} items: throughput, whole flow", "items/s"),
        ("wall_large", f"{large:,} items: flow wall time, end to end", "s"),
        ("rate_mid", f"{mid:,} items: throughput, whole flow", "items/s"),
        ("rate_small", f"{small:,} items: throughput, whole flow", "items/s"),
        ("rss_idle", "flow process RSS after a warm-up run", "MB"),
        ("peak_small", f"flow process peak RSS, {small:,} items", "MB"),
        ("peak_mid", f"flow process peak RSS, {mid:,} items", "MB"),
        ("peak_large", f"flow process peak RSS, {large:,} items", "MB"),
        ("bytes_per_item", f"peak RSS growth per item, {mid:,} to {large:,}", "B/item"),
        ("max_unacked", f"{large:,} items: most outcome records unacknowledged at once", "records"),
        ("ledger_bytes", f"{large:,} items: final ledger.jsonl size per item", "B/item"),
        ("ledger_succeeded", f"{large:,} items: succeeded rows in the ledger", "items"),
        ("processed_twice", "items processed more than once", "items"),
        (
            "absorb_rate",
            f"results consumer + ledger (checkpoint, store, ack), {ABSORB_RECORDS:,} records",
            "records/s",
        ),
        (
            "rate_results",
            f"{large:,} items with 100-byte results: throughput, whole flow",
            "items/s",
        ),
        ("peak_results", f"flow process peak RSS, {large:,} items with 100-byte results", "MB"),
        ("results_exact", f"{large:,} items: ledger rows holding their exact result", "items"),
        (
            "ledger_bytes_results",
            f"{large:,} items with results: final ledger.jsonl size per item",
            "B/item",
        ),
    ]
    return {key: fig.new_series(key, label, unit) for key, label, unit in specs}


def _add_round(
    fig: FigureResult, s: dict[str, Series], sizes: tuple[int, int, int], out: dict[str, Any]
) -> bool:
    """One child's three flow runs into the series; False when a run's ledger is not full."""
    small, mid, large = sizes
    by_size = {r["items"]: r for r in out["runs"]}
    a, m, b = by_size[small], by_size[mid], by_size[large]
    full = True
    for r in (a, m, b):
        summary = r["summary"]
        ok = (
            r["job_phase"] == "Succeeded"
            and r["ledger_succeeded"] == r["items"]
            and r["ledger_unique_ids"] == r["items"]
            and summary["succeeded"] == r["items"]
            and summary["left"] == 0
        )
        if not ok:
            full = False
            fig.notes.append(
                f"a {r['items']:,}-item run ended {r['job_phase']}: ledger {r['ledger_rows']} "
                f"rows, {r['ledger_succeeded']} succeeded; summary {summary}"
            )
    s["rss_idle"].add(out["rss_idle_kb"] * 1024 / 1e6)
    s["peak_small"].add(a["max_rss_kb"] * 1024 / 1e6)
    s["peak_mid"].add(m["max_rss_kb"] * 1024 / 1e6)
    s["peak_large"].add(b["max_rss_kb"] * 1024 / 1e6)
    s["bytes_per_item"].add((b["max_rss_kb"] - m["max_rss_kb"]) * 1024 / (large - mid))
    s["max_unacked"].add(max(r["max_unacked"] or 0 for r in (a, m, b)))
    s["ledger_bytes"].add(b["ledger_bytes"] / large)
    s["rate_large"].add(large / b["wall_s"])
    s["wall_large"].add(b["wall_s"])
    s["rate_mid"].add(mid / m["wall_s"])
    s["rate_small"].add(small / a["wall_s"])
    s["ledger_succeeded"].add(b["ledger_succeeded"])
    s["processed_twice"].add(b["summary"]["processed_more_than_once"])
    say(
        f"  {large:,} items: {b['wall_s']:.1f} s ({large / b['wall_s']:,.0f} items/s), "
        f"ledger {b['ledger_succeeded']:,} succeeded, peak RSS "
        f"{b['max_rss_kb'] / 1024:.0f} MiB (after {mid:,}: {m['max_rss_kb'] / 1024:.0f} MiB), "
        f"at most {b['max_unacked']} records unacknowledged"
    )
    return full


def _add_results_round(
    fig: FigureResult, s: dict[str, Series], large: int, out: dict[str, Any]
) -> None:
    """The run with results into its series; a shortfall is noted."""
    [r] = [r for r in out["runs"] if r["items"] == large]
    exact = r["ledger_results_exact"]
    whole = r["job_phase"] == "Succeeded" and exact == r["ledger_results"] == large
    if not whole or r["report_results"] != large:
        fig.notes.append(
            f"the {large:,}-item run with results ended {r['job_phase']}: {r['ledger_results']} "
            f"rows with a result, {exact} exact, the report counted {r['report_results']}"
        )
    s["rate_results"].add(large / r["wall_s"])
    s["peak_results"].add(r["max_rss_kb"] * 1024 / 1e6)
    # Exact means every row holds its own result and no row holds another.
    s["results_exact"].add(exact if r["ledger_results"] == exact else 0)
    s["ledger_bytes_results"].add(r["ledger_bytes"] / large)
    say(
        f"  {large:,} items with results: {r['wall_s']:.1f} s ({large / r['wall_s']:,.0f} "
        f"items/s), {exact:,} exact results, peak RSS {r['max_rss_kb'] / 1024:.0f} MiB"
    )


def _add_results_targets(fig: FigureResult, s: dict[str, Series], large: int) -> None:
    ratio = fig.ratio(
        f"{large:,} items: with 100-byte results / without", "rate_results", "rate_large"
    )
    fig.target(
        f"{large:,} items with 100-byte results vs without",
        ratio,
        ">=",
        TARGET_RESULTS_RATIO,
        "x",
        measured="throughput with / without results",
    )
    fig.target(
        f"flow peak RSS, {large:,} items with results",
        s["peak_results"].median,
        "<=",
        TARGET_PEAK_MB,
        "MB",
        measured="flow process",
    )
    exact = s["results_exact"]
    fig.target(
        f"every result kept, exactly ({large:,} items)",
        min(exact.values) if exact.values else None,
        ">=",
        float(large),
        "items",
        measured="ledger rows with their exact result, worst run",
        detail="; ".join(n for n in fig.notes if "with results" in n),
    )


def _add_targets(
    fig: FigureResult,
    s: dict[str, Series],
    sizes: tuple[int, int, int],
    *,
    quick: bool,
    full_ledgers: bool,
) -> None:
    _small, mid, large = sizes
    complete, unacked = s["ledger_succeeded"], s["max_unacked"]
    peak_ratio = fig.ratio(f"peak {large:,} / peak {mid:,}", "peak_large", "peak_mid")
    fig.ratio(f"throughput {large:,} / {mid:,}", "rate_large", "rate_mid")
    fig.target(
        f"full ledger in every run ({large:,} items)",
        min(complete.values) if complete.values and full_ledgers else None,
        ">=",
        float(large),
        "items",
        measured="succeeded ledger rows, worst run",
        detail="; ".join(fig.notes),
    )
    fig.target(
        f"flow peak RSS, {large:,} items",
        s["peak_large"].median,
        "<=",
        TARGET_PEAK_MB,
        "MB",
        measured="flow process",
    )
    fig.target(
        f"flat memory from {mid:,} to {large:,} items",
        peak_ratio,
        "<=",
        TARGET_PEAK_RATIO,
        "x",
        measured=f"peak {large:,} / peak {mid:,}",
    )
    fig.target(
        "unacknowledged outcome records, at most",
        max(unacked.values) if unacked.values else None,
        "<=",
        float(MAX_UNACKED),
        "records",
        measured="the flow's results consumer, worst run",
    )
    if not quick:
        fig.target(
            f"{large:,} items end to end (fill, work, ledger)",
            s["wall_large"].median,
            "<=",
            TARGET_WALL_S,
            "s",
            measured="flow wall time",
        )
    fig.target(
        "results absorbed by the flow",
        s["absorb_rate"].median,
        ">=",
        TARGET_ABSORB_RATE,
        "records/s",
        measured="results consumer + ledger",
    )
