"""A worker whose connection is lost (its node died, a balancer dropped it) connects again and
carries on: what it held unacked comes again as a further attempt, never as a loss. The tests'
own TCP balancer (`proxy.TcpProxy`) stands between the worker and the real broker and cuts the
connection."""

from __future__ import annotations

import urllib.parse
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from queuejob.flows.adapters.broker import (
    BrokerConfig,
    QueueSettings,
    declare_queues,
    fill_queue,
    queue_depths,
)
from queuejob.flows.core.items import ItemSource, iter_items
from queuejob.flows.core.ledger import SUCCEEDED
from queuejob.flows.worker import EXIT_BROKER, EXIT_OK

from .proxy import TcpProxy
from .support import collect_records, started_worker, wait_until, worker_env

pytestmark = pytest.mark.broker


@pytest.fixture
def proxy(broker_url: str) -> Iterator[TcpProxy]:
    parts = urllib.parse.urlsplit(broker_url)
    with TcpProxy([(parts.hostname or "127.0.0.1", parts.port or 5672)]) as p:
        yield p


def _through(proxy: TcpProxy, broker_url: str) -> str:
    parts = urllib.parse.urlsplit(broker_url)
    userinfo = parts.netloc.rpartition("@")[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{userinfo}@127.0.0.1:{proxy.port}"))


def _done(path: Path) -> Counter[str]:
    return Counter(path.read_text().split()) if path.exists() else Counter()


def test_a_fine_worker_reconnects_and_loses_nothing(
    cfg: BrokerConfig,
    qs: QueueSettings,
    run_id: str,
    broker_url: str,
    proxy: TcpProxy,
    tmp_path: Path,
) -> None:
    n = 400
    values = [f"i{k}" for k in range(n)]
    declare_queues(cfg, qs)
    fill_queue(cfg, qs, iter_items(ItemSource.inline(values)), run_id=run_id)
    done = tmp_path / "done.txt"
    env = worker_env(
        _through(proxy, broker_url), qs.name, run_id, "pod-r", DONE=str(done), ITEM_SLEEP="0.01"
    )
    call = ["--call", "tests.broker.worker_calls:record_done"]
    with started_worker(
        ["--mode", "fine", "--idle-timeout", "2", "--prefetch", "20", *call], env
    ) as proc:
        wait_until(lambda: sum(_done(done).values()) >= 60, timeout=30, what="work under way")
        assert proxy.cut() >= 1  # the node behind the balancer is gone, for a moment
        _, err = proc.communicate(timeout=90)
    assert proc.returncode == EXIT_OK, err
    assert "lost the connection to the broker" in err and "connected again" in err, err
    work = _done(done)
    assert sorted(work) == sorted(values), "every item was processed"
    assert queue_depths(cfg, qs)["work"].ready == 0
    records = collect_records(cfg, qs, run_id, count=n)
    succeeded: dict[str, list[int]] = {}
    for rec in records:
        if rec.status == SUCCEEDED:
            succeeded.setdefault(rec.item_id or "", []).append(rec.attempt)
    assert len(succeeded) == n, "a success record for every item"
    by_value = {i.body.decode(): i.id for i in iter_items(ItemSource.inline(values))}
    twice = [v for v, c in work.items() if c > 1]
    # An item done twice is one whose message went back with the connection: its second
    # success record carries a later attempt.
    for value in twice:
        assert max(succeeded[by_value[value]]) >= 2, (value, succeeded[by_value[value]])


def test_a_coarse_worker_that_lost_its_items_message_records_it_and_exits_3(
    cfg: BrokerConfig,
    qs: QueueSettings,
    run_id: str,
    broker_url: str,
    proxy: TcpProxy,
    tmp_path: Path,
) -> None:
    declare_queues(cfg, qs)
    fill_queue(cfg, qs, iter_items(ItemSource.inline(["only"])), run_id=run_id)
    started = tmp_path / "started"
    env = worker_env(_through(proxy, broker_url), qs.name, run_id, "pod-c")
    cmd = ["sh", "-c", f"touch {started}; sleep 1.5; cat >/dev/null"]
    with started_worker(["--idle-timeout", "5", "--", *cmd], env) as proc:
        wait_until(started.exists, timeout=20, what="the item to start")
        proxy.cut()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_BROKER, err
    assert "went back to the queue with the lost connection" in err, err
    # The attempt is on record, and the item is back in the queue for another pod.
    records = collect_records(cfg, qs, run_id, count=1)
    assert [(r.status, r.attempt) for r in records] == [(SUCCEEDED, 1)]
    wait_until(lambda: queue_depths(cfg, qs)["work"].ready == 1, what="the item back in the queue")


def test_without_a_reconnect_window_a_lost_connection_exits_3(
    cfg: BrokerConfig,
    qs: QueueSettings,
    run_id: str,
    broker_url: str,
    proxy: TcpProxy,
    tmp_path: Path,
) -> None:
    declare_queues(cfg, qs)
    env = worker_env(_through(proxy, broker_url), qs.name, run_id, "pod-z")
    args = ["--mode", "fine", "--idle-timeout", "30", "--reconnect-timeout", "0", "--", "cat"]
    with started_worker(args, env) as proc:
        wait_until(lambda: proxy.connections() >= 1, timeout=20, what="the worker to connect")
        wait_until(lambda: queue_depths(cfg, qs)["work"].consumers == 1, what="its consumer")
        proxy.cut()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_BROKER, err
    assert "lost the connection to the broker" in err
