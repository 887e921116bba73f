"""The options of ``queuejob run`` and ``render``: the parser, the option groups with their
help, the flow's parameters built from them, and `check_run_input`, which refuses bad input
before Prefect is imported.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from pydantic import ValidationError


DOCS_ITEMS = ["apple", "banana", "cherry", "date", "fig", "grape", "lemon", "melon"]
DEMO_COMMAND = ["sh", "-c", 'item=$(cat); echo "processed $item"']
WORKER_LINE = "[queuejob worker "  # how the pod program's own log lines start
# As queuejob.flows.tasks reads it (not imported from there: that loads Prefect).
BROKER_URL_ENV = "QUEUEJOB_BROKER_URL"
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
    "job.max_result_bytes": "--max-result-bytes",
    "job.item_timeout_seconds": "--item-timeout",
    "job.start_grace_seconds": "--start-grace",
    "job.start_timeout_seconds": "--start-timeout",
}

# The exit status of `queuejob run` and `queuejob rerun` (README.md has the same table).
EXIT_CODES: tuple[tuple[int, str], ...] = (
    (0, "every item succeeded, or those that did not are within --max-failed-items"),
    (1, "the run failed: items beyond --max-failed-items, the Job failed, its pods could not"),
    (1, "start, a timeout, caveat findings under --policy fail, or the broker or the cluster"),
    (1, "failed the run"),
    (2, "usage or configuration refused before anything was queued or created"),
    (130, "interrupted (Ctrl-C), once the run's Job and pods are deleted"),
    (143, "terminated (SIGTERM), once the run's Job and pods are deleted"),
)


def exit_code_lines() -> str:
    """The exit statuses as ``--help`` shows them (a status continued on a second line is
    shown once)."""
    lines, last = [], None
    for code, meaning in EXIT_CODES:
        lines.append(f"  {'' if code == last else code:<5}{meaning}")
        last = code
    return "\n".join(lines)


RUN_EPILOG = (
    """\
examples:
  # the docs' pattern on this machine: each item on a pod's stdin, pods as local processes
  queuejob run apple banana cherry --backend local --parallelism 2 -- sh -c 'cat; echo'

  # a file of items on a cluster, failing the run on any caveat finding
  queuejob run --file items.txt --image registry.example/queuejob:1.0 --namespace batch \\
      --policy fail -- python -m mypkg.process

  # a million integers, pods looping over many items each
  queuejob run --range 0 1000000 --mode fine --parallelism 8 --backend local \\
      -- sh -c 'cat >/dev/null'

  # a nightly batch that may lose up to 1% of its items to a known-bad input
  queuejob run --file items.txt --backend local --max-failed-items 1% -- ./process.sh

Items that did not succeed (failed, dead-lettered, left in the queue) fail the run unless
--max-failed-items tolerates them; --policy is about the pattern's caveats only (completions
against the items, stale messages, pods without work, items processed twice).

exit status:
"""
    + exit_code_lines()
    + """

