"""scan: a body graph applied `length` times with carried state (a recurrent loop).

Design
------
A recurrent layer is one loop construct rather than T copies of its step. It is two ops,
because a graph node has one type and a loop has several results (XLA's while +
get-tuple-element, JAX's lax.scan):

    %s = scan(c_1..c_k, xs_1..xs_s, w_1..w_n, body=B, length=T, reverse=r, carries=k, seqs=s)
         : (C_1, ..., C_k, [T]+Y_1, ..., [T]+Y_m)           a TupleType
    %r = scan_result(%s, index=i)                              one element of it

Operands, in this order:
  carries      k initial states c_i : C_i            (h_0, c_0 of an LSTM)
  sequences    s stacked inputs xs_j : [T] + X_j      time is axis 0 (time-major)
  invariants   the rest, w_l : W_l, read by every step (weights, biases)

The body B is a `Graph` held in the attrs. Its inputs (role "data") are named by position:
  `c<i>` : C_i   the carry before this step
  `x<j>` : X_j   this step's slice xs_j[t]
  `w<l>` : W_l   the invariant
and its results, in this order:
  `c<i>` : C_i   the carry after this step (same type as `c<i>`)
  `y<m>` : Y_m   a per-step output, stacked along a new axis 0 of length T

Semantics (the reference interpreter runs exactly this):

    carry = c
    for t in (range(T) if not reverse else reversed(range(T))):
        carry, y[t] = B(carry, xs[t], w)
    results = carry..., stack(y)...

Step t always reads xs[t] and writes y[t], whatever the direction: a reverse scan walks
time backwards but its stacked outputs are in time order (a bidirectional layer
concatenates both directions' outputs as they are; the backward pass reads the forward
pass's per-step values at the same index).

`scan_result(s, i)` is the final carry i for i < k, else the stacked output i - k.

T (`length`) is an int or a symbolic dimension (`Sym`): the shape rule only relates it to
the sequences' axis 0; lowering by unrolling needs it known.

The body is self-contained: it reads only its own inputs (never a node of the enclosing
graph) and has no params or updates. Bodies are never mutated in place (passes build new
bodies); a body may itself contain scans.

Gradients: `scan` has no local vjp rule; passes/autodiff.py differentiates a scan as a
whole into a reverse scan over the body's vjp (see its docstring), with the per-step
values that the backward body needs stashed as extra stacked outputs of the forward scan.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dlc.core.types import DType, ShapeError, TensorType, TupleType
from dlc.core.ops.base import Kind, OpDef, register


def carry_name(i: int) -> str:
    return f"c{i}"


def seq_name(j: int) -> str:
    return f"x{j}"


def inv_name(k: int) -> str:
    return f"w{k}"


def out_name(m: int) -> str:
    return f"y{m}"


@dataclass(frozen=True)
class Signature:
    """A scan's body interface as node ids of the body graph."""

    carries: tuple[int, ...]      # body inputs c0..
    seqs: tuple[int, ...]         # body inputs x0..
    invariants: tuple[int, ...]   # body inputs w0..
    new_carries: tuple[int, ...]  # body results c0..
    outputs: tuple[int, ...]      # body results y0..


def _numbered(names, prefix: str) -> list[str]:
    out = sorted((n for n in names if n.startswith(prefix) and n[len(prefix):].isdigit()),
                 key=lambda n: int(n[len(prefix):]))
    if out != [f"{prefix}{i}" for i in range(len(out))]:
        raise ShapeError(f"scan body: {prefix}<i> names are not numbered 0, 1, ...: {out}")
    return out


def signature(body, carries: int, seqs: int, invariants: int | None = None) -> Signature:
    """The body's inputs and results by role; ShapeError when they do not follow the
    conventions (names, counts)."""
    inputs = {body.node(i).attrs["name"]: i for i in body.inputs()}
    cs, xs, ws = (_numbered(inputs, p) for p in ("c", "x", "w"))
    if len(cs) + len(xs) + len(ws) != len(inputs):
        raise ShapeError(f"scan body: inputs must be named c<i>, x<j>, w<l>; got {sorted(inputs)}")
    if len(cs) != carries or len(xs) != seqs or (invariants is not None and len(ws) != invariants):
        raise ShapeError(f"scan body takes {len(cs)} carries, {len(xs)} sequences and {len(ws)} "
                         f"invariants; the scan gives {carries}, {seqs} and "
                         f"{'?' if invariants is None else invariants}")
    results = list(body.outputs)
    new_cs, ys = _numbered(results, "c"), _numbered(results, "y")
    if results != new_cs + ys or len(new_cs) != carries:
        raise ShapeError(f"scan body results must be c0..c{carries - 1} then y0, y1, ...; got {results}")
    return Signature(tuple(inputs[n] for n in cs), tuple(inputs[n] for n in xs), tuple(inputs[n] for n in ws),
                     tuple(body.outputs[n] for n in new_cs), tuple(body.outputs[n] for n in ys))


def stacked(t: TensorType, length) -> TensorType:
    return t.with_shape((length,) + tuple(t.shape))


