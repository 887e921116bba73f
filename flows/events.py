"""The run's Prefect events: what an Automation acts on (notify, run a deployment, ...).

At its end a run emits, after its ledger, report and artifacts are saved:

* ``queuejob.finding.<code>`` for each finding of its report (``queuejob.finding.dead-letters``,
  ``queuejob.finding.items-left-in-queue``, ...): the payload is the finding (code, kind,
  severity, stage, message, advice, numbers);
* then ``queuejob.run.completed`` or ``queuejob.run.failed``: the payload has the outcome
  (headline, message, items that did not succeed by fate, what was tolerated, the rerun command),
  the counts (``summary``), the Job's name, phase and reason, the finding codes and the ledger's
  location.

A run that fails before it can report (bad input, the broker or the cluster refusing, a
timeout) emits ``queuejob.run.failed`` with ``error`` and ``message`` in the payload.

Every event's resource is the run: ``prefect.resource.id`` is ``queuejob.run.<run id>``, with the
labels ``queuejob.run-id``, ``queuejob.queue`` (and, once known, ``queuejob.job``,
``queuejob.namespace``, ``queuejob.backend``). Prefect relates each event to the flow run, its
flow, deployment, work pool and tags. An Automation matches on the event's name and these labels,
e.g. ``expect: queuejob.finding.dead-letters`` and ``match: {"queuejob.queue": "nightly"}``.

Emitting never fails the run: an event that cannot be sent is logged and dropped.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect.events import emit_event

RUN_COMPLETED = "queuejob.run.completed"
RUN_FAILED = "queuejob.run.failed"
FINDING_PREFIX = "queuejob.finding."
RESOURCE_PREFIX = "queuejob.run."
MESSAGE_CAP = 4000  # characters of an error message carried in an event

logger = logging.getLogger(__name__)


def run_resource(run_id: str, queue: str, **labels: str | None) -> dict[str, str]:
    """The resource of a run's events: its id, its queue and the given labels (``job``,
    ``namespace``, ``backend``), each as ``queuejob.<label>``."""
    resource = {
        "prefect.resource.id": f"{RESOURCE_PREFIX}{run_id}",
        "prefect.resource.name": f"queuejob run {run_id} (queue {queue})",
        "queuejob.run-id": run_id,
        "queuejob.queue": queue,
    }
    resource.update({f"queuejob.{k}": str(v) for k, v in labels.items() if v is not None})
    return resource


def emit_report(report: dict[str, Any]) -> list[Any]:
    """Emit a finished run's events: one per finding, then the run's end. Returns the events
    sent (None for one that could not be)."""
    resource = run_resource(
        report["run_id"],
        report["queue"],
        job=report.get("job"),
        namespace=report.get("namespace"),
        backend=report.get("backend"),
    )
    sent = [_emit(f"{FINDING_PREFIX}{f['code']}", resource, dict(f)) for f in report["findings"]]
    outcome = report.get("outcome") or {}
    completed = outcome.get("state") == "Completed"
    payload = {
        "outcome": outcome.get("state"),
        "headline": outcome.get("headline"),
        "message": outcome.get("message"),
        "not_succeeded": outcome.get("not_succeeded", {}),
        "tolerated": outcome.get("tolerated", 0),
        "max_failed_items": outcome.get("max_failed_items"),
        "rerun": outcome.get("rerun"),
        "summary": report.get("summary", {}),
        "job": {
            "name": report.get("job"),
            "phase": report.get("job_phase"),
            "reason": report.get("job_reason"),
        },
        "findings": [f["code"] for f in report["findings"]],
        "ledger": report.get("ledger"),
        "rerun_of": report.get("rerun_of"),
    }
    sent.append(_emit(RUN_COMPLETED if completed else RUN_FAILED, resource, payload))
    return sent


def emit_run_error(run_id: str, queue: str, error: BaseException) -> Any:
    """Emit ``queuejob.run.failed`` for a run that failed before it could report."""
    message = " ".join(str(error).split())[:MESSAGE_CAP]
    payload = {"outcome": "Failed", "error": type(error).__name__, "message": message}
    return _emit(RUN_FAILED, run_resource(run_id or "unknown", queue), payload)


def _emit(name: str, resource: dict[str, str], payload: dict[str, Any]) -> Any:
    try:
        return emit_event(event=name, resource=resource, payload=payload)
    except Exception as exc:  # an event is worth a log line, never the run
        logger.warning("could not emit the event %s: %s: %s", name, type(exc).__name__, exc)
        return None
