"""deployments/prefect.yaml against the code and manifests it names, without a server.

tests/e2e deploys it to a real Prefect server and runs `on-demand`; these checks catch drift
early: parameters the flow no longer accepts (in any of the four deployments, including the
kubernetes pair that e2e cannot run), an entrypoint that moved, a service account that is not the
one deployments/k8s/rbac.yaml creates, or a build step that would make `deploy` need Docker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"
RBAC_YAML = ROOT / "deployments" / "k8s" / "rbac.yaml"


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(PREFECT_YAML.read_text())
    return loaded


@pytest.fixture(scope="module")
def by_name(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in config["deployments"]}


RERUN = "rerun-failures"


def test_two_pairs_on_their_pools_and_queues(by_name: dict[str, dict[str, Any]]) -> None:
    pools = {
        name: (dep["work_pool"]["name"], dep["work_pool"]["work_queue_name"])
        for name, dep in by_name.items()
    }
    assert pools == {
        "on-demand": ("queuejob-local", "on-demand"),
        "nightly": ("queuejob-local", "nightly"),
        "on-demand-k8s": ("queuejob-k8s", "on-demand"),
        "nightly-k8s": ("queuejob-k8s", "nightly"),
        RERUN: ("queuejob-local", "on-demand"),
    }
    for name, dep in by_name.items():
        assert dep["enforce_parameter_schema"] is True, name
        crons = [s["cron"] for s in dep["schedules"]]
        assert crons == (["0 2 * * *"] if name.startswith("nightly") else []), name


def test_entrypoint_is_the_flow(by_name: dict[str, dict[str, Any]]) -> None:
    from prefect.flows import load_flow_from_entrypoint

    for name, dep in by_name.items():
        flow = load_flow_from_entrypoint(dep["entrypoint"], use_placeholder_flow=False)
        assert flow.name == ("queuejob-rerun" if name == RERUN else "queuejob"), name


def test_every_deployments_parameters_are_accepted_by_the_flow(
    by_name: dict[str, dict[str, Any]],
) -> None:
    from queuejob.flows.work_queue import run_work_queue

    for name, dep in by_name.items():
        if name == RERUN:
            continue
        params = run_work_queue.validate_parameters(dep["parameters"])
        assert params["backend"] == ("kubernetes" if name.endswith("-k8s") else "local"), name
        assert params["broker_block"] == "queuejob-broker"
        # Shown on every deployment; the nightly ones keep the default: any item that did not
        # succeed fails the night's run.
        assert dep["parameters"]["max_failed_items"] == 0, name
        if name.endswith("-k8s"):
            assert params["job"].template_block == "queuejob-worker"


def test_deploy_needs_no_docker(config: dict[str, Any]) -> None:
    assert not config.get("build")
    assert not config.get("push")
    for dep in config["deployments"]:
        assert not dep.get("build") and not dep.get("push"), dep["name"]
        if dep["work_pool"]["name"] == "queuejob-k8s":
            # The code is in the image: no pull step pointing at the deploying machine.
            assert dep["pull"] == [], dep["name"]


def test_kubernetes_pair_runs_as_the_rbac_service_account(
    by_name: dict[str, dict[str, Any]],
) -> None:
    docs = list(yaml.safe_load_all(RBAC_YAML.read_text()))
    account = next(d for d in docs if d["kind"] == "ServiceAccount")
    for name in ("on-demand-k8s", "nightly-k8s"):
        variables = by_name[name]["work_pool"]["job_variables"]
        assert variables["service_account_name"] == account["metadata"]["name"]
        assert variables["namespace"] == account["metadata"]["namespace"]
        assert variables["image"]


def test_rerun_deployments_form_asks_for_the_run_id(by_name: dict[str, dict[str, Any]]) -> None:
    from prefect.utilities.callables import parameter_schema

    from queuejob.flows.rerun import rerun_failures

    dep = by_name[RERUN]
    assert "run_id" not in dep["parameters"]  # no default: the form asks for it
    schema = parameter_schema(rerun_failures).model_dump()
    assert "run_id" in schema["required"]
    assert "earlier queuejob flow run" in schema["properties"]["run_id"]["description"]
    params = rerun_failures.validate_parameters({**dep["parameters"], "run_id": "r1"})
    assert params["fates"] == ["failed", "dead_lettered", "left"]
    with pytest.raises(Exception, match="run_id"):
        rerun_failures.validate_parameters(dep["parameters"])
