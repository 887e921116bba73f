"""The `queuejob` command.

  queuejob run ITEM... [options] -- CMD ...   run the flow from a terminal
  queuejob demo                               the docs' eight items on the local backend
  queuejob render [options] -- CMD ...        print the Secret (redacted) and Job it would create
  queuejob worker [worker options] -- CMD ... the pod program (same as python -m flows.worker)

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
        help="delete the run's queues after success (default: keep them)",
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
    print(f"  items:          {s['expected']}")
    print(f"  succeeded:      {s['succeeded']}")
    print(f"  failed:         {s['failed']}")
    print(f"  dead-lettered:  {s['dead_lettered']}")
    print(f"  left in queue:  {s['left']}")
    print(f"  findings:       {len(report['findings'])}")
    for f in report["findings"]:
        print(f"    - [{f['severity']}] {f['code']}: {f['message']}")
    print(f"  wall time:      {report['wall_time_s']:.1f} s")
    print(f"  ledger:         {report['ledger_path']}")


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
    from flows.adapters.local_jobs import LocalBackend

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
    parser.error(f"unknown command {args.cmd}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
