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
Imports stay lazy: `queuejob worker` runs in every pod and must not pay for Prefect, and bad input
is refused before Prefect is even imported (`check_run_input`), so it costs no temporary server.
Errors are one line on stderr, `queuejob: <what is wrong>; <what to do>`, exit status 2 for bad
input; tracebacks only with --debug.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from pydantic import ValidationError

DOCS_ITEMS = ["apple", "banana", "cherry", "date", "fig", "grape", "lemon", "melon"]
DEMO_COMMAND = ["sh", "-c", 'item=$(cat); echo "processed $item"']
WORKER_LINE = "[queuejob worker "  # how the pod program's own log lines start
BROKER_URL_ENV = "QUEUEJOB_BROKER_URL"  # as flows.tasks reads it (not imported: it loads Prefect)
# Prefect's temporary server sends telemetry unless told not to; with no internet (common on
# batch clusters) every run then logs an error and a traceback. Set it to true to send it again.
TELEMETRY_ENV = "PREFECT_SERVER_ANALYTICS_ENABLED"

# Parameter fields -> the options that set them, so an error names what the user typed.
OPTION_NAMES = {
    "queue.name": "--queue",
    "queue.type": "--queue-type",
    "queue.delivery_limit": "--delivery-limit",
    "queue.stale_messages": "--stale",
    "job.template_block": "--template-block",
    "job.image": "--image",
    "job.command": "the command after '--'",
    "job.call": "--call",
    "job.namespace": "--namespace",
    "job.parallelism": "--parallelism",
    "job.completions": "--completions",
    "job.backoff_limit": "--backoff-limit",
    "job.active_deadline_seconds": "--deadline",
    "job.idle_timeout_seconds": "--idle-timeout",
}

RUN_EPILOG = """\
examples:
  # the docs' pattern on this machine: each item on a pod's stdin, pods as local processes
  queuejob run apple banana cherry --backend local --parallelism 2 -- sh -c 'cat; echo'

  # a file of items on a cluster, failing the run on any caveat finding
  queuejob run --file items.txt --image registry.example/queuejob:1.0 --namespace batch \\
      --policy fail -- python -m mypkg.process

  # a million integers, pods looping over many items each
  queuejob run --range 0 1000000 --mode fine --parallelism 8 --backend local \\
      -- sh -c 'cat >/dev/null'

The command after '--' runs once per item with the item on its stdin. The broker URL comes from
QUEUEJOB_BROKER_URL (or --broker-block), never from the command line. Without PREFECT_API_URL the
run uses a temporary local Prefect server; Prefect's telemetry is off for it unless
PREFECT_SERVER_ANALYTICS_ENABLED=true.
"""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: what is wrong, and where to read more."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}; see `{self.prog} --help`\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's examples as written; wider option column for one-line help."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=100)


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


def _non_negative_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (got {n})")
    return n


