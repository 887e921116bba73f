"""Fixtures for flow tests: real Prefect (ephemeral API), real RabbitMQ, isolated local state."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from queuejob.flows.core.items import ItemSource
from tests.fakekube.pytest_plugin import fake_kube, fake_kubeconfig

__all__ = ["fake_kube", "fake_kubeconfig"]
from queuejob.flows.params import CleanupParams, JobParams, QueueParams

DOCS_ITEMS = ["apple", "banana", "cherry", "date", "fig", "grape", "lemon", "melon"]


@pytest.fixture
def flow_env(
    broker_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, str]]:
    """Environment the flow reads: broker URL, local-backend state and ledger directories."""
    env = {
        "QUEUEJOB_BROKER_URL": broker_url,
        "QUEUEJOB_STATE_DIR": str(tmp_path / "local-jobs"),
        "QUEUEJOB_LEDGER_DIR": str(tmp_path / "ledgers"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    yield env


def local_kwargs(
    queue_name: str,
    *,
    items: list[str] | None = None,
    command: list[str] | None = None,
    completions: int | str = "auto",
    parallelism: int = 2,
    policy: str = "warn",
    idle_timeout: float = 1.5,
    backoff_limit: int = 6,
    mode: str = "coarse",
    keep_job: bool = False,
    delete_queues: bool = False,
) -> dict[str, object]:
    """Flow parameters for a local-backend run with fast idle exits."""
    return {
        "items": ItemSource.inline(items or DOCS_ITEMS),
        "queue": QueueParams(name=queue_name),
        "job": JobParams(
            command=command or ["sh", "-c", 'item=$(cat); echo "processed $item"'],
            parallelism=parallelism,
            completions=completions,  # type: ignore[arg-type]
            idle_timeout_seconds=idle_timeout,
            backoff_limit=backoff_limit,
        ),
        "mode": mode,
        "backend": "local",
        "caveat_policy": policy,
        "timeout_seconds": 120.0,
        "cleanup": CleanupParams(delete_job=not keep_job, delete_queues=delete_queues),
    }


def pids_with_env_marker(marker: str) -> list[int]:
    """Pids of live processes whose environment mentions marker (for leak checks)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            env = proc.environ()
        except (psutil.Error, OSError):
            continue
        if any(marker in v for v in env.values()):
            found.append(proc.pid)
    return [p for p in found if p != os.getpid()]
