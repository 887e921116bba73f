"""Fixtures for the reliability suite.

- ``private_broker``: one private RabbitMQ for the whole suite (its start costs 10-20 s), whose
  only user has a recognisable password (`support.BROKER_PASSWORD`). Cases may stop, start and
  restart it; ``broker`` makes sure it is up again before each test.
- ``rel_env``: the flow's environment (broker URL, local-backend state and ledger directories).
- ``witness`` (autouse): every test's logs (at INFO, queuejob's at DEBUG), its captured stdout and
  stderr, and whatever the test hands it (return values, exceptions, CLI output, manifests, state
  directories, flow runs whose Prefect logs, states and artifacts are read back) are searched for
  the password at teardown. It may appear in a Secret's data and nowhere else.
- The numbers each case records are printed as a table at the end of the session (the README's
  reliability section is copied from it).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.fakekube.pytest_plugin import fake_kube, fake_kubeconfig
from tests.reliability import support
from tests.reliability.private_broker import PrivateBroker
from tests.reliability.support import (
    BROKER_PASSWORD,
    BROKER_USER,
    SideEffects,
    Witness,
    prefect_home,
    prefect_texts,
    secret_forms,
)

__all__ = ["fake_kube", "fake_kubeconfig"]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the reliability table when cases recorded their numbers."""
    if support.ROWS:
        terminalreporter.section("reliability: faults injected, items lost, processed twice")
        terminalreporter.write_line(support.table_markdown(support.ROWS))
        out = os.environ.get("QUEUEJOB_RELIABILITY_TABLE")
        if out:
            Path(out).write_text(support.table_markdown(support.ROWS) + "\n")


@pytest.fixture(scope="session")
def private_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateBroker]:
    """A private RabbitMQ node (recognisable password) shared by the whole suite."""
    support.require_rabbitmq_server("the reliability suite needs a private broker")
    broker = PrivateBroker(
        tmp_path_factory.mktemp("rabbitmq"), user=BROKER_USER, password=BROKER_PASSWORD
    )
    try:
        broker.start()
        yield broker
    finally:
        broker.close()


@pytest.fixture
def broker(private_broker: PrivateBroker) -> PrivateBroker:
    """The private broker, up (a case that failed half-way may have left it stopped)."""
    private_broker.join_start()
    if not private_broker.is_up():
        private_broker.start()
    return private_broker


@dataclass
class RelEnv:
    """Where a case's run puts things, and how to reach its broker."""

    url: str = field(repr=False)  # holds the password
    state_dir: Path
    ledger_dir: Path
    effects: SideEffects


@pytest.fixture
def rel_env(
    broker: PrivateBroker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    witness: Witness,
) -> RelEnv:
    """The flow's environment for the private broker, with private state and ledger dirs."""
    env = RelEnv(
        url=broker.url,
        state_dir=tmp_path / "local-jobs",
        ledger_dir=tmp_path / "ledgers",
        effects=SideEffects(tmp_path / "done.txt", tmp_path / "killed-once"),
    )
    monkeypatch.setenv("QUEUEJOB_BROKER_URL", env.url)
    monkeypatch.setenv("QUEUEJOB_STATE_DIR", str(env.state_dir))
    monkeypatch.setenv("QUEUEJOB_LEDGER_DIR", str(env.ledger_dir))
    # Local Jobs keep the Secret (and only it) under secrets/.
    witness.add_dir(env.state_dir, skip=("secrets",))
    witness.add_dir(env.ledger_dir)
    return env


@pytest.fixture(autouse=True)
def witness(capfd: pytest.CaptureFixture[str]) -> Iterator[Witness]:
    """Search everything the test's runs produced for the broker password (see module doc)."""
    w = Witness()
    collector = w.collector
    root = logging.getLogger()
    watched = {"": logging.INFO, "prefect": logging.INFO, "queuejob": logging.DEBUG}
    before = {name: logging.getLogger(name).level for name in watched}
    for name, level in watched.items():
        logging.getLogger(name).setLevel(level)
    root.addHandler(collector)
    try:
        yield w
    finally:
        root.removeHandler(collector)
        for name, level in before.items():
            logging.getLogger(name).setLevel(level)
    out, err = capfd.readouterr()
    # Written back, so pytest still shows the output of a failing test.
    sys.stdout.write(out)
    sys.stderr.write(err)
    extra = [("stdout", out), ("stderr", err)]
    extra += [(f"log {i}", text) for i, text in enumerate(collector.texts)]
    extra += prefect_texts(w.run_ids)
    # Prefect's own database and result storage, where parameters, states and logs persist.
    w.add_dir(prefect_home())
    leaks = w.leaks(secret_forms(BROKER_PASSWORD), extra)
    assert not leaks, "the broker password leaked:\n" + "\n".join(leaks[:10])


@pytest.fixture
def queue(queue_name: str, private_broker: PrivateBroker) -> Iterator[str]:
    """A unique work queue name. Afterwards no pod of it may be left running, and its queues
    are deleted from the private broker."""
    yield queue_name
    support.wait_for(
        lambda: not support.processes_with_env("QUEUE", queue_name),
        timeout=30,
        what=f"the pods of queue {queue_name} to end",
    )
    if private_broker.is_up():
        support.delete_queues(private_broker.url, queue_name)
