"""Figure 6: a 100,000-item flow run in fine mode on the local backend.

Each run is a child process with a warm Prefect home: a warm-up flow run on 8 items, then a
run of 10,000 items (the baseline) and one of 100,000, each a whole flow run (fill, Job, wait
with the results queue feeding the ledger, post-checks, the ledger file, cleanup). The pods
call a no-op function (``--call bench.trivial:noop``) so what is measured is queuejob's own
cost per item. After each run the child records its peak RSS so far (``ru_maxrss``); the
100,000-item run comes second, so its peak is its own.

Targets: every item of every run has a ``succeeded`` row in the ledger file, and the flow's
memory stays bounded: its peak below an absolute ceiling, and its growth from the 10,000-item
run to the 100,000-item run at most a small, fixed amount per item (the ledger keeps one
outcome per item by design; nothing else may grow with the items).
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
TITLE = "Scale: 100,000 items in fine mode on the local backend (whole flow)"

PARALLELISM = 8
TARGET_PEAK_MB = 512.0
TARGET_BYTES_PER_ITEM = 1024.0  # one ledger entry per item; a kept body or buffer is more
CALL = "bench.trivial:noop"


def _sizes(quick: bool) -> tuple[int, int]:
    return (2_000, 20_000) if quick else (10_000, 100_000)


def run(ctx: Context) -> FigureResult:
    """``ctx.runs`` child processes, each running the small then the large flow run."""
    small, large = _sizes(ctx.quick)
    fig = FigureResult(key=KEY, number=6, title=TITLE, runs=ctx.runs)
    fig.params = {
        "small": small,
        "large": large,
        "mode": "fine",
        "parallelism": PARALLELISM,
        "call": CALL,
    }
    rate = fig.new_series("rate_large", f"{large:,} items: throughput, whole flow", "items/s")
    wall = fig.new_series("wall_large", f"{large:,} items: flow wall time", "s")
    rate_small = fig.new_series("rate_small", f"{small:,} items: throughput, whole flow", "items/s")
    idle = fig.new_series("rss_idle", "flow process RSS after a warm-up run", "MB")
    peak_small = fig.new_series("peak_small", f"flow process peak RSS, {small:,} items", "MB")
    peak_large = fig.new_series("peak_large", f"flow process peak RSS, {large:,} items", "MB")
    per_item = fig.new_series(
        "bytes_per_item", f"peak RSS growth per item, {small:,} to {large:,}", "B/item"
    )
    complete = fig.new_series(
        "ledger_succeeded", f"{large:,} items: succeeded rows in the ledger file", "items"
    )
    twice = fig.new_series("processed_twice", "items processed more than once", "items")
    work = ctx.scratch(KEY)
    full_ledgers = True
    for _ in rounds(ctx, KEY):
        out = run_child(
            [
                "flow-scale",
                "--items",
                f"{small},{large}",
                "--parallelism",
                str(PARALLELISM),
                "--call",
                CALL,
                "--queue-prefix",
                queue_name(KEY),
            ],
            env=prefect_env(ctx.broker_url, work),
            timeout_s=2400,
            what=f"the {large:,}-item flow run",
        )
        by_size = {r["items"]: r for r in out["runs"]}
        a, b = by_size[small], by_size[large]
        for r in (a, b):
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
        peak_large.add(b["max_rss_kb"] * 1024 / 1e6)
        per_item.add((b["max_rss_kb"] - a["max_rss_kb"]) * 1024 / (large - small))
        rate.add(large / b["wall_s"])
        wall.add(b["wall_s"])
        rate_small.add(small / a["wall_s"])
        complete.add(b["ledger_succeeded"])
        twice.add(b["summary"]["processed_more_than_once"])
        say(
            f"  {large:,} items: {b['wall_s']:.1f} s, ledger {b['ledger_succeeded']:,} "
            f"succeeded, peak RSS {b['max_rss_kb'] / 1024:.0f} MiB "
            f"(after {small:,}: {a['max_rss_kb'] / 1024:.0f} MiB)"
        )
    fig.ratio(f"peak {large:,} / peak {small:,}", "peak_large", "peak_small")
    fig.ratio(f"throughput {large:,} / {small:,}", "rate_large", "rate_small")
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
        "memory growth per item",
        per_item.median,
        "<=",
        TARGET_BYTES_PER_ITEM,
        "B/item",
        measured=f"(peak {large:,} - peak {small:,}) / {large - small:,}",
    )
    return fig
