"""The training loop: epochs over shuffled mini-batches, evaluation on the held-out split,
learning-rate schedules, the numerics guard, checkpoints and resume."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from dlc import __version__, backends
from dlc.core.diagnostics import (ArgumentError, CheckpointError, DataError, DlcError, NumericsError, UsageError,
                                  did_you_mean, warn)
from dlc.language.recipe import Spec, check_augment
from dlc.program import VALID, make_programs
from dlc.runtime.augment import augment, generator


def learning_rate(schedule: Spec, lr0: float, epoch: int, epochs: int, step: int = 0) -> float:
    """The rate for a (0-based) epoch; `cyclic` is per step (the 0-based count of steps taken),
    and so is a schedule's `warmup`: step s < warmup takes (s + 1) / warmup of the rate."""
    a = schedule.args
    if schedule.name == "cyclic":  # triangular: base -> max over step_size steps, and back
        x = abs(step / a["step_size"] - 2 * math.floor(1 + step / (2 * a["step_size"])) + 1)
        return a["base"] + (a["max"] - a["base"]) * max(0.0, 1.0 - x)
    if schedule.name == "step":
        rate = lr0 * a["gamma"] ** (epoch // a["every"])
    elif schedule.name == "exponential":
        rate = lr0 * a["gamma"] ** epoch
    elif schedule.name == "cosine":
        rate = a["min_lr"] + (lr0 - a["min_lr"]) * 0.5 * (1.0 + math.cos(math.pi * epoch / max(epochs, 1)))
    else:
        rate = lr0
    warmup = a.get("warmup", 0)
    return rate * (step + 1) / warmup if step < warmup else rate


def per_step(schedule: Spec) -> bool:
    """Whether the schedule sets the rate every step (not once an epoch)."""
    return schedule.name == "cyclic" or bool(schedule.args.get("warmup"))


@dataclass
class Normalizer:
    """x' = (x - shift) / scale per feature, fitted on the training split only."""

    shift: np.ndarray
    scale: np.ndarray

    @staticmethod
    def fit(x: np.ndarray, mode) -> "Normalizer":
        from dlc.data.sources import normalization
        shift, scale = normalization(x, "none" if mode is None else mode)
        return Normalizer(np.atleast_1d(shift), np.atleast_1d(scale))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if x.dtype.kind not in "fiu":
            raise DataError(f"inputs must be numbers, got {x.dtype}")
        if x.dtype.kind in "iu" and not self.active:
            return x
        return ((x.astype(np.float32) - self.shift) / self.scale).astype(np.float32)

    @property
    def active(self) -> bool:
        return bool(np.any(self.shift != 0) or np.any(self.scale != 1))


@dataclass
class History:
    epochs: list[dict] = field(default_factory=list)
    previous: Path | None = None  # where the first save moved an existing checkpoint (keep_previous)
    test: dict = field(default_factory=dict)  # the test split's metrics, scored once after training
    stopped: str | None = None  # why training ended before its last epoch (early stopping, a callback)
    best_epoch: int | None = None  # keep_best: the epoch whose weights the model ends with

    def __getitem__(self, key: str) -> list:
        """The values of `key` per epoch (None in an epoch without it, such as a validation
        metric before the first validation). A key no epoch has is a KeyError."""
        keys = dict.fromkeys(k for e in self.epochs for k in e)
        if keys and key not in keys:
            keras = {"loss": "train_loss", "accuracy": "train_accuracy"}.get(key)
            hint = f"dlc calls Keras' `{key}` `{keras}`" if keras else did_you_mean(key, keys)
            raise KeyError(f"no `{key}` in this history; its keys: {', '.join(keys)}"
                           + (f" ({hint})" if hint else ""))
        return [e.get(key) for e in self.epochs]

    @property
    def history(self) -> dict[str, list]:
        """Keras' form: {metric: [value per epoch]}."""
        keys = dict.fromkeys(k for e in self.epochs for k in e)
        return {k: self[k] for k in keys}

    def __len__(self) -> int:
        return len(self.epochs)


class Session:
    """One model's compiled training and evaluation steps over one shared state.

    Graphs are built lazily: a native step found in the compile cache needs none.
    With a `world` (dlc/runtime/distributed.py) it is one rank of a data-parallel job: its
    training step runs on its shard of each global batch (compiled for the largest shard,
    smaller ones padded), and it evaluates every world.size-th chunk of the held-out data, in
    chunks of the compiled size (the sums are then added up over ranks); a model that carries
    state takes its rows of each global batch, in training and in evaluation alike."""

    def __init__(self, model, config, target: str = backends.DEFAULT, options: dict | None = None,
                 world=None):
        self.model = model
        self.config = config
        self.target = target
        self.input_name = model.input_types[0][0]
        self.state = model.state
        self._graphs: dict[str, object] = {}
        self.world = world
        if world is not None:
            _check_shardable(model)
            _check_loss_shares(model)
        ranks = world.size if world is not None else 1
        options = dict(options or {})
        self.bucket_bytes = options.pop("bucket_bytes", None)  # gradients per exchange (data-parallel)
        if world is not None:  # exchanges overlap the rest of the backward pass: measured faster
            if options.get("threads") in (None, "auto"):  # the ranks on this machine share its cores
                options["threads"] = world.default_threads()
            options = {"overlap": True, **options, "quick_start": False}  # (every rank on the O3 code)
            if not backends.backend(target).collectives:
                raise UsageError(f"target `{target}` cannot run a data-parallel job yet: its steps have no "
                                 "collective exchange", hint="train with --target cpu, or in one process")
        if not backends.backend(target).lowers:  # an interpreter needs the optimizer state up front
            model.ensure_state(self.graph("train"))
        # one program, two entry points: compiled together, once per batch size (evaluation
        # exchanges nothing: its entry is one process's step also in a data-parallel job)
        keys = {mode: model.source_key(mode, config, ranks, self.bucket_bytes) for mode in ("train", "eval")}
        # an artifact holds one-process steps of its train block's recipe: another optimizer,
        # clip or check_numerics compiles its own
        own = keys["train"] == model.preloaded_recipe
        self.program = make_programs(
            target, {mode: (lambda mode=mode: self.graph(mode)) for mode in ("train", "eval")}, self.state,
            keys=keys, name=model.name, data_name=self.input_name,
            preloaded={b: s for (t, b), s in model.preloaded.items() if t == target and own},
            options=options)
        self.train_program, self.eval_program = self.program.entry("train"), self.program.entry("eval")
        # results other than metrics have a `:` (output:h, a named result; carry:h, a state)
        self.metrics = [k for k in model.built("eval").graph.outputs if k not in ("output", "loss") and ":" not in k]
        self._results = ["loss"] + self.metrics
        self.global_step = int(self.state["step"]) if "step" in self.state else 0
        self._background: Background | None = None  # the compile fit() started while the data loads
        self.carries = model.built("eval").carries  # the model's `state`s, carried from batch to batch
        self._carried: dict[str, np.ndarray] = {}    # their values after the last training step
        self._carried_rows = (0, 0, 0)               # whose rows: (first, count, global batch size)

    # --- state carried between batches (a model's `state` declarations) ---------------------------
    def reset_state(self) -> None:
        """Training starts again from the states' initial values (every epoch does)."""
        self._carried.clear()

    def batches(self, n: int, batch: int, rng=None, every: bool = False):
        """The index arrays of one pass over n samples. A model that carries state reads them
        as parallel streams, so that row i of a batch continues row i of the one before
        (see stream_batches); `every`: keep the samples that fill no whole batch."""
        from dlc.data.sources import batches, stream_batches
        return stream_batches(n, batch, every) if self.carries else batches(n, batch, rng)

    def _passes(self, n: int, batch: int):
        """What evaluation and prediction read: every sample, in batches of `batch` rows
        (stream batches for a model that carries state, else slices in order)."""
        if self.carries:
            return self.batches(n, batch, every=True)
        return (slice(start, start + batch) for start in range(0, n, batch))

    def _carry_feeds(self, carried: dict, rows: int) -> dict:
        """Each state's value after the previous batch (its first `rows` rows: batches of a
        pass only shrink), or its initial value."""
        feeds = {}
        for c in self.carries:
            a = carried.get(c.name)
            a = None if a is None else np.asarray(a)  # (a GPU step's result is read here)
            if a is None or len(a) < rows:
                a = np.full((rows,) + tuple(int(d) for d in c.type.shape[1:]), c.value, c.type.dtype.np)
            feeds[c.input] = a[:rows]
        return feeds

    def _keep_carries(self, carried: dict, out: dict) -> None:
        for c in self.carries:
            carried[c.name] = out[c.input]

    def graph(self, mode: str):
        if mode not in self._graphs:
            ranks = self.world.size if self.world is not None and mode == "train" else 1
            self._graphs[mode] = self.model.compile_graph(mode, self.config, world=ranks,
                                                          bucket_bytes=self.bucket_bytes)
        return self._graphs[mode]

    @property
    def train_graph(self):
        return self.graph("train")

    def warm_up(self, rows=()) -> tuple[str | None, float]:
        """Finish compiling (or loading from the cache) the program for the compiled batch size
        -- the background compile fit() started, if any -- and the sizes of its own that batches
        of these row counts need (only where the steps cannot pad them: no `valid_rows`), so
        that the first epoch does not start with a long pause and no evaluation stops for a
        compile. Returns where the code came from ("compiled" when any of it was compiled,
        else "cache", "artifact" or "loaded"; None for an interpreter) and the seconds the
        compiling took."""
        background, self._background = self._background, None
        started = time.perf_counter()
        origins = list(background.wait() or []) if background is not None else []
        origins += self._load(rows)
        seconds = (background.seconds if background is not None else 0.0) + time.perf_counter() - started
        origins = [o for o in origins if o is not None]
        if not origins:
            return None, seconds
        return next((o for o in ("compiled", "cache", "artifact") if o in origins), "loaded"), seconds

    def _load(self, rows=()) -> list[str]:
        """Compile or load the program's unit for its batch size, and for the sizes batches of
        `rows` rows run at; where the code of each came from."""
        program = self.program
        if not hasattr(program, "steps_for") or program.batch is None:
            return []
        origins = []

        def load(batch: int) -> None:
            loaded = batch in program.units
            program.steps_for(batch)
            origins.append("loaded" if loaded else program.origins.get(batch))
        load(program.batch)
        for r in rows:
            if r and r < program.batch and program.batch_for(r) != program.batch:
                load(program.batch_for(r))
        return origins

    # --- one step ---------------------------------------------------------------------------------
    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> dict[str, float]:
        """One step on a global batch (of which a rank of a job takes its shard); the loss and
        metrics returned are the whole batch's."""
        return self.collect(self.submit(x, y, lr))

    def submit(self, x: np.ndarray, y: np.ndarray, lr: float) -> "Pending":
        """Run one training step without reading its results (a GPU step's results may
        still be on their way: `collect` reads them, later steps need not wait). A model's
        `state`s continue from the step submitted before."""
        weight, first, total = 1.0, 0, len(x)  # (read by data-parallel steps, and batchnorm(sync=true))
        carried, rows = self._carried, (0, total, total)
        if self.world is not None:  # this rank's rows; padded to the compiled batch by the program
            rows = (*self.world.shard(total), total)
            carried = self._shard_carries(*rows)
            x, y, weight, first = self.world.shard_feeds(x, y, total)
        feeds = {self.input_name: x, "label": y, "lr": lr, VALID: np.int32(len(x)), "shard_weight": weight,
                 "sample_offset": first, "global_batch": total, **self._carry_feeds(carried, len(x))}
        out = self.train_program.run(feeds)
        self._keep_carries(self._carried, out)
        self._carried_rows = rows
        return Pending(feeds, out)

    def _shard_carries(self, first: int, count: int, total: int) -> dict:
        """A rank's rows [first, first + count) of each state for a global batch of `total`:
        its own from the step before while the shards stay where they were (every full batch
        of a run); after a batch of another size, the whole state is put together (each rank's
        rows, summed over ranks) and cut as one process cuts it: its first rows, or afresh
        when the batch grew."""
        if not self.carries or not self._carried or self._carried_rows[2] == total:
            return self._carried
        was_first, was_count, was_total = self._carried_rows
        if was_total < total:
            return {}
        whole = []
        for c in self.carries:
            a = np.zeros((was_total,) + tuple(int(d) for d in c.type.shape[1:]), c.type.dtype.np)
            a[was_first:was_first + was_count] = np.asarray(self._carried[c.name])[:was_count]
            whole.append(a)
        self.world.allreduce(whole, whole)
        return {c.name: a[first:first + count] for c, a in zip(self.carries, whole)}

    def collect(self, step: "Pending") -> dict[str, float]:
        """A submitted step's loss and metrics; NumericsError when its loss (or, with
        `check_numerics`, a gradient) is not finite. Steps are collected in the order they
        ran (the step count counts finite steps)."""
        loss = float(step.out["loss"])
        if not math.isfinite(loss):
            raise self._numerics_error(step.feeds, f"the loss became {loss}")
        check = step.out.get("gradient_check")
        if check is not None and not math.isfinite(float(check)):
            raise self._numerics_error(step.feeds, "the gradients became non-finite", f" (the loss was {loss:.6g})")
        self.global_step += 1
        return {k: float(step.out[k]) for k in self._results}

    def _numerics_error(self, feeds, what_became: str, note: str = "") -> NumericsError:
        """Re-run the failed step on the reference interpreter to find the first bad op
        (in the backward pass too, where a finite loss had non-finite gradients). The step
        left the state untouched: the optimizer pass guards every update."""
        from dlc.core import ops
        backends.sync_state(self.state)
        values = backends.backend("reference").run_graph(self.train_graph, {**self.state, **feeds}, keep_all=True)
        forward = self.train_graph.ancestors([self.train_graph.outputs["loss"]])  # what the loss is computed from
        for nid in self.train_graph.toposort():
            node = self.train_graph.node(nid)
            v = values[nid]
            if node.op in (ops.CONST, ops.SCAN):
                continue  # an infinite constant is deliberate (the optimizer's finiteness test);
                #           a loop's results are checked where they are read (scan_result)
            if v.dtype.kind == "f" and not np.all(np.isfinite(v)):
                hint = ("lower the learning rate, normalize the inputs, or clip gradients "
                        "(`clip = 1.0` in the train block)")
                if node.op is ops.INPUT:
                    what = f"parameter or state `{node.attrs['name']}` holds non-finite values"
                    if not self.config.check_numerics:  # an earlier step's update wrote them
                        hint += "; `check_numerics = true` (or --check-numerics) stops at the step that wrote them"
                else:
                    what = f"`{node.op.name}` produced {_nonfinite(v)}"
                    what = what if nid in forward else f"in the backward pass of this line, {what}"
                return NumericsError(f"{what_became} at step {self.global_step + 1}{note}; {what}", node.span,
                                     hint=hint)
        return NumericsError(f"{what_became} at step {self.global_step + 1}{note}", None)

    def profile_report(self, top: int = 12) -> str:
        """Where training time went: per kernel and per .dln line (native target only)."""
        rows = self.train_program.profile_rows()
        if not rows:
            return f"no profile: target `{self.target}` runs no compiled kernels\n"
        total = sum(sec for _, _, sec in rows) or 1.0
        out = [f"profile of {self.train_program.calls} training steps "
               f"({total:.3f} s in compiled code)", "  kernel                      time     share  .dln lines"]
        for name, lines, sec in sorted(rows, key=lambda r: -r[2])[:top]:
            out.append(f"  {name:<24}{sec * 1e3:>9.1f} ms {sec / total:>7.1%}  {', '.join(lines) or '-'}")
        by_line: dict[str, float] = {}
        for name, lines, sec in rows:  # a kernel's time is shared evenly by its lines
            for line in lines or ("(generated)",):
                by_line[line] = by_line.get(line, 0.0) + sec / max(len(lines), 1)
        out.append("  .dln line                   time     share")
        for line, sec in sorted(by_line.items(), key=lambda r: -r[1])[:top]:
            out.append(f"  {line:<24}{sec * 1e3:>9.1f} ms {sec / total:>7.1%}")
        return "\n".join(out) + "\n"

    # --- whole data sets ----------------------------------------------------------------------
    def use_batch(self, batch: int) -> int:
        """Compile for batches of `batch` rows: smaller ones, such as the last of an epoch
        (or a whole data set smaller than the batch), are padded to it instead of compiled
        again. A rank of a data-parallel job compiles for its largest shard of a global
        batch of `batch` (every rank the same size: a smaller shard is padded to it)."""
        batch = max(1, batch)
        self.program.batch = self.world.shard_capacity(batch) if self.world is not None else batch
        return self.program.batch

    def compile_in_background(self, batch: int) -> "Background":
        """Compile the program for `batch` rows (or load it from the cache) on a thread,
        while the caller reads the data; `wait()` joins it and raises what it raised.
        (The LLVM work runs in the thread's forked compiler processes and in llvmlite,
        outside the GIL, so it overlaps reading and normalizing the data.)"""
        self.use_batch(batch)
        self._background = Background(self._load)  # the compiling line reads where the code came from
        return self._background

    def _chunk(self, batch: int, rows: int) -> int:
        """Evaluation in batches of the compiled size (the training one, once fit chose it)."""
        return self.program.batch or self.use_batch(min(batch, rows))

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch: int) -> dict[str, float]:
        """Loss and metrics over every sample (the last partial batch included); states
        start from their initial values."""
        totals: dict[str, float] = {}
        n = len(x)

        def add(size: int, out: dict) -> None:
            for k in ["loss"] + self.metrics:
                totals[k] = totals.get(k, 0.0) + float(out[k]) * size
        streams, batch = batch, self._chunk(batch, n)
        parts = self._passes(n, batch)
        if self.world is not None:  # every rank evaluates with rank 0's statistics, a share of the data
            self.world.broadcast(self.state, self.model.layer_state())
            if self.carries:  # its rows of every stream batch of the global batch, as in training
                first, count = self.world.shard(min(streams, n))
                parts = (idx[first:first + count] for idx in self.batches(n, streams, every=True))
            else:  # every size-th batch
                parts = (slice(start, start + batch) for start in self.world.batches_of(range(0, n, batch)))
        last = None  # the previous batch's results: read while the next batch runs
        carried: dict = {}
        for idx in parts:
            xb, yb = x[idx], y[idx]
            if not len(xb):  # (a late, shorter stream batch holds no row of this rank)
                continue
            out = self.eval_program.run({self.input_name: xb, "label": yb, **self._carry_feeds(carried, len(xb))})
            self._keep_carries(carried, out)
            if last:
                add(*last)
            last = (len(xb), out)
        if last:
            add(*last)
        if self.world is not None and n:
            totals = self.world.sum_floats(totals, ["loss"] + self.metrics)
        return {k: v / n for k, v in totals.items()} if n else {}

    def predict(self, x: np.ndarray, batch: int, results: bool = False):
        """The output for every sample; with `results`, {"output": ..., NAME: ...} with the
        model's named results too. States start from their initial values."""
        keys = ["output"] + [f"output:{name}" for name, _ in self.model.built("eval").results]
        parts: dict[str, list] = {k: [] for k in keys}
        order, carried = [], {}
        for idx in self._passes(len(x), self._chunk(batch, len(x))):
            xb = x[idx]
            label = np.zeros((len(xb),) + self._label_shape(), self._label_dtype()) \
                if self._label_type() is not None else None
            out = self.eval_program.run({self.input_name: xb, "label": label, **self._carry_feeds(carried, len(xb))})
            self._keep_carries(carried, out)
            order.append(idx)
            for k in keys:
                parts[k].append(out[k])
        if not order:
            return self.model.forward(x, results=results)  # no rows: the shapes alone
        joined = {k.removeprefix("output:"): np.concatenate([np.asarray(o) for o in v]) for k, v in parts.items()}
        if self.carries:  # stream batches interleave the samples
            where = np.argsort(np.concatenate(order), kind="stable")
            joined = {k: v[where] for k, v in joined.items()}
        return joined if results else joined["output"]

    def _label_type(self):
        """The label input's type, or None when the loss takes no labels."""
        g = self.model.built("eval").graph
        ids = g.inputs("label")
        return g.node(ids[0]).attrs["type"] if ids else None

    def _label_shape(self) -> tuple:
        return tuple(int(d) for d in self._label_type().shape[1:])

    def _label_dtype(self):
        return self._label_type().dtype.np


