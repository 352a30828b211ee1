"""``python -m pipeline.testing.mock``: run the mock backend (see ``--help``)."""

import sys

from pipeline.testing.mock.cli import main

sys.exit(main())
