"""Helpers for the broker tests: waiting on conditions, reading queues, running workers."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pika

from queuejob.flows.adapters.broker import BrokerConfig, QueueSettings, ResultsConsumer
from queuejob.flows.core.ledger import OutcomeRecord

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")

# A command in the amqp-consume style: the body on stdin; the item "poison" fails with code 7.
FAIL_ON_POISON = [
    "sh",
    "-c",
    'read -r x; [ "$x" != poison ] || { echo "boom: cannot process $x" >&2; exit 7; }',
]


def wait_until(
    check: Callable[[], T],
    *,
    timeout: float = 10.0,
    what: str = "condition",
    every: float = 0.05,
) -> T:
    """Poll `check` every `every` seconds until it returns something truthy; fail after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def ready_count(url: str, queue: str) -> int:
    """Ready messages in a queue (AMQP passive declare)."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return int(conn.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        conn.close()


def drain_messages(url: str, queue: str, *, expect: int, timeout: float = 60.0) -> list[Any]:
    """Consume (and ack) every message of a queue; return their properties."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    out: list[Any] = []
    try:
        ch = conn.channel()
        ch.basic_qos(prefetch_count=2000)
        deadline = time.monotonic() + timeout
        for method, props, _body in ch.consume(queue, auto_ack=True, inactivity_timeout=1.0):
            if method is None:
                if len(out) >= expect or time.monotonic() > deadline:
                    break
                continue
            out.append(props)
        ch.cancel()
    finally:
        conn.close()
    return out


def collect_records(
    cfg: BrokerConfig, qs: QueueSettings, run_id: str, *, count: int, timeout: float = 15.0
) -> list[OutcomeRecord]:
    """Read this run's outcome records until `count` have arrived (then a short grace to catch
    unexpected extras)."""
    records: list[OutcomeRecord] = []
    deadline = time.monotonic() + timeout
    with ResultsConsumer(cfg, qs, run_id=run_id) as consumer:
        while len(records) < count and time.monotonic() < deadline:
            records.extend(consumer.drain(max_wait_s=0.5))
        records.extend(consumer.drain(max_wait_s=0.3))
    return records


def worker_env(url: str, queue: str, run_id: str, pod: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUEUEJOB_")}
    env.update(
        BROKER_URL=url,
        QUEUE=queue,
        QUEUEJOB_RUN_ID=run_id,
        POD_NAME=pod,
        PYTHONPATH=str(ROOT),
        **extra,
    )
    return env


def run_worker(
    args: list[str], env: dict[str, str], *, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run `python -m queuejob.flows.worker ARGS` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "queuejob.flows.worker", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@contextlib.contextmanager
def started_worker(args: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    """`python -m queuejob.flows.worker ARGS` started (stderr piped, stdout discarded), and
    killed on the way out if it has not exited by then."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "queuejob.flows.worker", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
