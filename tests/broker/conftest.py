"""Fixtures for the broker adapter and worker tests (a real RabbitMQ)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from queuejob.flows.adapters.broker import BrokerConfig, QueueSettings, delete_queues


@pytest.fixture
def cfg(broker_url: str) -> BrokerConfig:
    """The test broker, with short timeouts."""
    return BrokerConfig(broker_url, connect_timeout_s=5.0)


@pytest.fixture
def qs(cfg: BrokerConfig, queue_name: str) -> Iterator[QueueSettings]:
    """Quorum queue settings with a unique name; all its queues are deleted afterwards."""
    settings = QueueSettings(queue_name)
    yield settings
    with contextlib.suppress(Exception):
        delete_queues(cfg, settings, only_if_empty=False)
