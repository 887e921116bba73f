"""``python -m queuejob.flows.adapters.local supervise <job state file>``: a Job's supervisor."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from queuejob.flows.adapters.local.supervisor import Supervisor


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m queuejob.flows.adapters.local supervise <job state file>``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "supervise":
        print("usage: python -m queuejob.flows.adapters.local supervise <job state file>",
              file=sys.stderr)  # fmt: skip
        return 2
    job_file = Path(args[1])
    # Detach: the launcher exits at once, the supervisor lives on in a session of its own and is
    # adopted by init, so the caller never has to reap it.
    if os.fork() != 0:
        os._exit(0)
    os.setsid()
    try:
        return Supervisor(job_file).run()
    except Exception as exc:  # pragma: no cover - logged for the operator, then re-raised
        print(f"supervisor failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        raise


if __name__ == "__main__":
    sys.exit(main())
