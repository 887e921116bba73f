"""The queuejob flow: fan items out through RabbitMQ to a Job, and report each item's fate.

The flow is five stages, each a function here, passing one `Run` along:

* `prepare`: check the inputs, the namespace and the ledger storage; wait for the broker and
  declare the queues;
* `fill`: the stale-message check, then fill the queue (a retry finds it filled, or the Job
  made);
* `plan_job` and `launch`: size the Job from the confirmed count, check the caveats before it,
  create (or adopt) it;
* `watch`: wait for the Job while the outcome records feed the ledger (`wait_for_job`); when
  no pod of the Job can start (`queuejob.flows.core.pods`), delete the Job, its pods and its
  Secret, keeping every item in the queue;
* `report`: the caveats after the run, fitted to it (one finding per cause), the run's outcome
  (`queuejob.flows.core.outcome`), the saved ledger and report; then the artifacts beside it,
  and `conclude`: clean up after a Job that succeeded, emit the run's events
  (`queuejob.flows.events`), and end the flow run Completed or Failed with the report as its
  result.

The items decide the run: one that did not succeed (failed, dead-lettered, left in the queue)
fails it unless ``max_failed_items`` tolerates it; a failed Job fails it, and so do pods that
cannot start (``pods-cannot-start``); ``caveat_policy='fail'`` fails it on caveat findings.
Either way everything is reported first, and the flow returns a state
(`prefect.states.Completed` or `Failed`) whose result is the report: a Failed run's result is a
`RunFailed` error that reads as the report, so a caller calling the flow gets that error raised,
and one reading the state's result (``return_state=True``, then
``state.result(raise_on_failure=False)``) gets the report either way.

The ledger is an on-disk store fed in batches (`queuejob.flows.adapters.ledger_store`),
checkpointed to the run's ledger storage (a Prefect filesystem block, `ledger_storage`) before the
outcome records in each batch are acknowledged; at the end the storage gets the final ledger (one
JSON row per item) and the report. The storage is checked for writing before anything else happens.

A retry of the flow run (same flow-run id) re-attaches: the fill's marker makes the fill a no-op,
the Job's run label makes create adopt it, the ledger is rebuilt from the checkpoints in the
storage (a fresh pod with an empty disk loses nothing), and the wait picks the Job up where it is.
Cancellation and crashes delete the run's Job, pods and Secret from hooks that find them by label
(hooks run in another process than the flow, so they use no in-memory state).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, fields
from typing import Any, Literal, cast
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State
from prefect.runtime import flow_run as runtime_flow_run
from prefect.states import Completed, Failed
from prefect.utilities.annotations import quote
from pydantic import BaseModel

from queuejob.flows import events, run_report, tasks
from queuejob.flows.adapters import broker as broker_io
from queuejob.flows.adapters.ledger_storage import LedgerStorage
from queuejob.flows.adapters.ledger_store import RunLedger
from queuejob.flows.core import caveats
from queuejob.flows.core.backend import JobHandle
from queuejob.flows.core.errors import (
    CaveatViolation,
    InvalidInput,
    ItemsFailed,
    JobFailed,
    PermanentError,
    PodsCannotStart,
    QueueJobError,
    RunFailed,
)
from queuejob.flows.core.items import ItemSource
from queuejob.flows.core.job_status import JobPhase, JobState
from queuejob.flows.core.ledger import LedgerSummary
from queuejob.flows.core.manifest import (
    ITEMS_ANNOTATION,
    JobSpec,
    build_job,
    build_secret,
    job_name,
    run_labels,
    secret_name,
)
from queuejob.flows.core.outcome import Tolerance, decide
from queuejob.flows.core.pod_failure import POLICY_REASON, explain_policy_failure
from queuejob.flows.core.pods import StartLimits
from queuejob.flows.monitor import DEFAULT_MAX_UNACKED, Progress, RunMonitor
from queuejob.flows.params import (
    CleanupParams,
    JobParams,
    MaxFailedItems,
    QueueParams,
    default_items,
)
from queuejob.flows.storage import open_storage

# Fault injection for tests, on a flow run's first attempt only: "crash-after-create-job", or
# "crash-after-wait" (the Job is done and its records read, the ledger not yet saved).
FAULT_ENV = "QUEUEJOB_FAULT"
# How many outcome records the flow may hold unacknowledged at once (the results consumer's
# prefetch); records are saved in batches of half of it.
MAX_UNACKED_ENV = "QUEUEJOB_MAX_UNACKED_RECORDS"


@dataclass
class Run:
    """One run as the stages pass it on: what `prepare` resolved, and what the later stages add
    (the confirmed count, the completions, the findings and the results consumer's figures)."""

    run_id: str
    params: dict[str, Any]  # the flow's parameters as JSON, saved with the report
    items: ItemSource
    n_items: int
    mode: Literal["coarse", "fine"]
    backend: Literal["kubernetes", "local"]
    cfg: broker_io.BrokerConfig
    qs: broker_io.QueueSettings
    choice: tasks.BackendChoice
    spec: JobSpec
    name: str  # the Job's name
    storage: LedgerStorage
    storage_location: str
    started: float
    tolerance: Tolerance = field(default_factory=Tolerance)
    caveat_policy: Literal["warn", "fail"] = "warn"
    findings: list[caveats.Finding] = field(default_factory=list)
    # Filled in place by `wait_for_job`: the unacked bound and the most unacked records seen.
    stats: dict[str, int] = field(default_factory=dict)
    confirmed: int = 0
    completions: int | None = None


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
    start: StartLimits | None = None,
) -> JobState:
    """Wait for the Job to be decided while the results queue feeds the ledger.

    The ledger, findings and stats are the flow's own objects, filled in place, so a retry of
    this task keeps what an earlier attempt already took. Records are acknowledged only once the
    batch holding them is checkpointed in the ledger storage, so a flow run that dies and is
    retried (in a fresh pod too) loses none; the ledger takes each record once.

    When no pod of the Job can start within the ``start`` limits, the Job, its pods and its
    Secret are deleted at once (as a cancellation deletes them), before a late pod could take
    an item: the items stay in the queue, and the returned state says why
    (`JobState.start_failure`).
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
            state = backend.wait(
                handle, timeout_s=timeout_s, on_update=monitor.on_update, start=start
            )
            if state.start_failure is not None:
                logger.error(
                    "no pod of Job %s could start: %s (%s); deleting the Job, its pods and its "
                    "Secret: the items stay in queue %r",
                    handle.name,
                    state.start_failure.line(),
                    state.start_failure.why(),
                    qs.name,
                )
                backend.delete_run(namespace=handle.namespace, run_id=handle.run_id)
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
    max_failed_items: MaxFailedItems = 0,
    timeout_seconds: float = 3600.0,
    broker_wait_seconds: float = 60.0,
    cleanup: CleanupParams = CleanupParams(),  # noqa: B008
    ledger_storage: str | None = None,
) -> Any:
    """Process every item exactly once with a Job of pods taking items from a RabbitMQ queue.

    The run ends Failed when items did not succeed (failed, dead-lettered or left in the queue)
    beyond max_failed_items, when the Job failed, or on caveat findings under caveat_policy
    'fail'; Completed otherwise. Its result is the report (summary, outcome, findings, where the
    ledger is) either way; a Failed run raises it to a caller, as a `RunFailed` that reads as
    the report.

    Args:
        items: where the items come from (inline list, text or JSON Lines file, range).
        queue: the work queue's name, type, delivery limit and stale-message policy.
        job: the worker Job: template block, image, command, parallelism, completions, ...
        mode: coarse (one item per pod, the docs' pattern) or fine (pods loop until drained).
        backend: kubernetes, or local (pods as local processes, for a laptop or CI).
        broker_block: name of a RabbitMQBroker block (else QUEUEJOB_BROKER_URL is used).
        kubernetes_credentials_block: a prefect-kubernetes KubernetesCredentials block (else
            in-cluster config, then KUBECONFIG / ~/.kube/config).
        caveat_policy: what caveat findings do (completions against the items, stale
            messages, pods without work, items processed twice): warn reports them, fail fails
            the run on any warning or error among them. Items that did not succeed are not
            caveats: max_failed_items decides what they do.
        max_failed_items: how many items may fail, be dead-lettered or be left in the queue
            before the run fails: a number of items (default 0: any fails the run), or a
            percentage of the items as text, e.g. "5%".
        timeout_seconds: wall-clock limit for waiting on the Job.
        broker_wait_seconds: how long to wait for the broker to answer.
        cleanup: what to delete after success.
        ledger_storage: name of a LocalFileSystem or RemoteFileSystem block (any fsspec URL:
            s3://, gs://, az://, ...) where the ledger is kept, checkpointed as the run goes
            (else QUEUEJOB_LEDGER_DIR, default ~/.cache/queuejob/ledgers).
    """
    arguments = dict(locals())  # the parameters, and nothing else yet
    params = {k: _as_json(v) for k, v in arguments.items()}
    try:
        tolerance = _refused_if_raised(Tolerance.parse, max_failed_items)
        run = prepare(params, Inputs(**{f.name: arguments[f.name] for f in fields(Inputs)}))
        run.tolerance, run.caveat_policy = tolerance, caveat_policy
        fill(run, stale_policy=queue.stale_messages)
        secret, manifest = plan_job(run, job, caveat_policy)
        # The ledger: rebuilt from the storage's checkpoints (a retry goes on from them). It
        # learns the items at the start of the wait, while the pods already work; the wait
        # follows the Job's creation at once, so a stop (SIGTERM) once pods run lands where it
        # takes them down.
        ledger = RunLedger.open(run.storage, run.run_id, expected=run.confirmed)
        try:
            handle = launch(run, ledger, secret, manifest)
            state = watch(run, ledger, handle, timeout_seconds)
            result = report(run, ledger, handle, state, cleanup)
            run_report.create_artifacts(result, run.findings, ledger)
        finally:
            ledger.close()
        return conclude(run, state, result, cleanup)
    except Exception as exc:
        # Failed before it could report (bad input, the broker, the cluster, a timeout): the
        # run's end event still goes out, with the error. (A RunFailed with its report was
        # raised by `conclude`, after the run's events.)
        if not (isinstance(exc, RunFailed) and exc.report):
            events.emit_run_error(str(runtime_flow_run.id or ""), queue.name, exc)
        raise


def _refused_if_raised(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``; a `PermanentError` it raises is marked as refused (nothing was queued or
    created yet: the CLI exits 2)."""
    try:
        return fn(*args, **kwargs)
    except PermanentError as exc:
        exc.refused = True
        raise


def _as_json(value: Any) -> Any:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def _fault_point(name: str) -> None:
    if os.environ.get(FAULT_ENV) == name and runtime_flow_run.run_count <= 1:
        raise RuntimeError(f"fault injection: {name.replace('-', ' ')} (first attempt only)")


# --- the stages ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    """The flow's parameters that `prepare` checks and resolves."""

    items: ItemSource
    queue: QueueParams
    job: JobParams
    mode: Literal["coarse", "fine"]
    backend: Literal["kubernetes", "local"]
    broker_block: str | None
    kubernetes_credentials_block: str | None
    timeout_seconds: float
    broker_wait_seconds: float
    ledger_storage: str | None


def prepare(params: dict[str, Any], inputs: Inputs) -> Run:
    """Check everything that can be checked before anything happens, then wait for the broker
    and declare the queues."""
    started = time.monotonic()
    checked = _refused_if_raised(_check_inputs, inputs)
    run_id, spec, qs, cfg, choice, n_items, max_unacked, ledger_location, storage = checked
    # The broker: one that stays away past the deadline fails the run (exit 1), while refused
    # credentials are configuration refused before anything was queued (exit 2).
    try:
        tasks.wait_for_broker(cfg, inputs.broker_wait_seconds)
    except PermanentError as exc:
        exc.refused = True
        raise
    tasks.declare_queue(cfg, qs)
    return Run(
        run_id=run_id,
        params=params,
        items=inputs.items,
        n_items=n_items,
        mode=inputs.mode,
        backend=inputs.backend,
        cfg=cfg,
        qs=qs,
        choice=choice,
        spec=spec,
        name=job_name(spec.name_prefix, run_id),
        storage=storage,
        storage_location=ledger_location,
        started=started,
        stats={"max_unacked_allowed": max_unacked, "max_unacked_seen": 0},
    )


def _check_inputs(inputs: Inputs) -> tuple[Any, ...]:
    """What `prepare` checks before it touches the broker: it has no side effects."""
    logger = get_run_logger()
    items, queue = inputs.items, inputs.queue
    if inputs.timeout_seconds <= 0:
        raise InvalidInput(f"timeout_seconds must be positive (got {inputs.timeout_seconds})")
    run_id = _run_id()
    spec = tasks.resolve_job_spec(inputs.job, inputs.mode, inputs.backend)
    qs = broker_io.QueueSettings(
        name=queue.name, queue_type=queue.type, delivery_limit=queue.delivery_limit
    )
    # Every broker call of the run rides out a lost node (or connection) as long as the run
    # waits for the broker at its start.
    cfg = tasks.resolve_broker(inputs.broker_block).with_options(
        reconnect_s=inputs.broker_wait_seconds
    )
    choice = tasks.BackendChoice(
        kind=inputs.backend, credentials_block=inputs.kubernetes_credentials_block
    )
    n_items = tasks.validate_items(items)
    logger.info("%d items from %s; broker %s", n_items, items.describe(), cfg.redacted())
    max_unacked = _max_unacked()
    # A namespace that does not exist would only show when the Job is created, after the queue
    # was filled: check it while nothing has happened yet.
    tasks.check_namespace(choice, spec.namespace)
    # Where the ledger goes, checked for writing before anything happens (fail early rather
    # than after the Job has done the work). The probe file it writes is removed again.
    ledger_location = tasks.check_ledger_storage(inputs.ledger_storage, run_id)
    storage = open_storage(inputs.ledger_storage)
    logger.info("ledger storage: %s", ledger_location)
    return run_id, spec, qs, cfg, choice, n_items, max_unacked, ledger_location, storage


def fill(run: Run, *, stale_policy: Any) -> None:
    """Fill the work queue and set ``run.confirmed``. A retry after the Job was created finds
    the count on the Job; a retry after the fill finds the fill's marker (a no-op fill)."""
    logger = get_run_logger()
    cfg, qs = run.cfg, run.qs
    existing = tasks.find_job(run.choice, run.spec.namespace, run.name, run.run_id)
    if existing is not None:
        run.confirmed = int((existing.annotations or {}).get(ITEMS_ANNOTATION, run.n_items))
        logger.info("re-attaching to Job %s created by an earlier attempt", run.name)
        return
    marker, depths = tasks.inspect_queue(cfg, qs)
    if marker is None or marker.run_id != run.run_id:
        work = depths["work"]
        if run.items.kind == "ledger" and work.ready and not work.consumers and not work.unacked:
            # A rerun: the earlier run's own leftovers of these items go, the policy is for
            # the rest (`take_rerun_leftovers`, `queuejob.flows.core.rerun`).
            run.findings.extend(_take_rerun_leftovers(run, stale_policy))
        else:
            stale = caveats.check_stale(
                queue=qs.name,
                ready=work.ready,
                unacked=work.unacked or 0,
                consumers=work.consumers,
                policy=stale_policy,
            )
            if stale is not None:
                purged = tasks.purge_stale(cfg, qs)
                logger.warning("%s (%d purged)", stale.line(), purged)
                run.findings.append(stale)
    result = tasks.fill_queue(cfg, qs, run.items, run.run_id)
    run.confirmed = result.confirmed
    logger.info(
        "queue %r: %d items confirmed%s",
        qs.name,
        run.confirmed,
        " (filled by an earlier attempt)" if result.skipped else "",
    )


def _take_rerun_leftovers(run: Run, stale_policy: Any) -> list[caveats.Finding]:
    """Take the earlier run's messages of this rerun's items out of the work queue (they are
    queued again from its ledger by the fill); apply the stale policy to any other message."""
    from queuejob.flows.core.rerun import check_rerun_leftovers

    logger = get_run_logger()
    earlier = str(run.items.run_id)
    scan = tasks.take_rerun_leftovers(run.cfg, run.qs, run.items, stale_policy == "purge")
    if scan.consumers:  # pods came meanwhile: the plain rule says what that means
        caveats.check_stale(
            queue=run.qs.name, ready=scan.ready, unacked=0, consumers=scan.consumers,
            policy=stale_policy,
        )  # fmt: skip
    stale = check_rerun_leftovers(
        queue=run.qs.name,
        earlier_run=earlier,
        taken=scan.taken,
        others=scan.others,
        exhaustive=scan.exhaustive,
        policy=stale_policy,
    )
    if scan.taken:
        logger.info(
            "queue %r: took out %d message(s) run %s left there; their items are queued again "
            "from its ledger",
            run.qs.name,
            scan.taken,
            earlier,
        )
    if stale is None:
        return []
    logger.warning(stale.line())
    return [stale]


def plan_job(
    run: Run, job: JobParams, caveat_policy: Literal["warn", "fail"]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Size the Job from the confirmed count and check the caveats before it exists; return its
    Secret and manifest. Under the fail policy a finding stops the run here, with nothing on
    the cluster to clean up."""
    logger = get_run_logger()
    spec, qs = run.spec, run.qs
    run.completions = caveats.plan_completions(
        requested=job.completions, confirmed=run.confirmed, mode=run.mode
    )
    before = caveats.check_completions(
        queue=qs.name,
        requested=job.completions,
        confirmed=run.confirmed,
        mode=run.mode,
        idle_timeout_s=spec.idle_timeout_seconds,
    )
    for finding in before:
        logger.warning(finding.line())
    run.findings.extend(before)
    caveats.enforce(run.findings, caveat_policy)
    secret = build_secret(
        namespace=spec.namespace,
        name=secret_name(run.name),
        run_id=run.run_id,
        broker_url=run.cfg.url,
    )
    # The Job's failure fields only where the API server keeps them (an older one drops them).
    features = tasks.server_features(run.choice)
    note = features.omission_note()
    if note:
        logger.warning(note)
    manifest = build_job(
        spec,
        run_id=run.run_id,
        queue=qs.name,
        completions=run.completions,
        confirmed_items=run.confirmed,
        delivery_limit=qs.delivery_limit if qs.queue_type == "classic" else None,
        features=features,
    )
    return secret, manifest


def launch(
    run: Run, ledger: RunLedger, secret: dict[str, Any], manifest: dict[str, Any]
) -> JobHandle:
    """Create the Job and its Secret, or adopt the ones an earlier attempt created."""
    logger = get_run_logger()
    if ledger.records:
        logger.info(
            "ledger: %d outcome records from %d checkpoints of an earlier attempt",
            ledger.records,
            ledger.segments,
        )
    handle = tasks.create_job(run.choice, secret, manifest, run.run_id)
    logger.info(
        "%s Job %s/%s", "adopted" if handle.adopted else "created", run.spec.namespace, run.name
    )
    _fault_point("crash-after-create-job")
    return handle


def watch(run: Run, ledger: RunLedger, handle: JobHandle, timeout_seconds: float) -> JobState:
    """Wait for the Job to be decided, feeding the ledger (see `wait_for_job`)."""
    state = wait_for_job(  # type: ignore[call-overload]
        run.choice,
        handle,
        run.cfg,
        run.qs,
        run.items,
        # quote(): hand the task these very objects (filled in place), not copies.
        quote(ledger),
        run.mode,
        run.spec.idle_timeout_seconds,
        timeout_seconds,
        quote(run.findings),
        quote(run.stats),
        StartLimits(grace_s=run.spec.start_grace_seconds, timeout_s=run.spec.start_timeout_seconds),
    )
    _fault_point("crash-after-wait")
    return cast(JobState, state)


def report(
    run: Run, ledger: RunLedger, handle: JobHandle, state: JobState, cleanup: CleanupParams
) -> dict[str, Any]:
    """Check the caveats after the run, save the ledger, delete the queues if asked (once the
    ledger is saved), fit the findings to the run, decide its outcome, and save and log the
    report."""
    summary, pod_failures = _check_after(run, ledger, handle, state)
    ledger_path = run.storage.write_rows(run.run_id, ledger.rows())
    # Queues go once the ledger is saved (the outcome records have served), before the report,
    # so that it says which were kept: a work or dead-letter queue still holding items stays.
    kept: dict[str, int] = {}
    if _work_done(state) and cleanup.delete_queues:
        kept = tasks.delete_queues(run.cfg, run.qs)
        run.findings.extend(
            caveats.check_kept_queues(
                queue=run.qs.name, dead_queue=run.qs.dead_name, kept=kept, run_id=run.run_id
            )
        )
    # One finding per cause, advice that fits the settings; in place (the wait's list).
    run.findings[:] = caveats.fit(
        run.findings,
        summary=summary,
        mode=run.mode,
        completions=run.completions,
        confirmed=run.confirmed,
    )
    failing = caveats.failing(run.findings) if run.caveat_policy == "fail" else []
    outcome = decide(
        summary=summary,
        job_phase=state.phase.value,
        job_reason=state.reason,
        job_message=_job_failure(state, pod_failures),
        tolerance=run.tolerance,
        run_id=run.run_id,
        caveat_failures=[f.line() for f in failing],
        start_failure=_start_failure(state),
    )
    result = _report_dict(run, ledger, state, summary, pod_failures, ledger_path, kept)
    result["outcome"] = outcome.as_dict()
    run.storage.write_report(run.run_id, {**result, "params": run.params})
    if result["rerun_of"]:
        _link_rerun(run, result["rerun_of"])
    run_report.log_summary(get_run_logger(), summary, run.findings, state, outcome.headline)
    return result


def _work_done(state: JobState) -> bool:
    """The Job succeeded, or its work is done and only pods that never started hold it open:
    what the cleanup after success applies to."""
    return state.phase is JobPhase.SUCCEEDED or state.held_open


def _start_failure(state: JobState) -> str | None:
    """Why no pod of the Job could start, in one line (None when they could)."""
    failure = state.start_failure
    if failure is None:
        return None
    return f"{failure.line()} ({failure.why()})"


def _job_failure(state: JobState, pod_failures: list[dict[str, Any]]) -> str | None:
    """Why a failed Job failed, in one line: after a FailJob rule, the pod, what its exit means
    and the end of its log."""
    if state.phase is not JobPhase.FAILED:
        return None
    if state.reason == POLICY_REASON:
        return explain_policy_failure(state.message, pod_failures)
    return state.message


def _link_rerun(run: Run, earlier: str) -> None:
    """Leave a link to this rerun in the earlier run's directory (`queuejob results
    --follow-reruns` reads it); a failure costs only that, so it is logged, not raised."""
    from queuejob.flows.results import record_rerun

    try:
        record_rerun(
            earlier_run_id=earlier,
            earlier_storage=run.items.ledger_storage,
            rerun_id=run.run_id,
            ledger_storage=run.params.get("ledger_storage"),
        )
    except QueueJobError as exc:
        get_run_logger().warning("could not link this rerun to run %s: %s", earlier, exc)


def conclude(
    run: Run, state: JobState, result: dict[str, Any], cleanup: CleanupParams
) -> State[Any] | dict[str, Any]:
    """After a Job that succeeded, delete what the caller asked to; emit the run's events; end
    the flow run Completed or Failed, as the report's outcome says, with the report as its
    result. The report is saved and shown by now either way."""
    if _work_done(state):
        if cleanup.delete_job:
            tasks.delete_run_objects(run.choice, run.spec.namespace, run.run_id)
        if not cleanup.delete_queues:  # the ledger is saved: the outcome records have served
            tasks.purge_results(run.cfg, run.qs)
    events.emit_report(result)
    outcome = result["outcome"]
    reasons = outcome["reasons"]
    error_type: type[RunFailed] = (
        PodsCannotStart
        if "pods" in reasons
        else JobFailed
        if "job" in reasons
        else ItemsFailed
        if "items" in reasons
        else CaveatViolation
    )
    if runtime_flow_run.run_count > 1:
        # A retried flow run. Prefect 3.9's engine hands a caller of the flow the exception of
        # an earlier attempt when a later one returns a State (it keeps the attempt's error),
        # so a retry returns the report or raises: the same result, Prefect's own message.
        if outcome["state"] == "Completed":
            return result
        raise error_type(outcome["message"], result)
    if outcome["state"] == "Completed":
        return Completed(message=outcome["message"], data=result)
    return Failed(message=outcome["message"], data=error_type(outcome["message"], result))


def _check_after(
    run: Run, ledger: RunLedger, handle: JobHandle, state: JobState
) -> tuple[LedgerSummary, list[dict[str, Any]]]:
    """What is left, what died, what the ledger says: the findings after the run (added to
    ``run.findings``), the ledger's summary and the failed pods."""
    cfg, qs = run.cfg, run.qs
    depths = broker_io.queue_depths(cfg, qs)
    dead_ids = broker_io.dead_letter_ids(cfg, qs, run_id=run.run_id)
    ledger.mark_dead_lettered(dead_ids)
    summary = ledger.summary()
    pod_failures: list[dict[str, Any]] = []
    run.findings.extend(
        caveats.check_start(state, job=run.name, namespace=run.spec.namespace, run_id=run.run_id)
    )
    failed = caveats.check_job_failed(state, job=run.name)
    if failed is not None:
        run.findings.append(failed)
        pod_failures = [
            {"pod": p.pod, "exit_code": p.exit_code, "reason": p.reason, "log_tail": p.log_tail}
            for p in tasks.make_backend(run.choice).failure_details(handle)
        ]
        run_report.log_pod_failures(get_run_logger(), pod_failures)
    run.findings.extend(
        caveats.check_after(
            queue=qs.name,
            confirmed=run.confirmed,
            state=state,
            residual_ready=depths["work"].ready,
            residual_unacked=depths["work"].unacked or 0,
            dead_letters=len(dead_ids),
            summary=summary,
            delivery_limit=qs.delivery_limit if qs.queue_type == "quorum" else None,
            unreported_attempts=ledger.unreported_attempts(),
            run_id=run.run_id,
        )
    )
    return summary, pod_failures


def _report_dict(
    run: Run,
    ledger: RunLedger,
    state: JobState,
    summary: LedgerSummary,
    pod_failures: list[dict[str, Any]],
    ledger_path: str,
    kept: dict[str, int],
) -> dict[str, Any]:
    return {
        "run_id": run.run_id,
        "job": run.name,
        "namespace": run.spec.namespace,
        "backend": run.backend,
        "queue": run.qs.name,
        "mode": run.mode,
        "items": run.n_items,
        "confirmed": run.confirmed,
        "completions": run.completions,
        "job_phase": state.phase.value,
        "job_reason": state.reason,
        "summary": summary.as_dict(),
        "findings": [f.as_dict() for f in run.findings],
        "pod_failures": pod_failures,
        # Pods Kubernetes stopped (evicted, preempted, lost): whether each counted, and why.
        "disruptions": [d.as_dict() for d in state.disruptions],
        # No pod could start (the run deleted the Job), or pods stuck while others ran.
        "start_failure": state.start_failure.as_dict() if state.start_failure else None,
        "stuck_pods": [p.as_dict() for p in state.stuck],
        "ledger": run.storage_location,
        "ledger_path": ledger_path,
        "ledger_records": ledger.records,
        "max_unacked_records": run.stats.get("max_unacked_seen", 0),
        "kept_queues": kept,
        "wall_time_s": round(time.monotonic() - run.started, 2),
        "labels": run_labels(run.run_id),
        # The run whose ledger this one's items came from (queuejob rerun), else None.
        "rerun_of": run_report.rerun_of(run.params),
        # Where the items' results are: the ledger's `result` column.
        "results": run_report.results_info(
            run.run_id, ledger_path, ledger.result_count(), run.params.get("ledger_storage")
        ),
    }