@dataclass
class Pending:
    """A training step that ran, with its results not read yet."""

    feeds: dict
    out: dict

    def ready(self) -> bool:
        """Whether reading the results would not wait (always, for results on the host)."""
        return all(v.ready() for v in self.out.values() if hasattr(v, "ready"))


# steps a training loop runs ahead of the one whose results it reads (GPU results arrive late)
READ_BEHIND = 8


class Background:
    """A function run on a daemon thread; wait() returns its result or raises its error."""

    def __init__(self, fn):
        import threading
        self._result, self._error = None, None
        self.seconds = 0.0  # how long fn ran

        def run():
            started = time.perf_counter()
            try:
                self._result = fn()
            except BaseException as e:  # noqa: BLE001 - re-raised by wait()
                self._error = e
            finally:
                self.seconds = time.perf_counter() - started
        self._thread = threading.Thread(target=run, name="dlc-compile", daemon=True)
        self._thread.start()

    def wait(self, quietly: bool = False):
        self._thread.join()
        if self._error is not None and not quietly:
            raise self._error
        return self._result


def _check_shardable(model) -> None:
    """A data-parallel job splits every batch between its ranks: a model whose outputs mix
    the samples of a batch would train otherwise than one process does."""
    from dlc.passes.mask_batch import mixes_samples
    graph = model.built("eval").graph
    nid = mixes_samples(graph)
    if nid is not None:
        raise UsageError(f"model {model.name} mixes the samples of a batch here (it reduces over the batch "
                         "axis), so a data-parallel job, each of whose ranks holds a share of "
                         "every batch, would not train what one process trains", graph.node(nid).span,
                         hint="train it in one process, or reduce over other axes than the batch")


