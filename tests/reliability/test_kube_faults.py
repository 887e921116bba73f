"""The Kubernetes API misbehaving under a whole run: bursts of 500 and 429 while the Job is
created and while it is watched, a watch dropped mid-stream, a 410 Gone on resuming, and RBAC
refusing the Job. The flow talks HTTP to the fake API server (tests/fakekube), which runs each
pod's ``queuejob worker`` as a local process against the private broker."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from queuejob.flows import tasks
from queuejob.flows.adapters.kube import KubeBackend
from queuejob.flows.core.manifest import RUN_ID_LABEL
from queuejob.flows.work_queue import run_work_queue
from tests.fakekube import FakeKubeServer
from tests.reliability.conftest import RelEnv
from tests.reliability.support import (
    DOCS_ITEMS,
    Witness,
    local_kwargs,
    record,
    wait_for,
)

pytestmark = [
    pytest.mark.reliability,
    pytest.mark.broker,
    pytest.mark.prefect,
    pytest.mark.kube,
]

IMAGE = "registry.example.invalid/queuejob-worker:1.0"
ROOT = Path(__file__).resolve().parents[2]


def run_objects(fake: FakeKubeServer, kind: str) -> list[dict[str, Any]]:
    """Objects of a kind in 'default' that belong to a queuejob run."""
    return [
        o
        for o in fake.list_objects(kind, "default")
        if RUN_ID_LABEL in (o["metadata"].get("labels") or {})
    ]


def spy_backends(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Keep every backend the flow makes, to read its watch statistics afterwards."""
    made: list[Any] = []
    real = tasks.make_backend

    def spy(choice: tasks.BackendChoice) -> Any:
        backend = real(choice)
        made.append(backend)
        return backend

    monkeypatch.setattr(tasks, "make_backend", spy)
    return made


def test_api_faults_during_create_and_wait_are_absorbed(
    rel_env: RelEnv,
    queue: str,
    fake_kube: FakeKubeServer,
    fake_kubeconfig: Path,
    witness: Witness,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(fake_kubeconfig))
    made = spy_backends(monkeypatch)
    fx = rel_env.effects
    # During create: the Secret's POST meets two 500s and a 429 (Retry-After: 1).
    fake_kube.fail_next(2, status=500, methods={"POST"})
    fake_kube.fail_next(1, status=429, methods={"POST"})
    steps: list[str] = []
    errors: list[BaseException] = []

    def watch_requests() -> int:
        # Requests are logged as their answer starts: a 200 here is a list or a watch begun.
        return sum(
            1
            for method, path, status in list(fake_kube.requests)
            if method == "GET" and path.endswith("/namespaces/default/jobs") and status == 200
        )

    def drop_and_wait_for_the_resume(what: str) -> None:
        before = watch_requests()
        fake_kube.drop_watches()
        wait_for(
            lambda: watch_requests() > before and fake_kube.open_watches() >= 1,
            timeout=60,
            what=what,
        )

    def chaos_during_the_wait() -> None:
        try:
            wait_for(lambda: fake_kube.open_watches() >= 1, timeout=120, what="a watch")
            # The reconnect after a dropped stream meets two 500s and a 429.
            fake_kube.fail_next(2, status=500, methods={"GET"})
            fake_kube.fail_next(1, status=429, methods={"GET"})
            drop_and_wait_for_the_resume("the watch to resume after 500, 500, 429")
            steps.append("dropped, then 500, 500, 429")
            # The next resume finds its resourceVersion expired: 410 Gone, so it re-lists.
            fake_kube.gone_next_watch("jobs")
            drop_and_wait_for_the_resume("the watch to resume after 410 Gone")
            steps.append("dropped, then 410 Gone")
        except BaseException as exc:
            errors.append(exc)

    chaos = threading.Thread(target=chaos_during_the_wait, daemon=True)
    chaos.start()
    try:
        report = run_work_queue(
            **local_kwargs(queue, fx.work(sleep_s=1.5), image=IMAGE, idle_timeout=3.0)
        )
    finally:
        chaos.join(120)
    witness.add("report", report)
    witness.add_run(report["run_id"])
    witness.add("jobs", fake_kube.list_objects("jobs", "default"))
    witness.add("pods", fake_kube.list_objects("pods", "default"))
    witness.add("pod logs", [fake_kube.pod_log("default", p["metadata"]["name"])
                             for p in fake_kube.list_objects("pods", "default")])  # fmt: skip
    assert not errors, errors
    assert len(steps) == 2, steps

    served = sorted((m, st) for m, _p, st in list(fake_kube.requests) if st in (429, 500))
    assert served == [
        ("GET", 429), ("GET", 500), ("GET", 500), ("POST", 429), ("POST", 500), ("POST", 500)
    ], served  # fmt: skip
    waits = [b.last_wait_stats for b in made if isinstance(b, KubeBackend) and b._last_watch]
    assert waits, "the flow waited with a watch"
    stats = waits[-1]
    assert stats.reconnects >= 2 and stats.relists >= 1, stats
    created = [r for r in fake_kube.requests if r[0] == "POST" and r[1].endswith("/jobs")]
    assert [st for *_, st in created] == [201], "one Job, created once"

    lost, twice = fx.lost_and_twice(DOCS_ITEMS)
    assert (lost, twice) == ([], [])
    s = report["summary"]
    assert (s["succeeded"], s["failed"], s["left"], s["processed_more_than_once"]) == (8, 0, 0, 0)
    assert report["job_phase"] == "Succeeded"
    record(
        "Kubernetes API: 500/429 bursts on create and watch, dropped watch, 410 Gone",
        faults="6 error answers, 2 dropped watches, 1 Gone",
        items=8,
        lost=len(lost),
        twice_expected="0",
        twice_observed=len(twice),
    )


