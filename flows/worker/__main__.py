"""``python -m flows.worker``: see `flows.worker` for the contract and the exit codes."""

import sys

from flows.worker import main as main  # re-exported: `queuejob worker` may import it from here

if __name__ == "__main__":
    sys.exit(main())