The command after '--' runs once per item with the item on its stdin. The broker URL comes from
QUEUEJOB_BROKER_URL (or --broker-block), never from the command line. Without PREFECT_API_URL the
run uses a temporary local Prefect server; Prefect's telemetry is off for it unless
PREFECT_SERVER_ANALYTICS_ENABLED=true.
"""
)


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: what is wrong, and where to read more."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}; see `{self.prog} --help`\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
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


def positive_int(value: str) -> int:
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


def max_failed_items(value: str) -> int | str:
    """``--max-failed-items``: a number of items (an int) or a percentage (kept as text)."""
    from queuejob.flows.core.errors import InvalidInput
    from queuejob.flows.core.outcome import Tolerance

    try:
        tolerance = Tolerance.parse(value)
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return tolerance.count if tolerance.count is not None else value.strip()


def _positive_seconds(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {value!r}") from None
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds (got {value})")
    return x


def _non_negative_seconds(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {value!r}") from None
    if not x >= 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds (got {value})")
    return x


def add_debug_option(p: argparse.ArgumentParser, *, top: bool = False) -> None:
    # On the subcommands too, so `queuejob run ... --debug` works as `queuejob --debug run ...`;
    # SUPPRESS there keeps a subcommand from resetting the top-level value.
    p.add_argument(
        "--debug",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="show tracebacks and Prefect's full errors (default: off)",
    )


def add_job_options(p: argparse.ArgumentParser) -> None:
    """The options of ``run`` and ``render``, in the groups ``--help`` shows."""
    _add_item_options(p)
    _add_job_group(p)
    _add_queue_options(p)
    _add_connection_options(p)
    add_debug_option(p)


def _add_item_options(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("items (give them one way)")
    src.add_argument("items", nargs="*", metavar="ITEM", help="items given inline, one per word")
    src.add_argument("--file", metavar="PATH", help="text file, one item per line (blank skipped)")
    src.add_argument(
        "--jsonl", metavar="PATH", help="JSON Lines file, one object per line, optional 'id'"
    )
    src.add_argument(
        "--range", nargs=2, type=int, metavar=("START", "STOP"), help="the integers START..STOP-1"
    )


def _add_job_group(p: argparse.ArgumentParser) -> None:
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
        type=positive_int,
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
        type=positive_int,
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
        "--item-timeout",
        type=_positive_seconds,
        default=None,
        metavar="S",
        help="an item running longer fails and is retried (default: no limit)",
    )
    job.add_argument(
        "--start-grace",
        type=_non_negative_seconds,
        default=None,
        metavar="S",
        help="k8s: a pull/config error this long fails the run (default: 60)",
    )
    job.add_argument(
        "--start-timeout",
        type=_non_negative_seconds,
        default=None,
        metavar="S",
        help="k8s: no pod started this long fails the run; 0: off (default: 600)",
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
    job.add_argument(
        "--max-result-bytes",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help="largest result per item; larger fails it (default: 65536)",
    )


def _add_queue_options(p: argparse.ArgumentParser) -> None:
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
        type=positive_int,
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


def _add_connection_options(p: argparse.ArgumentParser) -> None:
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
        "--max-failed-items",
        type=max_failed_items,
        default=0,
        metavar="N|P%",
        help="items that may not succeed, else the run fails (default: %(default)s)",
    )
    c.add_argument(
        "--policy",
        choices=["warn", "fail"],
        default="warn",
        help="caveats (not items' fates): report, or fail the run (default: %(default)s)",
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


def _plain(exc: ValidationError, prefix: str) -> str:
    """A pydantic error as one line naming the CLI's options."""
    from queuejob.flows.core.validation import readable_errors

    return readable_errors(exc, show_input=True, prefix=prefix, names=OPTION_NAMES)


def flow_kwargs(args: argparse.Namespace, command: list[str]) -> dict[str, Any]:
    """The flow's parameters from the options; `InvalidInput` (one plain line) when they do not
    make parameters at all. What else can be checked without Prefect is `check_run_input`'s."""
    from pydantic import ValidationError

    from queuejob.flows.core.errors import InvalidInput
    from queuejob.flows.core.items import ItemSource
    from queuejob.flows.params import CleanupParams, JobParams, QueueParams

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
            max_result_bytes=getattr(args, "max_result_bytes", None),
            item_timeout_seconds=getattr(args, "item_timeout", None),
            start_grace_seconds=getattr(args, "start_grace", None),
            start_timeout_seconds=getattr(args, "start_timeout", None),
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
        "max_failed_items": getattr(args, "max_failed_items", 0),
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
    from queuejob.flows.core.items import count_items, iter_items

    if items.kind == "range":
        next(iter_items(items))  # integers are always valid: only an empty range is refused
        return
    # The flow's own validation, streamed: the file is read once here, never held in memory.
    count_items(items)


def _check_job(job: Any, mode: str, backend: str) -> None:
    from queuejob.flows.core.errors import InvalidInput
    from queuejob.flows.core.manifest import check_dns1123_label, check_image
    from queuejob.flows.params import job_spec_for_run

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
    from queuejob.flows.core.errors import ConfigError

    if broker_block:
        return  # a block is read through Prefect, by the flow
    url = os.environ.get(BROKER_URL_ENV)
    if not url:
        raise ConfigError(
            f"no broker: set {BROKER_URL_ENV}=amqp://user:password@host:5672/%2F in the "
            "environment, or pass --broker-block NAME"
        )
    from queuejob.flows.adapters.broker import BrokerConfig

    BrokerConfig(url=url)  # a malformed URL raises ConfigError; the password is never shown
