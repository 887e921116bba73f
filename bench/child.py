"""The measured child processes: ``python -m bench.child fill|flow-overhead|flow-scale ...``.

Each subcommand does one measured thing in a process of its own, so its peak memory
(``ru_maxrss``) is its own, and prints one JSON object as its last line of output. The broker
URL comes from ``QUEUEJOB_TEST_BROKER_URL`` (fill) or ``QUEUEJOB_BROKER_URL`` (the flow), never
from the command line. The flow subcommands expect the Prefect settings in the environment
(`bench.flows.prefect_env`) before they import Prefect.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import uuid
from pathlib import Path
from typing import Any

DOCS_ITEMS = ["apple", "banana", "cherry", "date", "fig", "grape", "lemon", "melon"]


def rss_kb() -> int:
    """This process's resident set size now, in KiB (Linux)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def max_rss_kb() -> int:
    """This process's peak resident set size so far, in KiB (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def emit(obj: dict[str, Any]) -> None:
    """The result line the parent reads."""
    print(json.dumps(obj, separators=(",", ":")), flush=True)


# --- fill from a file --------------------------------------------------------------------------


def cmd_fill(ns: argparse.Namespace) -> int:
    """Declare the queue, fill it from a text file, report time and memory."""
    from queuejob.flows.adapters import broker as broker_io
    from queuejob.flows.core.items import ItemSource, iter_items

    cfg = broker_io.BrokerConfig(url=os.environ["QUEUEJOB_TEST_BROKER_URL"])
    qs = broker_io.QueueSettings(name=ns.queue, queue_type=ns.queue_type)
    broker_io.declare_queues(cfg, qs)
    rss_start = rss_kb()
    source = ItemSource(kind="text", path=ns.file)
    start = time.perf_counter()
    result = broker_io.fill_queue(cfg, qs, iter_items(source), run_id=str(uuid.uuid4()))
    elapsed = time.perf_counter() - start
    emit(
        {
            "confirmed": result.confirmed,
            "elapsed_s": elapsed,
            "rss_start_kb": rss_start,
            "max_rss_kb": max_rss_kb(),
        }
    )
    return 0


# --- the flow ----------------------------------------------------------------------------------


def _pod_span_s(job: dict[str, Any]) -> float:
    """Seconds from the first pod's start to the last pod's end: the workers' own time."""
    pods = (job.get("local") or {}).get("pods") or []
    starts = [float(p["startEpoch"]) for p in pods if p.get("startEpoch") is not None]
    ends = [float(p["finishedEpoch"]) for p in pods if p.get("finishedEpoch") is not None]
    if not starts or not ends:
        raise RuntimeError("the Job's state records no pod start or end")
    return max(ends) - min(starts)


def _flow_kwargs(
    queue: str,
    items: Any,
    *,
    mode: str,
    parallelism: int,
    idle_timeout_s: float,
    command: list[str] | None,
    call: str | None,
    delete_job: bool,
    timeout_s: float,
) -> dict[str, Any]:
    from queuejob.flows.params import CleanupParams, JobParams, QueueParams

    return {
        "items": items,
        "queue": QueueParams(name=queue),
        "job": JobParams(
            command=command,
            call=call,
            parallelism=parallelism,
            idle_timeout_seconds=idle_timeout_s,
        ),
        "mode": mode,
        "backend": "local",
        "caveat_policy": "warn",
        "timeout_seconds": timeout_s,
        "cleanup": CleanupParams(delete_job=delete_job, delete_queues=True),
    }


def _direct_run(queue: str, items: list[str], *, parallelism: int, idle_timeout_s: float) -> Any:
    """The flow's steps called directly (no Prefect): the baseline of the flow's overhead."""
    from queuejob.flows.adapters import broker as broker_io
    from queuejob.flows.adapters.local import LocalBackend
    from queuejob.flows.core.items import ItemSource, iter_items
    from queuejob.flows.core.ledger import Ledger
    from queuejob.flows.core.manifest import JobSpec, build_job, build_secret, secret_name

    start = time.perf_counter()
    run_id = str(uuid.uuid4())
    cfg = broker_io.BrokerConfig(url=os.environ["QUEUEJOB_BROKER_URL"])
    qs = broker_io.QueueSettings(name=queue)
    backend = LocalBackend()
    spec = JobSpec(
        image="localhost/queuejob:local",
        command=("cat",),
        parallelism=parallelism,
        idle_timeout_seconds=idle_timeout_s,
    )
    broker_io.wait_for_broker(cfg, deadline_s=60)
    broker_io.declare_queues(cfg, qs)
    confirmed = broker_io.fill_queue(
        cfg, qs, iter_items(ItemSource.inline(items)), run_id=run_id
    ).confirmed
    job = build_job(spec, run_id=run_id, queue=qs.name, completions=confirmed)
    secret = build_secret(
        namespace=spec.namespace,
        name=secret_name(job["metadata"]["name"]),
        run_id=run_id,
        broker_url=cfg.url,
    )
    ledger = Ledger(run_id=run_id, expected=confirmed)
    with broker_io.ResultsConsumer(cfg, qs, run_id=run_id) as results:
        handle = backend.create_or_adopt(secret=secret, job=job, run_id=run_id)
        state = backend.wait(
            handle, timeout_s=300, on_update=lambda _s: ledger.add_all(results.drain(max_wait_s=0))
        )
        deadline = time.monotonic() + 30
        while ledger.summary().succeeded < confirmed and time.monotonic() < deadline:
            ledger.add_all(results.drain(max_wait_s=0.2))
    stored = backend.read_job(namespace=handle.namespace, name=handle.name) or {}
    span = _pod_span_s(stored)
    backend.delete_run(namespace=handle.namespace, run_id=run_id)
    broker_io.delete_queues(cfg, qs, only_if_empty=False)
    wall = time.perf_counter() - start
    return {
        "wall_s": wall,
        "workers_s": span,
        "overhead_s": wall - span,
        "succeeded": ledger.summary().succeeded,
        "phase": state.phase.value,
    }


def _flow_run(
    queue: str, items: list[str], *, parallelism: int, idle_timeout_s: float
) -> dict[str, Any]:
    """One flow run on the docs' items, keeping the Job so its pods' times can be read; the
    Job is then deleted here, timed, as the flow's own cleanup would have done."""
    from queuejob.flows.adapters.local import LocalBackend
    from queuejob.flows.core.items import ItemSource
    from queuejob.flows.work_queue import run_work_queue

    kwargs = _flow_kwargs(
        queue,
        ItemSource.inline(items),
        mode="coarse",
        parallelism=parallelism,
        idle_timeout_s=idle_timeout_s,
        command=["cat"],
        call=None,
        delete_job=False,
        timeout_s=300,
    )
    start = time.perf_counter()
    report = run_work_queue(**kwargs)
    wall = time.perf_counter() - start
    backend = LocalBackend()
    job = backend.read_job(namespace=report["namespace"], name=report["job"]) or {}
    span = _pod_span_s(job)
    start = time.perf_counter()
    backend.delete_run(namespace=report["namespace"], run_id=report["run_id"])
    cleanup = time.perf_counter() - start
    return {
        "wall_s": wall + cleanup,
        "workers_s": span,
        "overhead_s": wall + cleanup - span,
        "succeeded": report["summary"]["succeeded"],
        "phase": report["job_phase"],
    }


def cmd_flow_overhead(ns: argparse.Namespace) -> int:
    """A warm-up flow run, then ``--runs`` rounds of (flow run, direct run) on 8 items."""
    prefix = ns.queue_prefix
    t0 = time.perf_counter()
    import prefect  # noqa: F401 - timed: what a fresh process pays before its first run

    import_s = time.perf_counter() - t0
    # The first run in this process starts the ephemeral API: measured, not counted.
    first = _flow_run(f"{prefix}-warm", DOCS_ITEMS, parallelism=ns.parallelism, idle_timeout_s=2.0)
    rounds = []
    for i in range(ns.runs):
        flow = _flow_run(
            f"{prefix}-f{i}", DOCS_ITEMS, parallelism=ns.parallelism, idle_timeout_s=2.0
        )
        direct = _direct_run(
            f"{prefix}-d{i}", DOCS_ITEMS, parallelism=ns.parallelism, idle_timeout_s=2.0
        )
        print(
            f"run {i + 1}: flow {flow['wall_s']:.2f} s (workers {flow['workers_s']:.2f} s), "
            f"direct {direct['wall_s']:.2f} s (workers {direct['workers_s']:.2f} s)",
            file=sys.stderr,
            flush=True,
        )
        rounds.append({"flow": flow, "direct": direct})
    emit({"import_s": import_s, "first": first, "rounds": rounds})
    return 0


