"""Fixtures for the local backend: a private state directory, Job builders and process checks.

Every test's runs are deleted at teardown, and the process table is checked: no process may be
left carrying one of the test's run markers.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from queuejob.flows.adapters.local import RUN_ENV, LocalBackend
from queuejob.flows.core.backend import JobHandle
from queuejob.flows.core.manifest import RUN_ID_LABEL, SECRET_KEY, build_secret, run_labels

# A made-up broker URL whose password must never show up anywhere the backend writes.
SECRET_PASSWORD = "pw-Zq8tLm3x"
SECRET_URL = f"amqp://queuejob:{SECRET_PASSWORD}@broker.invalid:5672/%2F"

T = TypeVar("T")


def run_marker(namespace: str, run_id: str) -> str:
    """The run marker the backend puts in the environment of every process of a run."""
    return f"{namespace}/{run_labels(run_id)[RUN_ID_LABEL]}"


def marked_processes(markers: set[str]) -> list[psutil.Process]:
    """Live processes whose environment carries one of the run markers."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(RUN_ENV) in markers:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def until(predicate: Callable[[], T], *, timeout: float = 20.0, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


@dataclass
class Harness:
    """A LocalBackend on a private state directory, plus helpers to build and inspect Jobs."""

    backend: LocalBackend
    state_dir: Path
    runs: list[tuple[str, str]] = field(default_factory=list)

    def shell_job(
        self,
        script: str,
        *,
        run_id: str | None = None,
        name: str | None = None,
        namespace: str = "default",
        completions: int | None = 1,
        parallelism: int = 1,
        backoff_limit: int = 6,
        deadline_s: int | None = None,
        env: dict[str, str] | None = None,
        extra_spec: dict[str, Any] | None = None,
    ) -> tuple[str, dict[str, Any], dict[str, Any]]:
        """(run id, Secret, Job) for pods running ``sh -c script``, shaped like the manifest
        builder's Jobs (the broker URL through a secretKeyRef, POD_NAME through a fieldRef)."""
        run_id = run_id or str(uuid.uuid4())
        name = name or f"t-{uuid.uuid4().hex[:10]}"
        secret = build_secret(
            namespace=namespace, name=f"{name}-broker", run_id=run_id, broker_url=SECRET_URL
        )
        container_env: list[dict[str, Any]] = [
            {
                "name": SECRET_KEY,
                "valueFrom": {"secretKeyRef": {"name": f"{name}-broker", "key": SECRET_KEY}},
            },
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ]
        container_env += [{"name": k, "value": v} for k, v in (env or {}).items()]
        spec: dict[str, Any] = {
            "parallelism": parallelism,
            "backoffLimit": backoff_limit,
            "template": {
                "metadata": {"labels": run_labels(run_id)},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "worker",
                            "image": "local/queuejob:dev",
                            "command": ["sh", "-c", script],
                            "env": container_env,
                        }
                    ],
                },
            },
        }
        if completions is not None:
            spec["completions"] = completions
        if deadline_s is not None:
            spec["activeDeadlineSeconds"] = deadline_s
        spec.update(extra_spec or {})
        job = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": name, "namespace": namespace, "labels": run_labels(run_id)},
            "spec": spec,
        }
        self.runs.append((namespace, run_id))
        return run_id, secret, job

    def create(self, script: str, **kwargs: Any) -> JobHandle:
        """Build a shell Job and create it."""
        run_id, secret, job = self.shell_job(script, **kwargs)
        return self.backend.create_or_adopt(secret=secret, job=job, run_id=run_id)

    def job(self, handle: JobHandle) -> dict[str, Any]:
        """The Job's current state (fails when it does not exist)."""
        job = self.backend.read_job(namespace=handle.namespace, name=handle.name)
        assert job is not None, f"Job {handle.name} has no state"
        return job

    def terminal(self, handle: JobHandle, timeout: float = 20.0) -> dict[str, Any]:
        """Wait until the Job has its terminal condition (every pod ended) and return it."""

        def done() -> dict[str, Any] | None:
            job = self.job(handle)
            types = {c["type"] for c in job["status"].get("conditions") or []}
            return job if types & {"Complete", "Failed"} else None

        return until(done, timeout=timeout, what=f"a terminal condition on {handle.name}")

    def processes(self, handle: JobHandle) -> list[psutil.Process]:
        """Live processes of the handle's run."""
        return marked_processes({run_marker(handle.namespace, handle.run_id)})


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    """A LocalBackend with a short back-off and grace period; cleans up and checks the process
    table at teardown."""
    backend = LocalBackend(
        state_dir=tmp_path / "state", backoff_base_s=0.1, backoff_max_s=1.0, grace_s=1.0
    )
    h = Harness(backend=backend, state_dir=tmp_path / "state")
    try:
        yield h
    finally:
        for namespace, run_id in h.runs:
            h.backend.delete_run(namespace=namespace, run_id=run_id)
        left = marked_processes({run_marker(ns, r) for ns, r in h.runs})
        assert not left, f"processes left behind: {[(p.pid, p.cmdline()) for p in left]}"
