"""Training progress: a live tqdm bar on a terminal, one summary line per epoch everywhere."""
from __future__ import annotations

import math
import sys
import time
from typing import Mapping, TextIO

REFRESH_SECONDS = 0.1  # at most ~10 bar updates a second, however fast the steps are
_SPLITS = ("train", "val", "test")
_SHORT = {"accuracy": "acc"}


class Progress:
    """Shows training progress on `stream` (default: sys.stderr at construction time).

    On a terminal, `step` drives a bar with the running mean loss and an ETA; elsewhere
    (a pipe, a log file, CI) only `end_epoch` writes, one plain line per epoch, with no
    carriage returns. `quiet` writes nothing at all.
    """

    def __init__(self, epochs: int, steps_per_epoch: int, quiet: bool = False,
                 stream: TextIO | None = None):
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.quiet = quiet
        self.stream = sys.stderr if stream is None else stream
        self._bar_class = None if quiet or not _isatty(self.stream) else _tqdm_class()
        self._bar = None
        self._steps = 0
        self._loss_sum = 0.0
        self._next_refresh = 0.0

    def start_epoch(self, epoch: int) -> None:
        self._close_bar()
        self._steps, self._loss_sum = 0, 0.0
        if self._bar_class is not None:
            self._bar = self._bar_class(total=self.steps_per_epoch, file=self.stream, leave=False,
                                        desc=f"epoch {epoch}/{self.epochs}", unit="step",
                                        dynamic_ncols=True, mininterval=REFRESH_SECONDS)
            self._next_refresh = time.monotonic() + REFRESH_SECONDS

    def step(self, loss: float) -> None:
        """Count one training step. Cheap: without a bar it returns at once."""
        if self._bar is None:
            return
        self._steps += 1
        self._loss_sum += float(loss)
        now = time.monotonic()
        if now >= self._next_refresh:
            self._next_refresh = now + REFRESH_SECONDS
            self._bar.set_postfix_str(f"loss {_fmt(self._loss_sum / self._steps)}", refresh=False)
            self._bar.update(self._steps - self._bar.n)

    def end_epoch(self, epoch: int, metrics: Mapping[str, float], seconds: float) -> None:
        self._close_bar()
        if not self.quiet:
            self.stream.write(summary_line(epoch, self.epochs, metrics, seconds) + "\n")
            self.stream.flush()

    def close(self) -> None:
        self._close_bar()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()  # leave=False: the bar erases itself before the summary line
            self._bar = None


def summary_line(epoch: int, epochs: int, metrics: Mapping[str, float], seconds: float) -> str:
    """`epoch 3/30  train loss 0.2134 acc 0.9412  test loss 0.2561 acc 0.9306  1.2s`."""
    groups: dict[str, list[str]] = {split: [] for split in _SPLITS}
    others = []
    for key, value in metrics.items():
        split, _, name = key.partition("_")
        if split in groups and name:
            groups[split].append(f"{_SHORT.get(name, name)} {_fmt(value)}")
        elif key != "lr":
            others.append(f"{key} {_fmt(value)}")
    parts = [f"epoch {epoch}/{epochs}"]
    parts += [f"{split} {' '.join(items)}" for split, items in groups.items() if items]
    parts += others
    if "lr" in metrics:
        parts.append(f"lr {metrics['lr']:.3g}")
    parts.append(f"{seconds:.1f}s")
    return "  ".join(parts)


def _fmt(value: float) -> str:
    # Four decimals read well for losses and accuracies; tiny or huge values need exponents.
    if value == 0 or not math.isfinite(value) or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4f}"
    return f"{value:.3e}"


def _isatty(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _tqdm_class():
    # tqdm is imported only when a bar will be drawn; without it a terminal gets the
    # per-epoch lines alone.
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm
