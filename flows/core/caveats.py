"""The caveats of the work-queue pattern, as rules over observations.

The Kubernetes docs' task "Coarse Parallel Processing Using a Work Queue" lists what goes wrong:
completions fewer than the items leaves work undone; more leaves pods blocked forever; a pod that
crashes after the work but before the ack makes the item run twice. Each rule here is a pure
function from numbers queuejob observed (confirmed items, queue depth, Job counts, the ledger) to
`Finding`s that carry a code, a severity, the numbers and advice a user can act on.

Two kinds of finding: the items' outcomes (items failed, dead-lettered, left in the queue or
unaccounted for, and the Job's failure), which decide the run with ``max_failed_items`` (see
`queuejob.flows.core.outcome`), and the caveats of the pattern (completions against the items,
stale messages, pods without work, work done twice), which ``caveat_policy`` governs. `fit`
makes the findings fit the run at its end: one finding per cause, advice that never asks for a
setting the run already has.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from queuejob.flows.core.errors import CaveatViolation, StaleMessages
from queuejob.flows.core.job_status import JobPhase, JobState, StartProblem
from queuejob.flows.core.ledger import LedgerSummary

Policy = Literal["warn", "fail"]


class Severity(enum.StrEnum):
    """How bad a finding is. Under the `fail` policy, warnings and errors fail the run."""

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class Code(enum.StrEnum):
    """Finding codes (stable: users filter and alert on them)."""

    STALE_MESSAGES = "stale-messages"
    STALE_PURGED = "stale-purged"
    COMPLETIONS_SHORT = "completions-fewer-than-items"
    COMPLETIONS_EXCESS = "completions-more-than-items"
    COMPLETIONS_IGNORED_FINE = "completions-set-in-fine-mode"
    QUEUE_DRAINED_PODS_WAITING = "queue-drained-pods-waiting"
    JOB_FAILED = "job-failed"
    ITEMS_LEFT = "items-left-in-queue"
    LEDGER_SHORT = "ledger-short"
    ITEMS_FAILED = "items-failed"
    DEAD_LETTERS = "dead-letters"
    AT_LEAST_ONCE = "processed-more-than-once"
    REDELIVERED_AFTER_LOST_ATTEMPT = "redelivered-after-lost-attempt"
    NO_WORK_PODS = "pods-found-no-work"
    QUEUE_KEPT = "queue-kept"
    PODS_DISRUPTED = "pods-disrupted"
    PODS_CANNOT_START = "pods-cannot-start"
    PODS_STUCK = "pods-stuck-pending"

    @property
    def kind(self) -> Literal["outcome", "caveat"]:
        """``outcome``: what became of the items (decides the run, with max_failed_items);
        ``caveat``: a caveat of the pattern (governed by caveat_policy)."""
        return "outcome" if self in OUTCOME_CODES else "caveat"


# The findings about the items' fates and the Job: `max_failed_items` decides what they do to
# the run, not `caveat_policy`.
OUTCOME_CODES = frozenset(
    {
        Code.ITEMS_LEFT,
        Code.ITEMS_FAILED,
        Code.DEAD_LETTERS,
        Code.LEDGER_SHORT,
        Code.JOB_FAILED,
        Code.PODS_CANNOT_START,
    }
)


@dataclass(frozen=True, slots=True)
class Finding:
    """One caveat observed: what, how bad, the numbers behind it and what to do."""

    code: Code
    severity: Severity
    message: str
    advice: str
    numbers: dict[str, int | float | str] = field(default_factory=dict)
    stage: Literal["before", "during", "after"] = "after"

    def line(self) -> str:
        """One line for logs and failure messages."""
        return f"[{self.severity.value}] {self.code.value}: {self.message} ({self.advice})"

    def as_dict(self) -> dict[str, object]:
        """Plain dict for the flow's return value and artifacts."""
        return {
            "code": self.code.value,
            "kind": self.code.kind,
            "severity": self.severity.value,
            "stage": self.stage,
            "message": self.message,
            "advice": self.advice,
            "numbers": dict(self.numbers),
        }


# --- before the Job --------------------------------------------------------------------------


