"""Figure 5: what the whole flow costs on the docs' 8 items, beyond the workers' own time.

In one child process with a warm Prefect home (an ephemeral API, as `queuejob run` uses), a
first flow run starts the API and is not counted; then each round runs

* the flow (`run_work_queue`, local backend, coarse, parallelism 2, ``cat`` on each item): its
  wall time, plus the deletion of the Job it kept so the pods' times could be read, minus the
  workers' time (first pod's start to last pod's end, from the local backend's Job state);
* the baseline: the same steps called directly, without Prefect (wait for the broker, declare,
  fill, create the Job, wait while reading outcome records, delete Job and queues), measured
  the same way.
"""

from __future__ import annotations

from bench.common import (
    Context,
    FigureResult,
    prefect_env,
    queue_name,
    run_child,
    say,
)

KEY = "flow"
TITLE = "Flow overhead: the whole flow on 8 trivial items (warm Prefect home) minus the workers"

TARGET_OVERHEAD_S = 5.0


def run(ctx: Context) -> FigureResult:
    """One child process: warm-up run, then ``ctx.runs`` rounds of flow and direct runs."""
    fig = FigureResult(key=KEY, number=5, title=TITLE, runs=ctx.runs)
    fig.params = {"items": 8, "mode": "coarse", "parallelism": 2, "command": ["cat"]}
    flow = fig.new_series("flow_overhead", "flow: wall time minus workers' time", "s")
    direct = fig.new_series(
        "direct_overhead", "same steps without Prefect: wall time minus workers' time", "s"
    )
    flow_wall = fig.new_series("flow_wall", "flow: wall time", "s")
    workers = fig.new_series(
        "flow_workers", "flow: workers' time (first pod start to last end)", "s"
    )
    first = fig.new_series(
        "first_run_overhead",
        "first run in a fresh process (starts the ephemeral API), minus workers",
        "s",
    )
    imports = fig.new_series("import_prefect", "import prefect in a fresh process", "s")
    work = ctx.scratch(KEY)
    say(f"{KEY}: {ctx.runs} rounds of flow + direct runs in one process (Prefect warm-up first)")
    out = run_child(
        ["flow-overhead", "--runs", str(ctx.runs), "--queue-prefix", queue_name(KEY)],
        env=prefect_env(ctx.broker_url, work),
        timeout_s=900,
        what="the flow-overhead runs",
    )
    imports.add(out["import_s"])
    first.add(out["first"]["overhead_s"])
    for r in out["rounds"]:
        for kind in ("flow", "direct"):
            if r[kind]["succeeded"] != 8 or r[kind]["phase"] != "Succeeded":
                fig.notes.append(
                    f"a {kind} run ended {r[kind]['phase']} with {r[kind]['succeeded']}/8 items"
                )
        flow.add(r["flow"]["overhead_s"])
        flow_wall.add(r["flow"]["wall_s"])
        workers.add(r["flow"]["workers_s"])
        direct.add(r["direct"]["overhead_s"])
    for s in (flow, direct):
        say(f"  {s.label}: median {s.median:.2f} s")
    fig.ratio("flow / direct overhead", "flow_overhead", "direct_overhead")
    fig.target(
        "flow overhead, 8 items",
        flow.median if not fig.notes else None,
        "<=",
        TARGET_OVERHEAD_S,
        "s",
        measured="flow wall - workers",
        detail="; ".join(fig.notes),
    )
    return fig
