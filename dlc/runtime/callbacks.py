"""What runs at the end of every epoch besides logging: early stopping, keeping the best
weights, and the user's callbacks (`fit(callbacks=[...])`, Keras' protocol).

A callback is any object with `on_epoch_end(epoch, logs)`; `epoch` counts from 1 as printed,
`logs` is the epoch's record (`train_loss`, `val_accuracy`, `lr`, ...). Returning True stops
training after that epoch; `fit` then returns the History as usual. `on_train_begin(logs)` and
`on_train_end(logs)` are called too when the object has them.
"""
from __future__ import annotations

import math

import numpy as np

from dlc.core.diagnostics import ArgumentError, Span, did_you_mean


class Callback:
    """A base class for callbacks (optional: any object with `on_epoch_end` will do)."""

    def on_train_begin(self, logs: dict) -> None:
        pass

    def on_epoch_end(self, epoch: int, logs: dict) -> bool | None:
        return None

    def on_train_end(self, logs: dict) -> None:
        pass


class Monitor:
    """The best value so far of one per-epoch metric: losses must fall, other metrics rise,
    each by more than min_delta to count as an improvement."""

    def __init__(self, monitor: str, min_delta: float = 0.0):
        self.monitor = monitor
        self.min_delta = float(min_delta)
        self.lower_is_better = monitor.endswith("loss")
        self.best: float | None = None
        self.best_epoch: int | None = None

    def update(self, epoch: int, logs: dict) -> bool:
        """Record the epoch's value; True when it is the best so far."""
        value = logs.get(self.monitor)
        if value is None:
            recorded = [k for k in logs if k.startswith(("train_", "val_"))]
            raise ArgumentError(f"`{self.monitor}` is not recorded by this run (it records "
                                f"{', '.join(recorded) or 'no metrics'})",
                                hint=did_you_mean(self.monitor, recorded))
        value = float(value)
        if math.isnan(value):
            return False
        if self.best is None or (value < self.best - self.min_delta if self.lower_is_better
                                 else value > self.best + self.min_delta):
            self.best, self.best_epoch = value, epoch
            return True
        return False


class EarlyStopping(Callback):
    """Stops training when `monitor` has not improved by more than `min_delta` for `patience`
    epochs in a row (the train block's `early_stop(...)`; Keras' EarlyStopping)."""

    def __init__(self, monitor: str = "val_loss", patience: int = 5, min_delta: float = 0.0):
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ArgumentError(f"EarlyStopping: `patience` must be a positive number of epochs, got {patience!r}")
        if not isinstance(min_delta, (int, float)) or isinstance(min_delta, bool) or not 0 <= min_delta < math.inf:
            raise ArgumentError(f"EarlyStopping: `min_delta` must be zero or positive, got {min_delta!r}")
        self.monitor = monitor
        self.patience = patience
        self.min_delta = float(min_delta)
        self.on_train_begin({})

    def on_train_begin(self, logs: dict) -> None:
        self._watch = Monitor(self.monitor, self.min_delta)
        self.wait = 0
        self.stopped_epoch: int | None = None

    def on_epoch_end(self, epoch: int, logs: dict) -> bool:
        if self._watch.update(epoch, logs):
            self.wait = 0
            return False
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = epoch
            return True
        return False

    @property
    def reason(self) -> str:
        w = self._watch
        best = "" if w.best is None else f" (best {w.best:.4g} at epoch {w.best_epoch})"
        by = f" by more than {self.min_delta:g}" if self.min_delta else ""
        return f"stopped early: {self.monitor} did not improve{by} for {self.patience} epochs{best}"

    def __repr__(self) -> str:
        return f"EarlyStopping(monitor={self.monitor!r}, patience={self.patience}, min_delta={self.min_delta})"


