"""Commands on a run that has finished: ``queuejob ledger`` (its rows), ``queuejob rerun`` (its
failed, dead-lettered or left items as a new run) and ``queuejob dead-letters`` (list or
requeue ``<QUEUE>.dead``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any

from queuejob.flows.cli.args import add_job_options, positive_int
from queuejob.flows.cli.results import print_stored, write_jsonl
from queuejob.flows.cli.running import prefect_api_problem, prepare_prefect, print_summary, run_flow

# --- rerun -------------------------------------------------------------------------------------

# `run` options a rerun may give: argparse dest -> (flow parameter, field of it or None).
RERUN_OVERRIDES: dict[str, tuple[str, str | None]] = {
    "mode": ("mode", None),
    "backend": ("backend", None),
    "parallelism": ("job", "parallelism"),
    "completions": ("job", "completions"),
    "backoff_limit": ("job", "backoff_limit"),
    "deadline": ("job", "active_deadline_seconds"),
    "idle_timeout": ("job", "idle_timeout_seconds"),
    "item_timeout": ("job", "item_timeout_seconds"),
    "start_grace": ("job", "start_grace_seconds"),
    "start_timeout": ("job", "start_timeout_seconds"),
    "image": ("job", "image"),
    "namespace": ("job", "namespace"),
    "template_block": ("job", "template_block"),
    "call": ("job", "call"),
    "max_result_bytes": ("job", "max_result_bytes"),
    "queue": ("queue", "name"),
    "queue_type": ("queue", "type"),
    "delivery_limit": ("queue", "delivery_limit"),
    "stale": ("queue", "stale_messages"),
    "broker_block": ("broker_block", None),
    "kube_credentials_block": ("kubernetes_credentials_block", None),
    "policy": ("caveat_policy", None),
    "max_failed_items": ("max_failed_items", None),
    "timeout": ("timeout_seconds", None),
    "delete_queues": ("cleanup", "delete_queues"),
}
ITEM_OPTIONS = ("items", "file", "jsonl", "range")


RERUN_EPILOG = """\
examples:
  # the failed, dead-lettered and left items of a run, with that run's settings
  queuejob rerun 3f2a9c1e-5b7d-4c1a-9e0f-2d6b8a4c1e77

  # only the items it left in its queue, three pods at a time
  queuejob rerun 3f2a9c1e-5b7d-4c1a-9e0f-2d6b8a4c1e77 --fate left --parallelism 3

  # the failed items again, with a fixed program
  queuejob rerun 3f2a9c1e-5b7d-4c1a-9e0f-2d6b8a4c1e77 --fate failed -- python -m mypkg.process

