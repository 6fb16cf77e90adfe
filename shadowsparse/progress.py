"""Progress bars with ETA for the long loops (evaluation windows, benchmark methods): tqdm, redrawn often in a
terminal and every ``log_interval`` seconds otherwise, so a log file of a GPU job gets a line with the ETA now and
then instead of thousands of carriage-return redraws. SHADOWSPARSE_PROGRESS=0 turns them off."""
from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def progress(iterable=None, desc: str = "", unit: str = "it", log_interval: float = 30.0, **kwargs) -> tqdm:
    tty = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.1 if tty else log_interval)
    kwargs.setdefault("disable", os.environ.get("SHADOWSPARSE_PROGRESS", "1") == "0")
    if not tty:
        kwargs.setdefault("ncols", 100)  # a fixed width: no terminal to ask
    return tqdm(iterable, desc=desc, unit=unit, **kwargs)