def _role_permissions() -> set[tuple[str, str]]:
    """(verb, resource) pairs of the Role in deployments/k8s/rbac.yaml."""
    docs = [d for d in yaml.safe_load_all((ROOT / "deployments/k8s/rbac.yaml").read_text()) if d]
    role = next(d for d in docs if d.get("kind") == "Role")
    return {(v, r) for rule in role["rules"] for r in rule["resources"] for v in rule["verbs"]}


def test_rbac_refusing_the_job_names_the_verb_and_resource(
    rel_env: RelEnv,
    queue: str,
    fake_kube: FakeKubeServer,
    tmp_path: Path,
    witness: Witness,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    token = f"token-{uuid.uuid4().hex}"
    allowed = _role_permissions() - {("create", "jobs")}
    fake_kube.add_service_account(token, "system:serviceaccount:default:queuejob-flow", allowed)
    monkeypatch.setenv(
        "KUBECONFIG", str(fake_kube.write_kubeconfig(tmp_path / "limited.yaml", token=token))
    )
    state = run_work_queue(
        **local_kwargs(queue, rel_env.effects.work(), image=IMAGE), return_state=True
    )
    witness.add_run(state.state_details.flow_run_id)
    assert state.is_failed()
    with pytest.raises(Exception) as info:
        state.result()
    witness.add("exception", info.value)
    assert type(info.value).__name__ == "KubeForbidden"
    text = str(info.value)
    assert "cannot create jobs in namespace 'default'" in text
    assert "system:serviceaccount:default:queuejob-flow" in text
    assert "deployments/k8s/rbac.yaml" in text
    creates = [r for r in fake_kube.requests if r[0] == "POST" and r[1].endswith("/jobs")]
    assert [st for *_, st in creates] == [403], "a 403 is not retried"
    assert not run_objects(fake_kube, "jobs") and not run_objects(fake_kube, "secrets"), (
        "the Secret made before the refused Job was removed"
    )
    assert rel_env.effects.done() == {}, "no pod ran"
    record(
        "Kubernetes API: RBAC refuses the Job (403)",
        faults="1 forbidden create",
        items=8,
        lost=0,
        twice_expected="0 (run fails with an RBAC hint)",
        twice_observed=0,
    )