def _check_loss_shares(model) -> None:
    """Each rank differentiates its shard's loss times its share of the batch: the shares add
    up to one process's loss only when the loss is a mean over the samples (plus terms that
    do not depend on them). Probed on the reference interpreter: a batch of 4 random samples
    against its shards of 3 and 1. (A mean over a mask's kept positions is shared out by
    those instead, and not probed.)"""
    graph = model.built("eval").graph
    if graph.meta.get("masked_means"):
        return
    rng = np.random.default_rng(0)
    batch = {}
    for nid in graph.inputs():
        a = graph.node(nid).attrs
        if a["role"] in ("data", "label"):
            shape = (4,) + tuple(int(d) for d in a["type"].shape[1:])
            batch[a["name"]] = rng.normal(size=shape).astype(np.float32) if a["type"].dtype.is_float \
                else np.zeros(shape, a["type"].dtype.np)

    def loss(rows: slice) -> float:
        feeds = {**model.state, **{k: v[rows] for k, v in batch.items()}}
        return float(backends.backend("reference").run_graph(graph, feeds)["loss"])
    whole, shares = loss(slice(0, 4)), 0.75 * loss(slice(0, 3)) + 0.25 * loss(slice(3, 4))
    if math.isfinite(whole) and math.isfinite(shares) and abs(whole - shares) > 1e-3 * max(abs(whole), 1e-3):
        span = model.train_config.span("loss")
        raise UsageError("the loss is not a mean over the samples (for 4 random samples it is "
                         f"{whole:.6g}, and their shards' losses weighted by their shares give {shares:.6g}), "
                         "so a data-parallel job, whose ranks each differentiate their share of it, would "
                         "not train what one process trains", span,
                         hint="write the loss as a mean over the samples (the built-in losses are; "
                              "`sum(...)` over the batch is not), or train in one process")


