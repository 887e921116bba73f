"""The `queuejob` command.

  queuejob run ITEM... [options] -- CMD ...   run the flow from a terminal
  queuejob demo                               the docs' eight items on the local backend
  queuejob render [options] -- CMD ...        print the Secret (redacted) and Job it would create
  queuejob ledger RUN_ID [--fate F] [--ledger-storage BLOCK] [--format table|jsonl]
                                              a finished run's summary and ledger rows
  queuejob worker [worker options] -- CMD ... the pod program (same as python -m flows.worker)
  queuejob rerun RUN_ID [--fate F] [options]  an earlier run's failed items as a new run
  queuejob dead-letters QUEUE [--requeue]     list <QUEUE>.dead, or move it back to QUEUE

The broker comes from a RabbitMQBroker block (--broker-block) or the QUEUEJOB_BROKER_URL
environment variable (kept off the command line, where other users could read it).
Imports stay lazy: `queuejob worker` runs in every pod and must not pay for Prefect.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

DOCS_ITEMS = ["apple", "banana", "cherry", "date", "fig", "grape", "lemon", "melon"]
DEMO_COMMAND = ["sh", "-c", 'item=$(cat); echo "processed $item"']


def _completions(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"completions must be at least 1 or 'auto' (got {n})")
    return n


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {n})")
    return n


def _add_job_options(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("items (one source)")
    src.add_argument("items", nargs="*", help="inline items")
    src.add_argument("--file", help="text file, one item per line")
    src.add_argument("--jsonl", help="JSON Lines file, one object per line (optional 'id')")
    src.add_argument("--range", nargs=2, type=int, metavar=("START", "STOP"), help="integers")
    job = p.add_argument_group("job")
    job.add_argument("--mode", choices=["coarse", "fine"], default="coarse")
    job.add_argument("--backend", choices=["kubernetes", "local"], default="kubernetes")
    job.add_argument("--parallelism", type=_positive_int, default=None)
    job.add_argument("--completions", type=_completions, default="auto")
    job.add_argument("--backoff-limit", type=int, default=None)
    job.add_argument("--deadline", type=_positive_int, default=None, help="activeDeadlineSeconds")
    job.add_argument("--idle-timeout", type=float, default=None, help="worker idle exit, s")
    job.add_argument("--image", default=None)
    job.add_argument("--namespace", default=None)
    job.add_argument("--template-block", default=None, help="WorkQueueJobTemplate block name")
    job.add_argument("--call", default=None, help="module:function instead of a command")
    q = p.add_argument_group("queue")
    q.add_argument("--queue", default="job1", help="work queue name")
    q.add_argument("--queue-type", choices=["quorum", "classic"], default="quorum")
    q.add_argument("--delivery-limit", type=_positive_int, default=3)
    q.add_argument("--stale", choices=["fail", "purge"], default="fail")
    c = p.add_argument_group("connections and policy")
    c.add_argument("--broker-block", default=None, help="RabbitMQBroker block name")
    c.add_argument("--kube-credentials-block", default=None, help="KubernetesCredentials block")
    c.add_argument("--policy", choices=["warn", "fail"], default="warn", help="caveat policy")
    c.add_argument("--timeout", type=float, default=3600.0, help="wait limit, s")
    c.add_argument("--keep-job", action="store_true", help="keep the Job after success")
    c.add_argument("--delete-queues", action="store_true", help="delete queues after success")
    c.add_argument(
        "--ledger-storage",
        default=None,
        help="LocalFileSystem or RemoteFileSystem block keeping the ledger (default: "
        "QUEUEJOB_LEDGER_DIR, else ~/.cache/queuejob/ledgers)",
    )


def _flow_kwargs(args: argparse.Namespace, command: list[str]) -> dict[str, Any]:
    from flows.core.errors import InvalidInput
    from flows.core.items import ItemSource
    from flows.params import CleanupParams, JobParams, QueueParams

    given = [bool(args.items), bool(args.file), bool(args.jsonl), args.range is not None]
    if sum(given) != 1:
        raise InvalidInput("give the items one way: inline ITEMs, --file, --jsonl or --range")
    if args.file:
        items = ItemSource(kind="text", path=args.file)
    elif args.jsonl:
        items = ItemSource(kind="jsonl", path=args.jsonl)
    elif args.range is not None:
        items = ItemSource.int_range(args.range[0], args.range[1])
    else:
        items = ItemSource.inline(args.items)
    if not command and not args.call and not args.template_block:
        raise InvalidInput("give the per-item command after '--' (e.g. -- sh -c 'cat'), or --call")
    job = JobParams(
        template_block=args.template_block,
        image=args.image,
        command=command or None,
        call=args.call,
        namespace=args.namespace,
        parallelism=args.parallelism,
        completions=args.completions,
        backoff_limit=args.backoff_limit,
        active_deadline_seconds=args.deadline,
        idle_timeout_seconds=args.idle_timeout,
    )
    return {
        "items": items,
        "queue": QueueParams(
            name=args.queue,
            type=args.queue_type,
            delivery_limit=args.delivery_limit,
            stale_messages=args.stale,
        ),
        "job": job,
        "mode": args.mode,
        "backend": args.backend,
        "broker_block": args.broker_block,
        "kubernetes_credentials_block": args.kube_credentials_block,
        "caveat_policy": args.policy,
        "timeout_seconds": args.timeout,
        "cleanup": CleanupParams(delete_job=not args.keep_job, delete_queues=args.delete_queues),
        "ledger_storage": getattr(args, "ledger_storage", None),
    }


def _progress_printer() -> Any:
    from flows.monitor import Progress

    tty = sys.stderr.isatty()
    state = {"last": ""}

    def show(p: Progress) -> None:
        if tty:
            width = 30
            filled = int(width * p.fraction)
            bar = "#" * filled + "-" * (width - filled)
            sys.stderr.write(f"\r[{bar}] {p.done}/{p.expected} done, {p.ready} queued   ")
            if p.done >= p.expected:
                sys.stderr.write("\n")
            sys.stderr.flush()
        else:
            line = f"{p.done}/{p.expected} done, {p.ready} queued"
            if line != state["last"]:
                state["last"] = line
                print(f"progress: {line}", file=sys.stderr, flush=True)

    return show


def _print_summary(report: dict[str, Any]) -> None:
    s = report["summary"]
    print()
    print(f"queuejob run {report['run_id']}  ({report['backend']} backend, {report['mode']} mode)")
    print(f"  Job:            {report['namespace']}/{report['job']}: {report['job_phase']}")
    if report.get("rerun_of"):
        print(f"  rerun of:       {report['rerun_of']}")
    print(f"  items:          {s['expected']}")
    print(f"  succeeded:      {s['succeeded']}")
    print(f"  failed:         {s['failed']}")
    print(f"  dead-lettered:  {s['dead_lettered']}")
    print(f"  left in queue:  {s['left']}")
    print(f"  findings:       {len(report['findings'])}")
    for f in report["findings"]:
        print(f"    - [{f['severity']}] {f['code']}: {f['message']}")
    print(f"  wall time:      {report['wall_time_s']:.1f} s")
    print(f"  ledger:         {report.get('ledger') or report['ledger_path']}")


def _run_flow(kwargs: dict[str, Any]) -> int:
    from flows.core.errors import QueueJobError
    from flows.monitor import LISTENERS
    from flows.work_queue import run_work_queue

    LISTENERS.append(_progress_printer())
    try:
        report = run_work_queue(**kwargs)
    except QueueJobError as exc:
        print(f"\nqueuejob: {exc}", file=sys.stderr)
        return 1
    _print_summary(report)
    return 0


def _prefect_api_problem() -> str | None:
    """Why the configured Prefect API cannot be used, or None. With no PREFECT_API_URL there is
    nothing to check: the flow runs against a temporary local server."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return None
    with get_client(sync_client=True) as client:
        error = client.api_healthcheck()
    if error is None:
        return None
    return (
        f"cannot reach the Prefect API at {url} ({type(error).__name__}: {error}); start it "
        "(prefect server start), correct PREFECT_API_URL, or unset PREFECT_API_URL to run "
        "against a temporary local server"
    )


