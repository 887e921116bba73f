"""The README's "Going to a real cluster", end to end on a real control plane (Kubernetes 1.20).

A real ``prefect server``; the ``queuejob-k8s`` kubernetes work pool; the three blocks (a
RabbitMQ Broker, a Work Queue Job Template, a LocalFileSystem for the ledgers);
``prefect deploy --name on-demand-k8s`` from ``deployments/prefect.yaml``, with the image (and,
here, the environment below) set in its job variables as step 5 says; a prefect-kubernetes
worker; and runs started the way the UI's Run button starts them
(``POST /api/deployments/{id}/create_flow_run``).

The worker creates the flow-run Job from the pool's base job template: its container sets
only ``args`` (``prefect flow-run execute``), which the kubelet stand-in runs as the command, as
an image without an ENTRYPOINT (this project's) does. The flow-run pod then creates the worker
Job as the ``queuejob-flow`` service account of deployments/k8s/rbac.yaml: the stand-in mounts
no service-account token, so the account's token reaches the pod as a kubeconfig named by
``KUBECONFIG`` in the deployment's job variables (in a cluster it is the mounted token). The
"image" is this checkout's install: the stand-in runs pods as processes with this venv first on
their PATH.

Checked: a run ends Completed with its three artifacts, its ledger in the storage block and
the worker Job, pods and Secret deleted; a run cancelled through the API leaves no Job, pod or
Secret of its own, nor its flow-run Job.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import PREFECT, ROOT, Cmd, PrefectStack, Service, wait_for
from tests.realkube.cluster import ControlPlane
from tests.realkube.helpers import NS, apply_role
from tests.realkube.kubelet import Api, Kubelet
from tests.shell_jobs import IMAGE

pytestmark = [pytest.mark.broker, pytest.mark.prefect, pytest.mark.e2e, pytest.mark.slow]

POOL = "queuejob-k8s"
DEPLOYMENT = "on-demand-k8s"
ITEMS = ["apple", "banana", "cherry", "date", "fig"]
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
RUN_TIMEOUT_S = 240.0
RUN_LABEL = "queuejob.io/run-id"
FLOW_RUN_LABEL = "prefect.io/flow-run-id"

# The three blocks of README step 4, saved through the server's API. The broker URL arrives
# through the environment, never a command line.
_SAVE_BLOCKS = """
import json, os
from prefect.filesystems import LocalFileSystem
from queuejob.blocks import RabbitMQBroker, WorkQueueJobTemplate
RabbitMQBroker.from_url(os.environ["QJ_BROKER_URL"]).save("queuejob-broker", overwrite=True)
WorkQueueJobTemplate(
    image=os.environ["QJ_IMAGE"],
    command=["sh", "-c", 'item=$(cat); echo "processed $item"'],
    namespace="default",
    parallelism=2,
    idle_timeout_seconds=3,
).save("queuejob-worker", overwrite=True)
LocalFileSystem(basepath=os.environ["QJ_LEDGERS"]).save("queuejob-ledgers", overwrite=True)
"""


def _prefect_file(tmp_path: Path, env: dict[str, str]) -> Path:
    """deployments/prefect.yaml as step 5 has the user edit it: the image set in the
    kubernetes job variables (here with the environment the stand-in needs)."""
    doc = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    variables = doc["definitions"]["k8s_job_variables"]
    # The anchor's copies in the deployments are the same object once loaded: edit it once.
    [dep] = [d for d in doc["deployments"] if d["name"] == DEPLOYMENT]
    assert dep["work_pool"]["job_variables"] is variables
    variables["image"] = IMAGE
    variables["env"] = env
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _objects(api: Api, kind: str, selector: str) -> list[str]:
    base = "/apis/batch/v1" if kind == "jobs" else "/api/v1"
    listing = api.get(f"{base}/namespaces/{NS}/{kind}?labelSelector={selector}") or {}
    return [o["metadata"]["name"] for o in listing.get("items") or []]


def _pod_logs(api: Api, kubelet: Kubelet, selector: str) -> str:
    out = []
    for pod in _objects(api, "pods", selector):
        for container in ("prefect-job", "worker"):
            log = kubelet.container_log(NS, pod, container)
            if isinstance(log, bytes):
                out.append(f"--- {pod}/{container} ---\n{log.decode(errors='replace')[-4000:]}")
    return "\n".join(out)


def flow_job_status(api: Api, job: dict[str, Any]) -> list[dict[str, Any]]:
    """The conditions of a Job, read again."""
    now = api.get(f"/apis/batch/v1/namespaces/{NS}/jobs/{job['metadata']['name']}") or {}
    return list((now.get("status") or {}).get("conditions") or [])


class _Runs:
    """Starting a deployment's runs as the UI does, and waiting on them."""

    def __init__(self, stack: PrefectStack, deployment_id: str, detail: Callable[[], str]):
        self.stack = stack
        self.deployment_id = deployment_id
        self.detail = detail

    def start(self, parameters: dict[str, Any]) -> str:
        run = self.stack.post(
            f"/deployments/{self.deployment_id}/create_flow_run",
            {
                "parameters": parameters,
                "state": {"type": "SCHEDULED", "message": "Run from the Prefect UI"},
                "job_variables": {},
            },
        )
        return str(run["id"])

    def wait(self, run_id: str, states: set[str]) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            current = self.stack.get(f"/flow_runs/{run_id}")
            return current if current["state"]["type"] in states else None

        final: dict[str, Any] = wait_for(
            reached,
            timeout=RUN_TIMEOUT_S,
            what=f"flow run {run_id} to reach {sorted(states)}",
            detail=self.detail,
            interval=1.0,
        )
        return final


