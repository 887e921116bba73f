"""Figure 4: per-item overhead, a pod per item (coarse) against pods that loop (fine).

The same trivial items (the docs' ``cat`` on each) go through the worker both ways on the local
backend, parallelism 2: a coarse Job with ``completions`` = items, where every pod starts
Python, connects, takes one message and exits; and a fine Job whose two pods loop until the
queue has been empty for the idle timeout. Timed from creating the Job to ``wait()`` returning
(the fine Job's time includes its pods' idle exit), after a fill that is not timed. Every item
must have a ``succeeded`` outcome record and the queue must be empty.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from pathlib import Path

from bench.common import BenchError, Context, FigureResult, queue_name, rounds, say
from flows.adapters import broker as broker_io
from flows.adapters.local import LocalBackend
from flows.core.items import ItemSource, iter_items
from flows.core.ledger import Ledger
from flows.core.manifest import JobSpec, build_job, build_secret, secret_name

KEY = "overhead"
TITLE = "Per-item overhead: 500 trivial items, coarse vs fine, parallelism 2, local backend"

TARGET_FINE_VS_COARSE = 10.0
PARALLELISM = 2
IDLE_TIMEOUT_S = 1.0
COMMAND = ("cat",)


def _items(quick: bool) -> int:
    return 60 if quick else 500


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
