"""Pytest fixtures for the fake Kubernetes API server.

Use them from any test package's ``conftest.py``::

    from tests.fakekube.pytest_plugin import fake_kube, fake_kube_client, fake_kubeconfig

or load the module as a plugin from the root conftest (``pytest_plugins = [...]``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakekube import FakeKubeServer


@pytest.fixture
def fake_kube() -> Iterator[FakeKubeServer]:
    """A started fake API server (pod back-off 0.2 s, capped at 2 s); stopped after the test,
    with every pod process killed."""
    server = FakeKubeServer(backoff_base_s=0.2, backoff_max_s=2.0)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fake_kubeconfig(fake_kube: FakeKubeServer, tmp_path: Path) -> Path:
    """Path to a kubeconfig (admin token, context ``fake``) for ``fake_kube``."""
    return fake_kube.write_kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
def fake_kube_client(fake_kube: FakeKubeServer) -> Iterator[Any]:
    """A ``kubernetes.client.ApiClient`` for ``fake_kube`` (closed after the test)."""
    from kubernetes import config

    api_client = config.new_client_from_config_dict(  # type: ignore[no-untyped-call]
        fake_kube.kubeconfig_dict()
    )
    try:
        yield api_client
    finally:
        api_client.close()
