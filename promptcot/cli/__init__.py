"""`promptcot`: run the factory, its workers, and the tools around its topics.

One Typer app; each module of this package adds a group of commands. ``main`` is the entry
point: every error a user can cause ends in one line and a non-zero exit (``--debug`` shows the
traceback instead).
"""

from __future__ import annotations

from promptcot.cli import (  # noqa: F401  (register the commands)
    dlq,
    evaluate,
    launch,
    loopback,
    records,
    tools,
    train,
)
from promptcot.cli.app import app, main

__all__ = ["app", "main"]
