"""The run's Secret and Job as the flow builds them, with a shell script as the pod command.

Shared by the Kubernetes backend's tests on the fake API server and on the real control plane.
"""

from __future__ import annotations

from typing import Any

from queuejob.flows.core.manifest import JobSpec, build_job, build_secret, secret_name
from queuejob.flows.core.pod_failure import ServerFeatures

IMAGE = "registry.example.invalid/queuejob-worker:1.0"


def shell_run(
    run_id: str,
    script: str,
    *,
    broker_url: str,
    completions: int | None = 1,
    parallelism: int = 1,
    backoff_limit: int = 0,
    namespace: str = "default",
    active_deadline_seconds: int | None = None,
    features: ServerFeatures = ServerFeatures(),  # noqa: B008 - frozen
    image: str = IMAGE,
    **spec_fields: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(Secret, Job) for a run whose pods run ``sh -c script`` instead of the queuejob worker;
    ``spec_fields`` are further `JobSpec` fields (``node_selector``, ``service_account``, ...).
    The image is set after the spec is checked, so a test can give one the kubelet refuses."""
    spec = JobSpec(
        image=IMAGE,
        command=("true",),
        namespace=namespace,
        parallelism=parallelism,
        backoff_limit=backoff_limit,
        active_deadline_seconds=active_deadline_seconds,
        **spec_fields,
    )
    job = build_job(
        spec,
        run_id=run_id,
        queue="q",
        completions=completions,
        confirmed_items=completions,
        features=features,
    )
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["command"] = ["sh", "-c", script]
    container["image"] = image
    name = job["metadata"]["name"]
    secret = build_secret(
        namespace=namespace, name=secret_name(name), run_id=run_id, broker_url=broker_url
    )
    return secret, job
