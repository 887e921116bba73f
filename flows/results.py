"""Reading a finished run's item results back, streamed: `read_results` (``queuejob.read_results``
in Python, ``queuejob results RUN_ID`` in a terminal).

The results are the ``result`` column of the run's ``ledger.jsonl`` in its ledger storage (one
row per item, in item order; see `queuejob.flows.core.results` for what a result is). Rows are
read one at a time, so a million results need no more memory than ten.

With ``follow_reruns``, each item's row comes from the latest run that reached it among the run
and its reruns (and theirs): a rerun, when it ends, leaves a link in the earlier run's directory
(`record_rerun`), and the ledgers are read side by side (`queuejob.flows.core.results
.follow_reruns`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterator
from typing import Any

from queuejob.flows.adapters.ledger_storage import LedgerStorage, normalize_fates
from queuejob.flows.core import results as core_results
from queuejob.flows.core.errors import QueueJobError
from queuejob.flows.storage import open_storage

# The fields of a result row, in order (with follow_reruns, "run_id" follows).
RESULT_FIELDS = ("item_id", "index", "body", "status", "result")

log = logging.getLogger(__name__)


def read_results(
    run_id: str,
    *,
    fates: Collection[str] | None = None,
    follow_reruns: bool = False,
    ledger_storage: str | None = None,
    decode_bytes: bool = True,
) -> Iterator[dict[str, Any]]:
    """A finished run's items with their results, in item order, streamed from its ledger.

    Each row is a dict: ``item_id``, ``index``, ``body``, ``status`` (the item's fate:
    ``succeeded``, ``failed``, ``dead_lettered`` or ``left_in_queue``) and ``result`` (what
    its succeeded attempt returned, else None).

    Args:
        run_id: the queuejob flow run's id (the report's ``run_id``).
        fates: only items of these fates (``left`` for ``left_in_queue``; a list, or one
            string, comma-separated); None for all.
        follow_reruns: per item, the row of the latest run that reached it among this run and
            its reruns (``queuejob rerun``, the ``queuejob-rerun`` flow), with that run's id in
            ``run_id``; ``index`` and ``body`` stay the original run's. The fates filter then
            applies to that latest row.
        ledger_storage: the filesystem block the run kept its ledger in (None: the default
            directory, ``QUEUEJOB_LEDGER_DIR``).
        decode_bytes: a result of bytes that are not UTF-8 (stored as ``{"$base64": ...}``)
            comes back as ``bytes``; False keeps the stored form.

    Raises `LedgerNotFound` at once (before the first row) when the run has no stored ledger,
    `InvalidInput` for an unknown fate. The rows are read lazily: iterate while the storage is
    reachable.
    """
    if isinstance(fates, str):  # "failed" or "failed,left": not its letters
        fates = [f.strip() for f in fates.split(",") if f.strip()]
    wanted = normalize_fates(fates)
    storage = open_storage(ledger_storage)
    storage.read_report(run_id)  # a missing run fails here, not at the first row
    if follow_reruns:
        tagged = _followed(storage, run_id, 0.0, {run_id}, {ledger_storage: storage})
        rows: Iterator[dict[str, Any]] = (
            {**_fields(row), "run_id": rid} for _when, rid, row in tagged
        )
    else:
        rows = (_fields(row) for row in storage.iter_rows(run_id))
    return _finish(rows, wanted, decode_bytes)


def _fields(row: dict[str, Any]) -> dict[str, Any]:
    return {name: row.get(name) for name in RESULT_FIELDS}


def _finish(
    rows: Iterator[dict[str, Any]], wanted: frozenset[str] | None, decode_bytes: bool
) -> Iterator[dict[str, Any]]:
    for row in rows:
        if wanted is not None and row["status"] not in wanted:
            continue
        if decode_bytes and row["result"] is not None:
            row["result"] = core_results.decode(row["result"])
        yield row


def _followed(
    storage: LedgerStorage,
    run_id: str,
    when: float,
    seen: set[str],
    storages: dict[str | None, LedgerStorage],
) -> Iterator[core_results.Tagged]:
    """The run's rows, each tagged with (when its run ended, its run id), merged with its
    reruns' (each merged with its own first)."""
    rows = ((when, run_id, row) for row in storage.iter_rows(run_id))
    reruns = []
    for link in storage.rerun_links(run_id):
        rerun_id = str(link["run_id"])
        if rerun_id in seen:
            continue
        seen.add(rerun_id)
        where = _rerun_storage(storage, rerun_id, link.get("ledger_storage"), storages)
        if where is None:
            log.warning(
                "rerun %s of run %s has no ledger (deleted, or kept where this process cannot "
                "read it); its results are left out",
                rerun_id,
                run_id,
            )
            continue
        ended = float(link.get("finished_at") or when)
        reruns.append(_followed(where, rerun_id, max(ended, when), seen, storages))
    return core_results.follow_reruns(rows, reruns) if reruns else rows


def _rerun_storage(
    earlier: LedgerStorage,
    rerun_id: str,
    block: Any,
    storages: dict[str | None, LedgerStorage],
) -> LedgerStorage | None:
    """Where a rerun's ledger is: the storage its link names, else the earlier run's."""
    name = block if isinstance(block, str) or block is None else None
    candidates = []
    try:
        if name not in storages:
            storages[name] = open_storage(name)
        candidates.append(storages[name])
    except QueueJobError:
        pass
    candidates.append(earlier)
    for storage in candidates:
        try:
            if storage.has_ledger(rerun_id):
                return storage
        except Exception:  # an unreachable storage: try the next
            continue
    return None


def record_rerun(
    *, earlier_run_id: str, earlier_storage: str | None, rerun_id: str, ledger_storage: str | None
) -> str:
    """Link a rerun that has ended to the earlier run whose items it reran: a file in the earlier
    run's directory naming it, when it ended and where its ledger is (``follow_reruns`` reads
    it). Return the link's path; raises `LedgerStorageError` (a `QueueJobError`)."""
    storage = open_storage(earlier_storage)
    link = {
        "run_id": rerun_id,
        "rerun_of": earlier_run_id,
        "finished_at": time.time(),
        "ledger_storage": ledger_storage,
    }
    return storage.write_rerun_link(earlier_run_id, rerun_id, link)


__all__ = ["RESULT_FIELDS", "read_results", "record_rerun"]
