"""Where a long step's details go while `up`'s console shows its progress: a log file.

Hugging Face and TRL write to the terminal on their own (the trainer's metric dicts, warnings
through the ``transformers`` logger's own handler, tqdm bars); in `up` that breaks the console's
progress bar and live table. ``details_to`` sends all of it, and this project's INFO lines, to a
file for the length of a step; ``quiet_progress_bars`` turns the libraries' bars off for a run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

# This project's loggers, whose INFO lines are the details of a step; the libraries' loggers keep
# their levels (transformers at INFO dumps whole model configs), their warnings go to the file.
DETAILED = ("promptcot", "trainer", "workers")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def quiet_progress_bars() -> None:
    """No tqdm bars from huggingface_hub, transformers or datasets in this process (they read
    these variables when imported; a library already imported is told directly)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()


@contextlib.contextmanager
def details_to(path: Path) -> Iterator[Path]:
    """For the length of the block: INFO and up of the DETAILED loggers, and the libraries'
    warnings (``warnings.warn`` included), go to ``path`` (appended); the console's log handlers
    show errors only. Everything is put back after."""
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setLevel(logging.INFO)
    to_file.setFormatter(logging.Formatter(FORMAT))
    consoles = [
        h
        for h in root.handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]
    levels = {h: h.level for h in consoles}
    loggers = {name: logging.getLogger(name) for name in DETAILED}
    logger_levels = {name: lg.level for name, lg in loggers.items()}
    for handler in consoles:
        handler.setLevel(max(handler.level, logging.ERROR))
    for lg in loggers.values():
        if lg.getEffectiveLevel() > logging.INFO:
            lg.setLevel(logging.INFO)
    hf = _transformers_logging()
    if hf is not None:  # its own stderr handler, and no propagation, unless told
        hf.disable_default_handler()
        hf.enable_propagation()
    logging.captureWarnings(True)
    root.addHandler(to_file)
    try:
        yield path
    finally:
        root.removeHandler(to_file)
        to_file.close()
        logging.captureWarnings(False)
        if hf is not None:
            hf.disable_propagation()
            hf.enable_default_handler()
        for name, lg in loggers.items():
            lg.setLevel(logger_levels[name])
        for handler, level in levels.items():
            handler.setLevel(level)


def _transformers_logging():
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return None
    return hf_logging
