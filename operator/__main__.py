"""``python -m hps_operator`` is the ``hps`` command."""

import sys

from hps_operator.cli import main

sys.exit(main())
