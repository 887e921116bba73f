"""``queuejob run``, ``demo`` and ``render``: Prefect set up for a terminal (a temporary server
when no API is configured, telemetry off, no tracebacks without --debug), the flow run in this
process, its progress, its summary and its exit status (`args.EXIT_CODES`: 0 Completed, 1
Failed, 2 refused before anything was queued or created, 130 interrupted). ``queuejob rerun``
runs its flow through `run_flow` too, so it exits the same way.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass

from queuejob.flows.cli.args import (
    BROKER_URL_ENV,
    DEMO_COMMAND,
    DOCS_ITEMS,
    OPTION_NAMES,
    TELEMETRY_ENV,
    WORKER_LINE,
    check_run_input,
    flow_kwargs,
)


def _progress_printer() -> Any:
    from queuejob.flows.monitor import Progress

    tty = sys.stderr.isatty()
    state = {"last": ""}

    def show(p: Progress) -> None:
        pending = f"; {p.pending}" if p.pending else ""
        if tty:
            width = 30
            filled = int(width * p.fraction)
            bar = "#" * filled + "-" * (width - filled)
            sys.stderr.write(
                f"\r\x1b[K[{bar}] {p.done}/{p.expected} done, {p.ready} queued{pending}"
            )
            if p.done >= p.expected:
                sys.stderr.write("\n")
            sys.stderr.flush()
        else:
            line = f"{p.done}/{p.expected} done, {p.ready} queued{pending}"
            if line != state["last"]:
                state["last"] = line
                print(f"progress: {line}", file=sys.stderr, flush=True)

    return show


def print_summary(report: Any) -> None:
    """A run's report as the terminal shows it: the outcome first, the Job's condition, the
    counts, the findings, and the command that reruns what did not succeed."""
    from queuejob.flows.run_report import headline

    s = report["summary"]
    outcome, job = headline(report)
    print()
    print(f"queuejob run {report['run_id']}  ({report['backend']} backend, {report['mode']} mode)")
    if outcome:
        print(f"  outcome:        {outcome}; {job}")
    print(f"  Job:            {report['namespace']}/{report['job']}: {job.removeprefix('Job ')}")
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
    results = report.get("results") or {}
    if results.get("items"):
        print(f"  results:        {results['items']} item(s): {results['read_with']}")
    rerun = (report.get("outcome") or {}).get("rerun")
    if rerun:
        print(f"  rerun:          {rerun}")


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


def prepare_prefect(debug: bool) -> None:
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


def run_flow(kwargs: dict[str, Any], *, debug: bool = False) -> tuple[int, Any]:
    """Run the flow in this process: (exit status, the report or None).

    0 when the run is Completed; 1 when it is Failed (the report is printed first when there is
    one: items beyond the tolerance, a failed Job, the caveat policy); 2 when the flow refused
    its input or configuration before anything was queued or created; 130 when interrupted
    (Ctrl-C): Prefect's crash hook has deleted the run's Job and pods by then.
    """
    from collections.abc import Mapping

    from prefect.client.schemas.objects import State

    from queuejob.flows.core.errors import QueueJobError
    from queuejob.flows.monitor import LISTENERS
    from queuejob.flows.work_queue import run_work_queue

    LISTENERS.append(_progress_printer())
    try:
        state: State[Any] = run_work_queue(**kwargs, return_state=True)  # type: ignore[assignment]
    except KeyboardInterrupt:
        print("\nqueuejob: interrupted; the run's Job and pods were deleted", file=sys.stderr)
        return 130, None
    result = state.result(raise_on_failure=False)
    if isinstance(result, Mapping) and "summary" in result:
        print_summary(result)
        if state.is_completed():
            return 0, result
        print(f"\nqueuejob: {_one_line(state.message or 'the run failed')}", file=sys.stderr)
        return 1, result
    if isinstance(result, QueueJobError):
        print(f"\nqueuejob: {_one_line(result)}", file=sys.stderr)
        return (2 if result.refused else 1), None
    if isinstance(result, BaseException):
        if debug:
            raise result
        print(
            f"\nqueuejob: the run failed: {type(result).__name__}: {_one_line(result)} "
            "(run again with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1, None
    print(f"\nqueuejob: the run ended {state.type.value}: {state.message}", file=sys.stderr)
    return 1, None


def _one_line(exc: BaseException | str) -> str:
    return " ".join(str(exc).split())


def prefect_api_problem() -> str | None:
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
    from queuejob.flows.core.errors import QueueJobError

    try:
        kwargs = flow_kwargs(args, command)
        check_run_input(kwargs)
    except QueueJobError as exc:
        print(f"queuejob: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file that opened but could not be read through
        print(f"queuejob: cannot read the items: {exc}; check the file", file=sys.stderr)
        return 2
    prepare_prefect(args.debug)
    # Before the run: an unreachable API would otherwise end in a traceback from the engine.
    problem = prefect_api_problem()
    if problem is not None:
        print(f"queuejob: {problem}", file=sys.stderr)
        return 2
    return run_flow(kwargs, debug=args.debug)[0]


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
        max_failed_items=0,
        timeout=600.0,
        keep_job=True,  # until its pods' logs are shown; deleted below
        delete_queues=True,
        ledger_storage=None,
    )
    prepare_prefect(args.debug)
    rc, report = run_flow(flow_kwargs(ns, DEMO_COMMAND), debug=args.debug)
    if report is not None:
        _show_pod_logs(report)
    print()
    print("To see runs in the Prefect UI: `prefect server start` in another terminal, then")
    print("`export PREFECT_API_URL=http://127.0.0.1:4200/api` and run `make demo` again; open")
    print("http://127.0.0.1:4200/runs to find the 'queuejob' flow run, its report and ledger.")
    return rc


def _show_pod_logs(report: dict[str, Any]) -> None:
    """What each pod printed, as `kubectl logs` shows it in the docs; then delete the Job."""
    from queuejob.flows.adapters.local import LocalBackend

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

    from queuejob.flows.core.errors import QueueJobError
    from queuejob.flows.core.manifest import (
        build_job,
        build_secret,
        job_name,
        redact_secret,
        secret_name,
    )
    from queuejob.flows.params import job_spec_for_run

    if not (args.items or args.file or args.jsonl or args.range):
        args.items = ["placeholder"]  # render needs no items: completions come from --items-count
    try:
        kwargs = flow_kwargs(args, command)
        if kwargs["job"].template_block:
            # The block with these options on top, as a run makes it (loads it from Prefect).
            from queuejob.flows.tasks import resolve_job_spec

            spec = resolve_job_spec(kwargs["job"], args.mode, "local")
        else:
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
