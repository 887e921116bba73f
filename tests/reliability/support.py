"""Helpers for the reliability suite: waiting, counting what the work did, the leak witness and the
table of results.

Counting: every case's command appends the item it processed to a side-effect file, so "lost"
(items never processed) and "processed twice" come from what the work actually did, not from
queuejob's own ledger, which the tests then hold against it.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import urllib.parse
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import pika.exceptions as pex
import pytest

from tests.broker.support import drain_messages, wait_until
from tests.reliability.private_broker import find_server

# The broker user of every run in this suite: a password that is easy to find if it leaks.
BROKER_USER = "queuejob-rel"
BROKER_PASSWORD = "s3cr3t-P4ss-queuejob"

DOCS_ITEMS = ["apple", "banana", "cherry", "date", "fig", "grape", "lemon", "melon"]


# Poll a condition with a deadline: the broker tests' helper, under the name this suite uses.
wait_for = wait_until


def require_rabbitmq_server(needs: str) -> None:
    """Skip the caller's tests when rabbitmq-server is not installed (fail them in CI), saying
    what ``needs`` it."""
    if find_server() is None:
        message = f"rabbitmq-server is not installed: {needs}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)


def queue_exists(url: str, name: str) -> bool:
    """True when the queue exists (a passive declare; a 404 closes only its channel)."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        conn.channel().queue_declare(name, passive=True)
        return True
    except pex.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            return False
        raise
    finally:
        if conn.is_open:
            conn.close()


def take_message_ids(url: str, name: str, *, expect: int, timeout: float = 60.0) -> list[str]:
    """Consume every message of a queue (they are gone afterwards) and return their ids.

    Consuming is the only way to see them all: a quorum queue hands an unacknowledging consumer
    a bounded number of messages.
    """
    return [str(p.message_id) for p in drain_messages(url, name, expect=expect, timeout=timeout)]


def delete_queues(url: str, name: str) -> None:
    """Delete a work queue and its companions (missing ones are fine)."""
    try:
        conn = pika.BlockingConnection(pika.URLParameters(url))
    except pex.AMQPError:
        return
    try:
        for q in (name, f"{name}.dead", f"{name}.results", f"{name}.fill"):
            ch = conn.channel()
            try:
                ch.queue_delete(q)
                ch.close()
            except pex.ChannelClosedByBroker:
                pass
    finally:
        if conn.is_open:
            conn.close()


