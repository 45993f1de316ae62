"""`python -m rlsys.eval`: see rlsys.eval.cli."""

import sys

from rlsys.eval.cli import main

sys.exit(main())
