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

Targets: the 1,000,000-item run ends within 6 minutes with two worker pods; every item of the
largest run has a ``succeeded`` row in the ledger; the flow's memory is flat: its peak at
1,000,000 items below an absolute ceiling and at most a little above its peak at 100,000 (the
ledger lives on disk; nothing in memory grows with the items); the unacknowledged records stay
within their bound; and the results are absorbed faster than the workers can produce them.
"""

from __future__ import annotations

from bench.common import (
    Context,
    FigureResult,
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


def _sizes(quick: bool) -> tuple[int, int, int]:
    return (2_000, 10_000, 100_000) if quick else (10_000, 100_000, 1_000_000)


def run(ctx: Context) -> FigureResult:
    """``ctx.runs`` child processes, each running the three flow runs in ascending size, and
    as many children measuring the results' absorption."""
    small, mid, large = _sizes(ctx.quick)
    fig = FigureResult(key=KEY, number=6, title=TITLE, runs=ctx.runs)
    fig.params = {
        "sizes": [small, mid, large],
        "mode": "fine",
        "parallelism": PARALLELISM,
        "call": CALL,
        "absorb_records": ABSORB_RECORDS,
    }
    rate = fig.new_series("rate_large", f"{large:,} items: throughput, whole flow", "items/s")
    wall = fig.new_series("wall_large", f"{large:,} items: flow wall time, end to end", "s")
    rate_mid = fig.new_series("rate_mid", f"{mid:,} items: throughput, whole flow", "items/s")
    rate_small = fig.new_series("rate_small", f"{small:,} items: throughput, whole flow", "items/s")
    idle = fig.new_series("rss_idle", "flow process RSS after a warm-up run", "MB")
    peak_small = fig.new_series("peak_small", f"flow process peak RSS, {small:,} items", "MB")
    peak_mid = fig.new_series("peak_mid", f"flow process peak RSS, {mid:,} items", "MB")
    peak_large = fig.new_series("peak_large", f"flow process peak RSS, {large:,} items", "MB")
    per_item = fig.new_series(
        "bytes_per_item", f"peak RSS growth per item, {mid:,} to {large:,}", "B/item"
    )
    unacked = fig.new_series(
        "max_unacked", f"{large:,} items: most outcome records unacknowledged at once", "records"
    )
    ledger_size = fig.new_series(
        "ledger_bytes", f"{large:,} items: final ledger.jsonl size per item", "B/item"
    )
    complete = fig.new_series(
        "ledger_succeeded", f"{large:,} items: succeeded rows in the ledger", "items"
    )
    twice = fig.new_series("processed_twice", "items processed more than once", "items")
    absorb = fig.new_series(
        "absorb_rate",
        f"results consumer + ledger (checkpoint, store, ack), {ABSORB_RECORDS:,} records",
        "records/s",
    )
    work = ctx.scratch(KEY)
    full_ledgers = True
    for _ in rounds(ctx, KEY):
        out = run_child(
            ["results-absorb", "--records", str(ABSORB_RECORDS), "--max-unacked",
             str(MAX_UNACKED), "--queue", queue_name(f"{KEY}-absorb")],
            env=prefect_env(ctx.broker_url, work),
            timeout_s=900,
            what="the results absorption",
        )  # fmt: skip
        absorb.add(out["records"] / out["wall_s"])
        out = run_child(
            [
                "flow-scale",
                "--items",
                f"{small},{mid},{large}",
                "--parallelism",
                str(PARALLELISM),
                "--call",
                CALL,
                "--timeout",
                "5400",
                "--queue-prefix",
                queue_name(KEY),
            ],
            env=prefect_env(ctx.broker_url, work),
            timeout_s=7200,
            what=f"the {large:,}-item flow run",
        )
        by_size = {r["items"]: r for r in out["runs"]}
        a, m, b = by_size[small], by_size[mid], by_size[large]
        for r in (a, m, b):
            s = r["summary"]
            ok = (
                r["job_phase"] == "Succeeded"
                and r["ledger_succeeded"] == r["items"]
                and r["ledger_unique_ids"] == r["items"]
                and s["succeeded"] == r["items"]
                and s["left"] == 0
            )
            if not ok:
                full_ledgers = False
                fig.notes.append(
                    f"a {r['items']:,}-item run ended {r['job_phase']}: ledger {r['ledger_rows']} "
                    f"rows, {r['ledger_succeeded']} succeeded; summary {s}"
                )
        idle.add(out["rss_idle_kb"] * 1024 / 1e6)
        peak_small.add(a["max_rss_kb"] * 1024 / 1e6)
        peak_mid.add(m["max_rss_kb"] * 1024 / 1e6)
        peak_large.add(b["max_rss_kb"] * 1024 / 1e6)
        per_item.add((b["max_rss_kb"] - m["max_rss_kb"]) * 1024 / (large - mid))
        unacked.add(max(r["max_unacked"] or 0 for r in (a, m, b)))
        ledger_size.add(b["ledger_bytes"] / large)
        rate.add(large / b["wall_s"])
        wall.add(b["wall_s"])
        rate_mid.add(mid / m["wall_s"])
        rate_small.add(small / a["wall_s"])
        complete.add(b["ledger_succeeded"])
        twice.add(b["summary"]["processed_more_than_once"])
        say(
            f"  {large:,} items: {b['wall_s']:.1f} s ({large / b['wall_s']:,.0f} items/s), "
            f"ledger {b['ledger_succeeded']:,} succeeded, peak RSS "
            f"{b['max_rss_kb'] / 1024:.0f} MiB (after {mid:,}: {m['max_rss_kb'] / 1024:.0f} MiB), "
            f"at most {b['max_unacked']} records unacknowledged"
        )
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
        peak_large.median,
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
    if not ctx.quick:
        fig.target(
            f"{large:,} items end to end (fill, work, ledger)",
            wall.median,
            "<=",
            TARGET_WALL_S,
            "s",
            measured="flow wall time",
        )
    fig.target(
        "results absorbed by the flow",
        absorb.median,
        ">=",
        TARGET_ABSORB_RATE,
        "records/s",
        measured="results consumer + ledger",
    )
    return fig
