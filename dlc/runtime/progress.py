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
        self._epoch_seconds: list[float] = []  # this run's epochs, for the whole run's ETA
        self._epoch = 0

    def compiling(self, compile_steps) -> None:
        """`compiling… (2.1 s)` or `compiling… (cached, 0.02 s)` before the first epoch, instead
        of a bar standing still at 0. compile_steps() compiles (or waits for the compile started
        in the background while the data loaded) and returns where the code came from ("cache",
        "artifact", "compiled", or None when nothing is compiled) and the seconds compiling took."""
        if not self.quiet:
            self.stream.write("compiling… ")
            self.stream.flush()
        origin, seconds = compile_steps()
        if not self.quiet:
            how = {"cache": "cached, ", "artifact": "from the artifact, "}.get(origin, "")
            self.stream.write(f"({how}{format_seconds(seconds)})\n")
            self.stream.flush()

    def note(self, text: str) -> None:
        """A line of its own between epochs (early stopping, the test score)."""
        self._close_bar()
        if not self.quiet:
            self.stream.write(text + "\n")
            self.stream.flush()

    def eta(self, epoch: int) -> float | None:
        """Seconds left in the whole run after `epoch`, from the mean epoch time so far."""
        if not self._epoch_seconds or epoch >= self.epochs:
            return None
        return sum(self._epoch_seconds) / len(self._epoch_seconds) * (self.epochs - epoch)

    def start_epoch(self, epoch: int) -> None:
        self._close_bar()
        self._epoch = epoch
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
            eta = self._run_eta_in_epoch()
            self._bar.set_postfix_str(f"loss {_fmt(self._loss_sum / self._steps)}"
                                      + (f", run eta {format_duration(eta)}" if eta is not None else ""),
                                      refresh=False)
            self._bar.update(self._steps - self._bar.n)

    def _run_eta_in_epoch(self) -> float | None:
        """During an epoch: the bar's time left in it plus the later epochs at the mean epoch time."""
        rate = self._bar.format_dict.get("rate") if self._bar is not None else None
        if not rate:
            return None
        left = (self.steps_per_epoch - self._steps) / rate
        per_epoch = (sum(self._epoch_seconds) / len(self._epoch_seconds) if self._epoch_seconds
                     else self.steps_per_epoch / rate)
        return left + per_epoch * (self.epochs - self._epoch)

    def end_epoch(self, epoch: int, metrics: Mapping[str, float], seconds: float) -> None:
        self._close_bar()
        self._epoch_seconds.append(seconds)
        if not self.quiet:
            self.stream.write(summary_line(epoch, self.epochs, metrics, seconds, self.eta(epoch)) + "\n")
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


def summary_line(epoch: int, epochs: int, metrics: Mapping[str, float], seconds: float,
                 eta: float | None = None) -> str:
    """`epoch 3/30  train loss 0.2134 acc 0.9412  val loss 0.2561 acc 0.9306  1.2s  eta 0:33`
    (eta: the whole run's time left)."""
    parts = [f"epoch {epoch}/{epochs}", metrics_text(metrics)] if metrics else [f"epoch {epoch}/{epochs}"]
    if "lr" in metrics:
        parts.append(f"lr {metrics['lr']:.3g}")
    parts.append(format_seconds(seconds, sep=""))
    if eta is not None:
        parts.append(f"eta {format_duration(eta)}")
    return "  ".join(p for p in parts if p)


def metrics_text(metrics: Mapping[str, float]) -> str:
    """`train loss 0.2134 acc 0.9412  test loss 0.2561 acc 0.9306` (lr left out)."""
    groups: dict[str, list[str]] = {split: [] for split in _SPLITS}
    others = []
    for key, value in metrics.items():
        split, _, name = key.partition("_")
        if split in groups and name:
            groups[split].append(f"{_SHORT.get(name, name)} {_fmt(value)}")
        elif key != "lr":
            others.append(f"{key} {_fmt(value)}")
    parts = [f"{split} {' '.join(items)}" for split, items in groups.items() if items]
    return "  ".join(parts + others)


def format_seconds(seconds: float, sep: str = " ") -> str:
    """`12.3 s`, `0.8 s`, `42 ms`, `1.3 ms`: seconds to a tenth, milliseconds below a tenth
    of a second (a digits MLP's epoch takes one: not `0.0 s`); `sep` between number and unit."""
    if seconds >= 0.1:
        return f"{seconds:.1f}{sep}s"
    return f"{max(seconds, 0.0) * 1e3:.2g}{sep}ms"


def format_duration(seconds: float) -> str:
    """`0:07`, `2:05`, `1:02:05`: minutes and seconds, hours when there are some."""
    s = int(round(max(seconds, 0.0)))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


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