def cmd_flow_scale(ns: argparse.Namespace) -> int:
    """A small warm-up flow run, then one fine-mode run per size in ``--items`` (ascending), each
    followed by its peak RSS so far: the peak of a larger run cannot hide in a smaller one's."""
    from queuejob.flows.core.items import ItemSource
    from queuejob.flows.work_queue import run_work_queue

    prefix = ns.queue_prefix
    common: dict[str, Any] = {
        "mode": "fine",
        "parallelism": ns.parallelism,
        "idle_timeout_s": ns.idle_timeout,
        "command": None if ns.call else ["cat"],
        "call": ns.call,
        "delete_job": True,
    }
    run_work_queue(
        **_flow_kwargs(f"{prefix}-warm", ItemSource.inline(DOCS_ITEMS), timeout_s=300, **common)
    )
    rss_idle = rss_kb()
    runs = []
    for i, n in enumerate(sorted(int(x) for x in ns.items.split(","))):
        start = time.perf_counter()
        report = run_work_queue(
            **_flow_kwargs(
                f"{prefix}-{i}", ItemSource.int_range(0, n), timeout_s=ns.timeout, **common
            )
        )
        wall = time.perf_counter() - start
        peak = max_rss_kb()
        rows = succeeded_rows = in_order = with_result = exact_results = 0
        expect = _expected_result(ns.call)
        # Range items: row k is item k (id and body str(k)). Checked in order, without a set of
        # a million ids inflating the next run's peak.
        with Path(report["ledger_path"]).open() as fh:
            for line in fh:
                row = json.loads(line)
                in_order += row["item_id"] == str(rows) == row["body"] and row["index"] == rows
                rows += 1
                succeeded_rows += row["status"] == "succeeded"
                result = row.get("result")
                with_result += result is not None
                exact_results += expect is not None and result == expect(row["body"].encode())
        runs.append(
            {
                "items": n,
                "wall_s": wall,
                "summary": report["summary"],
                "job_phase": report["job_phase"],
                "findings": [f["code"] for f in report["findings"]],
                "ledger_rows": rows,
                "ledger_unique_ids": in_order,
                "ledger_succeeded": succeeded_rows,
                "ledger_results": with_result,
                "ledger_results_exact": exact_results,
                "report_results": (report.get("results") or {}).get("items"),
                "ledger_bytes": Path(report["ledger_path"]).stat().st_size,
                "max_unacked": report.get("max_unacked_records"),
                "max_rss_kb": peak,
            }
        )
        print(f"{n} items: {wall:.1f} s, peak RSS {peak / 1024:.0f} MiB", file=sys.stderr)
    emit({"rss_idle_kb": rss_idle, "runs": runs})
    return 0


def _expected_result(call: str | None) -> Any:
    """The function whose result each row must hold (bench.trivial's), or None."""
    if call is None or not call.startswith("bench.trivial:"):
        return None
    import bench.trivial

    fn = getattr(bench.trivial, call.split(":", 1)[1])
    return None if fn is bench.trivial.noop else fn


