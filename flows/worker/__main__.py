"""``python -m queuejob.flows.worker``: `queuejob.flows.worker` has the contract and exit codes."""

import sys

from queuejob.flows.worker import (
    main as main,  # re-exported: `queuejob worker` may import it from here
)

if __name__ == "__main__":
    sys.exit(main())
