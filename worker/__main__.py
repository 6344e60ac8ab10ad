"""``python -m worker``: the same as ``dfl worker``."""

import sys

from worker.cli import main

sys.exit(main(prog="python -m worker"))
