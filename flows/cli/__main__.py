"""``python -m queuejob.flows.cli``: the `queuejob` command."""

import sys

from queuejob.flows.cli import main

sys.exit(main())