def check_stale(
    *, queue: str, ready: int, unacked: int, consumers: int, policy: Literal["fail", "purge"]
) -> Finding | None:
    """Messages already in the work queue before this run filled it.

    With policy ``fail`` this raises `StaleMessages`; with ``purge`` it returns a finding that
    the caller purged them (the caller does the purge).
    """
    if ready + unacked == 0 and consumers == 0:
        return None
    numbers: dict[str, int | float | str] = {
        "ready": ready,
        "unacked": unacked,
        "consumers": consumers,
    }
    if consumers or unacked:
        raise StaleMessages(
            f"queue {queue!r} has {consumers} consumer(s) and {unacked} unacknowledged "
            "message(s): another run is still working on it; wait for it to end, or use "
            "another queue name"
        )
    if policy == "fail":
        raise StaleMessages(
            f"queue {queue!r} already holds {ready} message(s) this run did not put there; "
            "pods would process them as if they were this run's items. Purge them "
            "(stale_messages='purge'), or use another queue name"
        )
    return Finding(
        Code.STALE_PURGED,
        Severity.WARNING,
        f"queue {queue!r} held {ready} stale message(s) from an earlier run; they were purged",
        "find out which run left them: its items were never processed",
        numbers,
        stage="before",
    )


def plan_completions(
    *, requested: int | Literal["auto"], confirmed: int, mode: Literal["coarse", "fine"]
) -> int | None:
    """The Job's ``completions``: the confirmed count for ``auto`` in coarse mode, unset in
    fine mode (pods loop until the queue is drained), else the number asked for."""
    if mode == "fine":
        return None
    if requested == "auto":
        return confirmed
    return requested


def check_completions(
    *,
    queue: str,
    requested: int | Literal["auto"],
    confirmed: int,
    mode: Literal["coarse", "fine"],
    idle_timeout_s: float,
) -> list[Finding]:
    """Findings about ``completions`` versus the items confirmed in the queue."""
    if mode == "fine":
        if requested != "auto":
            return [
                Finding(
                    Code.COMPLETIONS_IGNORED_FINE,
                    Severity.INFO,
                    f"completions={requested} is ignored in fine mode: pods loop until queue "
                    f"{queue!r} is drained",
                    "leave completions=auto in fine mode",
                    {"completions": requested, "items": confirmed},
                    stage="before",
                )
            ]
        return []
    if requested == "auto" or requested == confirmed:
        return []
    numbers: dict[str, int | float | str] = {"completions": requested, "items": confirmed}
    if requested < confirmed:
        left = confirmed - requested
        numbers["items_left"] = left
        return [
            Finding(
                Code.COMPLETIONS_SHORT,
                Severity.ERROR,
                f"queue {queue!r} holds {confirmed} items but completions={requested}: "
                f"{left} item(s) will be left in the queue when the Job completes",
                "pass completions=auto, or use fine mode",
                numbers,
                stage="before",
            )
        ]
    idle = requested - confirmed
    numbers["pods_without_work"] = idle
    return [
        Finding(
            Code.COMPLETIONS_EXCESS,
            Severity.WARNING,
            f"queue {queue!r} holds {confirmed} items but completions={requested}: {idle} pod(s) "
            f"will find no work (queuejob's worker exits after {idle_timeout_s:g} s idle; the "
            "docs' amqp-consume would block forever)",
            "pass completions=auto",
            numbers,
            stage="before",
        )
    ]


# --- during the Job ----------------------------------------------------------------------------


def check_drained(
    *, queue: str, ready: int, unacked: int, state: JobState, idle_timeout_s: float
) -> Finding | None:
    """The queue is empty with nothing in flight while pods still run: they wait for work that
    never comes, and end after the idle timeout (the docs' amqp-consume would block forever).

    Information only: the waiting pods are the completion slots of a cause the report names
    after the Job (completions above the items, or items dead-lettered or failed, whose slots a
    non-indexed Job cannot give back); `fit` folds this finding into it.
    """
    if ready or unacked or state.phase.decided or state.counts.active == 0:
        return None
    return Finding(
        Code.QUEUE_DRAINED_PODS_WAITING,
        Severity.INFO,
        f"queue {queue!r} is drained and nothing is in flight, but {state.counts.active} pod(s) "
        f"are still running; they exit 'no work' after {idle_timeout_s:g} s idle",
        "nothing to do: the report after the Job names their cause",
        {"active": state.counts.active, "ready": ready, "unacked": unacked},
        stage="during",
    )


