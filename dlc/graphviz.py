"""Pictures of a model (`dlc graph`): its layer graph, or its fused kernels, as Graphviz DOT.

  layer_graph(model)        one node per layer, function or block call of the model's body
                            (with its output type, parameters and .dln line), one per model
                            input, declared `param` and expression; edges follow the data
  kernel_graph(model, ...)  the graph after the `fuse` pass: each kernel a cluster coloured
                            by its kind and labelled with the .dln lines it came from

The DOT text is made with the `graphviz` Python package (`pip install 'dlc[graph]'`);
rendering it to SVG, PNG or PDF needs Graphviz's `dot` program (Debian/Ubuntu:
`apt-get install graphviz`, macOS: `brew install graphviz`). Writing `.dot` needs no `dot`.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from dlc.core import ops
from dlc.core.diagnostics import Span, UsageError
from dlc.core.optional import optional_module
from dlc.core.types import TensorType

GRAPH_EXTRA = "pip install 'dlc[graph]'  (the graphviz Python package)"
DOT_HINT = ("install Graphviz's `dot` program (Debian/Ubuntu: apt-get install graphviz; macOS: brew install "
            "graphviz; conda: conda install graphviz), or write DOT text instead: -o graph.dot")
RENDERED = {".svg": "svg", ".png": "png", ".pdf": "pdf"}
TEXT = (".dot", ".gv")

# fill colours: layers by kind, kernels by kind
LAYER_COLOURS = {"layer": "#cfe2f3", "activation": "#fff2cc", "function": "#eeeeee", "block": "#d9ead3",
                 "expression": "#ffffff", "input": "#f4cccc", "param": "#ead1dc", "output": "#f4cccc"}
KERNEL_COLOURS = {"elementwise": "#fff2cc", "reduce": "#fce5cd", "matmul": "#cfe2f3", "conv": "#c9daf8",
                  "pool": "#d9d2e9", "gather": "#d0e0e3", "concat": "#ead1dc", "loop": "#d9ead3"}


def _graphviz():
    return optional_module("graphviz", "`dlc graph`", "the graphviz Python package", GRAPH_EXTRA)


def span_text(span: Span | None, limit: int = 48) -> str:
    """The source text a span covers (its first line), clipped."""
    if span is None:
        return ""
    line = span.source.line(span.line)
    end = span.end_col - 1 if span.end_line == span.line else len(line)
    text = " ".join(line[span.col - 1:end].split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _width(span: Span | None) -> tuple:
    return (0, 0) if span is None else (span.end_line - span.line, span.end_col - span.col)


# --- the layer graph -------------------------------------------------------------------------------

@dataclass
class Call:
    """A call in the model's own body (not inside a block): the nodes it made."""

    name: str        # the function or block
    kind: str        # layer | activation | function | block
    span: Span
    nodes: range
    out: int
    stmt: int        # index of its statement
    prefix: str | None = None
    more: tuple = ()  # the other results of a call with several (`y, h = gru(..., return_state=true)`)


@dataclass
class LayerGraph:
    model: str
    graph: object                     # the built Graph
    calls: list[Call] = field(default_factory=list)
    statements: list = field(default_factory=list)  # (name, span, first node, end node)
    inits: dict = field(default_factory=dict)       # parameter name -> its initializer, as text
    results: list = field(default_factory=list)     # (name, node) of the model's named results