def _positive_seconds(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {value!r}") from None
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds (got {value})")
    return x


def _add_debug_option(p: argparse.ArgumentParser, *, top: bool = False) -> None:
    # On the subcommands too, so `queuejob run ... --debug` works as `queuejob --debug run ...`;
    # SUPPRESS there keeps a subcommand from resetting the top-level value.
    p.add_argument(
        "--debug",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="show tracebacks and Prefect's full errors (default: off)",
    )


def _add_job_options(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("items (give them one way)")
    src.add_argument("items", nargs="*", metavar="ITEM", help="items given inline, one per word")
    src.add_argument("--file", metavar="PATH", help="text file, one item per line (blank skipped)")
    src.add_argument(
        "--jsonl", metavar="PATH", help="JSON Lines file, one object per line, optional 'id'"
    )
    src.add_argument(
        "--range", nargs=2, type=int, metavar=("START", "STOP"), help="the integers START..STOP-1"
    )
    job = p.add_argument_group("job")
    job.add_argument(
        "--mode",
        choices=["coarse", "fine"],
        default="coarse",
        help="coarse: one item per pod; fine: pods loop (default: %(default)s)",
    )
    job.add_argument(
        "--backend",
        choices=["kubernetes", "local"],
        default="kubernetes",
        help="a Job on a cluster, or pods as processes here (default: %(default)s)",
    )
    job.add_argument(
        "--parallelism",
        type=_positive_int,
        default=None,
        metavar="N",
        help="pods running at once (default: 2, or the template's)",
    )
    job.add_argument(
        "--completions",
        type=_completions,
        default="auto",
        metavar="N|auto",
        help="pods to succeed; auto: one per confirmed item (default: %(default)s)",
    )
    job.add_argument(
        "--backoff-limit",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help="failed pods before the Job fails (default: 6, or the template's)",
    )
    job.add_argument(
        "--deadline",
        type=_positive_int,
        default=None,
        metavar="S",
        help="activeDeadlineSeconds: the Job's time limit (default: none)",
    )
    job.add_argument(
        "--idle-timeout",
        type=_positive_seconds,
        default=None,
        metavar="S",
        help="a worker idle this long exits 'no work' (default: 10)",
    )
    job.add_argument(
        "--image",
        default=None,
        metavar="REF",
        help="image with queuejob installed; kubernetes needs one (default: none)",
    )
    job.add_argument(
        "--namespace",
        default=None,
        metavar="NS",
        help="namespace of the Job and Secret (default: default, or template's)",
    )
    job.add_argument(
        "--template-block",
        default=None,
        metavar="NAME",
        help="WorkQueueJobTemplate block these options override (default: none)",
    )
    job.add_argument(
        "--call",
        default=None,
        metavar="MOD:FUNC",
        help="Python callable given each item, not a command (default: none)",
    )
    q = p.add_argument_group("queue")
    q.add_argument(
        "--queue", default="job1", metavar="NAME", help="work queue name (default: %(default)s)"
    )
    q.add_argument(
        "--queue-type",
        choices=["quorum", "classic"],
        default="quorum",
        help="quorum bounds poison items by --delivery-limit (default: %(default)s)",
    )
    q.add_argument(
        "--delivery-limit",
        type=_positive_int,
        default=3,
        metavar="N",
        help="redeliveries before an item is dead-lettered (default: %(default)s)",
    )
    q.add_argument(
        "--stale",
        choices=["fail", "purge"],
        default="fail",
        help="messages already queued: fail the run, or purge (default: %(default)s)",
    )
    c = p.add_argument_group("connections and policy")
    c.add_argument(
        "--broker-block",
        default=None,
        metavar="NAME",
        help=f"RabbitMQBroker block (default: the URL in {BROKER_URL_ENV})",
    )
    c.add_argument(
        "--kube-credentials-block",
        default=None,
        metavar="NAME",
        help="KubernetesCredentials block (default: in-cluster, then KUBECONFIG)",
    )
    c.add_argument(
        "--policy",
        choices=["warn", "fail"],
        default="warn",
        help="caveat findings: report them, or fail the run (default: %(default)s)",
    )
    c.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=3600.0,
        metavar="S",
        help="how long to wait for the Job, in seconds (default: %(default)g)",
    )
    c.add_argument(
        "--keep-job",
        action="store_true",
        help="keep the Job, pods and Secret after success (default: delete)",
    )
    c.add_argument(
        "--delete-queues",
        action="store_true",
        help="delete the run's queues after success, if empty (default: no)",
    )
    c.add_argument(
        "--ledger-storage",
        default=None,
        metavar="BLOCK",
        help="filesystem block keeping the ledger (default: QUEUEJOB_LEDGER_DIR)",
    )
    _add_debug_option(p)


def _plain(exc: ValidationError, prefix: str) -> str:
    """A pydantic error as one line naming the CLI's options."""
    from flows.core.validation import readable_errors

    return readable_errors(exc, show_input=True, prefix=prefix, names=OPTION_NAMES)


def _flow_kwargs(args: argparse.Namespace, command: list[str]) -> dict[str, Any]:
    """The flow's parameters from the options; `InvalidInput` (one plain line) when they do not
    make parameters at all. What else can be checked without Prefect is `check_run_input`'s."""
    from pydantic import ValidationError

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
    if command and args.call:
        raise InvalidInput("give either the per-item command after '--' or --call, not both")
    try:
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
    except ValidationError as exc:
        raise InvalidInput(f"invalid job settings: {_plain(exc, 'job')}") from None
    try:
        queue = QueueParams(
            name=args.queue,
            type=args.queue_type,
            delivery_limit=args.delivery_limit,
            stale_messages=args.stale,
        )
    except ValidationError as exc:
        raise InvalidInput(f"invalid queue settings: {_plain(exc, 'queue')}") from None
    return {
        "items": items,
        "queue": queue,
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


def check_run_input(kwargs: dict[str, Any]) -> None:
    """Check all of a run's input that needs neither Prefect, the broker nor the cluster.

    `queuejob run` calls it before Prefect is imported, so bad input is refused in a moment and
    starts no temporary server. Raises `InvalidInput` or `ConfigError`, one plain line each. The
    flow checks the same again for runs started from the UI or the API; what needs Prefect
    (blocks), the broker or the cluster (the namespace) is left to it.
    """
    _check_items(kwargs["items"])
    _check_job(kwargs["job"], kwargs["mode"], kwargs["backend"])
    _check_broker(kwargs["broker_block"])


def _check_items(items: Any) -> None:
    from flows.core.items import count_items, iter_items

    if items.kind == "range":
        next(iter_items(items))  # integers are always valid: only an empty range is refused
        return
    # The flow's own validation, streamed: the file is read once here, never held in memory.
    count_items(items)


def _check_job(job: Any, mode: str, backend: str) -> None:
    from flows.core.errors import InvalidInput
    from flows.core.manifest import check_dns1123_label, check_image
    from flows.params import job_spec_for_run

    if job.template_block:
        # The block itself is read by the flow; the options that override it are checked here.
        if job.image is not None:
            check_image(job.image)
        if job.namespace is not None:
            check_dns1123_label(job.namespace, "--namespace")
        return
    if job.image is None and backend == "kubernetes":
        raise InvalidInput(
            "no image for the kubernetes backend: pass --image REGISTRY/REPOSITORY:TAG (an image "
            "with queuejob installed), or --template-block NAME, or use --backend local"
        )
    job_spec_for_run(job, mode, backend, names=OPTION_NAMES)


def _check_broker(broker_block: str | None) -> None:
    from flows.core.errors import ConfigError

    if broker_block:
        return  # a block is read through Prefect, by the flow
    url = os.environ.get(BROKER_URL_ENV)
    if not url:
        raise ConfigError(
            f"no broker: set {BROKER_URL_ENV}=amqp://user:password@host:5672/%2F in the "
            "environment, or pass --broker-block NAME"
        )
    from flows.adapters.broker import BrokerConfig

    BrokerConfig(url=url)  # a malformed URL raises ConfigError; the password is never shown


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


class _NoTraceback(logging.Formatter):
    """Formats as the handler's own formatter did, without the traceback: Prefect logs each
    failed task and flow with one, which the CLI's one-line error already says in plain words."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            text = self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved
        cut = text.find("\nTraceback (most recent call last):")
        return text if cut < 0 else text[:cut]


def _prepare_prefect(debug: bool) -> None:
    """Set Prefect up for a run from the terminal.

    Before Prefect is imported: no telemetry from the temporary server, and time for it to
    start (the user's own settings win). After: no tracebacks on the terminal unless --debug;
    the run's logs in the Prefect API keep them (only the console handlers change).
    """
    os.environ.setdefault(TELEMETRY_ENV, "false")
    # Prefect waits 20 s for its temporary server; a first run (database set-up) on a busy
    # machine takes longer. The user's own setting wins.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()  # as `import prefect.main` would; later set-ups keep the handlers

    if debug:
        return
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for lg in loggers:
        for handler in lg.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(
                handler.formatter, _NoTraceback
            ):
                handler.setFormatter(_NoTraceback(handler.formatter))


def _run_flow(kwargs: dict[str, Any], *, debug: bool = False) -> tuple[int, dict[str, Any] | None]:
    """Run the flow in this process; (exit status, report or None when the run failed)."""
    from flows.core.errors import QueueJobError
    from flows.monitor import LISTENERS
    from flows.work_queue import run_work_queue

    LISTENERS.append(_progress_printer())
    try:
        report = run_work_queue(**kwargs)
    except QueueJobError as exc:
        print(f"\nqueuejob: {_one_line(exc)}", file=sys.stderr)
        return 1, None
    except Exception as exc:
        if debug:
            raise
        print(
            f"\nqueuejob: the run failed: {type(exc).__name__}: {_one_line(exc)} "
            "(run again with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1, None
    _print_summary(report)
    return 0, report


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


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
        check_run_input(kwargs)
    except QueueJobError as exc:
        print(f"queuejob: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file that opened but could not be read through
        print(f"queuejob: cannot read the items: {exc}; check the file", file=sys.stderr)
        return 2
    _prepare_prefect(args.debug)
    # Before the run: an unreachable API would otherwise end in a traceback from the engine.
    problem = _prefect_api_problem()
    if problem is not None:
        print(f"queuejob: {problem}", file=sys.stderr)
        return 2
    return _run_flow(kwargs, debug=args.debug)[0]


def cmd_demo(args: argparse.Namespace) -> int:
    url = os.environ.get(BROKER_URL_ENV) or os.environ.get("QUEUEJOB_TEST_BROKER_URL")
    if not url:
        print(
            "queuejob demo: no broker. Run it through `make demo` (which finds or starts one), "
            f"or set {BROKER_URL_ENV}=amqp://user:pass@host:5672/%2F",
            file=sys.stderr,
        )
        return 2
    os.environ[BROKER_URL_ENV] = url
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
        keep_job=True,  # until its pods' logs are shown; deleted below
        delete_queues=True,
        ledger_storage=None,
    )
    _prepare_prefect(args.debug)
    rc, report = _run_flow(_flow_kwargs(ns, DEMO_COMMAND), debug=args.debug)
    if report is not None:
        _show_pod_logs(report)
    print()
    print("To see runs in the Prefect UI: `prefect server start` in another terminal, then")
    print("`export PREFECT_API_URL=http://127.0.0.1:4200/api` and run `make demo` again; open")
    print("http://127.0.0.1:4200/runs to find the 'queuejob' flow run, its report and ledger.")
    return rc


def _show_pod_logs(report: dict[str, Any]) -> None:
    """What each pod printed, as `kubectl logs` shows it in the docs; then delete the Job."""
    from flows.adapters.local import LocalBackend

    backend = LocalBackend()
    handle = backend.find_job(
        namespace=report["namespace"], name=report["job"], run_id=report["run_id"]
    )
    if handle is None:
        return
    logs = backend.pod_logs(handle)
    print()
    print("What each pod printed, as `kubectl logs <pod>` shows it in the docs (the worker's own")
    print("'[queuejob worker ...]' lines left out):")
    width = max((len(pod) for pod in logs), default=0)
    for pod, text in logs.items():
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(WORKER_LINE)]
        for i, line in enumerate(lines or ["(nothing)"]):
            print(f"  {pod if i == 0 else '':<{width}}  {line}")
    backend.delete_run(namespace=report["namespace"], run_id=report["run_id"])


def cmd_render(args: argparse.Namespace, command: list[str]) -> int:
    import yaml

    from flows.core.errors import QueueJobError
    from flows.core.manifest import build_job, build_secret, job_name, redact_secret, secret_name
    from flows.params import job_spec_for_run

    if not (args.items or args.file or args.jsonl or args.range):
        args.items = ["placeholder"]  # render needs no items: completions come from --items-count
    try:
        kwargs = _flow_kwargs(args, command)
        # As the local backend does: without --image, the manifest shows a placeholder image.
        spec = job_spec_for_run(kwargs["job"], args.mode, "local", names=OPTION_NAMES)
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
    except QueueJobError as exc:
        print(f"queuejob: {_one_line(exc)}", file=sys.stderr)
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
        from flows.core.rerun import parse_fates, rerun_params
        from flows.storage import open_storage

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
    debug = bool(getattr(args, "debug", False))
    _prepare_prefect(debug)
    return _run_flow(kwargs, debug=debug)[0]


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
    from flows.adapters.broker import QueueSettings
    from flows.adapters.broker import dead_letters as dl
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
    from flows.core.dead_letters import attempts_from
    from flows.core.errors import QueueJobError
    from flows.storage import open_storage

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
    from flows.adapters.ledger_storage import normalize_fates
    from flows.core.errors import QueueJobError
    from flows.storage import open_storage

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
    parser = _Parser(
        prog="queuejob",
        description=__doc__.split("\n\n")[0],
        formatter_class=_HelpFormatter,
    )
    _add_debug_option(parser, top=True)
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser(
        "run",
        help="run the flow from a terminal",
        description="Run the queuejob flow from a terminal: queue the items, run a Job whose "
        "pods run\nthe command after '--' once per item, and report each item's fate.",
        usage="%(prog)s [options] (ITEM... | --file PATH | --jsonl PATH | --range START STOP) "
        "-- CMD...",
        epilog=RUN_EPILOG,
        formatter_class=_HelpFormatter,
    )
    _add_job_options(run)
    demo = sub.add_parser("demo", help="the docs' eight items on the local backend")
    demo.add_argument(
        "--queue", default="queuejob-demo", help="work queue name (default: %(default)s)"
    )
    _add_debug_option(demo)
    render = sub.add_parser(
        "render",
        help="print the Secret (redacted) and Job manifests",
        formatter_class=_HelpFormatter,
    )
    _add_job_options(render)
    render.add_argument(
        "--run-id",
        default="00000000-0000-0000-0000-000000000000",
        metavar="ID",
        help="flow-run id to name the objects after (default: all zeros)",
    )
    render.add_argument(
        "--items-count",
        type=_positive_int,
        default=8,
        metavar="N",
        help="completions for 'auto': the confirmed items (default: %(default)s)",
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