def cmd_run(args: argparse.Namespace, command: list[str]) -> int:
    from flows.core.errors import QueueJobError

    try:
        kwargs = _flow_kwargs(args, command)
    except (QueueJobError, ValueError) as exc:
        print(f"queuejob: {exc}", file=sys.stderr)
        return 2
    # Before the run: an unreachable API would otherwise end in a traceback from the engine.
    problem = _prefect_api_problem()
    if problem is not None:
        print(f"queuejob: {problem}", file=sys.stderr)
        return 2
    return _run_flow(kwargs)


def cmd_demo(args: argparse.Namespace) -> int:
    url = os.environ.get("QUEUEJOB_BROKER_URL") or os.environ.get("QUEUEJOB_TEST_BROKER_URL")
    if not url:
        print(
            "queuejob demo: no broker. Run it through `make demo` (which finds or starts one), "
            "or set QUEUEJOB_BROKER_URL=amqp://user:pass@host:5672/%2F",
            file=sys.stderr,
        )
        return 2
    os.environ["QUEUEJOB_BROKER_URL"] = url
    print("queuejob demo: the Kubernetes docs' eight items, parallelism 2, local backend")
    print("  (the first run sets up Prefect's local database: allow up to a minute)")
    ns = argparse.Namespace(
        items=DOCS_ITEMS,
        file=None,
        jsonl=None,
        range=None,
        mode="coarse",
        backend="local",
        parallelism=2,
        completions="auto",
        backoff_limit=None,
        deadline=None,
        idle_timeout=5.0,
        image=None,
        namespace=None,
        template_block=None,
        call=None,
        queue=args.queue,
        queue_type="quorum",
        delivery_limit=3,
        stale="purge",
        broker_block=None,
        kube_credentials_block=None,
        policy="warn",
        timeout=600.0,
        keep_job=False,
        delete_queues=True,
        ledger_storage=None,
    )
    rc = _run_flow(_flow_kwargs(ns, DEMO_COMMAND))
    print()
    print("To see runs in the Prefect UI: `prefect server start` in another terminal, then")
    print("`export PREFECT_API_URL=http://127.0.0.1:4200/api` and run `make demo` again; open")
    print("http://127.0.0.1:4200/runs to find the 'queuejob' flow run, its report and ledger.")
    return rc


