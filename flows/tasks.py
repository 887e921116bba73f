"""Thin Prefect tasks over the adapters: retries, back-off and which errors are worth retrying.

Each task calls one adapter. Tasks take serializable config (a `BrokerConfig`, `QueueSettings`,
a `BackendChoice`, manifest dicts), never live connections. Retries key on
`queuejob.flows.core.errors.RetryableError`: a refused connection or a 503 is retried with jittered
back-off; bad credentials, a 422 or a conflicting queue are not. Side effects are idempotent by
design (the fill's marker, the Job's run label), so a retry - or a retry of the whole flow run in a
fresh pod, without Prefect's result cache - never duplicates items or Jobs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import Any, Literal, cast

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff
from pydantic import BaseModel, ConfigDict

from queuejob.flows.adapters import broker as broker_io
from queuejob.flows.adapters.broker.leftovers import LeftoverScan, take_leftovers
from queuejob.flows.core.backend import JobBackend, JobHandle
from queuejob.flows.core.errors import ConfigError, InvalidInput, RetryableError
from queuejob.flows.core.items import Item, ItemSource, iter_items
from queuejob.flows.core.manifest import JobSpec
from queuejob.flows.core.pod_failure import ServerFeatures
from queuejob.flows.params import JobParams, job_spec_for_run

BROKER_URL_ENV = "QUEUEJOB_BROKER_URL"


def retry_if_retryable(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry only `RetryableError`s (and plain connection errors
    that escaped an adapter)."""
    try:
        state.result()
    except RetryableError:
        return True
    except (ConnectionError, TimeoutError):
        return True
    except BaseException:
        return False
    return False


RETRIES: dict[str, Any] = {
    # 2, 4, 8 and 16 s apart (with jitter): together longer than a broker restart takes.
    "retries": 4,
    "retry_delay_seconds": exponential_backoff(backoff_factor=2),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_if_retryable,
    "cache_policy": NO_CACHE,
}


