"""``python -m slimlm ...`` is the ``slimlm`` command."""
import sys

from slimlm.cli import main

sys.exit(main())