def check_job_failed(state: JobState, *, job: str) -> Finding | None:
    """The Job failed (back-off limit, deadline, ...)."""
    if state.phase is not JobPhase.FAILED:
        return None
    advice = {
        "BackoffLimitExceeded": "read the failed pods' logs below; fix the item or the command, "
        "or raise backoff_limit",
        "DeadlineExceeded": "raise active_deadline_seconds or parallelism, or split the batch",
        "PodFailurePolicy": "a pod failure that retrying cannot fix (the worker exits 2 on a "
        "configuration error: a --call that cannot be imported, refused broker credentials, a "
        "missing queue): read the named pod's log below and fix the configuration",
    }.get(state.reason or "", "read the Job's events and the failed pods' logs")
    return Finding(
        Code.JOB_FAILED,
        Severity.ERROR,
        f"Job {job!r} failed: {state.reason or 'unknown reason'}"
        + (f" ({state.message})" if state.message else ""),
        advice,
        {"failed_pods": state.counts.failed, "succeeded_pods": state.counts.succeeded},
        stage="during",
    )


# --- pods that never started -------------------------------------------------------------------

STUCK_PODS_SHOWN = 5


def _pods_text(problem: StartProblem) -> str:
    pods = problem.pods
    if not pods:
        return ""
    shown = ", ".join(pods[:STUCK_PODS_SHOWN])
    more = f" and {len(pods) - STUCK_PODS_SHOWN} more" if len(pods) > STUCK_PODS_SHOWN else ""
    return f"pod{'' if len(pods) == 1 else 's'} {shown}{more}"


def _start_advice(problem: StartProblem, *, job: str, namespace: str, rerun: str) -> str:
    """What to do about what kept the pods from starting, then the command that runs the
    items."""
    then = f"then `{rerun}` runs the items"
    reason = problem.reason
    if problem.kind == "container" and reason in (
        "InvalidImageName",
        "ErrImageNeverPull",
        "ErrImagePull",
        "ImagePullBackOff",
        "ImageInspectError",
    ):
        return (
            "check the image reference (registry, name, tag) and that the nodes may pull it "
            "(image_pull_secrets in the job template, the image pull policy); "
            f"then `{rerun} --image <an image that pulls>` runs the items with it"
        )
    if reason == "CreateContainerConfigError":
        return (
            "create the Secret or ConfigMap (or the key) that the message names, or fix the "
            f"template's env; {then}"
        )
    if problem.kind == "container":
        return (
            "the container runtime refused the container (the message says why): fix the "
            f"template's command, resources or security settings; {then}"
        )
    if problem.kind == "scheduling":
        return (
            "no node fits the pods (the scheduler's message says why): fix the template's "
            "node_selector, tolerations or resources, or add nodes; when a cluster autoscaler "
            f"adds nodes, give it a longer --start-timeout; {then}"
        )
    if problem.kind == "create":
        return (
            "the API server refused the Job's pods (the message says why: a ResourceQuota, a "
            "missing service account, a PodSecurity or admission policy): fix that, or lower "
            f"parallelism below the quota; {then}"
        )
    if problem.kind == "sandbox":
        return (
            "the node could not set up the pods' sandbox (network or container runtime): "
            f"`kubectl describe pods -l job-name={job} -n {namespace}` shows the node; {then}"
        )
    return (
        f"`kubectl describe job {job} -n {namespace}` and `kubectl get events -n {namespace}` "
        f"show why; if the pods only need longer (a large image), raise --start-timeout; {then}"
    )


