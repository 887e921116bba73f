"""queuejob: fan a batch of work items out through RabbitMQ to a Kubernetes Job, as a Prefect flow.

This file is the top of the installed package (`import queuejob`); the repository keeps it here
because its top-level folders are the design's: `flows/` is installed as `queuejob.flows`,
`blocks/` as `queuejob.blocks` (see `[tool.setuptools]` in pyproject.toml).

The Python API, for a flow of your own::

    from prefect import flow
    from queuejob import ItemSource, JobParams, read_results, run_work_queue

    @flow
    def nightly_etl() -> None:
        summary = run_work_queue(
            items=ItemSource.inline(["a.csv", "b.csv"]),
            job=JobParams(call="my_project.etl:process"),
            backend="local",
        )
        for row in read_results(summary["run_id"]):  # each item's return value, streamed
            print(row["item_id"], row["status"], row["result"])

Every name is imported on first use, so ``import queuejob`` costs nothing: the pod program
(`queuejob worker`) starts with it and must not pay for Prefect.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from queuejob.blocks.job_template import WorkQueueJobTemplate
    from queuejob.blocks.rabbitmq import RabbitMQBroker
    from queuejob.flows.core.items import ItemSource
    from queuejob.flows.params import CleanupParams, JobParams, QueueParams
    from queuejob.flows.rerun import rerun_failures
    from queuejob.flows.results import read_results
    from queuejob.flows.work_queue import run_work_queue

# name -> the module that defines it
_API = {
    "run_work_queue": "queuejob.flows.work_queue",
    "rerun_failures": "queuejob.flows.rerun",
    "read_results": "queuejob.flows.results",
    "ItemSource": "queuejob.flows.core.items",
    "QueueParams": "queuejob.flows.params",
    "JobParams": "queuejob.flows.params",
    "CleanupParams": "queuejob.flows.params",
    "RabbitMQBroker": "queuejob.blocks.rabbitmq",
    "WorkQueueJobTemplate": "queuejob.blocks.job_template",
}

__all__ = [
    "CleanupParams",
    "ItemSource",
    "JobParams",
    "QueueParams",
    "RabbitMQBroker",
    "WorkQueueJobTemplate",
    "__version__",
    "read_results",
    "rerun_failures",
    "run_work_queue",
]


def _version() -> str:
    """The installed distribution's version: pyproject.toml is its one source."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("queuejob")
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        return _version()
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'queuejob' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