def _nonfinite(v: np.ndarray) -> str:
    kinds = []
    if np.any(np.isnan(v)):
        kinds.append("NaN")
    if np.any(np.isinf(v)):
        kinds.append("Inf")
    return " and ".join(kinds)


@dataclass
class FitOptions:
    epochs: int
    batch: int
    lr: float
    seed: int
    shuffle: bool = True
    quiet: bool = True
    log_path: Path | None = None
    csv_path: Path | None = None
    tensorboard_dir: Path | None = None
    save_path: Path | None = None
    resume: dict | None = None  # meta of a loaded checkpoint
    keep_previous: bool = False  # the first save moves a file already at save_path aside
    on_epoch: Callable[[dict], None] | None = None
    early_stop: object | None = None  # a callbacks.EarlyStopping
    keep_best: bool = False  # end with the weights of the best epoch by the monitored metric
    callbacks: list = field(default_factory=list)  # objects with on_epoch_end(epoch, logs)


def fit(session: Session, data, opts: FitOptions, normalizer: Normalizer) -> History:
    """Train for opts.epochs, scoring the validation split (if any) after each epoch and the
    test split once at the end."""
    from dlc.runtime import callbacks as cbs
    from dlc.runtime.loggers import close_all, open_loggers
    from dlc.runtime.progress import Progress, metrics_text
    cfg = session.config
    x, y = data.x_train, data.y_train
    n = len(x)
    if n == 0:
        raise DataError("the training split is empty", cfg.span("data"))
    # A batchnorm that sees one value per channel per sample has no variance over a batch of
    # one. PyTorch raises ("Expected more than 1 value per channel when training"); so does dlc
    # when the batch size is 1, but a last partial batch of 1 (left by the data's size, not
    # chosen) is skipped, as with PyTorch's drop_last; the next epoch's shuffle leaves out another.
    batchnorm = session.model.built("train").graph.meta.get("one_value_per_channel")
    if batchnorm is not None and min(n, opts.batch) == 1:
        raise ArgumentError("`batchnorm` needs more than 1 value per channel when training, "
                            f"but {'each batch' if opts.batch == 1 else 'the training split'} holds 1 sample",
                            batchnorm, hint="train with `batch` of 2 or more")
    drop_last = batchnorm is not None and n % opts.batch == 1
    steps_per_epoch = n // opts.batch if drop_last else -(-n // opts.batch)
    if opts.batch >= max(2 * n, n + 256):  # the step is compiled for `batch` rows: the rest is padding
        warn(f"`batch` is {opts.batch:,}, but the training split holds {n:,} samples: every step computes "
             f"{opts.batch:,} rows, {opts.batch - n:,} of them padding",
             cfg.span("batch") if opts.batch == cfg.batch else None,
             hint=f"a full batch is `batch = {n}`: the same training, without the padding")
    for spec in cfg.augment:  # (a train block's were checked as it was read; an override's now)
        try:
            check_augment(spec, *session.model.input_types[0])
        except DlcError as err:
            raise err.with_span(cfg.span("augment"))
    session.use_batch(opts.batch)
    x_val = data.x_val if data.x_val is not None and len(data.x_val) else None
    stepwise = per_step(cfg.schedule)
    # what the monitors may watch, checked before the first step
    recorded = [f"{split}_{k}" for split in ("train", "val") if split == "train" or x_val is not None
                for k in session._results]
    watched = []
    if opts.early_stop is not None:
        cbs.check_monitor(opts.early_stop.monitor, recorded, "`early_stop`", cfg.span("early_stop"))
        watched.append(opts.early_stop)
    plateau = None
    if cfg.schedule.name == "plateau":
        plateau = cbs.Plateau(cfg.schedule, (opts.resume or {}).get("plateau"))
        cbs.check_monitor(plateau.monitor, recorded, "`schedule`", cfg.span("schedule"))
    best = None
    if opts.keep_best:
        monitor = opts.early_stop.monitor if opts.early_stop is not None else "val_loss"
        cbs.check_monitor(monitor, recorded, "`keep_best`", cfg.span("keep_best"))
        best = cbs.BestWeights(cbs.Monitor(monitor, opts.early_stop.min_delta if opts.early_stop else 0.0),
                               session.state, [k for k, spec in session.model.built("eval").params.items()
                                               if spec.type.dtype.is_float])  # not the step counter
    callbacks = watched + list(opts.callbacks)
    if session.carries:  # full batches that continue each other row by row (stream_batches)
        steps_per_epoch = n // min(n, opts.batch)
    start_epoch, skip = 0, 0
    if opts.resume:
        start_epoch, skip = opts.resume["epoch"], opts.resume["batch"]
    history = History()
    world = session.world  # a data-parallel job: rank 0 alone reports, logs and saves
    lead = world is None or world.lead
    if world is not None:
        world.check_same(session, data, opts)
    progress = Progress(opts.epochs, steps_per_epoch, quiet=opts.quiet or not lead)
    header = {"event": "start", "model": session.model.name, "dlc": __version__, "target": session.target,
              "epochs": opts.epochs, "batch": opts.batch, "seed": opts.seed}
    if world is not None:
        header["ranks"] = world.size
    loggers = open_loggers(header, bool(opts.resume), opts.log_path, opts.csv_path, opts.tensorboard_dir) \
        if lead else []
    position = (start_epoch, skip)  # where a resumed run continues: (epoch, batch)
    first_step = session.global_step
    keep = opts.keep_previous  # only the run's first save may move an existing file aside

    def checkpoint(epoch: int, batch: int) -> None:
        nonlocal keep
        if not lead:
            return
        moved = save(session.model, opts.save_path, normalizer, epoch, batch, session.global_step,
                     keep_previous=keep, extra={"plateau": plateau.state()} if plateau else None)
        history.previous, keep = history.previous or moved, False

    try:
        # the last, partial batches of each split: padded to the compiled size (compiled at their
        # own only where the steps cannot pad them)
        # (stream batches: min(rows, batch) streams; evaluation reads the shorter last batch too)
        b = session.program.batch
        rows = [min(n, b)] if session.carries else [0 if drop_last else n % b]
        for split in (x_val, data.x_test):
            if split is not None and len(split):
                streams = min(len(split), b)
                rows += [streams, len(split) % streams] if session.carries else [len(split) % b]
        progress.compiling(lambda: session.warm_up(rows))
        cbs.call_hook(callbacks, "on_train_begin", {})
        for epoch in range(start_epoch, opts.epochs):
            lr = learning_rate(cfg.schedule, opts.lr, epoch, opts.epochs, session.global_step)
            if plateau is not None:
                lr = plateau.rate(lr)
            progress.start_epoch(epoch + 1)
            started = time.perf_counter()
            sums: dict[str, float] = {}
            seen = 0
            rng = np.random.default_rng([opts.seed, epoch]) if opts.shuffle else None
            ran: list[tuple[int, Pending]] = []  # steps whose results are not read yet
            session.reset_state()  # a model's `state`s start each epoch from their initial values
            for i, idx in enumerate(session.batches(n, opts.batch, rng)):
                if (epoch == start_epoch and i < skip) or i == steps_per_epoch:  # i == ...: the dropped batch
                    continue
                if stepwise:  # the steps submitted so far, read or not, count
                    lr = learning_rate(cfg.schedule, opts.lr, epoch, opts.epochs, session.global_step + len(ran))
                inputs = augment(x[idx], cfg.augment, generator(opts.seed, epoch, i)) if cfg.augment else x[idx]
                ran.append((len(idx), session.submit(inputs, y[idx], lr)))
                position = (epoch, i + 1)
                while ran and (len(ran) > READ_BEHIND or ran[0][1].ready()):
                    seen += _record(session, *ran.pop(0), sums, progress)
            while ran:
                seen += _record(session, *ran.pop(0), sums, progress)
            position = (epoch + 1, 0)
            record = {"epoch": epoch + 1, "step": session.global_step, "lr": lr}
            record.update({f"train_{k}": v / seen for k, v in sums.items()} if seen else {})
            if x_val is not None:
                record.update({f"val_{k}": v for k, v in
                               session.evaluate(x_val, data.y_val, opts.batch).items()})
            record["seconds"] = time.perf_counter() - started
            history.epochs.append(record)
            if plateau is not None:  # (before the checkpoint, which saves its state)
                plateau.update(epoch + 1, record)
            metrics = {k: v for k, v in record.items() if k.startswith(("train_", "val_"))}
            progress.end_epoch(epoch + 1, metrics, record["seconds"])
            for lg in loggers:
                lg.write(record["epoch"], record["step"], metrics, lr, record["seconds"])
            improved = best is not None and best.update(epoch + 1, record)
            if opts.save_path and (best is None or improved):  # keep_best: the file holds the best epoch
                checkpoint(epoch + 1, 0)
            if opts.on_epoch:
                opts.on_epoch(record)
            history.stopped = cbs.end_of_epoch(callbacks, epoch + 1, record)
            if history.stopped:
                progress.note(history.stopped)
                break
        if best is not None and best.saved is not None:
            best.restore()
            history.best_epoch = best.monitor.best_epoch
            progress.note(f"kept the weights of epoch {history.best_epoch} "
                          f"({best.monitor.monitor} {best.monitor.best:.4g})")
        cbs.call_hook(callbacks, "on_train_end", {"epochs": len(history.epochs)})
        if len(data.x_test):
            history.test = session.evaluate(data.x_test, data.y_test, opts.batch)
            progress.note(metrics_text({f"test_{k}": v for k, v in history.test.items()}))
            last = history.epochs[-1]["epoch"] if history.epochs else start_epoch
            for lg in loggers:
                lg.write_test(last, history.test)
    except KeyboardInterrupt:
        progress.close()
        if session.global_step == first_step:  # no step yet (still compiling): nothing new to save
            kept = f"; {opts.save_path} left as it was" if opts.save_path else ""
            raise Interrupted(f"interrupted before the first training step{kept}") from None
        where = f"after epoch {position[0]}" if position[1] == 0 else \
            f"in epoch {position[0] + 1}, after batch {position[1]}"
        if opts.save_path and best is not None:  # the file holds the best epoch: keep it
            raise Interrupted(f"interrupted {where}; {opts.save_path} holds the best epoch so far "
                              f"({best.monitor.best_epoch or 'none yet'})") from None
        if opts.save_path:
            checkpoint(*position)
            raise Interrupted(f"interrupted {where}; saved {opts.save_path}{kept_note(history)} "
                              f"(resume with --resume {opts.save_path}, or fit(resume=...) from Python)") from None
        raise Interrupted(f"interrupted {where} (nothing saved: --save FILE, or fit(save=...), saves a "
                          "checkpoint)") from None
    finally:
        progress.close()
        close_all(loggers)
    return history


