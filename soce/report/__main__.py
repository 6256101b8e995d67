"""``python -m soce.report``: see :mod:`soce.report.cli`."""

import sys

from soce.report.cli import main

sys.exit(main())
