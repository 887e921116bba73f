"""Fixtures for the real-control-plane tier: Kubernetes 1.20's own apiserver and controllers.

Every test under this directory is marked ``realkube``. The tier runs in CI (``CI=true``; a
missing binary cache is built first), when ``QUEUEJOB_REAL_K8S=1`` (``make test-k8s``) or when
the cache exists; otherwise its tests are deselected and the summary says why in one line.
One control plane and one kubelet stand-in serve the whole session.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from queuejob.flows.adapters.kube import KubeBackend
from tests.e2e.conftest import prefect_server
from tests.images import PullFailure
from tests.realkube import cluster
from tests.realkube.helpers import NS, watch_threads
from tests.realkube.kubelet import Api, Kubelet

# A real `prefect server` (tests/e2e's), for the README's kubernetes work pool path.
__all__ = ["prefect_server"]

HERE = Path(__file__).resolve().parent
# Images the node cannot pull (tag "missing"), and one it pulls only at the first attempt after
# 3 s (tag "flaky"); every other image is on the node. Pull back-off: 1 s, doubling.
PULL_FAILURES = (PullFailure("*:missing"), PullFailure("*:flaky", for_s=3.0))
PULL_BACKOFF_S = 1.0
_REASON = pytest.StashKey[str]()
_TIMINGS = pytest.StashKey[dict[str, float]]()
_BUILD_ERROR = pytest.StashKey[str]()


def _is_ours(item: pytest.Item) -> bool:
    return HERE in Path(str(item.path)).resolve().parents


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark this tier's tests, and deselect them (saying why) when the tier does not run."""
    ours = [item for item in items if _is_ours(item)]
    for item in ours:
        item.add_marker(pytest.mark.realkube)
    if not ours:
        return
    chosen = cluster.selection()
    timings = config.stash.setdefault(_TIMINGS, {})
    if not chosen.run:
        items[:] = [item for item in items if not _is_ours(item)]
        config.hook.pytest_deselected(items=ours)
        config.stash[_REASON] = f"realkube: {len(ours)} tests deselected: {chosen.reason}"
        return
    if chosen.build_first:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        log = cluster.cache_dir() / "build.log"
        if reporter is not None:
            reporter.write_line(
                f"realkube: building the Kubernetes 1.20 binaries once into {cluster.cache_dir()}"
                f" (log: {log}); later runs reuse them"
            )
        try:
            timings["build_s"] = cluster.build(log)
        except RuntimeError as exc:
            # Fail this tier's tests with the reason, not the whole session.
            config.stash[_BUILD_ERROR] = str(exc)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line: why the tier was deselected, or what it cost."""
    config = terminalreporter.config
    reason = config.stash.get(_REASON, None)
    if reason:
        terminalreporter.write_line(reason, yellow=True)
        return
    timings = config.stash.get(_TIMINGS, {})
    if "start_s" in timings:
        parts = [f"control plane ready in {timings['start_s']:.1f} s"]
        if "build_s" in timings:
            parts.insert(0, f"binaries built in {timings['build_s'] / 60:.1f} min")
        terminalreporter.write_line("realkube: " + ", ".join(parts))


@pytest.fixture(scope="session")
def control_plane(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[cluster.ControlPlane]:
    """A running kube-apiserver + kube-controller-manager + etcd, bound to 127.0.0.1."""
    build_error = pytestconfig.stash.get(_BUILD_ERROR, None)
    if build_error:
        pytest.fail(build_error)
    run_dir = tmp_path_factory.mktemp("k8s-control-plane")
    try:
        plane = cluster.ControlPlane.start(run_dir)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    pytestconfig.stash.setdefault(_TIMINGS, {})["start_s"] = plane.start_seconds
    try:
        yield plane
    finally:
        plane.stop()
        left = cluster.processes_of(run_dir)
        assert not left, f"control-plane processes outlived the session: {left}"


@pytest.fixture(scope="session")
def kubelet(
    control_plane: cluster.ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Kubelet]:
    """The node: runs pods as local processes, with the project's console scripts on PATH; it
    cannot pull the images of `PULL_FAILURES`."""
    venv_bin = str(Path(sys.executable).parent)
    stand_in = Kubelet(
        control_plane.api_config(),
        node_name="queuejob-node",
        workdir=tmp_path_factory.mktemp("kubelet"),
        serving_cert=str(control_plane.serving_cert),
        serving_key=str(control_plane.serving_key),
        client_ca=str(control_plane.ca_file),
        path=f"{venv_bin}:/usr/local/bin:/usr/bin:/bin",
        pull_failures=PULL_FAILURES,
        pull_backoff_s=PULL_BACKOFF_S,
    )
    stand_in.start()
    try:
        yield stand_in
    finally:
        stand_in.stop()
        leftovers = stand_in.pod_processes()
        assert not leftovers, f"pod processes outlived the kubelet stand-in: {leftovers}"


@pytest.fixture(autouse=True)
def _kubelet_stays_healthy(kubelet: Kubelet) -> Iterator[None]:
    """Fail the test that made the stand-in hit an unexpected API error."""
    before = len(kubelet.errors)
    yield
    new = kubelet.errors[before:]
    assert not new, f"the kubelet stand-in met unexpected errors: {new}"


@pytest.fixture
def admin(control_plane: cluster.ControlPlane) -> Api:
    """The API as the cluster's administrator."""
    return control_plane.api()


@pytest.fixture
def backend(control_plane: cluster.ControlPlane, kubelet: Kubelet) -> Iterator[KubeBackend]:
    """The backend configured from an admin kubeconfig, with short timeouts."""
    kb = KubeBackend.from_config(
        kubeconfig=str(control_plane.admin_kubeconfig),
        request_timeout_s=10,
        watch_timeout_s=10,
        retries=3,
        retry_base_s=0.1,
    )
    yield kb
    assert not watch_threads(), "a wait left its watch thread running"


@pytest.fixture
def rid(backend: KubeBackend) -> Iterator[str]:
    """A run id whose objects are removed after the test, whatever it did."""
    run_id = f"run-{uuid.uuid4().hex[:12]}"
    yield run_id
    backend.delete_run(namespace=NS, run_id=run_id)
