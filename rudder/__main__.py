"""``python -m rudder`` = the ``rudder`` command."""

import sys

from rudder.cli import main

sys.exit(main())
