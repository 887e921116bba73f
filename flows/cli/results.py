"""``queuejob results RUN_ID``: a finished run's items with their results, streamed.

One row per item, in item order: ``item_id``, ``index``, ``body``, ``status`` and ``result``
(with ``--follow-reruns``, per item the latest run's row and that run's id in ``run_id``), as
JSON Lines (the results as JSON values) or CSV (a text result as it is, any other as JSON).
Rows are written as they are read, so a million results print in a few MB of memory.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Callable, Iterable
from typing import Any

FATE_CHOICES = ("succeeded", "failed", "dead_lettered", "left")


def add_results_options(p: argparse.ArgumentParser) -> None:
    """The options of ``queuejob results``."""
    p.add_argument("run_id", metavar="RUN_ID", help="the finished queuejob flow run's id")
    p.add_argument(
        "--format",
        choices=["jsonl", "csv"],
        default="jsonl",
        help="JSON Lines (results as JSON values) or CSV with a header (default: %(default)s)",
    )
    p.add_argument(
        "--fate",
        action="append",
        choices=FATE_CHOICES,
        help="only items of this fate (repeat for several; default: all)",
    )
    p.add_argument(
        "--follow-reruns",
        action="store_true",
        help="per item, the latest result across the run and its reruns (adds run_id)",
    )
    p.add_argument(
        "--ledger-storage",
        default=None,
        metavar="BLOCK",
        help="the LocalFileSystem or RemoteFileSystem block the run kept its ledger in",
    )


def print_stored(body: Callable[[], None]) -> int:
    """Run ``body``, which prints what a finished run stored: exit 2 (one line on stderr) on a
    queuejob error (the run has no stored ledger, the storage cannot be read), 0 otherwise, a
    reader that stops early (``queuejob results ... | head``) included."""
    from queuejob.flows.core.errors import QueueJobError

    try:
        body()
    except QueueJobError as exc:
        print(f"queuejob: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        sys.stderr.close()
    return 0


def write_jsonl(out: Any, rows: Iterable[dict[str, Any]]) -> None:
    """The rows as JSON Lines, as they come."""
    for row in rows:
        out.write(json.dumps(row, ensure_ascii=False) + "\n")


def cmd_results(args: argparse.Namespace) -> int:
    """Print the rows; exit 2 (one line on stderr) when the run has no stored ledger."""
    return print_stored(lambda: _print_results(args))


def _print_results(args: argparse.Namespace) -> None:
    from queuejob.flows.results import RESULT_FIELDS, read_results

    out = sys.stdout
    rows = read_results(
        args.run_id,
        fates=args.fate,
        follow_reruns=args.follow_reruns,
        ledger_storage=args.ledger_storage,
        decode_bytes=False,  # the stored form: base64 stays marked
    )
    fields = [*RESULT_FIELDS, "run_id"] if args.follow_reruns else list(RESULT_FIELDS)
    if args.format == "csv":
        _write_csv(out, fields, rows)
    else:
        write_jsonl(out, rows)
    out.flush()


def _write_csv(out: Any, fields: list[str], rows: Any) -> None:
    from queuejob.flows.core.results import as_text

    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(fields)
    for row in rows:
        row["result"] = as_text(row["result"])
        writer.writerow(["" if row.get(f) is None else row[f] for f in fields])
