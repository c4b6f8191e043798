"""The reference backend: a numpy interpreter of the graph, op by op, through OpDef.ref.

It is the oracle every other backend and pass is checked against, so it stays simple.
It runs in float32 by default, or float64 (`float_dtype=np.float64`) for gradient checks.
Symbolic dimensions are bound from the inputs' shapes (one specialization per batch size).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from dlc.backends.base import Backend
from dlc.core import ops
from dlc.core.graph import Graph
from dlc.core.ops.scan import run_scan
from dlc.passes.specialize import bind_symbols, is_symbolic, specialize
from dlc.core.types import DType


def np_dtype(dtype: DType, float_dtype=np.float32) -> np.dtype:
    return np.dtype(float_dtype) if dtype.is_float else dtype.np


class Interpreter:
    """Runs one graph repeatedly; keeps a specialized copy per set of symbol values."""

    def __init__(self, graph: Graph, float_dtype=np.float32):
        self.graph = graph
        self.float_dtype = float_dtype
        self.symbolic = is_symbolic(graph)
        self._plans: dict[tuple, tuple[Graph, list[int]]] = {}
        self._bodies: dict[int, tuple[Graph, Interpreter]] = {}  # id(loop body) -> its interpreter

    def _plan(self, inputs: Mapping[str, np.ndarray]) -> tuple[Graph, list[int]]:
        bindings = {}
        if self.symbolic:
            bindings = bind_symbols(self.graph, {k: np.shape(v) for k, v in inputs.items()})
        key = tuple(sorted(bindings.items()))
        if key not in self._plans:
            g = specialize(self.graph, bindings) if self.symbolic else self.graph
            self._plans[key] = (g, g.toposort())
        return self._plans[key]

    def run(self, inputs: Mapping[str, np.ndarray], keep_all: bool = False) -> dict:
        """{result name: array} for outputs, `update:<name>` for updates; with keep_all
        also {node id: array} for every node."""
        graph, order = self._plan(inputs)
        values: dict[int, np.ndarray] = {}
        with np.errstate(all="ignore"):  # NaN/Inf are reported by the numerics guard
            for nid in order:
                values[nid] = self._eval(graph, nid, values, inputs)
        result = {k: values[v] for k, v in graph.outputs.items()}
        result.update({f"update:{k}": values[v] for k, v in graph.updates.items()})
        if keep_all:
            result.update(values)
        return result

    def _eval(self, graph: Graph, nid: int, values, inputs) -> np.ndarray:
        node = graph.node(nid)
        if node.op is ops.SCAN:  # a tuple of arrays, read through scan_result
            body = node.attrs["body"]
            if id(body) not in self._bodies:  # (the body is held too, so its id stays its own)
                self._bodies[id(body)] = (body, Interpreter(body, self.float_dtype))
            return run_scan([values[o] for o in node.operands], float_dtype=self.float_dtype,
                            run_body=self._bodies[id(body)][1].run, **node.attrs)
        want = np_dtype(node.type.dtype, self.float_dtype)
        if node.op is ops.INPUT:
            name = node.attrs["name"]
            if name not in inputs:
                raise KeyError(f"missing input {name!r}")
            out = np.asarray(inputs[name])
        else:
            attrs = node.attrs
            if node.op is ops.CAST and attrs["dtype"].is_float:  # keep float64 runs exact
                attrs = dict(attrs, dtype=DType.of(np.zeros(0, want)))
            out = np.asarray(node.op.ref(*(values[o] for o in node.operands), **attrs))
        return out if out.dtype == want else out.astype(want)


def run_graph(graph: Graph, inputs: Mapping[str, np.ndarray], float_dtype=np.float32,
              keep_all: bool = False) -> dict:
    """One-off evaluation (see Interpreter.run)."""
    return Interpreter(graph, float_dtype).run(inputs, keep_all)


class ReferenceProgram:
    """A compiled step on the reference backend: reads params/state from `state` and
    writes their new values back into those same arrays (in place, as native code does)."""

    def __init__(self, graph: Graph, state: dict[str, np.ndarray], float_dtype=np.float32):
        self.graph = graph
        self.state = state
        self.interpreter = Interpreter(graph, float_dtype)
        self.calls = 0

    def profile_rows(self) -> list:
        return []  # nothing is compiled: there are no kernels to time

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        result = self.interpreter.run({**self.state, **feeds})
        for name in self.graph.updates:
            self.state[name][...] = result[f"update:{name}"]
        return {k: result[k] for k in self.graph.outputs}


class ReferenceBackend(Backend):
    """The graph interpreted op by op in numpy: the oracle, slow, no compilation."""

    name = "reference"
    doc = "the numpy interpreter of the graph, op by op (slow; the oracle every test checks against)"
    lowers = False
    collectives = True  # `allreduce` runs through dlc.core.collective, like every op's ref

    def interpret(self, graph: Graph, state: dict[str, np.ndarray]) -> ReferenceProgram:
        return ReferenceProgram(graph, state)

    run_graph = staticmethod(run_graph)


BACKEND = ReferenceBackend()
