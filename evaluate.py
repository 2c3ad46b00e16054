"""``python evaluate.py ...`` from a checkout = ``rudder evaluate ...``: agents scored against each other and the
oracles on recorded traces (or live).

The entry point itself is :mod:`rudder.evaluate` (installed with rudder, also ``python -m rudder.evaluate``).
"""

import sys

from rudder.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
