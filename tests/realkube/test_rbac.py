"""The Role in deployments/k8s/rbac.yaml, enforced by a real apiserver's RBAC authorizer.

A service account bound to exactly that Role runs the backend through a whole run (create,
adopt, wait, failure details with logs, cleanup). Then, for a few of its rules, a copy of the
Role without that one verb shows the 403 the backend reports names the verb, the resource and
the manifest to fix.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
import yaml

from queuejob.flows.adapters.kube import KubeBackend
from queuejob.flows.core.errors import KubeForbidden
from queuejob.flows.core.job_status import JobPhase
from tests.realkube.cluster import ControlPlane
from tests.realkube.helpers import NS, apply_role, can, make_run
from tests.realkube.kubelet import Kubelet

HINT = "deployments/k8s/rbac.yaml"


def full_run(kb: KubeBackend, ok_run: str, failing_run: str) -> str:
    """Everything the flow asks of Kubernetes; returns the failed pod's log tail."""
    kb.check_namespace(NS)  # forbidden for a namespaced Role: skipped, not an error
    secret, job = make_run(ok_run, "sleep 0.2")
    handle = kb.create_or_adopt(secret=secret, job=job, run_id=ok_run)
    again = kb.create_or_adopt(secret=secret, job=job, run_id=ok_run)
    assert again.adopted and again.uid == handle.uid
    found = kb.find_job(namespace=NS, name=handle.name, run_id=ok_run)
    assert found is not None
    assert kb.wait(handle, timeout_s=60, tick_s=0.5).phase is JobPhase.SUCCEEDED

    secret, job = make_run(failing_run, "echo boom-$((6*7)); exit 4", backoff_limit=0)
    failing = kb.create_or_adopt(secret=secret, job=job, run_id=failing_run)
    assert kb.wait(failing, timeout_s=60, tick_s=0.5).phase is JobPhase.FAILED
    details = kb.failure_details(failing, tail_lines=5)
    assert [d.exit_code for d in details] == [4]

    assert kb.delete_run(namespace=NS, run_id=ok_run) == 1
    assert kb.delete_run(namespace=NS, run_id=failing_run) == 1
    return details[0].log_tail


def _backend(kubeconfig: Path) -> KubeBackend:
    return KubeBackend.from_config(
        kubeconfig=str(kubeconfig), request_timeout_s=10, watch_timeout_s=10, retries=0
    )


def _runs() -> tuple[str, str]:
    return f"run-{uuid.uuid4().hex[:12]}", f"run-{uuid.uuid4().hex[:12]}"


def _cleanup(plane: ControlPlane, *runs: str) -> None:
    admin = KubeBackend.from_config(kubeconfig=str(plane.admin_kubeconfig), retries=1)
    for run in runs:
        admin.delete_run(namespace=NS, run_id=run)


def test_the_role_is_enough_for_a_whole_run(
    control_plane: ControlPlane, kubelet: Kubelet, tmp_path: Path
) -> None:
    kubeconfig = apply_role(control_plane, tmp_path, name="queuejob-flow")
    ok_run, failing_run = _runs()
    try:
        tail = full_run(_backend(kubeconfig), ok_run, failing_run)
    finally:
        _cleanup(control_plane, ok_run, failing_run)
    assert tail == "boom-42\n"


@pytest.mark.parametrize(
    ("resource", "verb"),
    [("jobs", "watch"), ("pods/log", "get"), ("secrets", "patch"), ("secrets", "get")],
)
def test_a_missing_verb_gives_the_403_hint(
    control_plane: ControlPlane, kubelet: Kubelet, tmp_path: Path, resource: str, verb: str
) -> None:
    name = f"queuejob-flow-no-{verb}-{resource.replace('/', '-')}"
    kubeconfig = apply_role(control_plane, tmp_path, name=name, drop=(resource, verb))
    assert not can(control_plane.api(_token_of(kubeconfig)), verb, resource), (
        "the copy of the Role still grants the dropped verb"
    )
    ok_run, failing_run = _runs()
    started = time.monotonic()
    try:
        try:
            text = full_run(_backend(kubeconfig), ok_run, failing_run)
        except KubeForbidden as exc:
            text = str(exc)
    finally:
        _cleanup(control_plane, ok_run, failing_run)
    assert f"cannot {verb} {resource} in namespace '{NS}'" in text, text
    assert HINT in text, text
    assert time.monotonic() - started < 60


def _token_of(kubeconfig: Path) -> str:
    config = yaml.safe_load(kubeconfig.read_text())
    return str(config["users"][0]["user"]["token"])
