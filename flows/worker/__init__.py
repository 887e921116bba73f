"""The pod worker: ``python -m queuejob.flows.worker`` (also ``queuejob worker``).

Its contract (the environment, what it does per item, the exit codes) is the docstring of
`queuejob.flows.worker.options`, which is also its ``--help``.

Modules: `options` (the command line and the exit codes), `loop` (the consumer loop, signals and
`main`), `runner` (running one item: a ``--call`` function or a command) and `outcomes` (the
outcome publisher: pipelined record confirms, then acks in delivery order). The package imports
neither prefect, kubernetes nor pydantic: a pod's start-up time counts once per item in coarse
mode.
"""

from __future__ import annotations

from queuejob.flows.worker.loop import main
from queuejob.flows.worker.options import (
    EXIT_BROKER,
    EXIT_ITEM_FAILED,
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_USAGE,
)

__all__ = [
    "EXIT_BROKER",
    "EXIT_ITEM_FAILED",
    "EXIT_OK",
    "EXIT_SIGINT",
    "EXIT_SIGTERM",
    "EXIT_USAGE",
    "main",
]
