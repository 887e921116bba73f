"""A fill run in its own process, so a test can kill it half-way.

Usage: python -m tests.broker.fill_child QUEUE RUN_ID N  (broker URL in QUEUEJOB_TEST_BROKER_URL)
Prints the confirmed count as it grows, one number per line.
"""

from __future__ import annotations

import os
import sys

from queuejob.flows.adapters.broker import BrokerConfig, QueueSettings, fill_queue
from queuejob.flows.core.items import ItemSource, iter_items


def main() -> None:
    queue, run_id, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg = BrokerConfig(os.environ["QUEUEJOB_TEST_BROKER_URL"])

    def progress(confirmed: int) -> None:
        print(confirmed, flush=True)

    result = fill_queue(
        cfg,
        QueueSettings(queue),
        iter_items(ItemSource.int_range(0, n)),
        run_id=run_id,
        window=500,
        on_progress=progress,
    )
    print(f"done {result.confirmed}", flush=True)


if __name__ == "__main__":
    main()
