"""``python -m tools.bench``: every benchmark in one process (see tools/bench/aggregate.py)."""
import sys

from tools.bench.aggregate import main

sys.exit(main())
