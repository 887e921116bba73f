"""Whole runs on a three-node cluster that loses a node: the work queue's leader killed mid-fill,
the results queue's node killed mid-wait (fine and coarse), a killed node started again mid-run,
and a rolling restart of all three. Each case counts the items lost and processed twice from
what the work did (tests/cluster/work.py) and adds a row to the reliability table.

The flow reaches the cluster through the balancer (a Kubernetes Service's role), as do the pods
(local processes, fine mode with ``--call`` unless said otherwise). Sizes are modest: the tier
shares `make test`'s time; ``QUEUEJOB_CLUSTER_ITEMS`` runs the results-node case at any size.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pika
import pika.exceptions as pex
import pytest

from queuejob.flows.core.items import ItemSource
from queuejob.flows.params import CleanupParams, JobParams, QueueParams
from queuejob.flows.work_queue import run_work_queue
from tests.cluster.rabbit_cluster import Node, RabbitCluster
from tests.cluster.work import files
from tests.reliability.support import ledger_rows, record, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.broker, pytest.mark.prefect]


def _kwargs(
    queue: str,
    n: int,
    *,
    mode: str = "fine",
    command: list[str] | None = None,
    parallelism: int = 2,
    idle_timeout: float = 3.0,
) -> dict[str, Any]:
    job = (
        JobParams(command=command, parallelism=parallelism, idle_timeout_seconds=idle_timeout)
        if command
        else JobParams(
            call="tests.cluster.work:record",
            parallelism=parallelism,
            idle_timeout_seconds=idle_timeout,
        )
    )
    return {
        "items": ItemSource.int_range(0, n),
        "queue": QueueParams(name=queue),
        "job": job,
        "mode": mode,
        "backend": "local",
        "caveat_policy": "warn",
        "timeout_seconds": 600.0,
        "broker_wait_seconds": 90.0,
        "cleanup": CleanupParams(delete_job=True, delete_queues=True),
    }


def _done(queue: str) -> Counter[str]:
    path = files(queue)[0]
    return Counter(path.read_text().split()) if path.exists() else Counter()


def _set_item_time(queue: str, seconds: float) -> None:
    files(queue)[1].write_text(f"{seconds:g}")


def _ready(cluster: RabbitCluster, queue: str, avoid: Node | None = None) -> int:
    """Ready messages of a queue, asked of a node that is up (not ``avoid``); 0 if unknown."""
    for node in cluster.nodes:
        if node is avoid or not node.is_up():
            continue
        try:
            conn = pika.BlockingConnection(pika.URLParameters(cluster.node_url(node)))
        except pex.AMQPError:
            continue
        try:
            return int(conn.channel().queue_declare(queue, passive=True).method.message_count)
        except pex.ChannelClosedByBroker:
            return 0
        finally:
            if conn.is_open:
                conn.close()
    return 0


def _in_background(fn: Callable[[], None]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def _check(queue: str, n: int, report: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Items lost and processed twice, from the work; each item twice must show 2+ attempts."""
    done = _done(queue)
    items = [str(i) for i in range(n)]
    lost = [i for i in items if done[i] == 0]
    twice = sorted(i for i in items if done[i] > 1)
    s = report["summary"]
    seen = f"summary={s} findings={[f['code'] for f in report['findings']]} lost={lost[:5]}"
    assert lost == [], seen
    assert (s["succeeded"], s["failed"], s["dead_lettered"], s["left"]) == (n, 0, 0, 0), seen
    assert report["job_phase"] == "Succeeded", seen
    if twice:
        rows = ledger_rows(report)
        by_body = {str(r["body"]): r for r in rows.values()}
        assert all(by_body[i]["attempts"] >= 2 for i in twice), twice[:5]
    return lost, twice


def test_work_queue_leader_killed_mid_fill(cluster_env: RabbitCluster, work_queue: str) -> None:
    cluster, n = cluster_env, 30_000
    killed: list[tuple[Node, int]] = []

    def kill_the_leader_mid_fill() -> None:
        wait_for(lambda: _ready(cluster, work_queue) > 0, timeout=120, what="the fill to start",
                 every=0.1)  # fmt: skip
        leader = cluster.leader_of(work_queue)
        at = wait_for(
            lambda: _ready(cluster, work_queue, avoid=leader) >= n // 10 or None,
            timeout=120,
            what="a tenth of the fill",
            every=0.02,
        )
        del at
        confirmed = _ready(cluster, work_queue, avoid=leader)
        leader.kill()
        killed.append((leader, confirmed))
        cluster.restart_in_background(leader, after_s=3.0)

    chaos, errors = _in_background(kill_the_leader_mid_fill)
    report = run_work_queue(**_kwargs(work_queue, n))
    chaos.join(180)
    assert not errors, errors
    assert killed and killed[0][1] < n, "the kill came during the fill"
    lost, twice = _check(work_queue, n, report)
    assert twice == [], "the pods started after the fill: nothing to do twice"
    record(
        "cluster: leader of the work queue's node SIGKILLed mid-fill",
        faults=f"1 SIGKILL after {killed[0][1]} of {n} queued",
        items=n,
        lost=len(lost),
        twice_expected="0",
        twice_observed=len(twice),
    )