def record_layers(program, model: str | None = None) -> LayerGraph:
    """Build the model (as for training, so that dropout shows) and note which nodes each
    call of its body made."""
    from dlc.core.builder import Value
    from dlc.language import nn
    from dlc.language.checks import check_program, choose_model
    from dlc.language.frontend import Frontend

    class Recorder(Frontend):
        def __init__(self, program):
            super().__init__(program, "train")
            self.calls: list[Call] = []
            self.frames: list[dict] = []
            self.depth = 0
            self.rows: list = []
            self.row_start = 0
            self.results: list = []

        def size(self) -> int:
            return len(self.graph)  # node ids are 0, 1, ... while the frontend builds

        def call(self, e, scope, namer):
            frame = {"e": e, "start": None, "depth": self.depth}
            self.frames.append(frame)
            try:
                out = super().call(e, scope, namer)
            finally:
                self.frames.pop()
            results = _flatten(out)
            if frame["start"] is not None and frame["depth"] == 0 and results \
                    and all(isinstance(v, Value) for v in results):
                fname = e.func.text
                fn = scope.vars.get(fname)
                fname = getattr(fn, "name", fname)  # a block parameter holding a function
                kind = "block" if fname in self.defs else nn.BUILTINS[fname].kind if fname in nn.BUILTINS \
                    else "function"
                self.calls.append(Call(fname, kind, e.span, range(frame["start"], self.size()), results[0].id,
                                       len(self.rows), more=tuple(v.id for v in results[1:])))
            return out

        def eval_arguments(self, e, scope, namer=None):
            result = super().eval_arguments(e, scope, namer)
            if self.frames and self.frames[-1]["e"] is e:
                self.frames[-1]["start"] = self.size()
            return result

        def call_def(self, d, args, kwargs, prefix, span, top=False, dims=None):
            if not top:
                self.depth += 1
            try:
                return super().call_def(d, args, kwargs, prefix, span, top=top, dims=dims)
            finally:
                if not top:
                    self.depth -= 1

        def _row(self, stmt, name, value, what=None):
            super()._row(stmt, name, value, what)
            self.rows.append((name, stmt.span, self.row_start, self.size()))
            self.row_start = self.size()
            if what == "result":
                self.results.append((name, value.id))

    check_program(program)
    d = choose_model(program, model)
    fe = Recorder(program)
    built = fe.build(d, None)
    inits = {k: f"{p.init.name}({', '.join(f'{a:g}' for a in p.init.args)})" if p.init.args else p.init.name
             for k, p in built.params.items()}
    return LayerGraph(d.name, built.graph, fe.calls, fe.rows, inits, fe.results)


def _flatten(value) -> list:
    """A value, or the values of a (nested) tuple of results, in order."""
    if isinstance(value, tuple):
        return [v for x in value for v in _flatten(x)]
    return [value]