def cmd_render(args: argparse.Namespace, command: list[str]) -> int:
    import yaml

    from flows.core.errors import QueueJobError
    from flows.core.manifest import build_job, build_secret, job_name, redact_secret, secret_name
    from flows.params import job_spec_from

    if not (args.items or args.file or args.jsonl or args.range):
        args.items = ["placeholder"]  # render needs no items: completions come from --items-count
    try:
        kwargs = _flow_kwargs(args, command)
        job = kwargs["job"]
        base: dict[str, object] = {} if job.image else {"image": "localhost/queuejob:local"}
        spec = job_spec_from(base, job, args.mode)
        name = job_name(spec.name_prefix, args.run_id)
        completions = args.completions if args.completions != "auto" else args.items_count
        if args.mode == "fine":
            completions = None
        secret = build_secret(
            namespace=spec.namespace,
            name=secret_name(name),
            run_id=args.run_id,
            broker_url="amqp://user:password@rabbitmq:5672/%2F",
        )
        manifest = build_job(spec, run_id=args.run_id, queue=args.queue, completions=completions)
    except (QueueJobError, ValueError) as exc:
        print(f"queuejob: {exc}", file=sys.stderr)
        return 2
    print(yaml.safe_dump_all([redact_secret(secret), manifest], sort_keys=False), end="")
    return 0


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
    "image": ("job", "image"),
    "namespace": ("job", "namespace"),
    "template_block": ("job", "template_block"),
    "call": ("job", "call"),
    "queue": ("queue", "name"),
    "queue_type": ("queue", "type"),
    "delivery_limit": ("queue", "delivery_limit"),
    "stale": ("queue", "stale_messages"),
    "broker_block": ("broker_block", None),
    "kube_credentials_block": ("kubernetes_credentials_block", None),
    "policy": ("caveat_policy", None),
    "timeout": ("timeout_seconds", None),
    "delete_queues": ("cleanup", "delete_queues"),
}
ITEM_OPTIONS = ("items", "file", "jsonl", "range")


