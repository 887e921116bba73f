"""The worker's command line: its options, their checks, the exit codes, and loading a
``--call`` function. The usage text is the package's docstring."""

from __future__ import annotations

import argparse
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

EXIT_OK = 0
EXIT_ITEM_FAILED = 1
EXIT_USAGE = 2
EXIT_BROKER = 3
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


# Fine mode's window (prefetch): enough messages to cover a publisher confirm's round trip.
DEFAULT_PREFETCH_CALL = 100  # a --call item may take microseconds
DEFAULT_PREFETCH_COMMAND = 2  # a command costs at least a process start: one more is enough


class Usage(Exception):
    """A usage or configuration problem: exit 2 with this message."""


@dataclass(frozen=True)
class Options:
    mode: str
    idle_timeout_s: float
    call: str | None
    command: list[str]
    delivery_limit: int | None
    connect_timeout_s: float
    grace_s: float
    prefetch: int


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flows.worker",
        description=_usage_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--mode",
        choices=("coarse", "fine"),
        default="coarse",
        help="coarse: one item, then exit; fine: items until idle (default: coarse)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="exit 0 after the queue stayed empty this long (default: 10)",
    )
    parser.add_argument(
        "--call", metavar="MODULE:FUNCTION", help="call this function with the body (bytes)"
    )
    parser.add_argument(
        "--delivery-limit",
        type=int,
        default=None,
        metavar="N",
        help="dead-letter an item after N+1 failed attempts, counted by the worker (for classic "
        "queues; default: $QUEUEJOB_DELIVERY_LIMIT, else leave it to the broker)",
    )
    parser.add_argument(
        "--prefetch",
        type=int,
        default=None,
        metavar="N",
        help="fine mode: messages a worker holds at a time, the window its acks and outcome "
        f"records are pipelined in (default: {DEFAULT_PREFETCH_CALL} with --call, "
        f"{DEFAULT_PREFETCH_COMMAND} with a command; coarse mode always takes 1)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for the broker at start-up (default: 30)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="after SIGTERM, time the command gets before SIGKILL (default: 10)",
    )
    return parser


def parse_args(argv: list[str]) -> Options:
    if "--" in argv:
        cut = argv.index("--")
        own, command = argv[:cut], argv[cut + 1 :]
    else:
        own, command = argv, []
    parser = build_parser()
    ns, extra = parser.parse_known_args(own)
    if extra:
        raise Usage(
            f"unexpected arguments {extra!r}; put the command after '--', e.g. "
            "python -m flows.worker -- ./process.sh"
        )
    if bool(ns.call) == bool(command):
        raise Usage("give exactly one of --call MODULE:FUNCTION and a command after '--'")
    if not ns.idle_timeout > 0:
        raise Usage(f"--idle-timeout must be positive (got {ns.idle_timeout})")
    limit = ns.delivery_limit
    if limit is None and os.environ.get("QUEUEJOB_DELIVERY_LIMIT", "").strip():
        raw = os.environ["QUEUEJOB_DELIVERY_LIMIT"].strip()
        try:
            limit = int(raw)
        except ValueError:
            raise Usage(f"QUEUEJOB_DELIVERY_LIMIT must be an integer (got {raw!r})") from None
    if limit is not None and limit < 0:
        raise Usage(f"--delivery-limit must be 0 or more (got {limit})")
    prefetch = ns.prefetch
    if prefetch is None:
        prefetch = DEFAULT_PREFETCH_CALL if ns.call else DEFAULT_PREFETCH_COMMAND
    if not 1 <= prefetch <= 65535:
        raise Usage(f"--prefetch must be between 1 and 65535 (got {prefetch})")
    return Options(
        mode=ns.mode,
        idle_timeout_s=ns.idle_timeout,
        call=ns.call,
        command=command,
        delivery_limit=limit,
        connect_timeout_s=max(0.0, ns.connect_timeout),
        grace_s=max(0.0, ns.grace),
        prefetch=prefetch,
    )


def load_callable(spec: str) -> Callable[[bytes], Any]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise Usage(f"--call {spec!r} must look like 'package.module:function'")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except Exception as exc:
        raise Usage(
            f"--call {spec!r} cannot be loaded ({type(exc).__name__}: {exc}); check that the "
            "module is installed in the image and the function name is right"
        ) from None
    if not callable(target):
        raise Usage(f"--call {spec!r} is not callable")
    return target  # type: ignore[no-any-return]


def _usage_text() -> str:
    import flows.worker  # the package's docstring is the worker's contract

    return flows.worker.__doc__ or ""
