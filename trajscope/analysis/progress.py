"""The analyzer's progress bar: pairs done / total, rate and ETA on stderr."""

from __future__ import annotations

import sys

__all__ = ["Progress"]


class Progress:
    """Pairs done / total, rate and ETA on stderr (tqdm); silent when disabled."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        self.bar = None
        if enabled and total:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=done, unit="pair", desc="analyze", file=sys.stderr,
                            dynamic_ncols=True)

    def pair_done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
