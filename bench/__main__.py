import sys

from rudder.bench.run import main

sys.exit(main())
