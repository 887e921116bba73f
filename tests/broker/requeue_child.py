"""A dead-letter requeue in its own process, killed (SIGKILL) right after the N-th publisher
confirm and before that dead letter's ack: the window where the item is in both queues.

Usage: python -m tests.broker.requeue_child QUEUE N  (broker URL in QUEUEJOB_TEST_BROKER_URL)
"""

from __future__ import annotations

import os
import signal
import sys

from queuejob.flows.adapters.broker import BrokerConfig, QueueSettings
from queuejob.flows.adapters.broker.dead_letters import requeue_dead_letters


def main() -> None:
    queue, kill_at = sys.argv[1], int(sys.argv[2])
    cfg = BrokerConfig(os.environ["QUEUEJOB_TEST_BROKER_URL"])

    def after_confirm(n: int) -> None:
        print(n, flush=True)
        if n >= kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    result = requeue_dead_letters(cfg, QueueSettings(queue), after_confirm=after_confirm)
    print(f"done {result.requeued}", flush=True)


if __name__ == "__main__":
    main()