class Plateau:
    """The schedule `plateau(...)`: the rate's share of the optimizer's, cut by `factor` each
    time `monitor` has gone `patience` epochs without improving (Keras' ReduceLROnPlateau):
    early stopping's count, which restarts after each cut instead of stopping. `state()` is
    saved with checkpoints, and a resumed run goes on from it."""

    def __init__(self, spec, saved: dict | None = None):
        a = spec.args
        self.factor, self.min_lr, self.scale = a["factor"], a["min_lr"], 1.0
        self._count = EarlyStopping(a["monitor"], a["patience"], a["min_delta"])
        if saved is not None:
            self.scale, self._count.wait, self._count._watch.best = saved["scale"], saved["wait"], saved["best"]

    @property
    def monitor(self) -> str:
        return self._count.monitor

    def rate(self, lr: float) -> float:
        return max(lr * self.scale, min(self.min_lr, lr))

    def update(self, epoch: int, logs: dict) -> None:
        if self._count.on_epoch_end(epoch, logs):
            self.scale, self._count.wait = self.scale * self.factor, 0

    def state(self) -> dict:
        return {"scale": self.scale, "wait": self._count.wait, "best": self._count._watch.best}

    @staticmethod
    def is_state(v) -> bool:
        """Whether `v` is what state() gives (a checkpoint's, checked on resume)."""
        def number(x):
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
        return isinstance(v, dict) and set(v) == {"scale", "wait", "best"} and number(v["scale"]) and \
            v["scale"] > 0 and isinstance(v["wait"], int) and not isinstance(v["wait"], bool) and v["wait"] >= 0 \
            and (v["best"] is None or number(v["best"]))


def from_spec(spec) -> EarlyStopping:
    """The train block's `early_stop(...)` as a callback."""
    return EarlyStopping(**spec.args)


def check_monitor(monitor: str, recorded: list[str], what: str, span: Span | None = None) -> None:
    """Refuse, before training, a monitor the run will not record (val_loss without a
    validation split, a misspelled metric)."""
    if monitor in recorded:
        return
    if monitor.startswith("val_") and not any(k.startswith("val_") for k in recorded):
        raise ArgumentError(f"{what} monitors `{monitor}`, but there is no validation split", span,
                            hint="add `validation = 0.1` to the train block (--validation 0.1, "
                                 "fit(validation=0.1)), or monitor train_loss")
    raise ArgumentError(f"{what} monitors `{monitor}`, which this run does not record", span,
                        hint=did_you_mean(monitor, recorded) or f"it records: {', '.join(recorded)}")


def check_callbacks(callbacks) -> list:
    """Each callback must have on_epoch_end(epoch, logs): caught at fit(), not after an epoch."""
    if callbacks is None:
        return []
    if not isinstance(callbacks, (list, tuple)):
        raise ArgumentError(f"fit(callbacks=...) takes a list of callbacks, got {type(callbacks).__name__}",
                            hint="callbacks=[cb]")
    for cb in callbacks:
        if not callable(getattr(cb, "on_epoch_end", None)):
            raise ArgumentError(f"callback {cb!r} has no on_epoch_end(epoch, logs) method",
                                hint="subclass dlc.Callback, or define on_epoch_end")
    return list(callbacks)


def call_hook(callbacks, hook: str, *args) -> None:
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if callable(fn):
            fn(*args)


def end_of_epoch(callbacks, epoch: int, record: dict) -> str | None:
    """Run every callback (each sees its own copy of the record); the reason to stop, if any."""
    reason = None
    for cb in callbacks:
        if cb.on_epoch_end(epoch, dict(record)) and reason is None:
            reason = getattr(cb, "reason", None) or f"stopped by {type(cb).__name__}"
    return reason


class BestWeights:
    """keep_best: a copy of the model's weights (and layer state) at the best epoch by a
    monitored metric, put back when training ends."""

    def __init__(self, monitor: Monitor, state: dict, names):
        self.monitor = monitor
        self.state = state
        self.names = [n for n in names if n in state]
        self.saved: dict[str, np.ndarray] | None = None

    def update(self, epoch: int, record: dict) -> bool:
        if not self.monitor.update(epoch, record):
            return False
        from dlc import backends
        backends.sync_state(self.state)  # a GPU step's weights come back to the host arrays first
        self.saved = {n: self.state[n].copy() for n in self.names}
        return True

    def restore(self) -> None:
        from dlc import backends
        backends.sync_state(self.state)  # then the next step reads the host arrays written here
        for n, v in (self.saved or {}).items():
            self.state[n][...] = v  # in place: compiled steps hold these arrays