def check_start(
    state: JobState, *, job: str, namespace: str, run_id: str | None = None
) -> list[Finding]:
    """Pods that never started: the wait gave up on them (``pods-cannot-start``: the run
    deleted the Job, its pods and its Secret, and kept the items in the queue), or they were
    stuck while other pods worked (``pods-stuck-pending``, a warning)."""
    rerun = f"queuejob rerun {run_id or '<RUN_ID>'} --fate left"
    failure = state.start_failure
    if failure is not None:
        details = [
            d for d in (_pods_text(failure), f"image {failure.image}" if failure.image else "") if d
        ]
        where = f" ({'; '.join(details)})" if details else ""
        numbers: dict[str, int | float | str] = {
            "reason": failure.reason,
            "pods": len(failure.pods),
            "waited_s": round(failure.seconds, 1),
        }
        if failure.image:
            numbers["image"] = failure.image
        if failure.rule:
            numbers["rule"] = failure.rule
        return [
            Finding(
                Code.PODS_CANNOT_START,
                Severity.ERROR,
                f"no pod of Job {job!r} could start: {failure.line()}{where}, "
                f"{failure.why()}; the run deleted the Job, its pods and its Secret",
                _start_advice(failure, job=job, namespace=namespace, rerun=rerun),
                numbers,
                stage="during",
            )
        ]
    if not state.stuck:
        return []
    parts = []
    for problem in state.stuck:
        where = _pods_text(problem)
        parts.append(
            f"{problem.line()}"
            + (f" ({where}, {problem.why()})" if where else f" ({problem.why()})")
        )
    n = sum(len(p.pods) for p in state.stuck)
    held = (
        "; they kept the Job from completing once its work was done, so the wait ended without them"
        if state.held_open
        else ""
    )
    return [
        Finding(
            Code.PODS_STUCK,
            Severity.WARNING,
            f"{n} pod(s) of Job {job!r} never started while others worked through the items: "
            + "; ".join(parts)
            + held,
            "the run went on with the pods that started; fix the cause so that every pod can "
            "start (a node that cannot pull the image, a quota below parallelism, no room for "
            "more pods)",
            {"pods": n},
            stage="during",
        )
    ]


# --- after the Job -----------------------------------------------------------------------------


def check_after(
    *,
    queue: str,
    confirmed: int,
    state: JobState,
    residual_ready: int,
    residual_unacked: int,
    dead_letters: int,
    summary: LedgerSummary,
    delivery_limit: int | None,
    unreported_attempts: int = 0,
    run_id: str | None = None,
) -> list[Finding]:
    """Findings once the Job has ended: items left, ledger gaps, failures, dead letters.

    ``unreported_attempts`` counts items that were delivered again after an attempt that left
    no outcome record (`Ledger.items_with_unreported_attempts`). ``run_id`` names this run in
    the advice for failed and dead-lettered items (the rerun command).
    """
    left = residual_ready + residual_unacked
    return [
        *_unfinished_items(
            queue=queue,
            state=state,
            residual_ready=residual_ready,
            residual_unacked=residual_unacked,
            dead_letters=dead_letters,
            summary=summary,
            delivery_limit=delivery_limit,
            run_id=run_id,
        ),
        *_ledger_gaps(
            confirmed=confirmed, left=left, summary=summary, unreported_attempts=unreported_attempts
        ),
        *check_disruptions(state),
    ]


DISRUPTIONS_SHOWN = 10


def check_disruptions(state: JobState) -> list[Finding]:
    """Pods Kubernetes disrupted (evicted, preempted, lost with their node), as the wait saw
    them: ignored by the Job's pod failure policy (they did not count toward backoffLimit), or
    counted on a server without one. Their items went back to the queue either way."""
    disrupted = state.disruptions
    if not disrupted:
        return []
    ignored = [d for d in disrupted if not d.counted]
    counted = len(disrupted) - len(ignored)
    shown = ", ".join(
        f"{d.pod} ({d.reason or 'DisruptionTarget'}{': ' + d.message if d.message else ''})"
        for d in disrupted[:DISRUPTIONS_SHOWN]
    )
    more = (
        f" and {len(disrupted) - DISRUPTIONS_SHOWN} more"
        if len(disrupted) > DISRUPTIONS_SHOWN
        else ""
    )
    if counted:
        how = (
            f"{counted} counted toward backoffLimit (the Job has no pod failure policy that "
            "ignores disruptions: Kubernetes before 1.26)"
        )
        if ignored:
            how = f"{len(ignored)} ignored by the Job's pod failure policy, " + how
    else:
        how = "ignored by the Job's pod failure policy: none counted toward backoffLimit"
    return [
        Finding(
            Code.PODS_DISRUPTED,
            Severity.INFO,
            f"{len(disrupted)} pod(s) stopped by Kubernetes, not by their work: {shown}{more}; "
            f"{how}",
            "nothing was lost: the items they held went back to the queue (the ledger shows "
            "each attempt); if this happens often, look at node drains, preemption and spot "
            "reclaims (a PodDisruptionBudget, a priority class)",
            {"disrupted": len(disrupted), "counted": counted},
        )
    ]