def processes_with_env(key: str, value: str) -> list[int]:
    """Pids of live processes whose environment sets ``key=value`` (pods carry QUEUE=...)."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(key) == value:
                found.append(proc.pid)
        except (psutil.Error, OSError):
            continue
    return found


# --- what the work did ------------------------------------------------------------------------


@dataclass
class SideEffects:
    """The side-effect file the per-item commands append to, and the commands themselves.

    Commands are plain shell, baked with absolute paths (a pod gets only the Job's environment).
    """

    path: Path
    marker: Path

    def work(self, *, sleep_s: float = 0.0, result: bool = False) -> list[str]:
        """Read the item from stdin, optionally take a while, append it to the file; with
        ``result``, return ``result-<item>`` as the item's result."""
        nap = f"sleep {sleep_s:g}; " if sleep_s else ""
        ret = 'printf "result-%s" "$item" > "$QUEUEJOB_RESULT_FILE"; ' if result else ""
        return [
            "sh",
            "-c",
            f'item=$(cat); {nap}{ret}echo "$item" >> {shlex.quote(str(self.path))}',
        ]

    def kill_after_work(self, item: str) -> list[str]:
        """The docs' race: the first time ``item`` comes, do the work, then SIGKILL the worker
        (the command's parent) before it can report or ack. The marker makes it happen once."""
        out, mark = shlex.quote(str(self.path)), shlex.quote(str(self.marker))
        return [
            "sh",
            "-c",
            f'item=$(cat); echo "$item" >> {out}; '
            f'if [ "$item" = {shlex.quote(item)} ] && mkdir {mark} 2>/dev/null; then '
            "kill -9 $PPID; fi",
        ]

    def kill_before_work(self, item: str) -> list[str]:
        """The first time ``item`` comes, SIGKILL the worker before doing anything."""
        out, mark = shlex.quote(str(self.path)), shlex.quote(str(self.marker))
        return [
            "sh",
            "-c",
            f'item=$(cat); if [ "$item" = {shlex.quote(item)} ] && mkdir {mark} 2>/dev/null; '
            f'then kill -9 $PPID; exit 0; fi; echo "$item" >> {out}',
        ]

    def done(self) -> Counter[str]:
        """How often each item was processed."""
        if not self.path.exists():
            return Counter()
        return Counter(line for line in self.path.read_text().splitlines() if line)

    def lost_and_twice(self, items: Iterable[str]) -> tuple[list[str], list[str]]:
        """(items never processed, items processed more than once)."""
        done = self.done()
        wanted = list(items)
        lost = [i for i in wanted if done[i] == 0]
        twice = sorted(i for i in wanted if done[i] > 1)
        return lost, twice


# --- the table for the README -------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One case's numbers: faults injected, items, lost, processed twice (expected/observed)."""

    case: str
    faults: str
    items: int
    lost: int
    twice_expected: str
    twice_observed: int


ROWS: list[Row] = []


def record(
    case: str, *, faults: str, items: int, lost: int, twice_expected: str, twice_observed: int
) -> None:
    """Add a row to the session's reliability table (printed at the end of the run)."""
    ROWS.append(Row(case, faults, items, lost, twice_expected, twice_observed))


def table_markdown(rows: Iterable[Row]) -> str:
    """The rows as the README's markdown table."""
    lines = [
        "| case | faults injected | items | lost | processed twice (expected / observed) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r.case} | {r.faults} | {r.items} | {r.lost} | "
            f"{r.twice_expected} / {r.twice_observed} |"
        )
    return "\n".join(lines)


# --- the leak witness ----------------------------------------------------------------------------


def secret_forms(password: str) -> list[str]:
    """The spellings of the password worth searching for: as is, and URL-quoted."""
    return sorted({password, urllib.parse.quote(password, safe="")}, key=len, reverse=True)


class LogCollector(logging.Handler):
    """Keeps every log record's rendered text (message, exception, stack)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # a broken format string is not our concern here
            text = f"{record.msg!r} {record.args!r}"
        parts = [record.name, text]
        if record.exc_info:
            parts.append(logging.Formatter().formatException(record.exc_info))
        if record.stack_info:
            parts.append(record.stack_info)
        self.texts.append(" | ".join(parts))


@dataclass
class Witness:
    """Everything a test's runs produced, searched for the broker password at teardown.

    Tests hand it what they get (return values, exceptions, CLI output, manifests) with `add`,
    the flow runs whose Prefect logs, states and artifacts must be read with `add_run`, and
    directories whose files must be read with `add_dir` (minus the parts that hold Secrets).
    """

    collector: LogCollector = field(default_factory=lambda: LogCollector())
    texts: list[tuple[str, str]] = field(default_factory=list)
    run_ids: set[str] = field(default_factory=set)
    dirs: list[tuple[Path, tuple[str, ...]]] = field(default_factory=list)

    def logged(self, text: str) -> bool:
        """True when a log record of the test so far contains ``text``."""
        return any(text in t for t in self.collector.texts)

    def add(self, label: str, obj: Any) -> None:
        """Keep the text of ``obj`` (str, repr and, where possible, JSON)."""
        if isinstance(obj, BaseException):
            text = f"{type(obj).__name__}: {obj} | {obj!r}"
            cause = obj.__cause__ or obj.__context__
            if cause is not None:
                text += f" | cause {type(cause).__name__}: {cause}"
        elif isinstance(obj, str | bytes):
            text = obj.decode("utf-8", "replace") if isinstance(obj, bytes) else obj
        else:
            try:
                text = json.dumps(obj, default=repr)
            except (TypeError, ValueError):
                text = repr(obj)
        self.texts.append((label, text))

    def add_run(self, run_id: Any) -> None:
        """A flow run whose logs, states and artifacts are read from the Prefect API."""
        if run_id:
            self.run_ids.add(str(run_id))

    def add_dir(self, path: Path, *, skip: tuple[str, ...] = ()) -> None:
        """Every file under ``path`` is read at teardown, except under directories named in
        ``skip`` (the local backend keeps Secrets in ``secrets/``)."""
        self.dirs.append((Path(path), skip))

    def files(self) -> Iterator[tuple[str, str]]:
        """(path, text) of the files under the added directories."""
        for root, skip in self.dirs:
            if not root.exists():
                continue
            for path in root.rglob("*"):
                if not path.is_file() or any(part in skip for part in path.parts):
                    continue
                try:
                    yield str(path), path.read_bytes().decode("utf-8", "replace")
                except OSError:
                    continue

    def leaks(self, forms: list[str], extra: Iterable[tuple[str, str]] = ()) -> list[str]:
        """Labels of every text holding one of ``forms``."""
        found = []
        for label, text in [*self.texts, *self.files(), *extra]:
            for form in forms:
                if form in text:
                    at = text.index(form)
                    context = text[max(0, at - 80) : at + len(form) + 40].replace("\n", " ")
                    found.append(f"{label}: ...{context}...")
                    break
        return found


def prefect_texts(run_ids: Iterable[str]) -> list[tuple[str, str]]:
    """What the Prefect API holds about these flow runs: logs, flow and task run state messages,
    parameters, and the artifacts' data and descriptions."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )

    ids = [str(r) for r in run_ids]
    if not ids:
        return []
    import uuid

    uuids = [uuid.UUID(r) for r in ids]
    out: list[tuple[str, str]] = []
    with get_client(sync_client=True) as client:
        log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=uuids))
        offset = 0
        while True:  # the API answers at most 200 at a time
            logs = client.read_logs(log_filter=log_filter, limit=200, offset=offset)
            out += [(f"prefect log {log.flow_run_id}", log.message) for log in logs]
            if len(logs) < 200:
                break
            offset += len(logs)
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=uuids)))
        for run in runs:
            out.append((f"flow run {run.id} parameters", json.dumps(run.parameters, default=str)))
            if run.state is not None:
                out.append((f"flow run {run.id} state", f"{run.state.name}: {run.state.message}"))
            states = client.read_flow_run_states(run.id)
            out += [(f"flow run {run.id} state history", f"{s.message}") for s in states]
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=uuids))
        )
        for tr in task_runs:
            if tr.state is not None:
                out.append((f"task run {tr.name}", f"{tr.state.name}: {tr.state.message}"))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=uuids))
        )
        for art in artifacts:
            out.append(
                (f"artifact {art.key}", f"{art.description} {json.dumps(art.data, default=str)}")
            )
    return out


