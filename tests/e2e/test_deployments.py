"""queuejob's deployments on a real Prefect server, run by a real process worker.

The stack (tests/e2e/conftest.py) deploys every deployment of ``deployments/prefect.yaml`` with
``prefect --no-prompt deploy --all``. These tests check what the server holds, then start
``on-demand`` the way the UI's Run button does - ``POST /api/deployments/{id}/create_flow_run`` - on
the local backend with the broker from a RabbitMQBroker block, and read the outcome back through
the API: the flow run's state and its artifacts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import (
    BROKER_BLOCK,
    FLOW_NAME,
    K8S_POOL,
    LOCAL_POOL,
    PREFECT,
    PREFECT_FILE,
    Cmd,
    PrefectStack,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.prefect, pytest.mark.broker, pytest.mark.slow]

ENTRYPOINT = "queuejob.flows.work_queue.run_work_queue"
# name -> (work pool, work queue, cron or None)
EXPECTED = {
    "on-demand": (LOCAL_POOL, "on-demand", None),
    "nightly": (LOCAL_POOL, "nightly", "0 2 * * *"),
    "on-demand-k8s": (K8S_POOL, "on-demand", None),
    "nightly-k8s": (K8S_POOL, "nightly", "0 2 * * *"),
}
ITEMS = ["apple", "banana", "cherry", "date", "fig"]
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
RUN_TIMEOUT_S = 150.0


def deployments(stack: PrefectStack) -> dict[str, dict[str, Any]]:
    rows = stack.post("/deployments/filter", {"flows": {"name": {"any_": [FLOW_NAME]}}})
    return {row["name"]: row for row in rows}


def test_deploy_all_creates_both_pairs_on_their_pools(deployed: PrefectStack) -> None:
    # ... and rerun-failures, a deployment of the flow queuejob-rerun.
    assert deployed.deploy_output.count("successfully created") == len(EXPECTED) + 1
    rerun = deployed.post("/deployments/filter", {"flows": {"name": {"any_": ["queuejob-rerun"]}}})
    assert [(d["name"], d["entrypoint"]) for d in rerun] == [
        ("rerun-failures", "queuejob.flows.rerun.rerun_failures")
    ]
    assert "run_id" in rerun[0]["parameter_openapi_schema"]["required"]
    found = deployments(deployed)
    assert set(found) == set(EXPECTED)
    for name, (pool, queue, _) in EXPECTED.items():
        dep = found[name]
        assert (dep["work_pool_name"], dep["work_queue_name"]) == (pool, queue), name
        assert dep["entrypoint"] == ENTRYPOINT
        assert dep["enforce_parameter_schema"] is True, name
        assert dep["parameters"]["broker_block"] == BROKER_BLOCK
        # The UI's run form is built from this schema: every flow parameter is on it.
        props = dep["parameter_openapi_schema"]["properties"]
        assert {"items", "queue", "job", "backend", "caveat_policy", "cleanup"} <= set(props)
        # The tolerance, with its meaning on the form; the deployment's value is the default.
        assert "before the run fails" in props["max_failed_items"]["description"]
        assert dep["parameters"]["max_failed_items"] == 0
    for name in ("on-demand", "nightly"):
        assert found[name]["parameters"]["backend"] == "local"
    for name in ("on-demand-k8s", "nightly-k8s"):
        dep = found[name]
        assert dep["parameters"]["backend"] == "kubernetes"
        assert dep["parameters"]["job"]["template_block"] == "queuejob-worker"
        variables = dep["job_variables"]
        assert variables["service_account_name"] == "queuejob-flow"
        assert variables["namespace"] == "default"
        assert variables["image"]
        # The code is in the image: no pull step pointing at the deploying machine.
        assert dep["pull_steps"] == []


def test_nightly_carries_its_cron_schedule_and_on_demand_none(deployed: PrefectStack) -> None:
    found = deployments(deployed)
    for name, (_, _, cron) in EXPECTED.items():
        schedules = found[name]["schedules"]
        if cron is None:
            assert schedules == [], name
            continue
        assert len(schedules) == 1, name
        (sched,) = schedules
        assert sched["active"] is True
        assert sched["schedule"]["cron"] == cron
        assert sched["schedule"]["timezone"] == "UTC"
        assert found[name]["paused"] is False


def test_deploying_one_pair_again_by_name_updates_it_in_place(deployed: PrefectStack) -> None:
    before = deployments(deployed)
    (output,) = deployed.cli(
        Cmd([PREFECT, "--no-prompt", "deploy", "--prefect-file", PREFECT_FILE,
             "--name", "on-demand-k8s", "--name", "nightly-k8s"])
    )  # fmt: skip
    assert output.count("successfully created") == 2, output
    after = deployments(deployed)
    assert {n: d["id"] for n, d in after.items()} == {n: d["id"] for n, d in before.items()}
    # The schedule is replaced, not added to.
    assert [s["schedule"]["cron"] for s in after["nightly-k8s"]["schedules"]] == ["0 2 * * *"]


def test_server_rejects_parameters_the_form_would_not_accept(deployed: PrefectStack) -> None:
    dep = deployed.get(f"/deployments/name/{FLOW_NAME}/on-demand")
    for params, field in (
        ({"caveat_policy": "sometimes"}, "caveat_policy"),
        ({"job": {"parallelism": 0}}, "job.parallelism"),
        ({"queue": {"name": "bad name!"}}, "queue.name"),
    ):
        response = deployed.request(
            "POST", f"/deployments/{dep['id']}/create_flow_run", {"parameters": params}
        )
        assert response.status_code in (409, 422), response.text
        assert field in response.text


def test_on_demand_run_from_the_ui_completes_with_ledger_and_artifacts(
    deployed: PrefectStack, queue_name: str
) -> None:
    dep = deployed.get(f"/deployments/name/{FLOW_NAME}/on-demand")
    # What the UI's Run > Custom run form posts: the whole form's parameters and a Scheduled
    # state for now. The broker, backend and policy keep the deployment's values.
    parameters = {
        "items": {"kind": "list", "values": ITEMS},
        "queue": {"name": queue_name},
        "job": {
            "command": ["sh", "-c", 'item=$(cat); echo "processed $item"'],
            "parallelism": 2,
            "completions": "auto",
            "idle_timeout_seconds": 2,
        },
        "cleanup": {"delete_job": True, "delete_queues": True},
        "timeout_seconds": 120,
    }
    run = deployed.post(
        f"/deployments/{dep['id']}/create_flow_run",
        {
            "parameters": parameters,
            "state": {"type": "SCHEDULED", "message": "Run from the Prefect UI"},
            "job_variables": {},
        },
    )
    run_id = run["id"]
    assert run["parameters"]["backend"] == "local"
    assert run["parameters"]["broker_block"] == BROKER_BLOCK

    def finished() -> dict[str, Any] | None:
        current = deployed.get(f"/flow_runs/{run_id}")
        return current if current["state"]["type"] in TERMINAL else None

    final = wait_for(
        finished,
        timeout=RUN_TIMEOUT_S,
        what=f"flow run {run_id} to finish",
        detail=deployed.diagnostics,
        interval=1.0,
    )
    assert final["state"]["type"] == "COMPLETED", (
        f"{final['state']['type']}: {final['state']['message']}\n{deployed.diagnostics()}"
    )
    assert final["state"]["message"].startswith(f"Completed: {len(ITEMS)} of {len(ITEMS)} items")

    artifacts = deployed.post(
        "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}}
    )
    by_type = {a["type"]: a for a in artifacts}
    assert set(by_type) == {"table", "markdown", "progress"}, artifacts

    rows = by_type["table"]["data"]
    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert len(rows) == len(ITEMS)
    assert {r["status"] for r in rows} == {"succeeded"}
    assert sorted(r["index"] for r in rows) == list(range(len(ITEMS)))
    assert all(r["attempts"] == 1 and r["exit_code"] == 0 for r in rows)

    report = by_type["markdown"]["data"]
    n = len(ITEMS)
    n_items = len(ITEMS)
    headline = f"**Completed: {n_items} of {n_items} items succeeded** · Job Succeeded"
    assert headline in report
    assert f"| {n} | {n} | 0 | 0 | 0 | 0 |" in report  # items, succeeded, failed, dead, left, twice
    assert "No caveat findings." in report

    assert float(by_type["progress"]["data"]) == 100.0

    ledger = Path(deployed.ledger_dir) / run_id / "ledger.jsonl"
    lines = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert [r["status"] for r in lines] == ["succeeded"] * n
    assert [r["body"] for r in lines] == list(ITEMS)
    stored = json.loads((Path(deployed.ledger_dir) / run_id / "report.json").read_text())
    assert stored["params"]["ledger_storage"] is None
    assert stored["ledger"] == str(Path(deployed.ledger_dir).resolve() / run_id)


def test_a_partial_job_given_at_run_time_is_explained(
    deployed: PrefectStack, queue_name: str
) -> None:
    # `prefect deployment run queuejob/on-demand --param job='{"parallelism": 4}'` posts this:
    # Prefect replaces the deployment's whole `job`, so the run has no command.
    dep = deployed.get(f"/deployments/name/{FLOW_NAME}/on-demand")
    run = deployed.post(
        f"/deployments/{dep['id']}/create_flow_run",
        {"parameters": {"job": {"parallelism": 4}, "queue": {"name": queue_name}}},
    )
    assert run["parameters"]["job"] == {"parallelism": 4}

    def finished() -> dict[str, Any] | None:
        current = deployed.get(f"/flow_runs/{run['id']}")
        return current if current["state"]["type"] in TERMINAL else None

    final = wait_for(
        finished,
        timeout=RUN_TIMEOUT_S,
        what=f"flow run {run['id']} to finish",
        detail=deployed.diagnostics,
        interval=1.0,
    )
    message = final["state"]["message"]
    assert final["state"]["type"] == "FAILED", message
    said = "job.command is missing: a parameter given at run time replaces the deployment's whole"
    assert said in message, message
    assert '"command": ["sh", "-c"' in message, message  # the deployment's, to start from
    assert "Custom run" in message
    assert "give exactly one of" not in message