def _unfinished_items(
    *,
    queue: str,
    state: JobState,
    residual_ready: int,
    residual_unacked: int,
    dead_letters: int,
    summary: LedgerSummary,
    delivery_limit: int | None,
    run_id: str | None,
) -> list[Finding]:
    """Items left in the queue, dead-lettered, or failed on their last attempt."""
    rerun = f"queuejob rerun {run_id or '<RUN_ID>'}"
    out: list[Finding] = []
    # An item whose last attempt failed went back to the queue when its pod gave up (a failed
    # Job): the queue's messages beyond the failed items are the ones never taken.
    never_taken = max(0, residual_ready + residual_unacked - summary.failed)
    if never_taken:
        held = (
            f"{never_taken} item(s) never processed ({residual_ready} ready, "
            f"{residual_unacked} unacknowledged)"
        )
        if state.phase is JobPhase.SUCCEEDED:
            message = f"the Job completed but queue {queue!r} still holds {held}"
        elif state.phase is JobPhase.FAILED:
            message = f"the Job failed before queue {queue!r} was drained: it still holds {held}"
        else:
            message = f"the Job ended but queue {queue!r} still holds {held}"
        out.append(
            Finding(
                Code.ITEMS_LEFT,
                Severity.ERROR,
                message,
                f"`{rerun} --fate left` runs them as a new run",
                {"items": never_taken, "ready": residual_ready, "unacked": residual_unacked},
            )
        )
    if dead_letters:
        limit = f" after {delivery_limit} redeliveries" if delivery_limit else ""
        out.append(
            Finding(
                Code.DEAD_LETTERS,
                Severity.ERROR,
                f"{dead_letters} item(s) were dead-lettered{limit} into {queue + '.dead'!r}",
                f"the pods' stderr tails are in the ledger (`queuejob dead-letters {queue}` lists "
                f"them); fix the cause, then `{rerun} --fate dead_lettered` runs them again as a "
                f"new run, or `queuejob dead-letters {queue} --requeue` puts them back in the "
                "queue",
                {"dead_lettered": dead_letters},
            )
        )
    if summary.failed:
        out.append(
            Finding(
                Code.ITEMS_FAILED,
                Severity.ERROR,
                f"{summary.failed} item(s) failed on their last attempt",
                "see the ledger's error tails for each; fix the cause, then "
                f"`{rerun} --fate failed` runs them again (`{rerun}` takes the failed, "
                "dead-lettered and left items together)",
                {"failed": summary.failed},
            )
        )
    return out


def _ledger_gaps(
    *, confirmed: int, left: int, summary: LedgerSummary, unreported_attempts: int
) -> list[Finding]:
    """What the ledger says beyond the items' fates: records missing, work done twice, attempts
    that left no record, pods that found no work."""
    out: list[Finding] = []
    # An item whose last attempt failed went back to the queue: if it is still there it is
    # counted in `left` too, so count failed items only beyond what the queue holds.
    reported = summary.succeeded + summary.failed + summary.dead_lettered
    missing = confirmed - summary.succeeded - summary.dead_lettered - max(left, summary.failed)
    if missing > 0:
        out.append(
            Finding(
                Code.LEDGER_SHORT,
                Severity.WARNING,
                f"{missing} of {confirmed} item(s) have no outcome record and are not in the queue",
                "a pod may have died after taking an item but before reporting; check the pods' "
                "logs, and make sure the worker publishes outcome records",
                {"items": confirmed, "reported": reported, "missing": missing},
            )
        )
    if summary.processed_more_than_once:
        out.append(
            Finding(
                Code.AT_LEAST_ONCE,
                Severity.WARNING,
                f"{summary.processed_more_than_once} item(s) were processed successfully more "
                "than once: a pod ended after doing the work but before its ack reached the broker",
                "delivery is at-least-once: make the work idempotent (write results under the "
                "item id, or check before doing)",
                {"processed_more_than_once": summary.processed_more_than_once},
            )
        )
    if unreported_attempts:
        out.append(
            Finding(
                Code.REDELIVERED_AFTER_LOST_ATTEMPT,
                Severity.WARNING,
                f"{unreported_attempts} item(s) were delivered again after an attempt that left "
                "no outcome record: its pod died holding the item, perhaps after doing the work "
                "but before its ack reached the broker, so that work may have run twice",
                "delivery is at-least-once: make the work idempotent (write results under the "
                "item id, or check before doing), and look for killed or evicted pods",
                {"items": unreported_attempts},
            )
        )
    if summary.no_work_pods:
        out.append(
            Finding(
                Code.NO_WORK_PODS,
                Severity.INFO,
                f"{summary.no_work_pods} pod(s) found no work and exited after the idle timeout",
                "nothing was lost: a pod that starts after the queue is drained exits after "
                "the idle timeout",
                {"no_work_pods": summary.no_work_pods},
            )
        )
    return out