def _scan_infer(*types, body, length, reverse: bool = False, carries: int = 0, seqs: int = 0) -> TupleType:
    from dlc.core.graph import VerifyError
    if carries < 0 or seqs < 0 or carries + seqs > len(types):
        raise ShapeError(f"scan: {carries} carries and {seqs} sequences but {len(types)} operands")
    if isinstance(length, int) and length < 1:
        raise ShapeError(f"scan: the length must be at least 1, got {length}")
    if any(isinstance(t, TupleType) for t in types):
        raise ShapeError("scan: an operand is a tuple; project it with scan_result")
    sig = signature(body, carries, seqs, len(types) - carries - seqs)
    node_type = lambda nid: body.node(nid).type  # noqa: E731
    for i, (t, nid) in enumerate(zip(types[:carries], sig.carries)):
        if node_type(nid) != t:
            raise ShapeError(f"scan: carry {i} is {t} but the body takes {node_type(nid)}")
        if node_type(sig.new_carries[i]) != t:
            raise ShapeError(f"scan: carry {i} is {t} but the body returns {node_type(sig.new_carries[i])}")
    for j, (t, nid) in enumerate(zip(types[carries:carries + seqs], sig.seqs)):
        if t.rank < 1 or t.shape[0] != length:
            raise ShapeError(f"scan: sequence {j} is {t}; its axis 0 must be the length {length}")
        if node_type(nid) != t.with_shape(t.shape[1:]):
            raise ShapeError(f"scan: sequence {j} is {t} but the body takes steps of {node_type(nid)}")
    for k, (t, nid) in enumerate(zip(types[carries + seqs:], sig.invariants)):
        if node_type(nid) != t:
            raise ShapeError(f"scan: invariant {k} is {t} but the body takes {node_type(nid)}")
    if body.updates or body.inputs("param"):
        raise ShapeError("scan body: no parameters or updates inside a loop body")
    try:
        body.verify()
    except VerifyError as e:
        raise ShapeError(f"scan body: {e}") from None
    return TupleType(tuple(types[:carries]) + tuple(stacked(node_type(y), length) for y in sig.outputs))


def evaluate(graph, feeds: dict, float_dtype) -> dict:
    """A graph's results by plain numpy evaluation, op by op (each OpDef.ref), in one float
    precision: how a loop body runs when no interpreter is given."""
    from dlc.core.ops.elementwise import CAST
    from dlc.core.ops.misc import INPUT
    values: dict = {}
    for nid in graph.toposort():
        n = graph.node(nid)
        if n.op is INPUT:
            values[nid] = np.asarray(feeds[n.attrs["name"]])
            continue
        attrs = n.attrs
        if n.op is CAST and attrs["dtype"].is_float:
            attrs = dict(attrs, dtype=DType.of(np.zeros(0, float_dtype)))
        out = n.op.ref(*(values[o] for o in n.operands), **attrs)
        if isinstance(n.type, TensorType):
            want = np.dtype(float_dtype) if n.type.dtype.is_float else n.type.dtype.np
            out = np.asarray(out)
            out = out if out.dtype == want else out.astype(want)
        values[nid] = out
    return {k: values[v] for k, v in graph.outputs.items()}


def run_scan(operands, body, length, reverse: bool = False, carries: int = 0, seqs: int = 0,
             float_dtype=None, run_body=None) -> tuple:
    """The scan's semantics (the docstring's loop): its results as a tuple of arrays.
    `run_body(feeds) -> {result name: array}` runs the body once (the reference interpreter
    passes its own); by default `evaluate` in the operands' float precision."""
    if float_dtype is None:
        floats = [a.dtype for a in map(np.asarray, operands) if a.dtype.kind == "f"]
        float_dtype = floats[0] if floats else np.float32
    if run_body is None:
        run_body = lambda feeds: evaluate(body, feeds, float_dtype)  # noqa: E731
    k, s = carries, seqs
    state = {carry_name(i): np.asarray(a) for i, a in enumerate(operands[:k])}
    fixed = {inv_name(i): np.asarray(a) for i, a in enumerate(operands[k + s:])}
    ys: list[list] = [[None] * int(length) for _ in range(len(body.outputs) - k)]
    for t in (reversed(range(int(length))) if reverse else range(int(length))):
        out = run_body({**state, **fixed, **{seq_name(j): np.asarray(a)[t]
                                              for j, a in enumerate(operands[k:k + s])}})
        state = {carry_name(i): out[carry_name(i)] for i in range(k)}
        for m, y in enumerate(ys):
            y[t] = out[out_name(m)]
    return tuple(state[carry_name(i)] for i in range(k)) + tuple(np.stack(y) for y in ys)


def _scan_ref(*arrays, **attrs):
    return run_scan(arrays, **attrs)


SCAN = register(OpDef("scan", Kind.LOOP, _scan_infer, _scan_ref, None, None,
                      doc="a body graph applied `length` times with carried state",
                      attrs=("length", "reverse", "carries", "seqs", "body")))


def _result_infer(t, index: int) -> TensorType:
    if not isinstance(t, TupleType):
        raise ShapeError(f"scan_result needs a scan, got {t}")
    if not 0 <= index < len(t.elements):
        raise ShapeError(f"scan_result: index {index} out of range for {t}")
    return t.elements[index]


# scan_result(s, index): one result of a scan. Autodiff treats it with the scan itself.
SCAN_RESULT = register(OpDef("scan_result", Kind.LOOP, _result_infer, lambda t, index: t[index], None, 1,
                             doc="one result of a scan", attrs=("index",)))
