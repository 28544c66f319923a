"""``python -m fastseg.cli``."""

import sys

from .main import main

sys.exit(main())
