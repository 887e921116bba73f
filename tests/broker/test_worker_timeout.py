"""``--item-timeout``: a hanging item fails like a failing one. Real workers, real broker."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from queuejob.flows.adapters.broker import BrokerConfig, QueueSettings, declare_queues, fill_queue
from queuejob.flows.core.items import ItemSource, iter_items
from queuejob.flows.core.ledger import FAILED, INTERRUPTED, SUCCEEDED
from queuejob.flows.worker import EXIT_ITEM_FAILED

from .support import collect_records, ready_count, run_worker, wait_until, worker_env

pytestmark = pytest.mark.broker


def _fill(cfg: BrokerConfig, qs: QueueSettings, values: list[str], run_id: str) -> dict[str, str]:
    declare_queues(cfg, qs)
    fill_queue(cfg, qs, iter_items(ItemSource.inline(values)), run_id=run_id)
    return {item.body.decode(): item.id for item in iter_items(ItemSource.inline(values))}


def _sleepers(queue: str) -> list[psutil.Process]:
    """The test command's ``sleep 60`` processes (their environment names the queue)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.cmdline() == ["sleep", "60"] and proc.environ().get("QUEUE") == queue:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_a_command_past_the_timeout_is_stopped_recorded_failed_and_redelivered(
    cfg: BrokerConfig, qs: QueueSettings, run_id: str, broker_url: str
) -> None:
    _fill(cfg, qs, ["hang"], run_id)
    env = worker_env(broker_url, qs.name, run_id, "pod-t")
    # It ignores SIGTERM, and leaves a child behind: only SIGKILL to its group ends it all.
    command = ["sh", "-c", "trap '' TERM; cat >/dev/null; sleep 60 & sleep 60; wait"]
    started = time.monotonic()
    done = run_worker(["--item-timeout", "1", "--grace", "0.5", "--", *command], env)
    took = time.monotonic() - started

    assert done.returncode == EXIT_ITEM_FAILED, done.stderr
    assert took < 15, f"the worker took {took:.1f} s for a 1 s timeout"
    assert "timed out after 1 s; rejected" in done.stderr
    (record,) = collect_records(cfg, qs, run_id, count=1)
    assert (record.status, record.exit_code, record.attempt) == (FAILED, 124, 1)
    assert "timed out after 1 s: the command was stopped (SIGTERM, then SIGKILL after 0.5 s)" in (
        record.stderr_tail or ""
    )
    assert "signal 9" in (record.stderr_tail or "")
    assert 1.0 <= (record.duration_s or 0) < 10
    assert not _sleepers(qs.name), "the command's process group outlived the timeout"
    # Rejected for redelivery: the broker has it again, one delivery further.
    wait_until(lambda: ready_count(broker_url, qs.name) == 1, what="the item back in the queue")
    again = run_worker(["--item-timeout", "1", "--grace", "0", "--", *command], env)
    assert again.returncode == EXIT_ITEM_FAILED
    records = collect_records(cfg, qs, run_id, count=2)  # the reader does not consume them
    assert sorted((r.status, r.attempt) for r in records) == [(FAILED, 1), (FAILED, 2)]


def test_items_within_the_timeout_are_untouched(
    cfg: BrokerConfig, qs: QueueSettings, run_id: str, broker_url: str
) -> None:
    _fill(cfg, qs, ["a", "b"], run_id)
    env = worker_env(broker_url, qs.name, run_id, "pod-t")
    done = run_worker(
        ["--mode", "fine", "--idle-timeout", "0.4", "--item-timeout", "5", "--", "cat"], env
    )
    assert done.returncode == 0, done.stderr
    records = collect_records(cfg, qs, run_id, count=2)
    assert sorted(r.status for r in records) == [SUCCEEDED, SUCCEEDED]


def test_a_call_past_the_timeout_ends_the_worker_and_returns_every_held_message(
    cfg: BrokerConfig, qs: QueueSettings, run_id: str, broker_url: str, tmp_path: Path
) -> None:
    values = ["first", "slow", "x1", "x2", "x3"]
    ids = _fill(cfg, qs, values, run_id)
    mark = tmp_path / "slow.started"
    env = worker_env(broker_url, qs.name, run_id, "pod-c", MARK=str(mark))
    args = ["--mode", "fine", "--idle-timeout", "5", "--prefetch", "10", "--item-timeout", "1"]
    started = time.monotonic()
    done = run_worker([*args, "--call", "tests.broker.worker_calls:slow_item"], env)
    took = time.monotonic() - started

    # The function cannot be stopped: the worker exits (1) without waiting for its minute.
    assert done.returncode == EXIT_ITEM_FAILED, done.stderr
    assert mark.exists() and took < 20, took
    assert "a --call function cannot be stopped" in done.stderr
    records = collect_records(cfg, qs, run_id, count=len(values))
    by_item = {r.item_id: r for r in records}
    assert Counter(r.status for r in records) == {SUCCEEDED: 1, FAILED: 1, INTERRUPTED: 3}
    slow = by_item[ids["slow"]]
    assert (slow.status, slow.exit_code) == (FAILED, 124)
    assert "timed out after 1 s" in (slow.stderr_tail or "")
    assert by_item[ids["first"]].status == SUCCEEDED
    # Nothing lost: the slow item (rejected) and the three never started are back.
    wait_until(lambda: ready_count(broker_url, qs.name) == 4, what="4 items back in the queue")
