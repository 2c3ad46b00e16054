"""``python train.py ...`` from a checkout = ``rudder train ...``: a DistDGL job (``gnn``) or a PPO agent (``ppo``).

The entry point itself is :mod:`rudder.train` (installed with rudder, also ``python -m rudder.train``).
"""

import sys

from rudder.train import main

if __name__ == "__main__":
    sys.exit(main())