def layer_graph(model) -> "object":
    """A graphviz.Digraph of the model's layers (see the module docstring)."""
    graphviz = _graphviz()
    rec = record_layers(model.program, model.name)
    g = rec.graph
    dot = graphviz.Digraph(model.name, graph_attr={"rankdir": "TB", "label": f"model {model.name} "
                                                   f"({Path(model.source_name).name})", "labelloc": "t",
                                                   "fontname": "Helvetica"},
                           node_attr={"shape": "box", "style": "rounded,filled", "fontname": "Helvetica",
                                      "fontsize": "11"},
                           edge_attr={"fontname": "Helvetica", "fontsize": "9", "color": "#555555"})
    owner: dict[int, str] = {}   # graph node -> the picture's node
    out_type: dict[str, TensorType] = {}
    for nid in g.inputs():
        a = g.node(nid).attrs
        if a["role"] == "data":
            key = "in_" + a["name"].replace(":", "_")  # (a `:` in a DOT name would name a port)
            owner[nid] = key
            label = f"state {a['name'][len('carry:'):]}" if a["name"].startswith("carry:") else a["name"]
            dot.node(key, f"{label}\n{a['type']}", shape="ellipse", fillcolor=LAYER_COLOURS["input"])
    in_call = set()
    for i, c in enumerate(rec.calls):
        key = f"call{i}"
        for nid in c.nodes:
            owner[nid] = key
            in_call.add(nid)
        params = [g.node(n).attrs for n in c.nodes if g.node(n).op is ops.INPUT and g.node(n).attrs["role"] == "param"]
        count = sum(_numel(p["type"]) for p in params)
        prefix = _common_prefix([p["name"] for p in params])
        lines = [span_text(c.span), ", ".join(str(g.node(o).type) for o in (c.out,) + c.more)]
        if count:
            lines.append(f"{prefix} · {count:,} params")
        lines.append(f"line {c.span.line}")
        dot.node(key, "\n".join(lines), fillcolor=LAYER_COLOURS[c.kind],
                 tooltip=f"{c.name} at {c.span}", **({"peripheries": "2"} if c.kind == "block" else {}))
        out_type[key] = g.node(c.out).type
        for o in (c.out,) + c.more:
            if o not in c.nodes:  # dropout in evaluation, or a call that returns its input
                owner.setdefault(o, key)
    # what is left: declared params and expressions, one picture node per statement
    for s, (name, span, start, end) in enumerate(rec.statements):
        free = [n for n in range(start, end) if n in g and n not in in_call and n not in owner]
        params = [n for n in free if g.node(n).op is ops.INPUT and g.node(n).attrs["role"] == "param"]
        for n in params:
            a = g.node(n).attrs
            key = f"param_{a['name']}"
            owner[n] = key
            dot.node(key, f"param {a['name']}\n{a['type']}\n= {rec.inits.get(a['name'], '?')}", shape="box",
                     style="filled",
                     fillcolor=LAYER_COLOURS["param"])
        rest = [n for n in free if n not in params and g.node(n).op is not ops.INPUT and not _scalar_const(g, n)]
        if rest:
            key = f"expr{s}"
            widest = max((g.node(n).span for n in rest if g.node(n).span), key=_width, default=span)
            last = max(rest)
            for n in rest:
                owner[n] = key
            dot.node(key, f"{span_text(widest)}\n{g.node(last).type}\nline {widest.line}",
                     fillcolor=LAYER_COLOURS["expression"], style="rounded,filled,dashed")
    edges = set()
    for nid in g.toposort():
        dst = owner.get(nid)
        if dst is None:
            continue
        for o in g.node(nid).operands:
            src = owner.get(o)
            if src is not None and src != dst and (src, dst) not in edges:
                edges.add((src, dst))
                dot.edge(src, dst, label=str(g.node(o).type) if src.startswith(("in_", "param_")) else None)
    out = g.outputs["output"]
    dot.node("output", f"output\n{g.node(out).type}", shape="ellipse", fillcolor=LAYER_COLOURS["output"])
    if out in owner:
        dot.edge(owner[out], "output")
    for name, nid in rec.results:  # the named results after `output`
        key = f"result_{name}"
        dot.node(key, f"result {name}\n{g.node(nid).type}", shape="ellipse", fillcolor=LAYER_COLOURS["output"])
        if nid in owner:
            dot.edge(owner[nid], key)
    for name, nid in g.outputs.items():  # a `state`'s value at the return goes to the next batch
        state = "in_" + name.replace(":", "_")
        if name.startswith("carry:") and nid in owner and state in owner.values():
            dot.edge(owner[nid], state, label="next batch", style="dashed", constraint="false")
    return dot


def _common_prefix(names: list[str]) -> str | None:
    """`h.residual` for h.residual.h.conv2d.w, h.residual.h.conv2d.b, h.residual.out.w, ..."""
    if not names:
        return None
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common) or None


def _numel(t: TensorType) -> int:
    n = 1
    for d in t.shape:
        n *= d if isinstance(d, int) else 1
    return n


def _scalar_const(g, nid: int) -> bool:
    n = g.node(nid)
    return n.op is ops.CONST and n.type.rank == 0


# --- the fused kernels -----------------------------------------------------------------------------