Every option not given keeps the earlier run's setting, except --completions: a rerun sizes
its Job to its own items (auto) unless told otherwise. The earlier run's own messages still in
its work queue (items it left, or failed and put back) are taken out before the fill when this
rerun queues those items again from the ledger; --stale applies to any other message there.
"""

# What a rerun's --help says for the options whose default is not "the earlier run's".
_RERUN_DEFAULTS = {
    "completions": "auto, sized to this rerun's items",
    "ledger_storage": "QUEUEJOB_LEDGER_DIR",
    "debug": "off",
}
_RERUN_HELP = {
    "completions": "pods to succeed, or auto",
    "stale": "other messages already queued: fail the run, or purge",
    "ledger_storage": "filesystem block holding the run's ledger; the rerun's goes there too",
}
_DEFAULT_NOTE = re.compile(r"\s*\(default: .*\)\s*$")


def add_rerun_options(p: argparse.ArgumentParser) -> None:
    """The options of ``queuejob rerun``: the run id, ``--fate`` and every ``run`` option as an
    override, each saying what it defaults to in a rerun."""
    p.add_argument("run_id", metavar="RUN_ID", help="the earlier queuejob flow run's id")
    p.add_argument(
        "--fate",
        action="append",
        default=None,
        metavar="FATE",
        help="failed, dead_lettered, left or succeeded; repeat, or comma-separate "
        "(default: failed,dead_lettered,left)",
    )
    add_job_options(p)
    for action in p._actions:
        if action.dest in ITEM_OPTIONS:  # the items come from the ledger (refused if given)
            action.help = argparse.SUPPRESS
            continue
        if action.dest in ("help", "run_id", "fate") or not action.help:
            continue
        # The run's defaults are not a rerun's: it keeps the earlier run's settings. (The run's
        # "%(default)s" would also be formatted with the None set below, and fail.)
        text = _RERUN_HELP.get(action.dest, _DEFAULT_NOTE.sub("", action.help))
        default = _RERUN_DEFAULTS.get(action.dest, "earlier run's")
        action.help = f"{text} (default: {default})"
    # No defaults: only the options given on the command line (not None, flags not False)
    # override the earlier run's settings.
    p.set_defaults(**{a.dest: None for a in p._actions if a.dest not in ("help", "run_id")})


def _rerun_overrides(args: argparse.Namespace, command: list[str]) -> dict[str, Any]:
    given = {k: v for k, v in vars(args).items() if v is not None and v is not False}
    overrides: dict[str, Any] = {}
    for dest, (param, field) in RERUN_OVERRIDES.items():
        if dest not in given:
            continue
        if field is None:
            overrides[param] = given[dest]
        else:
            overrides.setdefault(param, {})[field] = given[dest]
    if given.get("keep_job"):
        overrides.setdefault("cleanup", {})["delete_job"] = False
    if command:
        overrides.setdefault("job", {})["command"] = command
    return overrides


def cmd_rerun(args: argparse.Namespace, command: list[str]) -> int:
    from queuejob.flows.core.errors import QueueJobError

    given = [name for name in ITEM_OPTIONS if getattr(args, name, None)]
    if given:
        print(
            f"queuejob: a rerun takes its items from run {args.run_id}'s ledger; drop "
            + ", ".join("ITEM..." if n == "items" else f"--{n}" for n in given),
            file=sys.stderr,
        )
        return 2
    try:
        from queuejob.flows.core.rerun import parse_fates, rerun_params
        from queuejob.flows.storage import open_storage

        fates = parse_fates(args.fate)
        # The earlier run's report: an unknown run or a missing ledger stops here, before
        # Prefect starts and before anything is declared or created.
        report = open_storage(args.ledger_storage).read_report(args.run_id)
        params = rerun_params(
            report.get("params"),
            run_id=args.run_id,
            fates=fates,
            ledger_storage=args.ledger_storage,
            overrides=_rerun_overrides(args, command),
        )
        from queuejob.flows.rerun import flow_kwargs

        kwargs = flow_kwargs(params)
    except (QueueJobError, ValueError) as exc:
        print(f"queuejob: {exc}", file=sys.stderr)
        return 2
    problem = prefect_api_problem()
    if problem is not None:
        print(f"queuejob: {problem}", file=sys.stderr)
        return 2
    print(
        f"queuejob rerun: {kwargs['items'].describe()} ({kwargs.get('backend')} backend, "
        f"queue {kwargs['queue'].name!r})",
        flush=True,
    )
    debug = bool(getattr(args, "debug", False))
    prepare_prefect(debug)
    return run_flow(kwargs, debug=debug)[0]


# --- dead letters ------------------------------------------------------------------------------

DEAD_LETTER_LIST_CAP = 1000


def _broker_config(broker_block: str | None) -> Any:
    """The broker from a RabbitMQBroker block, else QUEUEJOB_BROKER_URL (without importing
    Prefect when no block is named)."""
    # A lost node or connection is ridden out this long (the dead-letter requeue carries on
    # from where it was: its tokens make it idempotent).
    reconnect_s = 60.0
    if broker_block:
        from queuejob.flows.tasks import resolve_broker

        return resolve_broker(broker_block).with_options(reconnect_s=reconnect_s)
    from queuejob.flows.adapters.broker import BrokerConfig
    from queuejob.flows.core.errors import ConfigError

    url = os.environ.get("QUEUEJOB_BROKER_URL")
    if not url:
        raise ConfigError(
            "no broker configured: pass --broker-block <name of a RabbitMQBroker block>, or set "
            "QUEUEJOB_BROKER_URL"
        )
    return BrokerConfig(url=url, reconnect_s=reconnect_s)


DEAD_LETTERS_EPILOG = """\
examples:
  # what job1.dead holds: item, run, attempts, reason, exit code, last error line
  queuejob dead-letters job1

  # the first 20, with the error tails from ledgers kept in a storage block
  queuejob dead-letters job1 --limit 20 --ledger-storage queuejob-ledgers

  # move them back into job1, for workers consuming it (safe to run again after a kill)
  queuejob dead-letters job1 --requeue

