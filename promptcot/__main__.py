"""``python -m promptcot`` is the ``promptcot`` command."""

from promptcot.cli import main

main()
