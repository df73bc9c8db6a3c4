"""Progress bars within epochs, with the conventions of avalon-layers' `fit`
(tqdm on stderr, "epoch i/N", unit "batch"): shown only when stdout and stderr
are both terminals, so logs, pipes and CI output stay free of them.

The bar refreshes at most twice a second, and the timed training steps do not
include its updates (each is a counter increment between refreshes).
"""
from __future__ import annotations

import sys

REFRESH_S = 0.5


def interactive() -> bool:
    """Whether someone watches: both output streams are terminals."""
    return all(getattr(stream, "isatty", lambda: False)() for stream in (sys.stdout, sys.stderr))


def epoch_bar(total: int, desc: str):
    """A tqdm bar of `total` batches, cleared when done (the caller prints the
    epoch's line); a no-op bar when not `interactive()`."""
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="batch", file=sys.stderr, dynamic_ncols=True, leave=False,
                mininterval=REFRESH_S, disable=not interactive())
