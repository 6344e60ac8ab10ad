"""``python -m aggregator``: the same as ``dfl aggregator``."""

import sys

from aggregator.cli import main

sys.exit(main(prog="python -m aggregator"))