def _add_rerun_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_id", metavar="RUN_ID", help="the earlier queuejob flow run's id")
    p.add_argument(
        "--fate",
        action="append",
        default=None,
        help="which of its items: failed, dead_lettered, left, succeeded (repeat, or "
        "comma-separate; default failed,dead_lettered,left)",
    )
    _add_job_options(p)
    for action in p._actions:
        if action.dest in ITEM_OPTIONS:  # the items come from the ledger (refused if given)
            action.help = argparse.SUPPRESS
    # No defaults: only the options given on the command line (not None, flags not False)
    # override the earlier run's settings.
    p.set_defaults(**{a.dest: None for a in p._actions if a.dest not in ("help", "run_id")})
    if not any("--ledger-storage" in a.option_strings for a in p._actions):
        p.add_argument(
            "--ledger-storage",
            default=None,
            help="LocalFileSystem or RemoteFileSystem block holding the run's ledger",
        )


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
    from flows.core.errors import QueueJobError

    given = [name for name in ITEM_OPTIONS if getattr(args, name, None)]
    if given:
        print(
            f"queuejob: a rerun takes its items from run {args.run_id}'s ledger; drop "
            + ", ".join("ITEM..." if n == "items" else f"--{n}" for n in given),
            file=sys.stderr,
        )
        return 2
    try:
        from flows.adapters.ledger_storage import open_storage
        from flows.core.rerun import parse_fates, rerun_params

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
        from flows.rerun import flow_kwargs

        kwargs = flow_kwargs(params)
    except (QueueJobError, ValueError) as exc:
        print(f"queuejob: {exc}", file=sys.stderr)
        return 2
    problem = _prefect_api_problem()
    if problem is not None:
        print(f"queuejob: {problem}", file=sys.stderr)
        return 2
    print(
        f"queuejob rerun: {kwargs['items'].describe()} ({kwargs.get('backend')} backend, "
        f"queue {kwargs['queue'].name!r})",
        flush=True,
    )
    return _run_flow(kwargs)


# --- dead letters ------------------------------------------------------------------------------

DEAD_LETTER_LIST_CAP = 1000


def _broker_config(broker_block: str | None) -> Any:
    """The broker from a RabbitMQBroker block, else QUEUEJOB_BROKER_URL (without importing
    Prefect when no block is named)."""
    if broker_block:
        from flows.tasks import resolve_broker

        return resolve_broker(broker_block)
    from flows.adapters.broker import BrokerConfig
    from flows.core.errors import ConfigError

    url = os.environ.get("QUEUEJOB_BROKER_URL")
    if not url:
        raise ConfigError(
            "no broker configured: pass --broker-block <name of a RabbitMQBroker block>, or set "
            "QUEUEJOB_BROKER_URL"
        )
    return BrokerConfig(url=url)


def _add_dead_letter_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("queue", help="the work queue; its dead letters are in <QUEUE>.dead")
    p.add_argument(
        "--requeue",
        action="store_true",
        help="move the dead letters back to QUEUE (confirmed, then acked; safe to run again)",
    )
    p.add_argument(
        "--limit",
        type=_positive_int,
        default=None,
        help=f"at most N dead letters, oldest first (default: all; a listing shows at most "
        f"{DEAD_LETTER_LIST_CAP})",
    )
    p.add_argument("--broker-block", default=None, help="RabbitMQBroker block name")
    p.add_argument(
        "--ledger-storage",
        default=None,
        help="LocalFileSystem or RemoteFileSystem block holding the runs' ledgers (for the "
        "exit codes and error tails)",
    )


def _short(run_id: str | None) -> str:
    return (run_id or "-")[:8]


