"""The peak memory of one CLI command over stored ledgers, for the streaming tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def cli_peak_rss_kb(args: list[str], ledger_dir: Path) -> int:
    """Run ``queuejob ARGS`` in a fresh interpreter reading the ledgers in ``ledger_dir``
    (its output discarded) and return its peak resident memory in KB."""
    code = (
        "import resource, sys\n"
        "from queuejob.flows.cli import main\n"
        f"rc = main({args!r})\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    env = {**os.environ, "QUEUEJOB_LEDGER_DIR": str(ledger_dir)}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, check=True, timeout=300,
    )  # fmt: skip
    return int(proc.stderr.strip().splitlines()[-1])
