"""Bad input is rejected before any side effect, with a message that says what to fix.

"Before any side effect" is checked three ways: no task of the run that touches the broker or
the cluster ran (the Prefect API lists the run's task runs), the work queue does not exist on
the broker (a passive declare), and the local backend holds no Job (its state directory).
Parameters are passed as a UI form or an API call would pass them: plain JSON values, so the
flow's own parameter validation is part of what is tested.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from queuejob.flows.core.manifest import RUN_ID_LABEL
from queuejob.flows.work_queue import run_work_queue
from tests.fakekube import FakeKubeServer
from tests.reliability.conftest import RelEnv
from tests.reliability.private_broker import free_port
from tests.reliability.support import DOCS_ITEMS, Witness, queue_exists, record

pytestmark = [pytest.mark.reliability, pytest.mark.broker, pytest.mark.prefect]

# Tasks that do nothing outside the flow's process: everything else is a side effect.
# Checks that leave nothing behind (the ledger storage's probe file is removed again).
HARMLESS_TASKS = {"validate-items", "check-namespace", "check-ledger-storage"}


def params(queue_name: str, **over: Any) -> dict[str, Any]:
    """JSON flow parameters for a small local run; ``over`` replaces top-level keys, and
    ``job``/``queue``/``items`` dicts are merged into the defaults."""
    base: dict[str, Any] = {
        "items": {"kind": "list", "values": DOCS_ITEMS},
        "queue": {"name": queue_name},
        "job": {"command": ["sh", "-c", "cat"], "parallelism": 2, "idle_timeout_seconds": 2},
        "backend": "local",
        "timeout_seconds": 60,
        "broker_wait_seconds": 5,
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and key != "items":
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


def task_names(flow_run_id: Any) -> set[str]:
    """Names of the task runs of a flow run (without the '-<3 hex digits>' Prefect adds)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return {re.sub(r"-[0-9a-f]{3}$", "", r.name) for r in runs}


def run_rejected(kwargs: dict[str, Any], witness: Witness) -> tuple[BaseException, Any]:
    """Run the flow expecting it to fail; return the exception and the flow run id."""
    state = run_work_queue(**kwargs, return_state=True)
    run_id = state.state_details.flow_run_id
    witness.add_run(run_id)
    assert state.is_failed(), f"expected a rejection, got {state.name}"
    try:
        state.result()
    except BaseException as exc:  # the flow's exception, re-raised from its state
        witness.add("exception", exc)
        return exc, run_id
    raise AssertionError("a failed state without an exception")


def assert_no_side_effects(env: RelEnv, queue: str, flow_run_id: Any) -> None:
    ran = task_names(flow_run_id) - HARMLESS_TASKS
    assert not ran, f"tasks with side effects ran: {sorted(ran)}"
    if len(queue.encode()) <= 255:
        assert not queue_exists(env.url, queue), f"queue {queue!r} was declared"
    assert not env.state_dir.exists() or not list(env.state_dir.rglob("*.json")), "a Job exists"


def _big_file(tmp: Path) -> dict[str, Any]:
    path = tmp / "big.txt"
    with path.open("wb") as fh:
        fh.truncate(200 * 1024 * 1024)  # sparse: 200 MB of one line, no disk used
    return {"items": {"kind": "text", "path": str(path)}}


def _latin1_file(tmp: Path) -> dict[str, Any]:
    path = tmp / "latin1.txt"
    path.write_bytes("apple\nbanana\ncr\xe8me br\xfbl\xe9e\n".encode("latin-1"))
    return {"items": {"kind": "text", "path": str(path)}}


