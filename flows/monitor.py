"""Watching a running Job: outcome records into the ledger, live caveats, progress.

The backend's `wait` calls `RunMonitor.on_update` on every Job change and at least once a tick;
each call drains the results queue into the ledger in batches (one task for the whole run,
however many items), reads the work queue's depth, checks the live caveat (queue drained while
pods still wait) and reports progress to listeners (the Prefect progress artifact, the CLI's
progress bar).

A broker that goes away while the pods run (a restart, a failover) does not end the wait: the Job
goes on without the flow, outcome records wait in the durable results queue, and the monitor
picks up where it left off once the broker answers again. The Job's own conditions and the run's
deadline still bound the wait.

Records are taken in batches of at most half of ``max_unacked`` (the consumer's prefetch, so the
broker never has more than that many unacknowledged), each saved by the ledger (a checkpoint in
the ledger storage, then the local store) before it is acknowledged: the broker keeps sending
the next batch while one is being saved. Records carry the items' results, so a batch also
ends at `BATCH_BYTES` of records, and no more than that is read from the connection ahead of
it: the flow's memory stays bounded whatever the results' sizes (the rest of the window waits
in the broker and the socket).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from queuejob.flows.adapters import broker as broker_io
from queuejob.flows.adapters.ledger_store import RunLedger
from queuejob.flows.core import caveats
from queuejob.flows.core.errors import BrokerUnavailable, LedgerStorageError
from queuejob.flows.core.job_status import JobState, StartProblem
from queuejob.flows.core.pods import PULL_REASONS

DEFAULT_MAX_UNACKED = 10_000
# One on_update keeps taking full batches for at most this long, so a burst of records is
# absorbed at the store's pace while the Job's events and the broker's depth are still read.
DRAIN_SLICE_S = 0.8
# The most record bytes one batch holds (records with results up to the run's limit each; a
# batch of small records ends at its count first).
BATCH_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Progress:
    """What a progress bar shows."""

    expected: int
    succeeded: int
    failed_attempts: int
    dead_lettered: int
    ready: int
    job: JobState | None

    @property
    def done(self) -> int:
        """Items with a final outcome (succeeded or dead-lettered)."""
        return self.succeeded + self.dead_lettered

    @property
    def fraction(self) -> float:
        """Done over expected, 0..1."""
        return min(1.0, self.done / self.expected) if self.expected else 1.0

    @property
    def pending(self) -> str | None:
        """What holds pods of the Job from starting, when something does: ``2 pods pending:
        ImagePullBackOff: Back-off pulling image "..."``."""
        problem = self.job.pending if self.job is not None else None
        return problem.line() if problem is not None else None

    def line(self) -> str:
        """One plain line: ``0/8 done; 2 pods pending: ImagePullBackOff: ... (0 succeeded,
        ...), 8 queued | job Running: active=2 ...``."""
        job = f" | job {self.job.describe(pods=False)}" if self.job else ""
        pending = f"; {self.pending}" if self.pending else ""
        return (
            f"{self.done}/{self.expected} done{pending} ({self.succeeded} succeeded, "
            f"{self.dead_lettered} dead-lettered, {self.failed_attempts} failed attempts), "
            f"{self.ready} queued{job}"
        )


def _cause(problem: StartProblem) -> tuple[object, ...]:
    """What the run's log names once: a pull's back-off and its retries are one cause."""
    reason = "pull" if problem.reason in PULL_REASONS else problem.reason
    return (problem.kind, reason, problem.image if reason == "pull" else problem.message)


ProgressListener = Callable[[Progress], None]

# In-process listeners (the CLI's progress bar registers here; the flow adds its artifact).
LISTENERS: list[ProgressListener] = []


@dataclass
class RunMonitor:
    """Folds the results queue into the ledger while the Job runs."""

    cfg: broker_io.BrokerConfig
    qs: broker_io.QueueSettings
    ledger: RunLedger
    mode: str
    idle_timeout_s: float
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger]
    listeners: list[ProgressListener] = field(default_factory=list)
    findings: list[caveats.Finding] = field(default_factory=list)
    min_report_interval_s: float = 1.0
    max_unacked: int = DEFAULT_MAX_UNACKED
    _consumer: broker_io.ResultsConsumer | None = None
    _dead_baseline: int | None = None
    _last_report: float = 0.0
    _last_line: str = ""
    _drained_flagged: bool = False
    _drained_since: float | None = None
    # A pod that has just reported its item is still "active" for a moment while it exits; only
    # a drained queue that stays drained this long with pods running means pods wait for nothing.
    drained_grace_s: float = 1.0
    last_ready: int = 0
    dead_delta: int = 0
    _broker_lost_at: float | None = None
    _max_unacked_seen: int = 0
    batch_bytes: int = BATCH_BYTES
    _pending_said: tuple[object, ...] | None = None
    _stuck_said: set[tuple[object, ...]] = field(default_factory=set)

    def __enter__(self) -> RunMonitor:
        if self.max_unacked < 2:
            raise ValueError(f"max_unacked must be at least 2 (got {self.max_unacked})")
        # The monitor rides out a lost broker itself, tick by tick, while it keeps watching the
        # Job: its calls must fail at once rather than wait out the reconnect window.
        self.cfg = self.cfg.with_options(reconnect_s=0.0)
        self._consumer = broker_io.ResultsConsumer(
            self.cfg, self.qs, run_id=self.ledger.run_id, prefetch=self.max_unacked
        )
        try:
            depths = broker_io.queue_depths(self.cfg, self.qs)
        except BrokerUnavailable as exc:
            self._lost_broker(exc)  # the baseline is taken once the broker answers again
        else:
            self._dead_baseline = depths["dead"].ready
            self.last_ready = depths["work"].ready
        return self

    def __exit__(self, *exc: object) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    @property
    def batch_size(self) -> int:
        """Records saved and acknowledged together: half the bound, so the broker can send
        the next half while one is saved."""
        return max(1, self.max_unacked // 2)

    @property
    def max_unacked_seen(self) -> int:
        """The most records this monitor held unacknowledged at once."""
        return self._max_unacked_seen

    def drain(self, max_wait_s: float = 0.0, slice_s: float = DRAIN_SLICE_S) -> int:
        """Save available outcome records in the ledger batch by batch, acknowledging each
        batch once saved; keep going while batches come full, for up to ``slice_s``. Return
        how many deliveries were taken."""
        consumer = self._consumer
        assert consumer is not None
        until = time.monotonic() + slice_s
        taken = 0
        while True:
            batch = consumer.take(
                max_wait_s=max_wait_s, max_records=self.batch_size, max_bytes=self.batch_bytes
            )
            self._max_unacked_seen = max(self._max_unacked_seen, consumer.max_unacked_seen)
            if batch.messages == 0:
                return taken
            try:
                self.ledger.absorb(batch.records)  # durable before the ack
            except LedgerStorageError:
                # Not saved: hand the whole window back to the broker (closing the channel), so
                # it is delivered again once the storage answers.
                consumer.close()
                raise
            consumer.ack(batch)
            taken += batch.messages
            full = batch.messages >= self.batch_size or batch.bytes >= self.batch_bytes
            if not full or time.monotonic() >= until:
                return taken
            max_wait_s = 0.0

    def drain_until_quiet(
        self, *, quiet_s: float = 1.0, cap_s: float = 10.0, broker_wait_s: float = 120.0
    ) -> None:
        """After the Job ended: take records until every item is accounted for, or none came
        for `quiet_s` while the results queue holds none ready (a backlog is drained however
        long it is: the pods may have outpaced the flow). `cap_s` bounds a wait with no new
        record at all. A broker that is away (restarting) is waited for up to
        `broker_wait_s`, as during the wait: the records are in its queue, and the cap
        counts from when it answers again."""
        deadline = time.monotonic() + cap_s
        last_new = time.monotonic()
        broker_deadline = time.monotonic() + broker_wait_s
        backlog = 0
        while time.monotonic() < deadline:
            try:
                if self.drain(max_wait_s=0.2):
                    last_new = time.monotonic()
                    deadline = last_new + cap_s
                if self._succeeded() + self.dead_delta >= self.ledger.expected:
                    return
                if time.monotonic() - last_new >= quiet_s and not backlog:
                    return
                backlog = self._refresh_depth()
            except (BrokerUnavailable, LedgerStorageError) as exc:
                if time.monotonic() >= broker_deadline:
                    raise
                self._lost_broker(exc)
                time.sleep(1.0)  # each drain retries the connection; no faster than this
                deadline = time.monotonic() + cap_s
                last_new = time.monotonic()

    def _succeeded(self) -> int:
        return self.ledger.succeeded

    def _refresh_depth(self) -> int:
        """Read the queues' depths; return the records ready in the results queue."""
        depths = broker_io.queue_depths(self.cfg, self.qs)
        self.last_ready = depths["work"].ready
        if self._dead_baseline is None:
            self._dead_baseline = depths["dead"].ready
        self.dead_delta = max(0, depths["dead"].ready - self._dead_baseline)
        return depths["results"].ready

    def _lost_broker(self, exc: BrokerUnavailable | LedgerStorageError) -> None:
        if self._broker_lost_at is None:
            self._broker_lost_at = time.monotonic()
            what = "the broker" if isinstance(exc, BrokerUnavailable) else "the ledger storage"
            self.logger.warning(
                "lost %s while the Job runs (%s); still waiting for the Job, and reading "
                "outcome records again once it answers",
                what,
                exc,
            )

    def progress(self, state: JobState | None) -> Progress:
        """The current progress numbers."""
        failed_attempts = self.ledger.failed_attempts
        return Progress(
            expected=self.ledger.expected,
            succeeded=self._succeeded(),
            failed_attempts=failed_attempts,
            dead_lettered=self.dead_delta,
            ready=self.last_ready,
            job=state,
        )

    def _say_pods(self, state: JobState) -> None:
        """Log what holds the Job's pods when it changes, and each cause of stuck pods once:
        the run's log names the cause while it happens."""
        pending = state.pending
        key = None if pending is None else _cause(pending)
        if key != self._pending_said:
            self._pending_said = key
            if pending is not None:
                self.logger.warning("%s", pending.line())
        for problem in state.stuck:
            said = _cause(problem)
            if said not in self._stuck_said:
                self._stuck_said.add(said)
                self.logger.warning(
                    "%s (%s); the run goes on with the pods that started",
                    problem.line(),
                    problem.why(),
                )

    def on_update(self, state: JobState) -> None:
        """The backend's progress callback."""
        self._say_pods(state)
        try:
            self.drain()
            self._refresh_depth()
        except (BrokerUnavailable, LedgerStorageError) as exc:
            # Progress and the live caveat need the broker, the ledger its storage; the Job
            # needs neither: keep waiting, and take the records again once both answer.
            self._lost_broker(exc)
            return
        if self._broker_lost_at is not None:
            self.logger.info(
                "the broker answers again after %.0f s", time.monotonic() - self._broker_lost_at
            )
            self._broker_lost_at = None
        progress = self.progress(state)
        if self.mode == "coarse" and not self._drained_flagged:
            in_flight = max(0, progress.expected - progress.ready - progress.done)
            finding = caveats.check_drained(
                queue=self.qs.name,
                ready=progress.ready,
                unacked=in_flight,
                state=state,
                idle_timeout_s=self.idle_timeout_s,
            )
            now = time.monotonic()
            if finding is None:
                self._drained_since = None
            elif self._drained_since is None:
                self._drained_since = now
            elif now - self._drained_since >= self.drained_grace_s:
                self._drained_flagged = True
                self.findings.append(finding)
                self.logger.warning(finding.line())
        now = time.monotonic()
        line = progress.line()
        if line != self._last_line and now - self._last_report >= self.min_report_interval_s:
            self._last_report, self._last_line = now, line
            self.logger.info("progress: %s", line)
        for listener in [*self.listeners, *LISTENERS]:
            listener(progress)
