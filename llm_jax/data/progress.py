"""Progress for the stages that run for minutes to hours: curation, tokenizing and packing (a line at most
every `data.progress_s` seconds, so a user sees how far it has come and how fast it goes, and a log stays
short), and loops of known length (evaluation batches, generation, judging, reference log-probs): a tqdm
bar on a terminal, the same periodic lines when the output is a file or a pipe."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator

from tqdm import tqdm


def ticker(seconds: float) -> Callable[[], bool]:
    """due(): True when `seconds` have passed since it was last True (or since the start); seconds 0:
    always. A loop asks it per item and builds and logs its line only when due."""
    next_at = time.monotonic() + seconds

    def due() -> bool:
        nonlocal next_at
        now = time.monotonic()
        if now < next_at:
            return False
        next_at = now + seconds
        return True

    return due


def rate_line(stage: str, done_bytes: int, began: float, details: str) -> str:
    """'curating: 120.3 MB in 38 s (3.17 MB/s); 45,321 documents read, 40,112 kept'."""
    seconds = max(time.perf_counter() - began, 1e-9)
    return f"{stage}: {done_bytes / 1e6:,.1f} MB in {seconds:,.0f} s ({done_bytes / 1e6 / seconds:.2f} MB/s); {details}"


def progress(items: Iterable, total: int, stage: str, log=print, every_s: float = 30.0) -> Iterator:
    """`items` (`total` of them), shown as a tqdm bar on stderr when it is a terminal, else as a line through
    `log` at most every `every_s` seconds: 'judging: 120 of 400 (30%), 2.1/s, 2 min left'."""
    if sys.stderr.isatty():
        yield from tqdm(items, total=total, desc=stage, leave=False, dynamic_ncols=True)
        return
    due, began = ticker(every_s), time.perf_counter()
    for done, item in enumerate(items, start=1):
        yield item
        if done < total and due():
            rate = done / max(time.perf_counter() - began, 1e-9)
            left = (total - done) / rate / 60
            log(f"{stage}: {done:,} of {total:,} ({done / total:.0%}), {rate:.1f}/s, {left:.0f} min left")
