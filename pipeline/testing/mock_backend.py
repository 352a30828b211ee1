"""The mock backend's former import path, kept so existing imports keep working.

New code imports :mod:`pipeline.testing.mock`, which this module re-exports;
``python -m pipeline.testing.mock_backend`` still runs the server.
"""

from __future__ import annotations

import sys

from pipeline.testing.mock import (
    FAULT_FIELDS,
    MockBackend,
    MockConfig,
    add_arguments,
    run_from_args,
    serve,
)

__all__ = ["FAULT_FIELDS", "MockBackend", "MockConfig", "add_arguments", "run_from_args", "serve"]

if __name__ == "__main__":
    from pipeline.testing.mock.cli import main

    sys.exit(main())