def _record(session: Session, size: int, step: Pending, sums: dict, progress) -> int:
    """Read a step's results into the epoch's sums and the progress bar."""
    out = session.collect(step)
    for k, v in out.items():
        sums[k] = sums.get(k, 0.0) + v * size
    progress.step(out["loss"])
    return size


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training, after the checkpoint (if any) was written: a KeyboardInterrupt
    (what `except KeyboardInterrupt` and a notebook expect) that says what was saved."""


def kept_note(history: History) -> str:
    """`` (the previous one is now ck.prev.npz)``, when the first save moved a file aside."""
    return f" (the previous one is now {history.previous})" if history.previous else ""


def save(model, path: Path, normalizer: Normalizer, epoch: int = 0, batch: int = 0, step: int = 0,
         keep_previous: bool = False, extra: dict | None = None) -> Path | None:
    """Write the model's state and normalization; (epoch, batch) is where a resumed run goes on
    (`extra`: more of the run's state, such as a plateau schedule's)."""
    from dlc.runtime.checkpoint import save_checkpoint
    arrays = {**model.state, "data:shift": normalizer.shift, "data:scale": normalizer.scale}
    meta = {"dlc": __version__, "model": model.name, "epoch": epoch, "batch": batch, "step": step, **(extra or {})}
    return save_checkpoint(path, arrays, meta, keep_previous)


def restore(model, path: Path, state: dict[str, np.ndarray]) -> tuple[dict, Normalizer]:
    """Load a checkpoint into `state` (in place, and only once all of it checked out);
    returns its meta and normalizer."""
    from dlc.runtime.checkpoint import load_checkpoint
    arrays, meta = load_checkpoint(path, lambda found: _expected(model, state, found), model=model.name)
    for key in ("epoch", "batch", "step"):  # where a resumed run goes on
        v = meta.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise CheckpointError(f"checkpoint `{path}` has damaged metadata: `{key}` is "
                                  f"{'missing' if v is None else repr(v)}, not a non-negative integer",
                                  hint="dlc writes it with every checkpoint; was the file edited?")
    from dlc.runtime.callbacks import Plateau
    plateau = meta.get("plateau")
    if plateau is not None and not Plateau.is_state(plateau):
        raise CheckpointError(f"checkpoint `{path}` has damaged metadata: `plateau` is {plateau!r}",
                              hint="dlc writes it with the checkpoints of a run with a plateau schedule; "
                                   "was the file edited?")
    _check_usable(path, arrays)
    norm = Normalizer(arrays.pop("data:shift", np.zeros(1, np.float32)),
                      arrays.pop("data:scale", np.ones(1, np.float32)))
    for k, v in arrays.items():
        if k in state:
            state[k][...] = v
        else:  # optimizer state: otherwise created by the first step
            state[k] = np.array(v, order="C")  # not ascontiguousarray: it makes the scalar `step` 1-d
    return meta, norm


def _expected(model, state: dict[str, np.ndarray], found: dict) -> dict:
    """{name: (shape, dtype)} a checkpoint of `model` must hold (every state tensor but the
    optimizer's) and may hold (optimizer state, shaped like its parameter; the normalization)."""
    # the step counter is optimizer state too: a session may have made it already, and a
    # checkpoint written before any training (`dlc import`, Model.save) has none
    expect = {k: (v.shape, v.dtype) for k, v in state.items() if ":" not in k and k != "step"}
    params = model.params
    sample = model.input_types[0][1].shape[1:] if model.input_types else ()
    features = math.prod(sample) if all(isinstance(d, int) for d in sample) else 1
    for name, (shape, _) in found.items():
        if name in expect:
            continue
        # optimizer state from an earlier fit of this model, or `<param>:<slot>` like its param
        like = state.get(name, params.get(name.rpartition(":")[0]))
        if like is not None:
            expect[name] = (like.shape, like.dtype)
        elif name in ("step", "seed"):
            expect[name] = ((), np.dtype(np.int32))
        elif name in ("data:shift", "data:scale"):  # one value per input feature, or one for all
            expect[name] = (shape if shape in ((1,), (features,)) else (features,), np.dtype(np.float32))
    return expect


def _check_usable(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Weights that would make every loss NaN are refused here, not found out by training."""
    for name, a in arrays.items():
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            raise CheckpointError(f"checkpoint `{path}` holds {_nonfinite(a)} values in `{name}`",
                                  hint="training had diverged when it was saved; use an earlier "
                                       "checkpoint (such as the .prev.npz one) or train afresh")
    scale = arrays.get("data:scale")
    if scale is not None and np.any(scale == 0):
        raise CheckpointError(f"checkpoint `{path}` has a zero input normalization scale "
                              "(`data:scale`), which would divide the inputs by zero",
                              hint="it was not written by dlc, or was edited; train afresh")