def test_the_readme_path_on_a_kubernetes_work_pool(
    control_plane: ControlPlane,
    kubelet: Kubelet,
    prefect_server: PrefectStack,
    broker_url: str,
    queue_name: str,
    tmp_path: Path,
) -> None:
    stack = prefect_server
    admin = control_plane.api()
    ledgers = tmp_path / "ledgers"
    # deployments/k8s/rbac.yaml's account, and a kubeconfig holding its token.
    flow_kubeconfig = apply_role(control_plane, tmp_path, name="queuejob-flow")

    # Step 5's file: on-demand-k8s with the image set. The flow-run pod's environment: the
    # account's kubeconfig (no mounted token here) and a temporary directory the stack sweeps.
    prefect_file = _prefect_file(
        tmp_path, {"KUBECONFIG": str(flow_kubeconfig), "TMPDIR": stack.env["TMPDIR"]}
    )
    # Steps 3 to 5: the pool, the block types, the blocks, the deployment. Registrations of
    # block types run one at a time (concurrent writes to the server's SQLite may fail).
    stack.cli(
        Cmd([PREFECT, "work-pool", "create", POOL, "--type", "kubernetes"]),
        Cmd([PREFECT, "block", "register", "-m", "queuejob.blocks"]),
    )
    stack.cli(
        Cmd([PREFECT, "block", "register", "-m", "prefect_kubernetes"]),
        Cmd([PREFECT, "--no-prompt", "deploy", "--prefect-file", str(prefect_file),
             "--name", DEPLOYMENT]),
    )  # fmt: skip
    stack.cli(
        Cmd(
            [sys.executable, "-c", _SAVE_BLOCKS],
            env={"QJ_BROKER_URL": broker_url, "QJ_IMAGE": IMAGE, "QJ_LEDGERS": str(ledgers)},
        )
    )
    deployment = stack.get(f"/deployments/name/queuejob/{DEPLOYMENT}")
    assert deployment["job_variables"]["service_account_name"] == "queuejob-flow"

    # Step 3's worker: prefect-kubernetes, creating flow-run Jobs with an admin's kubeconfig
    # (in a cluster: the Helm chart's service account).
    worker: Service = stack.start(
        "k8s-worker",
        [PREFECT, "worker", "start", "--pool", POOL, "--type", "kubernetes",
         "--work-queue", "on-demand"],
        env={
            **stack.env,
            "KUBECONFIG": str(control_plane.admin_kubeconfig),
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_ENABLED": "false",
        },
    )  # fmt: skip
    try:

        def detail() -> str:
            pods = _pod_logs(admin, kubelet, FLOW_RUN_LABEL)
            return f"{stack.diagnostics()}\n{pods}"

        runs = _Runs(stack, deployment["id"], detail)

        # Step 6: a run from the Run button, with the deployment's job (the template block).
        run_id = runs.start({
            "items": {"kind": "list", "values": ITEMS},
            "queue": {"name": queue_name},
            "timeout_seconds": 120,
        })  # fmt: skip
        final = runs.wait(run_id, TERMINAL)
        assert final["state"]["type"] == "COMPLETED", (
            f"{final['state']['type']}: {final['state']['message']}\n{detail()}"
        )
        # The flow-run Job: Prefect's pod template sets `args` only (the stand-in ran them as
        # the command, as this project's image does) and runs as queuejob-flow.
        [flow_job] = (
            admin.get(
                f"/apis/batch/v1/namespaces/{NS}/jobs?labelSelector={FLOW_RUN_LABEL}%3D{run_id}"
            )
            or {}
        )["items"]
        pod_spec = flow_job["spec"]["template"]["spec"]
        assert pod_spec["serviceAccountName"] == "queuejob-flow"
        [container] = pod_spec["containers"]
        assert "command" not in container and container["args"][:2] == ["prefect", "flow-run"]
        # Step 7: the artifacts, and the ledger in the storage block.
        artifacts = stack.post(
            "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}}
        )
        keys = {a["type"]: a["key"] for a in artifacts}
        assert keys == {
            "progress": f"queuejob-progress-{run_id[:8]}",
            "table": f"queuejob-ledger-{run_id[:8]}",
            "markdown": f"queuejob-report-{run_id[:8]}",
        }, artifacts
        rows = [json.loads(x) for x in (ledgers / run_id / "ledger.jsonl").read_text().splitlines()]
        assert [(r["body"], r["status"]) for r in rows] == [(i, "succeeded") for i in ITEMS]
        # Each item was processed by a pod of the worker Job, which the flow-run pod created.
        assert all(r["pod"].startswith("queuejob-") for r in rows), rows
        report = json.loads((ledgers / run_id / "report.json").read_text())
        assert report["params"]["ledger_storage"] == "queuejob-ledgers"
        assert report["job_phase"] == "Succeeded" and report["completions"] == len(ITEMS)
        # Cleanup after success: the worker Job, its pods and its Secret are gone.
        selector = f"{RUN_LABEL}%3D{run_id}"
        wait_for(
            lambda: not any(_objects(admin, k, selector) for k in ("jobs", "pods", "secrets")),
            timeout=30,
            what="the run's Job, pods and Secret to be deleted",
        )

        # A run cancelled through the API while its pods work.
        cancelled = runs.start({
            "items": {"kind": "list", "values": ITEMS},
            "queue": {"name": f"{queue_name}-cancel"},
            "job": {"template_block": "queuejob-worker", "command": ["sleep", "600"]},
            "timeout_seconds": 200,
        })  # fmt: skip
        selector = f"{RUN_LABEL}%3D{cancelled}"

        def working() -> bool:
            pods = admin.get(f"/api/v1/namespaces/{NS}/pods?labelSelector={selector}") or {}
            return any(
                (p.get("status") or {}).get("phase") == "Running" for p in pods.get("items") or []
            )

        wait_for(working, timeout=RUN_TIMEOUT_S, what="the cancelled run's pods", detail=detail)
        stack.post(
            f"/flow_runs/{cancelled}/set_state",
            {"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": True},
        )
        final = runs.wait(cancelled, TERMINAL)
        assert final["state"]["type"] == "CANCELLED", final["state"]
        flow_run_selector = f"{FLOW_RUN_LABEL}%3D{cancelled}"

        def left() -> dict[str, list[str]]:
            found = {k: _objects(admin, k, selector) for k in ("jobs", "pods", "secrets")}
            return {k: v for k, v in found.items() if v}

        wait_for(
            lambda: not left(),
            timeout=60,
            what="the cancelled run's Job, pods and Secret to be deleted",
            detail=lambda: f"left: {left()}\n{detail()}",
        )
        # The flow-run pod stopped too; its Job stays, finished, for `kubectl logs` until the
        # deployment's finished_job_ttl collects it (1.23+: 1.20 drops the alpha field).
        [flow_job] = (
            admin.get(f"/apis/batch/v1/namespaces/{NS}/jobs?labelSelector={flow_run_selector}")
            or {}
        )["items"]
        assert deployment["job_variables"]["finished_job_ttl"] == 3600
        wait_for(
            lambda: {c["type"] for c in flow_job_status(admin, flow_job)} & {"Complete", "Failed"},
            timeout=60,
            what="the flow-run Job to finish",
            detail=detail,
        )
        wait_for(
            lambda: not kubelet.pod_processes(),
            timeout=30,
            what="every pod process to end",
            detail=lambda: str(kubelet.pod_processes()),
        )
    finally:
        worker.stop()
        stack.services.pop("k8s-worker", None)