@pytest.mark.parametrize("mode", ["fine", "coarse"])
def test_results_queue_node_killed_mid_wait(
    cluster_env: RabbitCluster, work_queue: str, mode: str
) -> None:
    cluster = cluster_env
    if mode == "fine":
        n = int(os.environ.get("QUEUEJOB_CLUSTER_ITEMS", "3000"))
        kwargs = _kwargs(work_queue, n)
        _set_item_time(work_queue, 0.004 if n <= 10_000 else 0.0)
    else:
        n = 10
        done, _ = files(work_queue)
        cmd = ["sh", "-c", f'item=$(cat); sleep 0.5; echo "$item" >> {done}']
        kwargs = _kwargs(work_queue, n, mode="coarse", command=cmd)
    killed: list[Node] = []

    def kill_the_results_node() -> None:
        wait_for(lambda: sum(_done(work_queue).values()) >= max(2, n // 5), timeout=300,
                 what="work under way", every=0.02)  # fmt: skip
        node = cluster.leader_of(f"{work_queue}.results")
        node.kill()
        killed.append(node)

    chaos, errors = _in_background(kill_the_results_node)
    started = time.monotonic()
    report = run_work_queue(**kwargs)
    chaos.join(180)
    assert not errors, errors
    assert killed, "a node was killed"
    lost, twice = _check(work_queue, n, report)
    record(
        f"cluster: results queue's node SIGKILLed mid-wait, {mode} mode",
        faults="1 SIGKILL",
        items=n,
        lost=len(lost),
        twice_expected="0 or more, each shown with 2+ attempts",
        twice_observed=len(twice),
    )
    if n >= 100_000:
        print(
            f"\n{n} items, fine: {report['summary']['succeeded']} succeeded, "
            f"{len(twice)} processed twice, {time.monotonic() - started:.0f} s"
        )


def test_killed_node_restarted_mid_run(cluster_env: RabbitCluster, work_queue: str) -> None:
    cluster, n = cluster_env, 3000
    _set_item_time(work_queue, 0.006)
    events: list[str] = []

    def kill_then_restart() -> None:
        wait_for(lambda: sum(_done(work_queue).values()) >= n // 10, timeout=300,
                 what="work under way", every=0.02)  # fmt: skip
        node = cluster.leader_of(work_queue)
        node.kill()
        events.append(f"killed {node.name}")
        time.sleep(2.0)
        node.start()
        events.append(f"started {node.name} at {sum(_done(work_queue).values())} done")

    chaos, errors = _in_background(kill_then_restart)
    report = run_work_queue(**_kwargs(work_queue, n, idle_timeout=5.0))
    chaos.join(240)
    assert not errors, errors
    assert len(events) == 2, events
    lost, twice = _check(work_queue, n, report)
    record(
        "cluster: work queue's node SIGKILLed, started again mid-run",
        faults="1 SIGKILL, 1 restart",
        items=n,
        lost=len(lost),
        twice_expected="0 or more, each shown with 2+ attempts",
        twice_observed=len(twice),
    )


def test_rolling_restart_of_all_three_during_a_run(
    cluster_env: RabbitCluster, work_queue: str
) -> None:
    cluster, n = cluster_env, 3000
    # Items take long enough for the run to outlast the restarts; once they are done, no time.
    _set_item_time(work_queue, 0.05)
    restarted: list[str] = []

    def rolling_restart() -> None:
        try:
            wait_for(lambda: sum(_done(work_queue).values()) >= 50, timeout=300,
                     what="work under way", every=0.02)  # fmt: skip
            for node in cluster.nodes:
                node.stop()
                node.start()
                cluster.wait_formed()
                restarted.append(node.name)
        finally:
            _set_item_time(work_queue, 0.0)

    chaos, errors = _in_background(rolling_restart)
    report = run_work_queue(**_kwargs(work_queue, n, idle_timeout=5.0))
    chaos.join(300)
    assert not errors, errors
    assert len(restarted) == 3, restarted
    done_before_end = sum(_done(work_queue).values())
    assert done_before_end >= n
    lost, twice = _check(work_queue, n, report)
    record(
        "cluster: rolling restart of all three nodes during a run",
        faults="3 restarts, one node at a time",
        items=n,
        lost=len(lost),
        twice_expected="0 or more, each shown with 2+ attempts",
        twice_observed=len(twice),
    )


def test_a_classic_queue_on_a_dead_node_is_named(
    cluster: RabbitCluster, queue_name: str, tmp_path: Path
) -> None:
    """What a classic work queue gives up: its node gone, its queues are out of reach, and the
    error says so (retryable), instead of 'declare the queues first'."""
    from queuejob.flows.adapters.broker import (
        BrokerConfig,
        QueueSettings,
        declare_queues,
        queue_depths,
    )
    from queuejob.flows.core.errors import BrokerUnavailable

    qs = QueueSettings(queue_name, queue_type="classic")
    first = cluster.nodes[0]
    declare_queues(BrokerConfig(cluster.node_url(first)), qs)  # classic: on that node
    first.kill()
    try:
        cfg = BrokerConfig(cluster.node_url(cluster.nodes[1]), reconnect_s=0)
        with pytest.raises(BrokerUnavailable) as info:
            queue_depths(cfg, qs)
        text = str(info.value)
        assert text.startswith(f"node {first.name} holding queue {qs.name!r} is down"), text
        assert "declare the queues" not in text
    finally:
        first.start()
        cluster.wait_formed()
        from queuejob.flows.adapters.broker import delete_queues

        delete_queues(BrokerConfig(cluster.url), qs, only_if_empty=False)