def cmd_dead_letters(args: argparse.Namespace) -> int:
    from flows.adapters import dead_letters as dl
    from flows.adapters.broker import QueueSettings
    from flows.core.dead_letters import plural
    from flows.core.errors import QueueJobError

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
    from flows.adapters.ledger_storage import open_storage
    from flows.core.dead_letters import attempts_from
    from flows.core.errors import QueueJobError

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
    from flows.core.dead_letters import plural

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
    from flows.adapters.ledger_storage import normalize_fates, open_storage
    from flows.core.errors import QueueJobError

    try:
        fates = normalize_fates(args.fate) if args.fate else None
        storage = open_storage(args.ledger_storage)
        report = storage.read_report(args.run_id)
        rows = storage.iter_rows(args.run_id, fates)
        out = sys.stdout
        if args.format == "jsonl":
            import json

            s = report.get("summary", {})
            print(
                f"queuejob run {args.run_id}: {s.get('expected')} items, {s.get('succeeded')} "
                f"succeeded, {s.get('failed')} failed, {s.get('dead_lettered')} dead-lettered, "
                f"{s.get('left')} left; ledger {report.get('ledger')}",
                file=sys.stderr,
            )
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
            return 0
        _print_summary(report)
        print()
        print("  ".join(name.ljust(width) for name, width in LEDGER_COLUMNS).rstrip())
        shown = 0
        for row in rows:
            line = "  ".join(_cell(row.get(n), w).ljust(w) for n, w in LEDGER_COLUMNS)
            out.write(line.rstrip() + "\n")
            shown += 1
        which = ", ".join(sorted(fates)) if fates else "all fates"
        print(f"({shown} rows, {which})")
    except QueueJobError as exc:
        print(f"queuejob: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `queuejob ledger ... | head`
        sys.stderr.close()
        return 0
    return 0


def _exit_cleanly_on_sigterm() -> None:
    """Make SIGTERM end the process as an exception does, so its exit handlers run.

    Prefect turns a SIGTERM during a flow run into a crash (the crash hook deletes the Job),
    then hands the signal to the handler that was there before. With the default one the
    process dies at once, and the temporary Prefect API server started for a run without
    ``PREFECT_API_URL`` is left running: it is stopped by an exit handler.
    """

    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `queuejob` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        from flows.worker import main as worker_main

        return worker_main(argv[1:])
    command: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1 :]
    parser = argparse.ArgumentParser(prog="queuejob", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run the flow from a terminal")
    _add_job_options(run)
    demo = sub.add_parser("demo", help="the docs' eight items on the local backend")
    demo.add_argument("--queue", default="queuejob-demo")
    render = sub.add_parser("render", help="print the Secret (redacted) and Job manifests")
    _add_job_options(render)
    render.add_argument("--run-id", default="00000000-0000-0000-0000-000000000000")
    render.add_argument(
        "--items-count",
        type=_positive_int,
        default=8,
        help="completions for 'auto' (the confirmed count at run time)",
    )
    ledger = sub.add_parser("ledger", help="a finished run's summary and ledger rows")
    ledger.add_argument("run_id", metavar="RUN_ID", help="the flow run id")
    ledger.add_argument(
        "--fate",
        action="append",
        choices=["succeeded", "failed", "dead_lettered", "left"],
        help="only rows of this fate (repeat for several)",
    )
    ledger.add_argument(
        "--ledger-storage",
        default=None,
        help="the LocalFileSystem or RemoteFileSystem block the run kept its ledger in",
    )
    ledger.add_argument("--format", choices=["table", "jsonl"], default="table")
    sub.add_parser("worker", help="the pod program (see `queuejob worker --help`)")
    _add_rerun_options(
        sub.add_parser(
            "rerun",
            help="rerun an earlier run's failed, dead-lettered, left items",
            description="Run an earlier run's items of the given fates again as a new run, "
            "with their ids and bodies from its ledger and its settings from its report. Any "
            "option below, and a command after '--', overrides the earlier setting.",
        )
    )
    _add_dead_letter_options(
        sub.add_parser("dead-letters", help="list <QUEUE>.dead, or --requeue it back to QUEUE")
    )
    args = parser.parse_args(argv)
    if args.cmd in ("run", "demo", "rerun"):
        _exit_cleanly_on_sigterm()
    if args.cmd == "run":
        return cmd_run(args, command)
    if args.cmd == "demo":
        return cmd_demo(args)
    if args.cmd == "render":
        return cmd_render(args, command)
    if args.cmd == "dead-letters":
        return cmd_dead_letters(args)
    if args.cmd == "rerun":
        return cmd_rerun(args, command)
    if args.cmd == "ledger":
        return cmd_ledger(args)
    parser.error(f"unknown command {args.cmd}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
