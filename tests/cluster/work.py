"""The per-item work of the cluster tier's runs (``--call tests.cluster.work:record``): append
the item to a file of its queue, so that items lost and processed twice are counted from what
the work did. A pod has only the Job's environment: the files are found from ``QUEUE``."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path


def files(queue: str) -> tuple[Path, Path]:
    """(the side-effect file, the file holding the seconds each item takes) of a queue."""
    base = Path(tempfile.gettempdir()) / "queuejob-cluster-tier"
    base.mkdir(exist_ok=True)
    return base / f"{queue}.done", base / f"{queue}.sleep"


def record(body: bytes) -> None:
    """Take the queue's item time (0 unless its file says otherwise), then append the item."""
    done, sleep = files(os.environ["QUEUE"])
    try:
        nap = float(sleep.read_text() or 0)
    except (OSError, ValueError):
        nap = 0.0
    if nap:
        time.sleep(nap)
    with done.open("a") as out:
        out.write(body.decode() + "\n")