def failing(findings: Iterable[Finding]) -> list[Finding]:
    """The findings that fail a run under the `fail` policy: caveats that are warnings or
    errors. The items' outcomes are not among them: `max_failed_items` decides those."""
    return [f for f in findings if f.severity is not Severity.INFO and f.code.kind == "caveat"]


def enforce(findings: Sequence[Finding], policy: Policy) -> None:
    """Raise `CaveatViolation` listing the findings when the policy is `fail`."""
    bad = failing(findings)
    if policy == "fail" and bad:
        lines = "\n".join(f"  - {f.line()}" for f in bad)
        raise CaveatViolation(
            f"{len(bad)} caveat finding(s) with policy 'fail':\n{lines}\n"
            "Fix them, or run with caveat_policy='warn' to report without failing."
        )


# --- at the end: one finding per cause ----------------------------------------------------------


def fit(
    findings: Sequence[Finding],
    *,
    summary: LedgerSummary,
    mode: Literal["coarse", "fine"],
    completions: int | None,
    confirmed: int,
) -> list[Finding]:
    """The run's findings made to fit it, once the Job has ended: one finding per cause.

    - Pods that found no work are named inside their cause: completions above the items
      (``completions-more-than-items``), or the completion slots of dead-lettered or failed
      items, which a non-indexed Job cannot give back (``dead-letters``, ``items-failed``).
      What no cause explains stays as ``pods-found-no-work`` (information). The live
      ``queue-drained-pods-waiting`` was about those same pods, so it goes once they are counted.
    - Items left in the queue by completions below the items: ``items-left-in-queue`` names the
      completions; ``completions-fewer-than-items`` (the same cause, seen before the Job) goes.
    - A queue kept by the cleanup because it holds those items is said inside the finding about
      them (``items-left-in-queue``, ``items-failed``, ``dead-letters``).
    - Items left because no pod could start: ``pods-cannot-start`` says how many stay in the
      queue and names the rerun; ``items-left-in-queue`` (the same cause) goes.

    ``completions`` is the Job's (None in fine mode), ``confirmed`` the items queued.
    """
    by_code: dict[Code, Finding] = {}
    for f in findings:
        by_code.setdefault(f.code, f)
    changed: dict[Code, Finding] = {}
    dropped: set[Code] = set()

    def current(code: Code) -> Finding | None:
        return changed.get(code, by_code.get(code))

    def extend(code: Code, text: str, **numbers: int | float | str) -> None:
        f = current(code)
        assert f is not None
        changed[code] = replace(f, message=f"{f.message}; {text}", numbers={**f.numbers, **numbers})

    # Pods that found no work, to their causes.
    rest = summary.no_work_pods
    if rest and mode == "coarse":
        excess = max(0, (completions or confirmed) - confirmed)
        if Code.COMPLETIONS_EXCESS in by_code and excess:
            n = min(rest, excess)
            rest -= n
            extend(
                Code.COMPLETIONS_EXCESS,
                f"{n} pod(s) found no work and exited after the idle timeout",
                no_work_pods=n,
            )
        for code, count, what in (
            (Code.DEAD_LETTERS, summary.dead_lettered, "dead-lettered"),
            (Code.ITEMS_FAILED, summary.failed, "failed"),
        ):
            if rest and count and code in by_code:
                n = min(rest, count)
                rest -= n
                extend(
                    code,
                    f"{n} pod(s) found no work: the completion slot(s) of the {what} item(s), "
                    "which a non-indexed Job cannot give back",
                    no_work_pods=n,
                )
    if Code.NO_WORK_PODS in by_code:
        if not rest:
            dropped.add(Code.NO_WORK_PODS)
        else:
            changed[Code.NO_WORK_PODS] = _no_work_pods(rest, mode)
    if Code.QUEUE_DRAINED_PODS_WAITING in by_code and summary.no_work_pods:
        dropped.add(Code.QUEUE_DRAINED_PODS_WAITING)

    # Items left by completions below the items: one cause.
    short = by_code.get(Code.COMPLETIONS_SHORT)
    if short is not None and Code.ITEMS_LEFT in by_code:
        extend(
            Code.ITEMS_LEFT,
            f"completions={short.numbers.get('completions')} for "
            f"{short.numbers.get('items')} items left them, as the check before the Job said",
            completions=short.numbers.get("completions", 0),
        )
        left = current(Code.ITEMS_LEFT)
        assert left is not None
        changed[Code.ITEMS_LEFT] = replace(
            left, advice=f"{left.advice}; leave completions=auto to size the Job from the items"
        )
        dropped.add(Code.COMPLETIONS_SHORT)

    # Items left because no pod could start: one cause.
    if Code.PODS_CANNOT_START in by_code and Code.ITEMS_LEFT in by_code:
        kept_items = by_code[Code.ITEMS_LEFT].numbers.get("items", 0)
        extend(
            Code.PODS_CANNOT_START,
            f"{kept_items} item(s) stay in the work queue for a rerun",
            items_left=kept_items,
        )
        dropped.add(Code.ITEMS_LEFT)

    # Kept queues, inside the finding about what they hold.
    out: list[Finding] = []
    for f in findings:
        if f.code is Code.QUEUE_KEPT:
            home = _kept_home(f, by_code)
            if home is not None:
                extend(
                    home,
                    f"queue {f.numbers.get('queue')!r} is kept: it holds "
                    f"{f.numbers.get('messages')} message(s) (cleanup deletes no queue that "
                    "holds items)",
                    queue_kept=f.numbers.get("messages", 0),
                )
                continue
        if f.code in dropped:
            continue
        out.append(f)
    return [changed.get(f.code, f) if by_code.get(f.code) is f else f for f in out]


