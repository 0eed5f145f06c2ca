"""``python -m mm`` is the ``mm`` command."""
import sys

from mm.cli import main

sys.exit(main())
