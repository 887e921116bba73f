"""Figure 7: the fill and a whole flow run on a three-node RabbitMQ cluster, beside one node.

A cluster of three nodes of the installed ``rabbitmq-server`` is started on this machine
(tests/cluster/rabbit_cluster.py, the cluster tier's), next to the single broker the other
figures use. In each round, the same work runs against both, one after the other:

* the confirmed fill of a quorum queue from a text file (the ``fill`` child), in msg/s: on the
  cluster every message is replicated to three nodes before its confirm;
* a whole fine-mode flow run (fill, Job with two pods calling a no-op, the results into the
  ledger, the report; the ``flow-scale`` child), in items/s: every queue of the run is a
  replicated quorum queue on the cluster.

Clients reach the cluster with a URL naming its three nodes (each connection goes to one node,
the first that answers), as pods reach a StatefulSet's pods through a Service. The figure is a
ratio, cluster over single node, and has no target: the three nodes share this machine's two
cores with the flow and its pods, so the ratio says what replication costs here, not on three
machines.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from bench.common import (
    Context,
    FigureResult,
    child_env,
    prefect_env,
    queue_name,
    rounds,
    run_child,
    say,
)

KEY = "cluster"
TITLE = "A three-node RabbitMQ cluster beside one node: fill and whole flow"
PARALLELISM = 2
CALL = "bench.trivial:noop"


def _sizes(quick: bool) -> tuple[int, int]:
    """(items filled, items of the flow run)."""
    return (20_000, 5_000) if quick else (200_000, 100_000)


def run(ctx: Context) -> FigureResult:
    """Start the cluster, then ``ctx.runs`` rounds of fill and flow on each broker."""
    from tests.cluster.rabbit_cluster import RabbitCluster

    fill_n, flow_n = _sizes(ctx.quick)
    fig = FigureResult(key=KEY, number=7, title=TITLE, runs=ctx.runs)
    fig.params = {
        "fill_items": fill_n,
        "flow_items": flow_n,
        "nodes": 3,
        "queue_type": "quorum",
        "mode": "fine",
        "parallelism": PARALLELISM,
        "call": CALL,
    }
    s = {
        "fill_single": fig.new_series(
            "fill_single", "one node: queuejob fill (confirmed)", "msg/s"
        ),
        "fill_cluster": fig.new_series(
            "fill_cluster", "three-node cluster: queuejob fill (confirmed)", "msg/s"
        ),
        "flow_single": fig.new_series(
            "flow_single", f"one node: {flow_n:,} items, whole flow", "items/s"
        ),
        "flow_cluster": fig.new_series(
            "flow_cluster", f"three-node cluster: {flow_n:,} items, whole flow", "items/s"
        ),
    }
    work = ctx.scratch(KEY)
    items = work / "items.txt"
    items.write_text("".join(f"item-{i:08d}\n" for i in range(fill_n)))
    say(f"{KEY}: starting a three-node RabbitMQ cluster")
    cluster = RabbitCluster(work / "rabbit", user="queuejob-bench", password=uuid.uuid4().hex)
    try:
        cluster.start()
        brokers = {"single": ctx.broker_url, "cluster": cluster.multi_url()}
        for _ in rounds(ctx, KEY):
            for name, url in brokers.items():
                s[f"fill_{name}"].add(_fill(url, items, fill_n))
                s[f"flow_{name}"].add(_flow(url, flow_n, work / name))
                say(
                    f"  {name}: fill {s[f'fill_{name}'].values[-1]:,.0f} msg/s, flow "
                    f"{s[f'flow_{name}'].values[-1]:,.0f} items/s"
                )
    finally:
        cluster.close()
    fig.ratio("fill: cluster / one node", "fill_cluster", "fill_single")
    fig.ratio("whole flow: cluster / one node", "flow_cluster", "flow_single")
    fig.notes.append(
        "The three nodes, the flow and its pods share the same two cores: the ratio is what "
        "replication costs on this machine, not a target."
    )
    return fig


def _fill(url: str, items: Path, n: int) -> float:
    out = run_child(
        ["fill", "--file", str(items), "--queue", queue_name(f"{KEY}-fill")],
        env=child_env({"QUEUEJOB_TEST_BROKER_URL": url}),
        timeout_s=900,
        what="the fill",
    )
    if out["confirmed"] != n:
        raise RuntimeError(f"the fill confirmed {out['confirmed']} of {n} items")
    return float(out["confirmed"]) / float(out["elapsed_s"])


def _flow(url: str, n: int, work: Path) -> float:
    work.mkdir(parents=True, exist_ok=True)
    out = run_child(
        ["flow-scale", "--items", str(n), "--parallelism", str(PARALLELISM), "--call", CALL,
         "--timeout", "1800", "--queue-prefix", queue_name(KEY)],
        env=prefect_env(url, work),
        timeout_s=2400,
        what=f"the {n:,}-item flow run",
    )  # fmt: skip
    (run,) = out["runs"]
    if run["summary"]["succeeded"] != n or run["job_phase"] != "Succeeded":
        raise RuntimeError(f"the flow run ended {run['job_phase']} with {run['summary']}")
    return float(n) / float(run["wall_s"])