def _kept_home(kept: Finding, by_code: Mapping[Code, Finding]) -> Code | None:
    """The finding about what a kept queue holds, if the run has one."""
    name = str(kept.numbers.get("queue", ""))
    homes = (Code.DEAD_LETTERS,) if name.endswith(".dead") else (Code.ITEMS_LEFT, Code.ITEMS_FAILED)
    return next((code for code in homes if code in by_code), None)


def _no_work_pods(n: int, mode: Literal["coarse", "fine"]) -> Finding:
    if mode == "fine":
        return Finding(
            Code.NO_WORK_PODS,
            Severity.INFO,
            f"{n} pod(s) found no work and exited after the idle timeout: in fine mode a pod that "
            "starts after the queue is drained finds nothing to take",
            "nothing was lost; lower parallelism if many pods start for nothing",
            {"no_work_pods": n},
        )
    return Finding(
        Code.NO_WORK_PODS,
        Severity.INFO,
        f"{n} pod(s) found no work and exited after the idle timeout: a pod that ended without "
        "counting as a completion (killed, evicted, or failed after its item was done) left its "
        "completion to a later pod, which found the queue empty",
        "nothing was lost; if it recurs, look for killed or evicted pods in the Job's events",
        {"no_work_pods": n},
    )


# --- cleanup ---------------------------------------------------------------------------------


def check_kept_queues(
    *, queue: str, dead_queue: str, kept: Mapping[str, int], run_id: str | None = None
) -> list[Finding]:
    """Queues the cleanup kept because they still held messages (``kept``: name -> count).

    Deleting them would destroy items this run did not account for as done: the leftovers of too
    few completions, or dead letters. The problem itself is reported by its own finding
    (items left, dead letters), into which `fit` folds this one; alone, it says where the
    messages are and that they were kept.
    """
    rerun = f"queuejob rerun {run_id or '<RUN_ID>'}"
    advice = {
        queue: f"its messages were never processed: `{rerun}` runs this run's items again, or "
        "delete the queue by hand once you no longer need them",
        dead_queue: "inspect or requeue the dead letters, then delete the queue by hand",
    }
    return [
        Finding(
            Code.QUEUE_KEPT,
            Severity.INFO,
            f"kept queue {name!r}: it holds {count} item(s)",
            advice.get(name, "delete the queue by hand once it is no longer needed"),
            {"queue": name, "messages": count},
        )
        for name, count in kept.items()
    ]