class BackendChoice(BaseModel):
    """Which Job backend to use and how to reach it (serializable, so tasks can take it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["kubernetes", "local"]
    credentials_block: str | None = None  # a prefect-kubernetes KubernetesCredentials block
    cluster_config_block: str | None = None  # or a KubernetesClusterConfig block
    state_dir: str | None = None  # local backend: where Job state lives


def make_backend(choice: BackendChoice) -> JobBackend:
    """Build the backend (the only place that knows both adapters)."""
    if choice.kind == "local":
        from pathlib import Path

        from queuejob.flows.adapters.local import LocalBackend

        return LocalBackend(state_dir=Path(choice.state_dir) if choice.state_dir else None)
    from queuejob.flows.adapters.kube import KubeBackend

    cluster_config: dict[str, Any] | None = None
    context: str | None = None
    if choice.credentials_block or choice.cluster_config_block:
        try:
            from prefect_kubernetes.credentials import (
                KubernetesClusterConfig,
                KubernetesCredentials,
            )

            if choice.credentials_block:
                creds = cast(Any, KubernetesCredentials.load(choice.credentials_block))
                cfg_block = creds.cluster_config
            else:
                cfg_block = cast(Any, KubernetesClusterConfig.load(choice.cluster_config_block))
        except ValueError as exc:
            name = choice.credentials_block or choice.cluster_config_block
            raise ConfigError(
                f"cannot load the Kubernetes block {name!r}: {exc}; create it in the Prefect UI "
                "(Blocks) or fix the name"
            ) from exc
        if cfg_block is not None:
            cluster_config = dict(cfg_block.config)
            context = cfg_block.context_name
    return KubeBackend.from_config(cluster_config=cluster_config, context=context)


def resolve_broker(broker_block: str | None) -> broker_io.BrokerConfig:
    """The broker: a RabbitMQBroker block by name, else the QUEUEJOB_BROKER_URL environment."""
    if broker_block:
        from queuejob.blocks import RabbitMQBroker

        try:
            blk = cast(RabbitMQBroker, RabbitMQBroker.load(broker_block))
        except ValueError as exc:
            raise ConfigError(
                f"no RabbitMQBroker block named {broker_block!r}: create it in the Prefect UI "
                "(Blocks > RabbitMQ Broker) or with RabbitMQBroker(...).save(name)"
            ) from exc
        return broker_io.BrokerConfig(
            url=blk.url(),
            ca_file=blk.ca_file,
            connect_timeout_s=float(blk.connect_timeout_s),
            heartbeat_s=int(blk.heartbeat_s),
        )
    url = os.environ.get(BROKER_URL_ENV)
    if not url:
        raise ConfigError(
            "no broker configured: pass broker_block=<name of a RabbitMQBroker block>, or set "
            f"{BROKER_URL_ENV} in the flow run's environment"
        )
    return broker_io.BrokerConfig(url=url)


def resolve_job_spec(job: JobParams, mode: str, backend: str) -> JobSpec:
    """The run's `JobSpec`: a WorkQueueJobTemplate block with the run's overrides on top, else
    the `job` parameter alone (explaining a field a deployment's `job` had and the run lost)."""
    if job.template_block:
        from queuejob.blocks import WorkQueueJobTemplate

        try:
            template = cast(WorkQueueJobTemplate, WorkQueueJobTemplate.load(job.template_block))
        except ValueError as exc:
            raise InvalidInput(
                f"no WorkQueueJobTemplate block named {job.template_block!r}: create it in the "
                "Prefect UI (Blocks) or fix job.template_block"
            ) from exc
        # The run's overrides apply on top of the block (None values keep the block's).
        return template.to_job_spec(**job.overrides(), mode=mode)
    try:
        return job_spec_for_run(job, mode, backend)
    except InvalidInput as exc:
        missing = _missing_job_field(job, backend)
        if missing is None:
            raise
        hint = _deployment_job_hint(missing)
        if hint is None:
            raise
        raise InvalidInput(hint) from exc


def _missing_job_field(job: JobParams, backend: str) -> str | None:
    """The field a run's `job` lacks to make a Job on its own (no template block), or None."""
    if job.template_block:
        return None
    if not job.command and not job.call:
        return "command"
    if job.image is None and backend != "local":
        return "image"
    return None


def _deployment_job_hint(missing: str) -> str | None:
    """For a run of a deployment whose `job` has what this run's lacks: say why.

    Prefect replaces a parameter given at run time whole (``--param job='{"parallelism": 4}'``,
    or ``create_flow_run`` with a partial ``job``): the deployment's command, image or template
    block are gone. The flow cannot tell a field left out from one set to null, so it explains
    rather than merges. None when the run is not from a deployment, or its deployment's `job`
    lacks the field too (then the plain message says what to set).
    """
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    deployment_id = ctx.flow_run.deployment_id if ctx and ctx.flow_run else None
    if deployment_id is None:
        return None
    try:
        with get_client(sync_client=True) as client:
            deployed = client.read_deployment(deployment_id)
    except Exception:  # the hint is a courtesy: without it the plain message still stands
        return None
    deployed_job = (deployed.parameters or {}).get("job") or {}
    if not isinstance(deployed_job, dict):
        return None
    has = {
        "command": bool(deployed_job.get("command") or deployed_job.get("call")),
        "image": bool(deployed_job.get("image")),
    }
    if not (has[missing] or deployed_job.get("template_block")):
        return None
    return (
        f"job.{missing} is missing: a parameter given at run time replaces the deployment's "
        f"whole `job` (Prefect does not merge the two), and this run's `job` has no {missing}. "
        f"Give the whole object: the deployment's is {json.dumps(deployed_job)}; change what "
        "you need in it, or start the run from the UI's Custom run form, which begins with the "
        "deployment's values"
    )


def source_items(source: ItemSource) -> Iterator[Item]:
    """The source's items; for kind ``ledger`` streamed from the earlier run's stored ledger
    (`LedgerNotFound` names the run and the location when it has none)."""
    if source.kind != "ledger":
        return iter_items(source)
    from queuejob.flows.core.rerun import fate_statuses
    from queuejob.flows.storage import open_storage

    assert source.run_id is not None  # the model requires it for kind 'ledger'
    storage = open_storage(source.ledger_storage)
    rows = storage.iter_rows(source.run_id, fate_statuses(source.fates))
    return iter_items(source, rows=rows)


# --- tasks ---------------------------------------------------------------------------------


@task(name="validate-items", **{**RETRIES, "retries": 0})
def validate_items(source: ItemSource) -> int:
    """Read the whole item source once, before any side effect; return how many items."""
    return sum(1 for _ in source_items(source))


# No task retries: the adapter already retries with back-off until the deadline, and a second
# layer of retries would multiply the wait the caller asked for.
@task(name="wait-for-broker", **{**RETRIES, "retries": 0})
def wait_for_broker(cfg: broker_io.BrokerConfig, deadline_s: float) -> None:
    """Wait until the broker completes an AMQP handshake (back-off inside, until a deadline)."""
    broker_io.wait_for_broker(cfg, deadline_s=deadline_s)


@task(name="declare-queue", **RETRIES)
def declare_queue(cfg: broker_io.BrokerConfig, qs: broker_io.QueueSettings) -> None:
    """Declare the work, dead-letter, results and fill-marker queues."""
    broker_io.declare_queues(cfg, qs)


@task(name="inspect-queue", **RETRIES)
def inspect_queue(
    cfg: broker_io.BrokerConfig, qs: broker_io.QueueSettings
) -> tuple[broker_io.FillMarker | None, dict[str, broker_io.QueueDepth]]:
    """The fill marker and the queues' depths (for the stale-message check)."""
    return broker_io.read_fill_marker(cfg, qs), broker_io.queue_depths(cfg, qs)


@task(name="purge-stale", **RETRIES)
def purge_stale(cfg: broker_io.BrokerConfig, qs: broker_io.QueueSettings) -> int:
    """Purge messages left by another run (the caller chose stale_messages='purge')."""
    return broker_io.purge_work_queue(cfg, qs)


@task(name="take-rerun-leftovers", **RETRIES)
def take_rerun_leftovers(
    cfg: broker_io.BrokerConfig,
    qs: broker_io.QueueSettings,
    source: ItemSource,
    purge_others: bool,
) -> LeftoverScan:
    """A rerun's first step on its work queue: take out the earlier run's own messages for the
    items this rerun queues again from that run's ledger (``source``, kind ``ledger``); with
    ``purge_others`` remove every other message too, else leave everything when there is any
    other (the caller stops the run). Idempotent: a retry finds those messages gone."""
    from queuejob.flows.core.rerun import RerunLeftovers, fate_statuses
    from queuejob.flows.storage import open_storage

    assert source.kind == "ledger" and source.run_id is not None
    rows = open_storage(source.ledger_storage).iter_rows(source.run_id, None)
    lookup = RerunLeftovers.from_rows(source.run_id, fate_statuses(source.fates), rows)
    return take_leftovers(
        cfg, qs, classify=lookup.classify, most=lookup.items, purge_others=purge_others
    )


@task(name="fill-queue", **RETRIES)
def fill_queue(
    cfg: broker_io.BrokerConfig,
    qs: broker_io.QueueSettings,
    source: ItemSource,
    run_id: str,
    on_progress: Callable[[int], None] | None = None,
) -> broker_io.FillResult:
    """Publish every item, persistent and confirmed; idempotent for the same run."""
    # A function, not the items: a fill cut by a lost node starts again with them read anew.
    return broker_io.fill_queue(
        cfg, qs, lambda: source_items(source), run_id=run_id, on_progress=on_progress
    )


@task(name="check-namespace", **RETRIES)
def check_namespace(choice: BackendChoice, namespace: str) -> None:
    """Raise `KubeNotFound` when the Job's namespace does not exist (Kubernetes backend; the
    local backend has no namespaces to check)."""
    if choice.kind != "kubernetes":
        return
    from queuejob.flows.adapters.kube import KubeBackend

    backend = make_backend(choice)
    if isinstance(backend, KubeBackend):
        backend.check_namespace(namespace)


@task(name="server-features", **RETRIES)
def server_features(choice: BackendChoice) -> ServerFeatures:
    """Which Job fields the cluster's API server keeps (its /version, read once per run); the
    local backend has them all."""
    if choice.kind != "kubernetes":
        return ServerFeatures()
    from queuejob.flows.adapters.kube import KubeBackend

    backend = make_backend(choice)
    return backend.server_features() if isinstance(backend, KubeBackend) else ServerFeatures()


@task(name="find-job", **RETRIES)
def find_job(choice: BackendChoice, namespace: str, name: str, run_id: str) -> JobHandle | None:
    """This run's Job, if a previous attempt created it."""
    return make_backend(choice).find_job(namespace=namespace, name=name, run_id=run_id)


@task(name="create-job", **RETRIES)
def create_job(
    choice: BackendChoice, secret: dict[str, Any], job: dict[str, Any], run_id: str
) -> JobHandle:
    """Create the Secret and the Job, or adopt the Job this run already created."""
    return make_backend(choice).create_or_adopt(secret=secret, job=job, run_id=run_id)


@task(name="delete-run-objects", **RETRIES)
def delete_run_objects(choice: BackendChoice, namespace: str, run_id: str) -> int:
    """Delete the run's Jobs, pods and Secret (found by the run label)."""
    return make_backend(choice).delete_run(namespace=namespace, run_id=run_id)


@task(name="purge-results", **RETRIES)
def purge_results(cfg: broker_io.BrokerConfig, qs: broker_io.QueueSettings) -> int:
    """Remove the run's outcome records from the results queue once the ledger is saved."""
    return broker_io.purge_results(cfg, qs)


@task(name="delete-queues", **RETRIES)
def delete_queues(cfg: broker_io.BrokerConfig, qs: broker_io.QueueSettings) -> dict[str, int]:
    """Delete the run's queues, keeping a work or dead-letter queue that still holds items
    (returned: name -> messages held)."""
    return broker_io.delete_queues(cfg, qs)


@task(name="check-ledger-storage", **{**RETRIES, "retries": 2})
def check_ledger_storage(block_name: str | None, run_id: str) -> str:
    """Open the ledger storage (a LocalFileSystem / RemoteFileSystem block, or the default
    directory) and check that the run's ledger can be written there; return its location."""
    from queuejob.flows.storage import open_storage

    storage = open_storage(block_name)
    storage.check_writable(run_id)
    return storage.location(run_id)