def kernel_graph(model, mode: str = "eval", batch: int | None = None) -> "object":
    """A graphviz.Digraph of the graph after the `fuse` pass, one cluster per kernel."""
    from dlc.pipeline import Compilation
    graphviz = _graphviz()
    log = Compilation()
    model.lower(mode, batch, log=log)
    record = log.last("fuse")
    g = record.graph
    plan = g.meta["fusion"]
    dot = graphviz.Digraph(f"{model.name}_{mode}", graph_attr={
        "rankdir": "TB", "fontname": "Helvetica", "labelloc": "t", "compound": "true",
        "label": f"model {model.name}: {'training step' if mode == 'train' else 'evaluation'}, "
                 f"{len(plan.kernels)} kernels in {plan.phases} phases"},
        node_attr={"shape": "box", "style": "rounded,filled", "fontname": "Helvetica", "fontsize": "10",
                   "fillcolor": "white"},
        edge_attr={"color": "#555555", "arrowsize": "0.6"})
    shown = set()
    for k in plan.kernels:
        lines = _lines(g, k.nodes)
        colour = KERNEL_COLOURS.get(k.kind, "#eeeeee")
        loop = ""
        if k.body is not None:  # a recurrent layer's loop: its body is fused on its own
            body = k.body.meta["fusion"]
            loop = f" over {g.node(k.anchor).attrs['length']} steps (body: {len(body.kernels)} kernels)"
        with dot.subgraph(name=f"cluster_k{k.id}") as c:
            c.attr(label=f"k{k.id} {k.kind}{loop}" + (f" · {lines}" if lines else ""), style="filled,rounded",
                   fillcolor=colour, color="#999999", fontsize="10")
            for n in k.nodes:
                shown.add(n)
                node = g.node(n)
                c.node(f"n{n}", f"{node.op.name}\n{node.type}", penwidth="2" if n in k.outputs else "1")
    for nid in g.toposort():
        node = g.node(nid)
        if nid in shown or _scalar_const(g, nid) or not any(u in shown for u in g.users(nid)):
            continue
        shown.add(nid)
        if node.op is ops.INPUT:
            a = node.attrs
            dot.node(f"n{nid}", f"{a['name']}\n{a['type']}", shape="ellipse",
                     fillcolor=LAYER_COLOURS["input" if a["role"] == "data" else "param"])
        else:
            dot.node(f"n{nid}", f"{node.op.name}\n{node.type}", style="rounded,dashed")
    for nid in g.toposort():
        if nid not in shown:
            continue
        for o in dict.fromkeys(g.node(nid).operands):
            if o in shown:
                dot.edge(f"n{o}", f"n{nid}")
    for name, nid in g.outputs.items():
        if nid in shown:
            dot.node(f"out_{name}", name, shape="ellipse", fillcolor=LAYER_COLOURS["output"])
            dot.edge(f"n{nid}", f"out_{name}")
    return dot


def _lines(g, nodes) -> str:
    """`lenet5.dln:5, 6`: the .dln lines a kernel's nodes came from."""
    where: dict[str, set[int]] = {}
    for n in nodes:
        span = g.node(n).span
        if span is not None:
            where.setdefault(Path(span.source.name).name, set()).add(span.line)
    return "; ".join(f"{f}:{', '.join(str(x) for x in sorted(ls))}" for f, ls in where.items())


# --- writing ---------------------------------------------------------------------------------------

def write(dot, path) -> Path:
    """DOT text for .dot/.gv, else the picture rendered by Graphviz's `dot` (.svg, .png, .pdf)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in TEXT:
        path.write_text(dot.source)
        return path
    if suffix not in RENDERED:
        raise UsageError(f"-o {path}: write .svg, .png or .pdf (rendered by Graphviz's `dot`), or .dot/.gv "
                         "(DOT text)")
    if shutil.which("dot") is None:
        raise UsageError(f"rendering {path.name} needs Graphviz's `dot` program, which is not installed",
                         hint=DOT_HINT)
    import graphviz
    try:
        data = graphviz.Source(dot.source).pipe(format=RENDERED[suffix])
    except (graphviz.ExecutableNotFound, graphviz.CalledProcessError) as e:
        raise UsageError(f"Graphviz's `dot` could not render {path.name}: {e}", hint=DOT_HINT) from None
    path.write_bytes(data)
    return path