def cmd_results_absorb(ns: argparse.Namespace) -> int:
    """Outcome records already in a results queue, taken by the flow's own monitor (results
    consumer, checkpoint to the ledger storage, SQLite store, batched acks): records/s."""
    import logging
    import tempfile

    import pika

    from queuejob.flows.adapters import broker as broker_io
    from queuejob.flows.adapters.ledger_store import RunLedger
    from queuejob.flows.core.ledger import SUCCEEDED, OutcomeRecord
    from queuejob.flows.monitor import RunMonitor
    from queuejob.flows.storage import open_storage

    cfg = broker_io.BrokerConfig(url=os.environ["QUEUEJOB_BROKER_URL"])
    qs = broker_io.QueueSettings(name=ns.queue)
    broker_io.declare_queues(cfg, qs)
    run_id = str(uuid.uuid4())
    n = ns.records
    conn = pika.BlockingConnection(pika.URLParameters(cfg.url))
    try:
        ch = conn.channel()
        props = pika.BasicProperties(delivery_mode=2)
        for i in range(n):
            rec = OutcomeRecord(
                run_id=run_id, status=SUCCEEDED, item_id=str(i), index=i, attempt=1,
                pod=f"queuejob-bench-{i % 8}", exit_code=0, duration_s=0.0001, ts=time.time(),
            )  # fmt: skip
            ch.basic_publish("", qs.results_name, rec.to_json(), props)
        deadline = time.monotonic() + 120
        while ch.queue_declare(qs.results_name, passive=True).method.message_count < n:
            if time.monotonic() > deadline:
                raise SystemExit("the records did not all arrive in the results queue")
            time.sleep(0.05)
    finally:
        conn.close()
    storage = open_storage(None)
    with tempfile.TemporaryDirectory() as work:
        ledger = RunLedger.open(storage, run_id, expected=n, work_dir=Path(work))
        monitor = RunMonitor(
            cfg=cfg, qs=qs, ledger=ledger, mode="fine", idle_timeout_s=1.0,
            logger=logging.getLogger("bench"), max_unacked=ns.max_unacked,
        )  # fmt: skip
        start = time.perf_counter()
        with monitor:
            while ledger.records < n and time.perf_counter() - start < 300:
                monitor.drain(max_wait_s=0.5)
        wall = time.perf_counter() - start
        segments = ledger.segments
        taken = ledger.records
        ledger.close()
    broker_io.delete_queues(cfg, qs)
    print(f"{taken} records in {wall:.2f} s: {taken / wall:,.0f} records/s", file=sys.stderr)
    emit(
        {
            "records": taken,
            "wall_s": wall,
            "segments": segments,
            "max_unacked_seen": monitor.max_unacked_seen,
        }
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the subcommand and run it."""
    parser = argparse.ArgumentParser(prog="python -m bench.child")
    sub = parser.add_subparsers(dest="cmd", required=True)
    fill = sub.add_parser("fill", help="fill a queue from a text file")
    fill.add_argument("--file", required=True)
    fill.add_argument("--queue", required=True)
    fill.add_argument("--queue-type", default="quorum", choices=("quorum", "classic"))
    over = sub.add_parser("flow-overhead", help="flow vs direct on the docs' 8 items")
    over.add_argument("--runs", type=int, default=3)
    over.add_argument("--parallelism", type=int, default=2)
    over.add_argument("--queue-prefix", required=True)
    scale = sub.add_parser("flow-scale", help="one fine-mode flow run of many items")
    scale.add_argument("--items", required=True, help="comma-separated sizes, e.g. 10000,100000")
    scale.add_argument("--parallelism", type=int, default=2)
    scale.add_argument("--idle-timeout", type=float, default=2.0)
    scale.add_argument("--call", default=None)
    scale.add_argument("--timeout", type=float, default=1800.0)
    scale.add_argument("--queue-prefix", required=True)
    absorb = sub.add_parser("results-absorb", help="records/s the flow takes from the results")
    absorb.add_argument("--records", type=int, default=100_000)
    absorb.add_argument("--max-unacked", type=int, default=10_000)
    absorb.add_argument("--queue", required=True)
    ns = parser.parse_args(argv)
    handlers = {
        "fill": cmd_fill,
        "flow-overhead": cmd_flow_overhead,
        "flow-scale": cmd_flow_scale,
        "results-absorb": cmd_results_absorb,
    }
    return handlers[ns.cmd](ns)


if __name__ == "__main__":
    sys.exit(main())
