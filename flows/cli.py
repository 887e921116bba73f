"""The `queuejob` command.

  queuejob run ITEM... [options] -- CMD ...   run the flow from a terminal
  queuejob demo                               the docs' eight items on the local backend
  queuejob render [options] -- CMD ...        print the Secret (redacted) and Job it would create
  queuejob ledger RUN_ID [--fate F] [--ledger-storage BLOCK] [--format table|jsonl]
                                              a finished run's summary and ledger rows
  queuejob worker [worker options] -- CMD ... the pod program (same as python -m flows.worker)

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
    args = parser.parse_args(argv)
    if args.cmd in ("run", "demo"):
        _exit_cleanly_on_sigterm()
    if args.cmd == "run":
        return cmd_run(args, command)
    if args.cmd == "demo":
        return cmd_demo(args)
    if args.cmd == "render":
        return cmd_render(args, command)
    if args.cmd == "ledger":
        return cmd_ledger(args)
    parser.error(f"unknown command {args.cmd}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
