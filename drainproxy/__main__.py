import sys

from drainproxy.cli import main

sys.exit(main())
