"""``python -m locoswarm`` runs the command line."""

import sys

from locoswarm.node.entry import main

sys.exit(main())
