"""The cluster tier: one three-node RabbitMQ cluster (tests/cluster/rabbit_cluster.py) behind the
tests' own TCP balancer, started once for the whole session (~20-30 s) and shared by its cases.
Each case may kill, stop and restart nodes; ``cluster`` starts again any node a case left down.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.rabbit_cluster import RabbitCluster
from tests.cluster.work import files
from tests.reliability import support
from tests.reliability.support import BROKER_PASSWORD, BROKER_USER


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the rows of the reliability table when the reliability suite does not."""
    if support.ROWS and "tests.reliability.conftest" not in sys.modules:
        terminalreporter.section("reliability: faults injected, items lost, processed twice")
        terminalreporter.write_line(support.table_markdown(support.ROWS))


@pytest.fixture(scope="session")
def rabbit_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    """Three clustered nodes of the installed rabbitmq-server, for the whole session."""
    support.require_rabbitmq_server("the cluster tier needs three nodes of it")
    cluster = RabbitCluster(
        tmp_path_factory.mktemp("rabbit-cluster"), user=BROKER_USER, password=BROKER_PASSWORD
    )
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def cluster(rabbit_cluster: RabbitCluster) -> RabbitCluster:
    """The cluster with all three nodes up."""
    rabbit_cluster.up()
    return rabbit_cluster


@pytest.fixture
def cluster_env(
    cluster: RabbitCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> RabbitCluster:
    """The flow's environment: the broker through the balancer, private state and ledgers."""
    monkeypatch.setenv("QUEUEJOB_BROKER_URL", cluster.url)
    monkeypatch.setenv("QUEUEJOB_STATE_DIR", str(tmp_path / "local-jobs"))
    monkeypatch.setenv("QUEUEJOB_LEDGER_DIR", str(tmp_path / "ledgers"))
    return cluster


@pytest.fixture
def work_queue(queue_name: str) -> Iterator[str]:
    """A unique queue name; its work files are removed afterwards."""
    yield queue_name
    for path in files(queue_name):
        path.unlink(missing_ok=True)
