"""``python tests/gated_worker.py ARGS`` is ``promptcot ARGS`` with the test gate of
tests/gate.py installed from the environment: a test facility, never part of the product."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gate import install_from_env  # noqa: E402

if __name__ == "__main__":
    install_from_env()
    from promptcot.cli import main

    main(sys.argv[1:])
