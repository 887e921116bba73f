"""Figure 4: per-item overhead, a pod per item (coarse) against pods that loop (fine), and one
fine worker against a bare pika consumer.

The same trivial items (the docs' ``cat`` on each) go through the worker both ways on the local
backend, parallelism 2: a coarse Job with ``completions`` = items, where every pod starts
Python, connects, takes one message and exits; and a fine Job whose two pods loop until the
queue has been empty for the idle timeout. Timed from creating the Job to ``wait()`` returning
(the fine Job's time includes its pods' idle exit), after a fill that is not timed. Every item
must have a ``succeeded`` outcome record and the queue must be empty.

Then the worker's own pace: one fine-mode worker (``--call bench.trivial:noop``, its default
window) drains a queue of trivial items, against a bare pika consumer (prefetch 100, a
``basic_ack`` per message, nothing else) draining the same number from a queue declared and
filled the same way, the two alternating which goes first in each round. Both are timed from
their first message to their last: the worker from the first to the last outcome record's
timestamp (it acks each message only after that record is confirmed), the bare consumer from
its first delivery to its last ack; neither counts its process start or its idle exit.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import BenchError, Context, FigureResult, child_env, queue_name, rounds, say
from queuejob.flows.adapters import broker as broker_io
from queuejob.flows.adapters.local import LocalBackend
from queuejob.flows.core.items import ItemSource, iter_items
from queuejob.flows.core.ledger import Ledger
from queuejob.flows.core.manifest import JobSpec, build_job, build_secret, secret_name

KEY = "overhead"
TITLE = (
    "Per-item overhead: 500 trivial items, coarse vs fine, parallelism 2, local backend; "
    "one fine worker vs a bare pika consumer"
)

TARGET_FINE_VS_COARSE = 10.0
TARGET_WORKER_RATE = 3_000.0  # items/s, one worker, trivial --call
TARGET_WORKER_VS_BARE = 0.25
BARE_PREFETCH = 100
PARALLELISM = 2
IDLE_TIMEOUT_S = 1.0
COMMAND = ("cat",)


def _items(quick: bool) -> int:
    return 60 if quick else 500


def _pace_items(quick: bool) -> int:
    return 5_000 if quick else 20_000


def _filled(cfg: broker_io.BrokerConfig, n: int, run_id: str) -> broker_io.QueueSettings:
    """A fresh work queue (quorum, as queuejob declares it) holding ``n`` trivial items."""
    qs = broker_io.QueueSettings(name=queue_name(KEY))
    broker_io.declare_queues(cfg, qs)
    confirmed = broker_io.fill_queue(
        cfg, qs, iter_items(ItemSource.int_range(0, n)), run_id=run_id
    ).confirmed
    if confirmed != n:
        raise BenchError(f"the fill confirmed {confirmed} of {n} items")
    return qs


def worker_pace(cfg: broker_io.BrokerConfig, n: int) -> float:
    """Items/s of one fine worker with a trivial ``--call``, first to last outcome record."""
    run_id = str(uuid.uuid4())
    qs = _filled(cfg, n, run_id)
    try:
        env = child_env({"BROKER_URL": cfg.url, "QUEUE": qs.name, "QUEUEJOB_RUN_ID": run_id})
        argv = [
            sys.executable,
            "-m",
            "queuejob.flows.worker",
            "--mode",
            "fine",
            "--idle-timeout",
            "0.5",
        ]
        done = subprocess.run(
            [*argv, "--call", "bench.trivial:noop"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0:
            raise BenchError(f"the worker exited {done.returncode}: {done.stderr[-500:]}")
        stamps = _record_stamps(cfg, qs.results_name, n)
        if broker_io.queue_depths(cfg, qs)["work"].ready:
            raise BenchError("the worker left items in the queue")
        return (n - 1) / (max(stamps) - min(stamps))
    finally:
        with contextlib.suppress(Exception):
            broker_io.delete_queues(cfg, qs)


def _record_stamps(cfg: broker_io.BrokerConfig, queue: str, n: int) -> list[float]:
    """The timestamps of the ``n`` succeeded records in ``queue``."""
    stamps: list[float] = []
    conn = broker_io.connect(cfg)
    try:
        ch = conn.channel()
        ch.basic_qos(prefetch_count=1000)
        for method, _props, body in ch.consume(queue, auto_ack=True, inactivity_timeout=5.0):
            if method is None:
                break
            record = json.loads(body)
            if record.get("status") == "succeeded":
                stamps.append(float(record["ts"]))
            if len(stamps) >= n:
                break
        ch.cancel()
    finally:
        conn.close()
    if len(stamps) != n:
        raise BenchError(f"{len(stamps)} of {n} succeeded records arrived")
    return stamps


def bare_pace(cfg: broker_io.BrokerConfig, n: int) -> float:
    """Items/s of a bare pika consumer (prefetch 100, ack each), first delivery to last ack."""
    qs = _filled(cfg, n, str(uuid.uuid4()))
    try:
        conn = broker_io.connect(cfg)
        try:
            ch = conn.channel()
            ch.basic_qos(prefetch_count=BARE_PREFETCH)
            seen = 0
            first = 0.0

            def on_message(channel: Any, method: Any, _props: Any, _body: bytes) -> None:
                nonlocal seen, first
                if not seen:
                    first = time.perf_counter()
                channel.basic_ack(method.delivery_tag)
                seen += 1
                if seen == n:
                    channel.stop_consuming()

            ch.basic_consume(qs.name, on_message)
            ch.start_consuming()
            elapsed = time.perf_counter() - first
        finally:
            conn.close()
        return (n - 1) / elapsed
    finally:
        with contextlib.suppress(Exception):
            broker_io.delete_queues(cfg, qs)


def process(
    cfg: broker_io.BrokerConfig, backend: LocalBackend, n: int, mode: str
) -> tuple[float, float]:
    """Fill ``n`` items, run the Job in ``mode`` and return (seconds from creating the Job to
    the wait returning, seconds until the last outcome record was read)."""
    run_id = str(uuid.uuid4())
    qs = broker_io.QueueSettings(name=queue_name(KEY))
    spec = JobSpec(
        image="localhost/queuejob:bench",
        command=COMMAND,
        name_prefix="bench-item",
        mode=mode,  # type: ignore[arg-type]
        parallelism=PARALLELISM,
        idle_timeout_seconds=IDLE_TIMEOUT_S,
        backoff_limit=10,
    )
    try:
        broker_io.declare_queues(cfg, qs)
        confirmed = broker_io.fill_queue(
            cfg, qs, iter_items(ItemSource.int_range(0, n)), run_id=run_id
        ).confirmed
        job = build_job(
            spec,
            run_id=run_id,
            queue=qs.name,
            completions=confirmed if mode == "coarse" else None,
        )
        secret = build_secret(
            namespace=spec.namespace,
            name=secret_name(job["metadata"]["name"]),
            run_id=run_id,
            broker_url=cfg.url,
        )
        ledger = Ledger(run_id=run_id, expected=confirmed)
        last_record = 0.0
        with broker_io.ResultsConsumer(cfg, qs, run_id=run_id) as results:

            def take(_state: object = None, wait_s: float = 0.0) -> None:
                nonlocal last_record
                records = results.drain(max_wait_s=wait_s)
                if records:
                    ledger.add_all(records)
                    last_record = time.perf_counter()

            start = time.perf_counter()
            handle = backend.create_or_adopt(secret=secret, job=job, run_id=run_id)
            state = backend.wait(handle, timeout_s=900, on_update=take)
            elapsed = time.perf_counter() - start
            deadline = time.monotonic() + 30
            while ledger.summary().succeeded < confirmed and time.monotonic() < deadline:
                take(wait_s=0.2)
        summary = ledger.summary()
        if state.phase.value != "Succeeded" or summary.succeeded != n:
            raise BenchError(
                f"{mode} Job ended {state.describe()} with {summary.succeeded}/{n} items succeeded"
            )
        ready = broker_io.queue_depths(cfg, qs)["work"].ready
        if ready:
            raise BenchError(f"{mode} Job left {ready} items in the queue")
        return elapsed, last_record - start
    finally:
        with contextlib.suppress(Exception):
            backend.delete_run(namespace=spec.namespace, run_id=run_id)
        with contextlib.suppress(Exception):
            broker_io.delete_queues(cfg, qs, only_if_empty=False)


def run(ctx: Context) -> FigureResult:
    """Coarse and fine in every round, alternating which goes first."""
    n = _items(ctx.quick)
    fig = FigureResult(key=KEY, number=4, title=TITLE, runs=ctx.runs)
    fig.params = {
        "items": n,
        "parallelism": PARALLELISM,
        "command": list(COMMAND),
        "idle_timeout_s": IDLE_TIMEOUT_S,
    }
    cfg = broker_io.BrokerConfig(url=ctx.broker_url)
    backend = LocalBackend(state_dir=Path(ctx.scratch(KEY)) / "local-jobs")
    coarse = fig.new_series("coarse", "coarse: a pod per item", "items/s")
    fine = fig.new_series(
        "fine", "fine: pods loop", "items/s", note=f"includes the {IDLE_TIMEOUT_S:g} s idle exit"
    )
    fine_busy = fig.new_series(
        "fine_records", "fine: until the last outcome record (no idle exit)", "items/s"
    )
    coarse_ms = fig.new_series("coarse_ms", "coarse: time per item", "ms")
    fine_ms = fig.new_series("fine_ms", "fine: time per item", "ms")
    for i in rounds(ctx, KEY):
        for mode in ("coarse", "fine") if i % 2 else ("fine", "coarse"):
            elapsed, to_last = process(cfg, backend, n, mode)
            if mode == "coarse":
                coarse.add(n / elapsed)
                coarse_ms.add(1000 * elapsed / n)
            else:
                fine.add(n / elapsed)
                fine_ms.add(1000 * elapsed / n)
                fine_busy.add(n / to_last)
            say(f"  {mode}: {n} items in {elapsed:.2f} s ({n / elapsed:,.1f} items/s)")
    pace_n = _pace_items(ctx.quick)
    fig.params.update(
        pace_items=pace_n,
        pace_call="bench.trivial:noop",
        bare_prefetch=BARE_PREFETCH,
    )
    worker = fig.new_series(
        "worker_call", "one fine worker, trivial --call (default window)", "items/s"
    )
    bare = fig.new_series(
        "bare_consumer", f"bare pika consumer, prefetch {BARE_PREFETCH}, ack each", "items/s"
    )
    for i in rounds(ctx, f"{KEY} (worker vs bare consumer)"):
        for who in ("worker", "bare") if i % 2 else ("bare", "worker"):
            if who == "worker":
                worker.add(worker_pace(cfg, pace_n))
                say(f"  worker: {worker.values[-1]:,.0f} items/s")
            else:
                bare.add(bare_pace(cfg, pace_n))
                say(f"  bare consumer: {bare.values[-1]:,.0f} items/s")
    vs_bare = fig.ratio("worker / bare consumer", "worker_call", "bare_consumer")
    fig.target(
        "one fine worker, trivial --call",
        worker.median,
        ">=",
        TARGET_WORKER_RATE,
        "items/s",
        measured="worker",
    )
    fig.target(
        "fine worker vs a bare consumer",
        vs_bare,
        ">=",
        TARGET_WORKER_VS_BARE,
        "x",
        measured="worker / bare pika consumer",
    )
    ratio = fig.ratio("fine / coarse", "fine", "coarse")
    fig.target(
        "fine vs coarse throughput",
        ratio,
        ">=",
        TARGET_FINE_VS_COARSE,
        "x",
        measured="fine / coarse items/s",
    )
    return fig
