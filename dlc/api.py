"""The public Python API: `dlc.load(path_or_source)` gives a Model."""
from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

import numpy as np

from . import frontend
from .diagnostics import DataError, DlcError, UsageError
from .frontend import Built
from .initializers import param_rng
from .printer import print_graph
from .summary import format_summary
from .syntax.parse import parse
from .syntax.printer import format_ast


def read_source(path_or_source) -> tuple[str, str]:
    """(text, name): a path to a .dln file, or the program text itself."""
    if isinstance(path_or_source, os.PathLike) or (
            isinstance(path_or_source, str) and "\n" not in path_or_source and "{" not in path_or_source):
        path = Path(path_or_source)
        try:
            return path.read_text(encoding="utf-8"), str(path_or_source)
        except FileNotFoundError:
            raise UsageError(f"no such file: {path}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read {path}: {e}") from None
    return str(path_or_source), "<string>"


def load(path_or_source, model: str | None = None) -> "Model":
    """Parse and check a .dln program (a path or the text) and return its model."""
    text, name = read_source(path_or_source)
    return Model(parse(text, name), model, name)


class Model:
    """A checked .dln model: its summary, its IR, its parameters, and a forward pass."""

    def __init__(self, program, model: str | None, source_name: str = "<string>"):
        self.program = program
        self.source_name = source_name
        self._eval = frontend.build(program, model, mode="eval")
        self.name = self._eval.model.name
        self.train_config = self._eval.train
        seed = self.train_config.seed if self.train_config else 0
        self.state: dict[str, np.ndarray] = init_state(self._eval, seed)

    # --- inspection -----------------------------------------------------------------------------
    @cached_property
    def _train(self) -> Built:
        return frontend.build(self.program, self.name, mode="train")

    def built(self, mode: str = "eval") -> Built:
        return self._train if mode == "train" else self._eval

    def summary(self) -> str:
        return format_summary(self._eval, self.source_name)

    def ir(self, stage: str = "graph") -> str:
        """The text of one IR stage: `ast` or `graph` (the training-mode model graph)."""
        if stage == "ast":
            return format_ast(self.program)
        if stage == "graph":
            return print_graph(self._train.graph)
        raise UsageError(f"unknown IR stage {stage!r}; stages: ast, graph")

    @property
    def params(self) -> dict[str, np.ndarray]:
        """Trainable parameters by name (numpy arrays, shared with the model)."""
        return {k: v for k, v in self.state.items() if self._eval.params[k].role == "param"}

    @property
    def input_types(self):
        return self._eval.inputs

    # --- running --------------------------------------------------------------------------------
    def forward(self, *xs: np.ndarray, float_dtype=np.float32) -> np.ndarray:
        """The model's output for a batch (evaluation mode), on the reference interpreter."""
        from .backends.reference import run_graph
        feeds = self._feeds(xs)
        g = self._eval.graph.copy()
        g.outputs = {"output": g.outputs["output"]}
        g.remove_unused(keep_inputs=False)
        return run_graph(g, feeds, float_dtype=float_dtype)["output"]

    __call__ = forward

    def _feeds(self, xs) -> dict[str, np.ndarray]:
        if len(xs) != len(self.input_types):
            raise DataError(f"model {self.name} takes {len(self.input_types)} input(s), got {len(xs)}")
        feeds = dict(self.state)
        for (name, t), x in zip(self.input_types, xs):
            feeds[name] = check_input(name, t, x)
        return feeds


def check_input(name: str, t, x) -> np.ndarray:
    """Convert a batch to the declared dtype and check its shape (symbols match anything)."""
    x = np.asarray(x)
    want = t.dtype.np
    if x.ndim != t.rank or any(isinstance(d, int) and d != s for d, s in zip(t.shape, x.shape)):
        raise DataError(f"input `{name}` should be {t}, got an array of shape {list(x.shape)}")
    if x.dtype != want:
        if want.kind in "iu" and x.dtype.kind == "f" and not np.all(np.mod(x, 1) == 0):
            raise DataError(f"input `{name}` should hold integers ({t}), got fractional values")
        x = x.astype(want)
    return x


def init_state(built: Built, seed: int) -> dict[str, np.ndarray]:
    """Fresh parameters (seeded per name) and state (running stats, counters)."""
    out = {}
    for name, spec in built.params.items():
        shape = tuple(int(d) for d in spec.type.shape)
        if name == "seed":
            out[name] = np.array(seed, dtype=np.int32)
        elif spec.type.dtype.is_float:
            out[name] = spec.init.sample(param_rng(seed, name), shape, spec.fan_in, spec.fan_out)
        else:
            out[name] = np.zeros(shape, dtype=spec.type.dtype.np)
    return out


__all__ = ["load", "Model", "DlcError"]
