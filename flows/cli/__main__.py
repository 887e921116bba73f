"""``python -m flows.cli``: the `queuejob` command."""

import sys

from flows.cli import main

sys.exit(main())