Listing consumes nothing. To process dead letters as a run with a report and a ledger, use
`queuejob rerun RUN_ID --fate dead_lettered` instead of --requeue. The broker URL comes from
QUEUEJOB_BROKER_URL (or --broker-block), never from the command line.
"""


def add_dead_letter_options(p: argparse.ArgumentParser) -> None:
    """The options of ``queuejob dead-letters``."""
    p.add_argument(
        "queue", metavar="QUEUE", help="the work queue; its dead letters are in QUEUE.dead"
    )
    p.add_argument(
        "--requeue",
        action="store_true",
        help="move them back to QUEUE, confirmed, then acked (default: list only)",
    )
    p.add_argument(
        "--limit",
        type=positive_int,
        default=None,
        metavar="N",
        help="at most N, oldest first "
        f"(default: all; a listing shows at most {DEAD_LETTER_LIST_CAP})",
    )
    p.add_argument(
        "--broker-block",
        default=None,
        metavar="NAME",
        help="RabbitMQBroker block (default: the URL in QUEUEJOB_BROKER_URL)",
    )
    p.add_argument(
        "--ledger-storage",
        default=None,
        metavar="BLOCK",
        help="block with the runs' ledgers, for exit codes (default: QUEUEJOB_LEDGER_DIR)",
    )


def _short(run_id: str | None) -> str:
    return (run_id or "-")[:8]


def cmd_dead_letters(args: argparse.Namespace) -> int:
    from queuejob.flows.adapters.broker import QueueSettings
    from queuejob.flows.adapters.broker import dead_letters as dl
    from queuejob.flows.core.dead_letters import plural
    from queuejob.flows.core.errors import QueueJobError

    try:
        qs = QueueSettings(args.queue)
        cfg = _broker_config(args.broker_block)
        if args.requeue:

            def show(letter: Any, published: bool) -> None:
                what = "requeued" if published else "already back (an earlier requeue)"
                print(f"{what}: {letter.item_id}  (run {_short(letter.run_id)})", flush=True)

            result = dl.requeue_dead_letters(cfg, qs, limit=args.limit, on_requeued=show)
            print(
                f"{plural(result.requeued, 'dead letter')} moved back to {qs.name!r}"
                + (
                    f", {result.already_requeued} already there from an interrupted requeue"
                    if result.already_requeued
                    else ""
                )
                + f"; {result.remaining} left in {qs.dead_name!r}"
            )
            return 0
        cap = min(args.limit or DEAD_LETTER_LIST_CAP, DEAD_LETTER_LIST_CAP)
        listing = dl.list_dead_letters(cfg, qs, limit=cap)
    except QueueJobError as exc:
        print(f"queuejob: {exc}", file=sys.stderr)
        return 1
    known = _ledger_details(listing.letters, args.ledger_storage)
    _print_dead_letters(qs.dead_name, listing.total, listing.letters, known)
    return 0


def _ledger_details(letters: list[Any], ledger_storage: str | None) -> dict[tuple[str, str], Any]:
    """(run id, item id) -> (attempts, exit code, error tail) from the runs' ledgers, for the
    dead letters listed; runs without a stored ledger are skipped. For a quorum queue's dead
    letter without a ledger row, attempts come from the run's delivery limit."""
    from queuejob.flows.core.dead_letters import attempts_from
    from queuejob.flows.core.errors import QueueJobError
    from queuejob.flows.storage import open_storage

    wanted: dict[str, set[str]] = {}
    for letter in letters:
        if letter.run_id:
            wanted.setdefault(letter.run_id, set()).add(letter.item_id)
    out: dict[tuple[str, str], Any] = {}
    if not wanted:
        return out
    try:
        storage = open_storage(ledger_storage)
    except QueueJobError:
        return out
    for run_id, ids in wanted.items():
        try:
            params = storage.read_report(run_id).get("params") or {}
            limit = (params.get("queue") or {}).get("delivery_limit")
            for item_id in ids:
                attempts = attempts_from(reason="delivery_limit", failures=0, delivery_limit=limit)
                out[(run_id, item_id)] = (attempts, None, "")
            for row in storage.iter_rows(run_id, {"dead_lettered", "failed"}):
                if row.get("item_id") in ids:
                    key = (run_id, row["item_id"])
                    out[key] = (row.get("attempts"), row.get("exit_code"), row.get("error_tail"))
        except (QueueJobError, ValueError):
            continue
    return out


