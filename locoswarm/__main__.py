"""``python -m locoswarm`` runs the command line."""

import sys

from locoswarm.node.cli import main

sys.exit(main())