def _duplicate_ids(tmp: Path) -> dict[str, Any]:
    path = tmp / "items.jsonl"
    lines = [{"id": "a", "n": 1}, {"id": "b", "n": 2}, {"id": "a", "n": 3}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return {"items": {"kind": "jsonl", "path": str(path)}}


# (case, parameters over the defaults, exception type name, fragments of the message)
CASES: list[tuple[str, Callable[[Path], dict[str, Any]], str, list[str]]] = [
    (
        "no items",
        lambda _t: {"items": {"kind": "list", "values": []}},
        "ItemError",
        ["no items", "give at least one item"],
    ),
    (
        "an item of 200 MB",
        _big_file,
        "ItemError",
        ["big.txt:1", "longer than the limit of 1048576 bytes", "object storage"],
    ),
    (
        "a non-UTF-8 file",
        _latin1_file,
        "ItemError",
        ["latin1.txt:3", "not valid UTF-8", "re-encode the file as UTF-8"],
    ),
    (
        "duplicate ids",
        _duplicate_ids,
        "ItemError",
        ["items.jsonl:3", "duplicate id 'a'", "ids must be unique"],
    ),
    (
        "a queue name with spaces",
        lambda _t: {"queue": {"name": "my work queue"}},
        "ParameterTypeError",
        ["queue.name", "contains ' '", "use only letters, digits"],
    ),
    (
        "a queue name over 255 bytes",
        lambda _t: {"queue": {"name": "q" * 256}},
        "ParameterTypeError",
        ["queue.name", "256 characters", "use at most 200"],
    ),
    (
        "an invalid image reference",
        lambda _t: {"job": {"image": "Registry.Example/My Image:latest!"}},
        "InvalidInput",
        ["not a valid image reference", "[registry/]repository[:tag]"],
    ),
    (
        "parallelism 0",
        lambda _t: {"job": {"parallelism": 0}},
        "ParameterTypeError",
        ["job.parallelism", "greater than or equal to 1"],
    ),
    (
        "completions 0",
        lambda _t: {"job": {"completions": 0}},
        "ParameterTypeError",
        ["job.completions", "at least 1 or 'auto'"],
    ),
    (
        "timeout 0",
        lambda _t: {"timeout_seconds": 0},
        "InvalidInput",
        ["timeout_seconds must be positive"],
    ),
    (
        "a missing broker block",
        lambda _t: {"broker_block": f"no-such-broker-{uuid.uuid4().hex[:6]}"},
        "ConfigError",
        ["no RabbitMQBroker block named", "create it"],
    ),
    (
        "a missing job template block",
        lambda _t: {"job": {"template_block": f"no-such-template-{uuid.uuid4().hex[:6]}"}},
        "InvalidInput",
        ["no WorkQueueJobTemplate block named", "create it"],
    ),
]


@pytest.mark.parametrize(
    ("over", "kind", "fragments"),
    [pytest.param(over, kind, frags, id=case) for case, over, kind, frags in CASES],
)
def test_bad_input_is_rejected_before_any_side_effect(
    over: Callable[[Path], dict[str, Any]],
    kind: str,
    fragments: list[str],
    rel_env: RelEnv,
    queue: str,
    tmp_path: Path,
    witness: Witness,
    request: pytest.FixtureRequest,
) -> None:
    kwargs = params(queue, **over(tmp_path))
    exc, flow_run_id = run_rejected(kwargs, witness)
    assert type(exc).__name__ == kind, f"{type(exc).__name__}: {exc}"
    for fragment in fragments:
        assert fragment in str(exc), f"{fragment!r} not in: {exc}"
    target = kwargs["queue"]["name"]
    assert_no_side_effects(rel_env, target, flow_run_id)
    record(
        f"bad input: {request.node.callspec.id}",
        faults="1 bad parameter",
        items=0,
        lost=0,
        twice_expected="0 (rejected first)",
        twice_observed=0,
    )


def test_a_namespace_that_does_not_exist_is_rejected_first(
    rel_env: RelEnv,
    queue: str,
    fake_kube: FakeKubeServer,
    fake_kubeconfig: Path,
    witness: Witness,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(fake_kubeconfig))
    kwargs = params(
        queue,
        backend="kubernetes",
        job={"image": "registry.example.invalid/queuejob:1.0", "namespace": "batch-nope"},
    )
    exc, flow_run_id = run_rejected(kwargs, witness)
    assert type(exc).__name__ == "KubeNotFound"
    assert "namespace 'batch-nope' does not exist" in str(exc)
    assert "kubectl create namespace batch-nope" in str(exc)
    assert_no_side_effects(rel_env, queue, flow_run_id)
    for kind in ("jobs", "secrets"):
        labelled = [
            o
            for ns in ("default", "batch-nope")
            for o in fake_kube.list_objects(kind, ns)
            if RUN_ID_LABEL in (o["metadata"].get("labels") or {})
        ]
        assert not labelled, f"{kind} were created"
    record(
        "bad input: a namespace that does not exist",
        faults="1 bad parameter",
        items=0,
        lost=0,
        twice_expected="0 (rejected first)",
        twice_observed=0,
    )


def test_an_unreachable_prefect_api_is_named_by_the_cli(
    rel_env: RelEnv, queue: str, witness: Witness
) -> None:
    api = f"http://127.0.0.1:{free_port()}/api"
    env = {**os.environ, "PREFECT_API_URL": api, "QUEUEJOB_BROKER_URL": rel_env.url}
    proc = subprocess.run(
        [sys.executable, "-m", "queuejob.flows.cli", "run", *DOCS_ITEMS, "--backend", "local",
         "--queue", queue, "--", "sh", "-c", "cat"],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    witness.add("cli stdout", proc.stdout)
    witness.add("cli stderr", proc.stderr)
    assert proc.returncode != 0
    assert f"cannot reach the Prefect API at {api}" in proc.stderr
    assert "prefect server start" in proc.stderr and "PREFECT_API_URL" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not queue_exists(rel_env.url, queue)
    assert not rel_env.state_dir.exists()
    record(
        "bad input: an unreachable Prefect API",
        faults="1 bad setting",
        items=0,
        lost=0,
        twice_expected="0 (rejected first)",
        twice_observed=0,
    )