def _print_dead_letters(
    dead_name: str, total: int, letters: list[Any], known: dict[tuple[str, str], Any]
) -> None:
    from queuejob.flows.core.dead_letters import plural

    print(f"queue {dead_name!r} holds {plural(total, 'dead letter')}")
    if not letters:
        return
    rows = [("ITEM", "RUN", "ATTEMPTS", "REASON", "EXIT", "LAST ERROR")]
    for letter in letters:
        attempts, exit_code, tail = known.get((letter.run_id, letter.item_id), (None, None, ""))
        if letter.attempts is not None:  # counted by the worker: exact
            attempts = letter.attempts
        lines = [line.strip() for line in (tail or "").splitlines() if line.strip()]
        last = lines[-1] if lines else "-"
        rows.append(
            (
                letter.item_id,
                _short(letter.run_id),
                "?" if attempts is None else str(attempts),
                letter.reason or "-",
                "-" if exit_code is None else str(exit_code),
                last if len(last) <= 60 else last[:57] + "...",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if total > len(letters):
        more = total - len(letters)
        print(f"  ... and {more} more (--limit N shows up to {DEAD_LETTER_LIST_CAP})")


LEDGER_COLUMNS = (
    ("index", 7),
    ("item_id", 20),
    ("status", 13),
    ("attempts", 8),
    ("exit_code", 9),
    ("pod", 24),
    ("body", 30),
    ("error_tail", 40),
)


def _cell(value: Any, width: int) -> str:
    text = "" if value is None else str(value)
    text = text.replace("\r", " ").replace("\n", " | ")
    return text if len(text) <= width else text[: width - 3] + "..."


def cmd_ledger(args: argparse.Namespace) -> int:
    """Print a finished run's summary and its ledger rows, streamed from the storage."""
    return print_stored(lambda: _print_ledger(args))


def _print_ledger(args: argparse.Namespace) -> None:
    from queuejob.flows.adapters.ledger_storage import normalize_fates
    from queuejob.flows.storage import open_storage

    fates = normalize_fates(args.fate) if args.fate else None
    storage = open_storage(args.ledger_storage)
    report = storage.read_report(args.run_id)
    rows = storage.iter_rows(args.run_id, fates)
    out = sys.stdout
    if args.format == "jsonl":
        s = report.get("summary", {})
        print(
            f"queuejob run {args.run_id}: {s.get('expected')} items, {s.get('succeeded')} "
            f"succeeded, {s.get('failed')} failed, {s.get('dead_lettered')} dead-lettered, "
            f"{s.get('left')} left; ledger {report.get('ledger')}",
            file=sys.stderr,
        )
        write_jsonl(out, rows)
        return
    print_summary(report)
    print()
    print("  ".join(name.ljust(width) for name, width in LEDGER_COLUMNS).rstrip())
    shown = 0
    for row in rows:
        line = "  ".join(_cell(row.get(n), w).ljust(w) for n, w in LEDGER_COLUMNS)
        out.write(line.rstrip() + "\n")
        shown += 1
    which = ", ".join(sorted(fates)) if fates else "all fates"
    print(f"({shown} rows, {which})")
