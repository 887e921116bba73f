"""Shared fixtures: the real broker, and a quiet, fast Prefect environment.

RabbitMQ is real in every broker test: the URL comes from QUEUEJOB_TEST_BROKER_URL (set by
`make test`, which runs scripts/broker.py), else this conftest finds or starts one the same way.
In CI (CI=true) a missing broker fails the session instead of skipping.
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Prefect: ephemeral API, one reusable home, no telemetry, quiet logs. Set before prefect imports.
os.environ.pop("PREFECT_API_URL", None)
os.environ.setdefault("PREFECT_HOME", str(ROOT / ".cache" / "prefect-test-home"))
# Prefect creates its home but not the folders above it: a fresh clone has no .cache yet.
Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")


def _load_broker_script():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "qj_broker_script", ROOT / "scripts" / "broker.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def broker_url() -> Iterator[str]:
    """The AMQP URL of a real, running RabbitMQ."""
    url = os.environ.get("QUEUEJOB_TEST_BROKER_URL")
    if url:
        yield url
        return
    script = _load_broker_script()
    try:
        url, started = script.ensure()
    except script.BrokerNotFound as exc:
        message = f"no RabbitMQ broker for the tests: {exc}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    os.environ["QUEUEJOB_TEST_BROKER_URL"] = url
    try:
        yield url
    finally:
        if started:
            script.stop_private()


@pytest.fixture
def queue_name(request: pytest.FixtureRequest) -> str:
    """A unique queue name per test, so tests never see each other's messages."""
    base = request.node.name.lower()
    safe = "".join(c if c.isalnum() else "-" for c in base)[:40].strip("-")
    return f"qj-test-{safe}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def run_id() -> str:
    """A fresh run id shaped like a Prefect flow-run id."""
    return str(uuid.uuid4())
