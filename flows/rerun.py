"""Rerun what failed: an earlier run's failed, dead-lettered and leftover items as a new run.

`rerun_failures` is the flow behind the ``rerun-failures`` deployment (its run form asks for
the earlier run's id); ``queuejob rerun RUN_ID`` does the same from a terminal with every `run`
option available as an override. Both read the earlier run's report (``report.json`` in its
ledger storage), take its parameters, replace the items with that run's ledger (the items of
the chosen fates, with their ids and bodies) and start the `queuejob` flow: a new run, whose
report names the earlier one (``rerun_of``). A rerun of a rerun works the same way: its ledger
holds the bodies too. The rerun's Job is sized to its own items (completions ``auto``) unless an
override says otherwise, and the earlier run's own messages of those items still in the work
queue are taken out before the fill (the stale-message policy is for any other message).

An unknown run id, or a run whose ledger is missing, fails here, before anything is declared on
the broker or created on the cluster.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from prefect import flow, get_run_logger

from queuejob.flows.core.items import ItemSource
from queuejob.flows.core.rerun import parse_fates, rerun_params
from queuejob.flows.params import CleanupParams, JobParams, QueueParams
from queuejob.flows.storage import open_storage
from queuejob.flows.work_queue import run_work_queue

Fate = Literal["succeeded", "failed", "dead_lettered", "left"]


def rerun_kwargs(
    run_id: str,
    *,
    fates: Iterable[str] | None = None,
    ledger_storage: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The `queuejob` flow's arguments for a rerun of ``run_id``: its report's parameters, its
    ledger as the items, ``overrides`` on top. Raises `LedgerNotFound` (an `InvalidInput`)
    naming the run and the location when the run has no stored report."""
    chosen = parse_fates(list(fates) if fates is not None else None)
    report = open_storage(ledger_storage).read_report(run_id)
    params = rerun_params(
        report.get("params"),
        run_id=run_id,
        fates=chosen,
        ledger_storage=ledger_storage,
        overrides=overrides,
    )
    return flow_kwargs(params)


def flow_kwargs(params: Mapping[str, Any]) -> dict[str, Any]:
    """Flow parameters as JSON (a report's ``params``) -> the flow's arguments, validated.
    Parameters this version of the flow does not take are dropped."""
    accepted = inspect.signature(run_work_queue.fn).parameters
    models: dict[str, Any] = {
        "items": ItemSource,
        "queue": QueueParams,
        "job": JobParams,
        "cleanup": CleanupParams,
    }
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key not in accepted:
            continue
        model = models.get(key)
        out[key] = model.model_validate(value) if model is not None and value is not None else value
    return out


@flow(
    name="queuejob-rerun",
    description="Run an earlier queuejob run's failed, dead-lettered and leftover items again, "
    "with that run's settings, as a new run.",
    log_prints=True,
)
def rerun_failures(
    run_id: str,
    fates: list[Fate] = ["failed", "dead_lettered", "left"],  # noqa: B006 - the UI's default
    ledger_storage: str | None = None,
    parallelism: int | None = None,
    caveat_policy: Literal["warn", "fail"] | None = None,
    timeout_seconds: float | None = None,
) -> dict[str, Any]:
    """Rerun the items of an earlier queuejob run that did not succeed.

    Args:
        run_id: the earlier queuejob flow run's id (its report and ledger are read back).
        fates: which of its items: failed, dead_lettered, left (never finished), succeeded.
        ledger_storage: the LocalFileSystem or RemoteFileSystem block holding that run's
            ledger (default: the local ledger directory); the rerun's ledger goes there too.
        parallelism: pods at once (default: the earlier run's).
        caveat_policy: warn or fail (default: the earlier run's).
        timeout_seconds: wait limit for the Job (default: the earlier run's).
    """
    overrides: dict[str, Any] = {}
    if parallelism is not None:
        overrides["job"] = {"parallelism": parallelism}
    if caveat_policy is not None:
        overrides["caveat_policy"] = caveat_policy
    if timeout_seconds is not None:
        overrides["timeout_seconds"] = timeout_seconds
    kwargs = rerun_kwargs(run_id, fates=fates, ledger_storage=ledger_storage, overrides=overrides)
    get_run_logger().info("rerun of run %s: %s", run_id, kwargs["items"].describe())
    report: dict[str, Any] = run_work_queue(**kwargs)
    return report