def prefect_home() -> Path:
    """Prefect's home directory (its database and local result storage)."""
    from prefect.settings import PREFECT_HOME

    return Path(PREFECT_HOME.value())


def local_kwargs(
    queue: str,
    command: list[str],
    *,
    items: list[str] | None = None,
    parallelism: int = 2,
    idle_timeout: float = 2.0,
    backoff_limit: int = 6,
    timeout_s: float = 180.0,
    keep_job: bool = False,
    broker_wait_s: float = 60.0,
    image: str | None = None,
) -> dict[str, Any]:
    """Flow parameters for a coarse-mode run: on the local backend, or on Kubernetes when an
    ``image`` is given."""
    from queuejob.flows.core.items import ItemSource
    from queuejob.flows.params import CleanupParams, JobParams, QueueParams

    return {
        "items": ItemSource.inline(items or DOCS_ITEMS),
        "queue": QueueParams(name=queue),
        "job": JobParams(
            command=command,
            parallelism=parallelism,
            idle_timeout_seconds=idle_timeout,
            backoff_limit=backoff_limit,
            image=image,
        ),
        "mode": "coarse",
        "backend": "local" if image is None else "kubernetes",
        "caveat_policy": "warn",
        "timeout_seconds": timeout_s,
        "broker_wait_seconds": broker_wait_s,
        "cleanup": CleanupParams(delete_job=not keep_job, delete_queues=False),
    }


def ledger_rows(
    report: dict[str, Any], items: list[str] | None = None
) -> dict[str, dict[str, Any]]:
    """The run's ledger (JSON Lines) by item: the inline item's value (ids are derived from
    position and content), or the item id for other sources."""
    from queuejob.flows.core.items import ItemSource, iter_items

    rows = [json.loads(x) for x in Path(report["ledger_path"]).read_text().splitlines() if x]
    by_id = {str(r["item_id"]): r for r in rows}
    if items is None:
        return by_id
    names = {i.id: i.body.decode() for i in iter_items(ItemSource.inline(items))}
    return {names.get(k, k): r for k, r in by_id.items()}


def finding_codes(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The report's findings by code."""
    return {str(f["code"]): f for f in report["findings"]}
