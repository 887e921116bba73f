"""The `queuejob` command.

  queuejob run ITEM... [options] -- CMD ...   run the flow from a terminal
  queuejob demo                               the docs' eight items on the local backend
  queuejob render [options] -- CMD ...        print the Secret (redacted) and Job it would create
  queuejob ledger RUN_ID [--fate F] [--ledger-storage BLOCK] [--format table|jsonl]
                                              a finished run's summary and ledger rows
  queuejob results RUN_ID [--format jsonl|csv] [--fate F] [--follow-reruns]
                                              a finished run's items with their results
  queuejob worker [worker options] -- CMD ... the pod program (python -m queuejob.flows.worker)
  queuejob rerun RUN_ID [--fate F] [options]  an earlier run's failed items as a new run
  queuejob dead-letters QUEUE [--requeue]     list <QUEUE>.dead, or move it back to QUEUE

The broker comes from a RabbitMQBroker block (--broker-block) or the QUEUEJOB_BROKER_URL
environment variable (kept off the command line, where other users could read it).
Imports stay lazy: `queuejob worker` runs in every pod and must not pay for Prefect, and bad input
is refused before Prefect is even imported (`check_run_input`), so it costs no temporary server.
Errors are one line on stderr, `queuejob: <what is wrong>; <what to do>`, exit status 2 for bad
input; tracebacks only with --debug.

Modules: `args` (the run options, turned into the flow's parameters and checked before Prefect
starts), `running` (run, demo and render: a flow run in this process) and `after_run` (ledger,
rerun and dead-letters: what comes after a run) and `results` (the items' results, streamed).
`main` here builds the parser and dispatches.
"""

from __future__ import annotations

import signal
import sys

from queuejob.flows.cli.after_run import (
    DEAD_LETTERS_EPILOG,
    RERUN_EPILOG,
    add_dead_letter_options,
    add_rerun_options,
    cmd_dead_letters,
    cmd_ledger,
    cmd_rerun,
)
from queuejob.flows.cli.args import (
    RUN_EPILOG,
    HelpFormatter,
    Parser,
    add_debug_option,
    add_job_options,
    positive_int,
)
from queuejob.flows.cli.results import add_results_options, cmd_results
from queuejob.flows.cli.running import cmd_demo, cmd_render, cmd_run


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


def _version() -> str:
    """The installed distribution's version (pyproject.toml is its one source)."""
    import queuejob

    return str(queuejob.__version__)


LEDGER_EPILOG = """\
examples:
  queuejob ledger 3f2a9c1e-5b7d-4c1a-9e0f-2d6b8a4c1e77 --fate failed --fate left
  queuejob ledger 3f2a9c1e-5b7d-4c1a-9e0f-2d6b8a4c1e77 --format jsonl > ledger.jsonl
"""


def _parser() -> Parser:
    """The `queuejob` parser and its subcommands."""
    parser = Parser(
        prog="queuejob",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    add_debug_option(parser, top=True)
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {_version()}",
        help="print queuejob's version and exit",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser(
        "run",
        help="run the flow from a terminal",
        description="Run the queuejob flow from a terminal: queue the items, run a Job whose "
        "pods run\nthe command after '--' once per item, and report each item's fate.",
        usage="%(prog)s [options] (ITEM... | --file PATH | --jsonl PATH | --range START STOP) "
        "-- CMD...",
        epilog=RUN_EPILOG,
        formatter_class=HelpFormatter,
    )
    add_job_options(run)
    demo = sub.add_parser("demo", help="the docs' eight items on the local backend")
    demo.add_argument(
        "--queue", default="queuejob-demo", help="work queue name (default: %(default)s)"
    )
    add_debug_option(demo)
    render = sub.add_parser(
        "render",
        help="print the Secret (redacted) and Job manifests",
        formatter_class=HelpFormatter,
    )
    add_job_options(render)
    render.add_argument(
        "--run-id",
        default="00000000-0000-0000-0000-000000000000",
        metavar="ID",
        help="flow-run id to name the objects after (default: all zeros)",
    )
    render.add_argument(
        "--items-count",
        type=positive_int,
        default=8,
        metavar="N",
        help="completions for 'auto': the confirmed items (default: %(default)s)",
    )
    ledger = sub.add_parser(
        "ledger",
        help="a finished run's summary and ledger rows",
        epilog=LEDGER_EPILOG,
        formatter_class=HelpFormatter,
    )
    ledger.add_argument("run_id", metavar="RUN_ID", help="the flow run id")
    ledger.add_argument(
        "--fate",
        action="append",
        choices=["succeeded", "failed", "dead_lettered", "left"],
        metavar="FATE",
        help="only rows of this fate: succeeded, failed, dead_lettered, left; repeat for "
        "several (default: all)",
    )
    ledger.add_argument(
        "--ledger-storage",
        default=None,
        metavar="BLOCK",
        help="filesystem block the run kept its ledger in (default: QUEUEJOB_LEDGER_DIR)",
    )
    ledger.add_argument(
        "--format",
        choices=["table", "jsonl"],
        default="table",
        help="a table, or one JSON object per row (default: %(default)s)",
    )
    add_results_options(
        sub.add_parser(
            "results",
            help="a finished run's items with their results",
            description="Print a finished run's items with their results, in item order, "
            "streamed from its ledger: item_id, index, body, status, result.",
        )
    )
    sub.add_parser("worker", help="the pod program (see `queuejob worker --help`)")
    add_rerun_options(
        sub.add_parser(
            "rerun",
            help="rerun an earlier run's failed, dead-lettered, left items",
            description="Run an earlier run's items of the given fates again as a new run, "
            "with their ids and bodies from its ledger\nand its settings from its report. Any "
            "option below, and a command after '--', overrides the earlier setting.",
            usage="%(prog)s RUN_ID [--fate FATE] [options] [-- CMD...]",
            epilog=RERUN_EPILOG,
            formatter_class=HelpFormatter,
        )
    )
    add_dead_letter_options(
        sub.add_parser(
            "dead-letters",
            help="list <QUEUE>.dead, or --requeue it back to QUEUE",
            description="List the dead letters of a work queue (QUEUE.dead) without consuming "
            "them, or move them back\ninto QUEUE.",
            usage="%(prog)s QUEUE [--requeue] [--limit N] [options]",
            epilog=DEAD_LETTERS_EPILOG,
            formatter_class=HelpFormatter,
        )
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `queuejob` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        from queuejob.flows.worker import main as worker_main

        return worker_main(argv[1:])
    command: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1 :]
    parser = _parser()
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
    if args.cmd == "results":
        return cmd_results(args)
    parser.error(f"unknown command {args.cmd}")
    return 2
