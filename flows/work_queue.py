"""The queuejob flow: fan items out through RabbitMQ to a Job, and report each item's fate.

wait_for_broker -> declare_queue -> (stale check) -> fill_queue -> plan + pre-check -> create_job
-> wait_for_job (ledger, progress, live caveats) -> post-check + report -> cleanup.

The ledger is an on-disk store fed in batches (`flows.adapters.ledger_store`), checkpointed to
the run's ledger storage (a Prefect filesystem block, `ledger_storage`) before the outcome
records in each batch are acknowledged; at the end the storage gets the final ledger (one JSON
row per item) and the report. The storage is checked for writing before anything else happens.

A retry of the flow run (same flow-run id) re-attaches: the fill's marker makes the fill a no-op,
the Job's run label makes create adopt it, the ledger is rebuilt from the checkpoints in the
storage (a fresh pod with an empty disk loses nothing), and the wait picks the Job up where it is.
Cancellation and crashes delete the run's Job, pods and Secret from hooks that find them by label
(hooks run in another process than the flow, so they use no in-memory state).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Literal, cast
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run as runtime_flow_run
from prefect.utilities.annotations import quote

from flows import tasks
from flows.adapters import broker as broker_io
from flows.adapters.ledger_storage import LedgerStorage
from flows.adapters.ledger_store import RunLedger
from flows.core import caveats
from flows.core.backend import JobHandle
from flows.core.errors import InvalidInput, JobFailed, QueueJobError
from flows.core.items import ItemSource
from flows.core.job_status import JobPhase, JobState
from flows.core.manifest import (
    ITEMS_ANNOTATION,
    JobSpec,
    build_job,
    build_secret,
    job_name,
    run_labels,
    secret_name,
)
from flows.monitor import DEFAULT_MAX_UNACKED, Progress, RunMonitor
from flows.params import CleanupParams, JobParams, QueueParams, default_items, job_spec_for_run
from flows.storage import open_storage

TABLE_ROW_CAP = 500
POD_FAILURES_SHOWN = 20  # failed pods whose log tail goes to the run's logs and the report
# Fault injection for tests, on a flow run's first attempt only: "crash-after-create-job", or
# "crash-after-wait" (the Job is done and its records read, the ledger not yet saved).
FAULT_ENV = "QUEUEJOB_FAULT"
# How many outcome records the flow may hold unacknowledged at once (the results consumer's
# prefetch); records are saved in batches of half of it.
MAX_UNACKED_ENV = "QUEUEJOB_MAX_UNACKED_RECORDS"
TABLE_BODY_CAP = 200


def _run_id() -> str:
    rid = runtime_flow_run.id
    if not rid:
        raise InvalidInput("queuejob must run as a Prefect flow run (no flow-run id found)")
    return str(rid)


def _max_unacked() -> int:
    raw = os.environ.get(MAX_UNACKED_ENV)
    if not raw:
        return DEFAULT_MAX_UNACKED
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 2 <= value <= 65535:
        raise InvalidInput(
            f"{MAX_UNACKED_ENV}={raw!r}: give a whole number of outcome records from 2 to 65535 "
            f"(default {DEFAULT_MAX_UNACKED})"
        )
    return value


def _job_spec(job: JobParams, mode: str, backend: str) -> JobSpec:
    if job.template_block:
        from blocks import WorkQueueJobTemplate

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


def _progress_artifact_listener(run_id: str) -> Any:
    artifact_id = cast(
        UUID,
        create_progress_artifact(
            progress=0.0,
            key=f"queuejob-progress-{run_id[:8]}",
            description="Items done out of the items queued",
        ),
    )
    last = {"t": 0.0, "p": -1.0}

    def listener(progress: Progress) -> None:
        pct = round(100.0 * progress.fraction, 1)
        now = time.monotonic()
        if pct != last["p"] and (now - last["t"] >= 2.0 or pct >= 100.0):
            last["t"], last["p"] = now, pct
            update_progress_artifact(artifact_id=artifact_id, progress=pct)

    return listener


@task(name="wait-for-job", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE,
      retry_condition_fn=tasks.retry_if_retryable)  # fmt: skip
def wait_for_job(
    choice: tasks.BackendChoice,
    handle: JobHandle,
    cfg: broker_io.BrokerConfig,
    qs: broker_io.QueueSettings,
    items: ItemSource,
    ledger: RunLedger,
    mode: str,
    idle_timeout_s: float,
    timeout_s: float,
    findings: list[caveats.Finding],
    stats: dict[str, int],
) -> JobState:
    """Wait for the Job to be decided while the results queue feeds the ledger.

    The ledger, findings and stats are the flow's own objects, filled in place, so a retry of
    this task keeps what an earlier attempt already took. Records are acknowledged only once the
    batch holding them is checkpointed in the ledger storage, so a flow run that dies and is
    retried (in a fresh pod too) loses none; the ledger takes each record once.
    """
    logger = get_run_logger()
    backend = tasks.make_backend(choice)
    monitor = RunMonitor(
        cfg=cfg,
        qs=qs,
        ledger=ledger,
        mode=mode,
        idle_timeout_s=idle_timeout_s,
        logger=logger,
        listeners=[_progress_artifact_listener(handle.run_id)],
        max_unacked=stats.get("max_unacked_allowed", DEFAULT_MAX_UNACKED),
    )
    try:
        if not ledger.items_loaded:  # streamed from the source, in batches
            ledger.load_items(tasks.source_items(items))
        with monitor:
            state = backend.wait(handle, timeout_s=timeout_s, on_update=monitor.on_update)
            monitor.drain_until_quiet()
            monitor.on_update(state)
    except BaseException as exc:
        if not isinstance(exc, Exception):
            # Told to stop (cancellation, SIGTERM): take the Job and its pods down with us.
            logger.warning("stopping: deleting Job %s and its pods", handle.name)
            backend.delete_run(namespace=handle.namespace, run_id=handle.run_id)
        raise
    finally:
        findings.extend(f for f in monitor.findings if f not in findings)
        stats["max_unacked_seen"] = max(stats.get("max_unacked_seen", 0), monitor.max_unacked_seen)
    return state


def _report_markdown(report: dict[str, Any], findings: list[caveats.Finding]) -> str:
    s = report["summary"]
    lines = [
        f"# queuejob run {report['run_id']}",
        "",
        f"Job `{report['job']}` in `{report['namespace']}` ({report['backend']} backend), "
        f"queue `{report['queue']}`: **{report['job_phase']}**"
        + (f" ({report['job_reason']})" if report.get("job_reason") else ""),
        "",
    ]
    if report.get("rerun_of"):
        lines += [f"A rerun of run `{report['rerun_of']}`: its items from that run's ledger.", ""]
    lines += [
        "| items | succeeded | failed | dead-lettered | left in queue | processed twice |",
        "|---|---|---|---|---|---|",
        f"| {s['expected']} | {s['succeeded']} | {s['failed']} | {s['dead_lettered']} | "
        f"{s['left']} | {s['processed_more_than_once']} |",
        "",
    ]
    if findings:
        lines += ["## Findings", ""]
        lines += [
            f"- **{f.severity.value}** `{f.code.value}`: {f.message}. *{f.advice}*"
            for f in findings
        ]
    else:
        lines += ["No caveat findings."]
    if report.get("pod_failures"):
        lines += ["", "## Failed pods", ""]
        for pf in report["pod_failures"][:POD_FAILURES_SHOWN]:
            tail = pf["log_tail"].strip().replace("\n", "\n    ")
            lines += [f"- `{pf['pod']}` exit {pf['exit_code']} ({pf['reason']}):", f"    {tail}"]
    lines += ["", f"Full ledger (JSON Lines, one row per item): `{report['ledger_path']}`"]
    return "\n".join(lines)


def _log_pod_failures(logger: Any, pod_failures: list[dict[str, Any]]) -> None:
    """Put each failed pod's exit code and the end of its log in the run's logs (the report
    artifact has them too, but the logs are where a failed run is read first)."""
    for pf in pod_failures[:POD_FAILURES_SHOWN]:
        tail = pf["log_tail"].rstrip() or "(the pod wrote nothing)"
        logger.warning(
            "pod %s failed: exit code %s (%s); the end of its log:\n%s",
            pf["pod"],
            pf["exit_code"],
            pf["reason"] or "Error",
            tail,
        )
    if len(pod_failures) > POD_FAILURES_SHOWN:
        logger.warning(
            "%d more pods failed: the report artifact lists them",
            len(pod_failures) - POD_FAILURES_SHOWN,
        )


def cleanup_hook(flow: Any, flow_run: Any, state: Any) -> None:
    """on_cancellation / on_crashed: delete the run's Job, pods and Secret by the run label.

    Runs in the runner's or worker's process, not the flow's: everything comes from the flow
    run's parameters and id.
    """
    params = dict(getattr(flow_run, "parameters", None) or {})
    backend = params.get("backend", "kubernetes")
    job = params.get("job") or {}
    if isinstance(job, JobParams):
        job = job.model_dump()
    namespace = job.get("namespace") or "default"
    choice = tasks.BackendChoice(
        kind=backend,
        credentials_block=params.get("kubernetes_credentials_block"),
    )
    run_id = str(flow_run.id)
    try:
        deleted = tasks.make_backend(choice).delete_run(namespace=namespace, run_id=run_id)
        print(f"queuejob: {state.name} run {run_id}: deleted {deleted} Job(s) and their pods")
    except QueueJobError as exc:
        print(f"queuejob: cleanup of run {run_id} failed: {exc}")


@flow(
    name="queuejob",
    description="Fan a batch of work items out through RabbitMQ to a Job, and report each "
    "item's fate.",
    on_cancellation=[cleanup_hook],
    on_crashed=[cleanup_hook],
    log_prints=True,
)
def run_work_queue(
    items: ItemSource = default_items(),  # noqa: B008 - pydantic model default, frozen
    queue: QueueParams = QueueParams(),  # noqa: B008
    job: JobParams = JobParams(),  # noqa: B008
    mode: Literal["coarse", "fine"] = "coarse",
    backend: Literal["kubernetes", "local"] = "kubernetes",
    broker_block: str | None = None,
    kubernetes_credentials_block: str | None = None,
    caveat_policy: Literal["warn", "fail"] = "warn",
    timeout_seconds: float = 3600.0,
    broker_wait_seconds: float = 60.0,
    cleanup: CleanupParams = CleanupParams(),  # noqa: B008
    ledger_storage: str | None = None,
) -> dict[str, Any]:
    """Process every item exactly once with a Job of pods taking items from a RabbitMQ queue.

    Args:
        items: where the items come from (inline list, text or JSON Lines file, range).
        queue: the work queue's name, type, delivery limit and stale-message policy.
        job: the worker Job: template block, image, command, parallelism, completions, ...
        mode: coarse (one item per pod, the docs' pattern) or fine (pods loop until drained).
        backend: kubernetes, or local (pods as local processes, for a laptop or CI).
        broker_block: name of a RabbitMQBroker block (else QUEUEJOB_BROKER_URL is used).
        kubernetes_credentials_block: a prefect-kubernetes KubernetesCredentials block (else
            in-cluster config, then KUBECONFIG / ~/.kube/config).
        caveat_policy: warn (report findings) or fail (fail the run when there are any).
        timeout_seconds: wall-clock limit for waiting on the Job.
        broker_wait_seconds: how long to wait for the broker to answer.
        cleanup: what to delete after success.
        ledger_storage: name of a LocalFileSystem or RemoteFileSystem block (any fsspec URL:
            s3://, gs://, az://, ...) where the ledger is kept, checkpointed as the run goes
            (else QUEUEJOB_LEDGER_DIR, default ~/.cache/queuejob/ledgers).
    """
    logger = get_run_logger()
    started = time.monotonic()
    if timeout_seconds <= 0:
        raise InvalidInput(f"timeout_seconds must be positive (got {timeout_seconds})")
    run_id = _run_id()
    spec = _job_spec(job, mode, backend)
    name = job_name(spec.name_prefix, run_id)
    qs = broker_io.QueueSettings(
        name=queue.name, queue_type=queue.type, delivery_limit=queue.delivery_limit
    )
    cfg = tasks.resolve_broker(broker_block)
    choice = tasks.BackendChoice(kind=backend, credentials_block=kubernetes_credentials_block)
    n_items = tasks.validate_items(items)
    logger.info("%d items from %s; broker %s", n_items, items.describe(), cfg.redacted())
    max_unacked = _max_unacked()
    params = {
        "items": items.model_dump(mode="json"),
        "queue": queue.model_dump(mode="json"),
        "job": job.model_dump(mode="json"),
        "mode": mode,
        "backend": backend,
        "broker_block": broker_block,
        "kubernetes_credentials_block": kubernetes_credentials_block,
        "caveat_policy": caveat_policy,
        "timeout_seconds": timeout_seconds,
        "broker_wait_seconds": broker_wait_seconds,
        "cleanup": cleanup.model_dump(mode="json"),
        "ledger_storage": ledger_storage,
    }
    # A namespace that does not exist would only show when the Job is created, after the queue
    # was filled: check it while nothing has happened yet.
    tasks.check_namespace(choice, spec.namespace)
    # Where the ledger goes, checked for writing before anything happens (fail early rather
    # than after the Job has done the work). The probe file it writes is removed again.
    ledger_location = tasks.check_ledger_storage(ledger_storage, run_id)
    storage = open_storage(ledger_storage)
    logger.info("ledger storage: %s", ledger_location)

    findings: list[caveats.Finding] = []
    tasks.wait_for_broker(cfg, broker_wait_seconds)
    tasks.declare_queue(cfg, qs)

    existing = tasks.find_job(choice, spec.namespace, name, run_id)
    if existing is not None:
        # A retry of this run after the Job was created: the fill is done, the Job is adopted.
        confirmed = int((existing.annotations or {}).get(ITEMS_ANNOTATION, n_items))
        logger.info("re-attaching to Job %s created by an earlier attempt", name)
    else:
        marker, depths = tasks.inspect_queue(cfg, qs)
        if marker is None or marker.run_id != run_id:
            work = depths["work"]
            stale = caveats.check_stale(
                queue=qs.name,
                ready=work.ready,
                unacked=work.unacked or 0,
                consumers=work.consumers,
                policy=queue.stale_messages,
            )
            if stale is not None:
                purged = tasks.purge_stale(cfg, qs)
                logger.warning("%s (%d purged)", stale.line(), purged)
                findings.append(stale)
        fill = tasks.fill_queue(cfg, qs, items, run_id)
        confirmed = fill.confirmed
        logger.info(
            "queue %r: %d items confirmed%s",
            qs.name,
            confirmed,
            " (filled by an earlier attempt)" if fill.skipped else "",
        )

    completions = caveats.plan_completions(
        requested=job.completions, confirmed=confirmed, mode=mode
    )
    before = caveats.check_completions(
        queue=qs.name,
        requested=job.completions,
        confirmed=confirmed,
        mode=mode,
        idle_timeout_s=spec.idle_timeout_seconds,
    )
    for finding in before:
        logger.warning(finding.line())
    findings.extend(before)
    # Under the fail policy, stop before the Job exists: nothing to clean up on the cluster.
    caveats.enforce(findings, caveat_policy)

    secret = build_secret(
        namespace=spec.namespace, name=secret_name(name), run_id=run_id, broker_url=cfg.url
    )
    manifest = build_job(
        spec,
        run_id=run_id,
        queue=qs.name,
        completions=completions,
        confirmed_items=confirmed,
        delivery_limit=qs.delivery_limit if qs.queue_type == "classic" else None,
    )
    # The ledger: rebuilt from the storage's checkpoints (a retry goes on from them). It learns
    # the items at the start of the wait, while the pods already work; the wait follows the
    # Job's creation at once, so a stop (SIGTERM) once pods run lands where it takes them down.
    ledger = RunLedger.open(storage, run_id, expected=confirmed)
    try:
        if ledger.records:
            logger.info(
                "ledger: %d outcome records from %d checkpoints of an earlier attempt",
                ledger.records,
                ledger.segments,
            )
        handle = tasks.create_job(choice, secret, manifest, run_id)
        logger.info(
            "%s Job %s/%s", "adopted" if handle.adopted else "created", spec.namespace, name
        )
        if (
            os.environ.get(FAULT_ENV) == "crash-after-create-job"
            and runtime_flow_run.run_count <= 1
        ):
            raise RuntimeError("fault injection: crash after create_job (first attempt only)")
        return _wait_and_report(
            items=items,
            ledger=ledger,
            storage_location=ledger_location,
            storage=storage,
            params=params,
            choice=choice,
            handle=handle,
            cfg=cfg,
            qs=qs,
            mode=mode,
            spec=spec,
            name=name,
            backend=backend,
            n_items=n_items,
            confirmed=confirmed,
            completions=completions,
            timeout_seconds=timeout_seconds,
            findings=findings,
            cleanup=cleanup,
            caveat_policy=caveat_policy,
            started=started,
            max_unacked=max_unacked,
        )
    finally:
        ledger.close()


def _wait_and_report(
    *,
    items: ItemSource,
    ledger: RunLedger,
    storage_location: str,
    storage: LedgerStorage,
    params: dict[str, Any],
    choice: tasks.BackendChoice,
    handle: JobHandle,
    cfg: broker_io.BrokerConfig,
    qs: broker_io.QueueSettings,
    mode: str,
    spec: JobSpec,
    name: str,
    backend: str,
    n_items: int,
    confirmed: int,
    completions: int | None,
    timeout_seconds: float,
    findings: list[caveats.Finding],
    cleanup: CleanupParams,
    caveat_policy: Literal["warn", "fail"],
    started: float,
    max_unacked: int,
) -> dict[str, Any]:
    logger = get_run_logger()
    run_id = ledger.run_id
    stats: dict[str, int] = {"max_unacked_allowed": max_unacked, "max_unacked_seen": 0}
    state = wait_for_job(  # type: ignore[call-overload]
        choice,
        handle,
        cfg,
        qs,
        items,
        # quote(): hand the task these very objects (filled in place), not copies.
        quote(ledger),
        mode,
        spec.idle_timeout_seconds,
        timeout_seconds,
        quote(findings),
        quote(stats),
    )
    if os.environ.get(FAULT_ENV) == "crash-after-wait" and runtime_flow_run.run_count <= 1:
        raise RuntimeError("fault injection: crash after the wait (first attempt only)")

    # --- after: what is left, what died, what the ledger says --------------------------------
    depths = broker_io.queue_depths(cfg, qs)
    dead_ids = broker_io.dead_letter_ids(cfg, qs, run_id=run_id)
    ledger.mark_dead_lettered(dead_ids)
    summary = ledger.summary()
    backend_io = tasks.make_backend(choice)
    pod_failures = []
    failed = caveats.check_job_failed(state, job=name)
    if failed is not None:
        findings.append(failed)
        pod_failures = [
            {"pod": p.pod, "exit_code": p.exit_code, "reason": p.reason, "log_tail": p.log_tail}
            for p in backend_io.failure_details(handle)
        ]
        _log_pod_failures(logger, pod_failures)
    findings.extend(
        caveats.check_after(
            queue=qs.name,
            confirmed=confirmed,
            state=state,
            residual_ready=depths["work"].ready,
            residual_unacked=depths["work"].unacked or 0,
            dead_letters=len(dead_ids),
            summary=summary,
            delivery_limit=qs.delivery_limit if qs.queue_type == "quorum" else None,
            unreported_attempts=ledger.unreported_attempts(),
            run_id=run_id,
        )
    )

    ledger_path = storage.write_rows(run_id, ledger.rows())

    # Queues go once the ledger is saved (the outcome records have served), before the report, so
    # that it says which were kept: a work or dead-letter queue still holding items stays.
    kept: dict[str, int] = {}
    if state.phase is JobPhase.SUCCEEDED and cleanup.delete_queues:
        kept = tasks.delete_queues(cfg, qs)
        findings.extend(
            caveats.check_kept_queues(queue=qs.name, dead_queue=qs.dead_name, kept=kept)
        )

    report: dict[str, Any] = {
        "run_id": run_id,
        "job": name,
        "namespace": spec.namespace,
        "backend": backend,
        "queue": qs.name,
        "mode": mode,
        "items": n_items,
        "confirmed": confirmed,
        "completions": completions,
        "job_phase": state.phase.value,
        "job_reason": state.reason,
        "summary": summary.as_dict(),
        "findings": [f.as_dict() for f in findings],
        "pod_failures": pod_failures,
        "ledger": storage_location,
        "ledger_path": ledger_path,
        "ledger_records": ledger.records,
        "max_unacked_records": stats.get("max_unacked_seen", 0),
        "kept_queues": kept,
        "wall_time_s": round(time.monotonic() - started, 2),
        "labels": run_labels(run_id),
        # The run whose ledger this one's items came from (queuejob rerun), else None.
        "rerun_of": _rerun_of(params),
    }
    storage.write_report(run_id, {**report, "params": params})
    rows = [_table_row(r) for r in ledger.rows(limit=TABLE_ROW_CAP)]
    create_table_artifact(
        table=rows,
        key=f"queuejob-ledger-{run_id[:8]}",
        description=f"Per-item ledger (first {TABLE_ROW_CAP} rows; full: {ledger_path})",
    )
    create_markdown_artifact(
        markdown=_report_markdown(report, findings),
        key=f"queuejob-report-{run_id[:8]}",
        description="queuejob run report",
    )
    s = summary
    logger.info(
        "summary: %d items, %d succeeded, %d failed, %d dead-lettered, %d left in queue; "
        "%d finding(s); job %s",
        s.expected,
        s.succeeded,
        s.failed,
        s.dead_lettered,
        s.left,
        len(findings),
        state.describe(),
    )
    for finding in findings:
        if finding.stage == "after":
            (logger.info if finding.severity is caveats.Severity.INFO else logger.warning)(
                finding.line()
            )

    if state.phase is JobPhase.FAILED:
        raise JobFailed(
            f"Job {name!r} failed: {state.reason} ({state.message}); "
            f"{s.succeeded}/{s.expected} items succeeded; see the report artifact"
        )
    if state.phase is JobPhase.SUCCEEDED:
        if cleanup.delete_job:
            tasks.delete_run_objects(choice, spec.namespace, run_id)
        if not cleanup.delete_queues:  # the ledger is saved: the outcome records have served
            tasks.purge_results(cfg, qs)
    caveats.enforce(findings, caveat_policy)
    return report


def _table_row(row: dict[str, Any]) -> dict[str, Any]:
    body = row.get("body") or ""
    if len(body) > TABLE_BODY_CAP:
        row = {**row, "body": body[:TABLE_BODY_CAP] + "..."}
    return row


def _rerun_of(params: dict[str, Any]) -> str | None:
    """The earlier run a rerun's items come from (an item source of kind 'ledger')."""
    items = params.get("items") or {}
    run_id = items.get("run_id") if items.get("kind") == "ledger" else None
    return str(run_id) if run_id else None
