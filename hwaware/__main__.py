"""``python -m hwaware inspect PATH`` / ``python -m hwaware bench PATH``: the ``hwaware`` console script."""
import sys

from hwaware.cli import main

sys.exit(main())
