"""The broker going away: before the run, past the run's deadline, in the middle of the fill,
and while the pods work. The private broker (tests/reliability/private_broker.py) is stopped and
started for real; its data survives a restart, as a StatefulSet's volume would."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from prefect import flow

from queuejob.flows import tasks
from queuejob.flows.adapters import broker as broker_io
from queuejob.flows.core.errors import BrokerUnavailable
from queuejob.flows.core.items import ItemSource
from queuejob.flows.work_queue import run_work_queue
from tests.broker.support import ready_count
from tests.reliability.conftest import RelEnv
from tests.reliability.private_broker import PrivateBroker, free_port
from tests.reliability.support import (
    BROKER_PASSWORD,
    BROKER_USER,
    DOCS_ITEMS,
    Witness,
    ledger_rows,
    local_kwargs,
    queue_exists,
    record,
    take_message_ids,
    wait_for,
)

pytestmark = [pytest.mark.reliability, pytest.mark.broker, pytest.mark.prefect]


def test_broker_down_at_start_the_run_waits_and_succeeds(
    broker: PrivateBroker, rel_env: RelEnv, queue: str, witness: Witness
) -> None:
    fx = rel_env.effects
    broker.stop()
    stopped = time.monotonic()
    # The broker boots again (from its data, ~10 s here) only once the run has found it down.
    broker.start_in_background(when=lambda: witness.logged("not ready (attempt 1)"))
    up_at: list[float] = []

    def note_up() -> None:
        wait_for(broker.is_up, timeout=240, what="the broker to come back", every=0.05)
        up_at.append(time.monotonic())

    watcher = threading.Thread(target=note_up, daemon=True)
    watcher.start()
    try:
        report = run_work_queue(**local_kwargs(queue, fx.work(), broker_wait_s=120))
    finally:
        broker.join_start()
        watcher.join(240)
    witness.add("report", report)
    witness.add_run(report["run_id"])

    down_s = up_at[0] - stopped
    assert witness.logged("answered after"), "the readiness probe retried until it answered"
    lost, twice = fx.lost_and_twice(DOCS_ITEMS)
    assert (lost, twice) == ([], [])
    s = report["summary"]
    assert (s["succeeded"], s["left"], s["processed_more_than_once"]) == (8, 0, 0)
    record(
        f"broker down at start, up after {down_s:.0f} s",
        faults="1 outage",
        items=8,
        lost=len(lost),
        twice_expected="0",
        twice_observed=len(twice),
    )


def test_broker_down_past_the_deadline_fails_clearly_without_a_job(
    rel_env: RelEnv, queue: str, witness: Witness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing listens on this port: a broker that never comes up.
    port = free_port()
    url = f"amqp://{BROKER_USER}:{BROKER_PASSWORD}@127.0.0.1:{port}/%2F"
    monkeypatch.setenv("QUEUEJOB_BROKER_URL", url)
    started = time.monotonic()
    state = run_work_queue(**local_kwargs(queue, rel_env.effects.work(), broker_wait_s=1.0),
                           return_state=True)  # fmt: skip
    elapsed = time.monotonic() - started
    witness.add_run(state.state_details.flow_run_id)
    assert state.is_failed()
    with pytest.raises(BrokerUnavailable) as info:
        state.result()
    witness.add("exception", info.value)
    text = str(info.value)
    assert f"127.0.0.1:{port}" in text and "did not answer an AMQP handshake within 1 s" in text
    assert "check that RabbitMQ is running" in text
    # The readiness probe's deadline bounds the wait: the task does not retry on top of it.
    assert elapsed < 30
    assert not rel_env.state_dir.exists() or not list(rel_env.state_dir.rglob("*.json")), (
        "no Job was created"
    )
    assert not queue_exists(rel_env.url, queue), "nothing was declared"
    record(
        "broker down past the deadline",
        faults="1 outage",
        items=8,
        lost=0,
        twice_expected="0 (run fails, no Job)",
        twice_observed=0,
    )


def test_broker_restarted_mid_fill_the_retry_leaves_exactly_n(
    broker: PrivateBroker, rel_env: RelEnv, queue: str, witness: Witness
) -> None:
    n = 20_000
    cfg = broker_io.BrokerConfig(url=rel_env.url, connect_timeout_s=5.0)
    qs = broker_io.QueueSettings(name=queue)
    run_id = str(uuid.uuid4())
    broker_io.declare_queues(cfg, qs)
    restarted = threading.Event()
    confirmed_at_restart: list[int] = []
    restarter = threading.Thread(target=broker.restart, name="restart-mid-fill", daemon=True)

    def restart_mid_fill(confirmed: int) -> None:
        # Called from the fill's I/O loop as confirms arrive: restart once, part-way, from
        # another thread (the fill must go on until the broker drops it).
        if confirmed >= 2_000 and not restarted.is_set() and confirmed < n:
            restarted.set()
            confirmed_at_restart.append(confirmed)
            restarter.start()

    # The task's own retry policy keyed on RetryableError, with a window wider than a restart of
    # this broker (~12 s here; the default's three tries over ~14 s could just miss it).
    fill = tasks.fill_queue.with_options(retries=8, retry_delay_seconds=3, retry_jitter_factor=0)

    @flow(name="reliability-fill")
    def fill_in_a_flow(count: int) -> broker_io.FillResult:
        # The broker config is built inside: flow parameters are stored by the API.
        return fill(cfg, qs, ItemSource.int_range(0, count), run_id, on_progress=restart_mid_fill)

    try:
        state = fill_in_a_flow(n, return_state=True)
    finally:
        if restarter.is_alive() or restarted.is_set():
            restarter.join(150)
        wait_for(broker.is_up, timeout=150, what="the broker after the restart")
    witness.add_run(state.state_details.flow_run_id)
    result = state.result()
    witness.add("fill result", repr(result))

    assert restarted.is_set() and confirmed_at_restart[0] < n, "the restart hit the fill"
    assert broker.stops >= 1
    assert witness.logged("stopped half-way earlier: purged"), "the retry refilled from scratch"
    assert result.confirmed == n and not result.skipped
    assert ready_count(rel_env.url, queue) == n
    marker = broker_io.read_fill_marker(cfg, qs)
    assert marker is not None and marker.run_id == run_id and marker.done
    assert marker.confirmed == n
    ids = take_message_ids(rel_env.url, queue, expect=n)
    assert len(ids) == n and set(ids) == {str(i) for i in range(n)}, "each item exactly once"
    record(
        "broker restarted mid-fill",
        faults=f"1 restart after {confirmed_at_restart[0]} confirms",
        items=n,
        lost=n - len(set(ids)),
        twice_expected="0 (queue holds exactly N)",
        twice_observed=len(ids) - len(set(ids)),
    )


def test_broker_restarted_while_pods_run_loses_nothing(
    broker: PrivateBroker, rel_env: RelEnv, queue: str, witness: Witness
) -> None:
    fx = rel_env.effects
    restarted = threading.Event()
    errors: list[BaseException] = []

    def restart_once_work_is_under_way() -> None:
        try:
            wait_for(lambda: sum(fx.done().values()) >= 2, timeout=120, what="work under way")
            broker.restart()
            restarted.set()
        except BaseException as exc:
            errors.append(exc)

    chaos = threading.Thread(target=restart_once_work_is_under_way, daemon=True)
    chaos.start()
    try:
        # A long idle timeout: a pod that connects while the queue recovers must not give up.
        report = run_work_queue(
            **local_kwargs(queue, fx.work(sleep_s=1.0), idle_timeout=15.0, timeout_s=240)
        )
    finally:
        chaos.join(180)
    witness.add("report", report)
    witness.add_run(report["run_id"])
    assert not errors and restarted.is_set(), errors

    lost, twice = fx.lost_and_twice(DOCS_ITEMS)
    s = report["summary"]
    seen = f"done={dict(fx.done())} summary={s} findings={report['findings']}"
    assert lost == [], seen
    assert (s["succeeded"], s["failed"], s["dead_lettered"], s["left"]) == (8, 0, 0, 0), seen
    assert report["job_phase"] == "Succeeded", seen
    rows = ledger_rows(report, DOCS_ITEMS)
    assert sorted(rows) == sorted(DOCS_ITEMS), "the ledger accounts for every item"
    # A pod that lost the broker mid-item may have done the work before the restart: any item
    # done twice must be one the ledger shows with more than one attempt.
    assert all(rows[item]["attempts"] >= 2 for item in twice), (twice, rows)
    record(
        "broker restarted while pods run",
        faults="1 restart",
        items=8,
        lost=len(lost),
        twice_expected="0 or more, each flagged",
        twice_observed=len(twice),
    )
