"""Property-based fuzzing of the parser and the type checker (hypothesis).

(a) Random text and random mutations of valid programs: `dlc.load` either succeeds or
    raises `DlcError` with a source location; no other exception may escape.
(b) A generator of well-formed models (layer chains with random sizes and arguments,
    binary ops between bindings, indexing, parameters) that tracks shapes itself:
    programs it believes valid must load, and their forward pass on a batch of 3 must
    have the declared output shape; programs with one injected mistake must fail with a
    DlcError on the line of the mistake.
(c) The valid generated models compiled for the CPU predict, and train for three steps,
    as on the reference interpreter (tests/test_cuda_backend.py runs them through the
    CUDA backend's emulation too).

Deterministic for CI: derandomized, no example database, bounded example counts (see FUZZ).
"""
from __future__ import annotations

import math
import os
import re
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import dlc
from dlc.core.diagnostics import DlcError, DlcWarning

# CI: 200 fixed examples per test. A longer random hunt:
#   DLC_FUZZ_EXAMPLES=5000 DLC_FUZZ_RANDOM=1 pytest tests/test_fuzz.py
FUZZ = settings(max_examples=int(os.environ.get("DLC_FUZZ_EXAMPLES", "200")), deadline=None,
                derandomize=not os.environ.get("DLC_FUZZ_RANDOM"), database=None,
                suppress_health_check=list(HealthCheck))

# --- seeds: the programs of DESIGN.md and a few more ------------------------------------------

SEEDS = [
    '''# examples/digits_mlp.dln — a perceptron for scikit-learn's bundled 8x8 digits
model mlp(x: f32[B, 64]) -> f32[B, 10] {
    h = x |> dense(128) |> relu
    h = dropout(h, 0.1)
    return dense(h, 10)
}

train mlp {
    data      = digits(test=0.2)
    loss      = cross_entropy(output, label)
    optimizer = adam(lr=1e-3)
    batch     = 64
    epochs    = 30
    seed      = 0
}
''',
    '''# reusable blocks, primitive parameters, residual connections
block residual(x: f32[B, C, H, W]) -> f32[B, C, H, W] {
    h = x |> conv2d(C, 3, pad=1) |> batchnorm |> relu
    h = h |> conv2d(C, 3, pad=1) |> batchnorm
    return relu(h + x)
}

model linreg(x: f32[B, 3]) -> f32[B, 1] {
    param w: f32[3, 1] = normal(0, 0.01)
    param b: f32[1] = zeros
    return x @ w + b
}
''',
    '''block residual(x: f32[B, C, H, W]) -> f32[B, C, H, W] {
    h = x |> conv2d(C, 3, pad=1) |> batchnorm |> relu
    h = h |> conv2d(C, 3, pad=1) |> batchnorm
    return relu(h + x)
}

model resnet(x: f32[B, 1, 8, 8]) -> f32[B, 10] {
    h = x |> conv2d(8, 3, pad=1) |> relu
    h = residual(h)
    h = h |> maxpool(2) |> residual
    return h |> global_avgpool |> dense(10)
}

train resnet {
    data = digits()
    loss = cross_entropy(output, label) + 1e-4 * l2(weights)
    optimizer = sgd(lr=0.1, momentum=0.9, nesterov=true)
    schedule = cosine()
    metrics = [accuracy]
}
''',
    '''model seq(tokens: i32[B, 12]) -> f32[B, 2] {
    e = embedding(tokens, 100, 16)
    h = e |> lstm(32, return_sequences=true)
    last = h[:, -1]
    first = rnn(e[:, 0:6], 8)
    return concat([last, first], axis=-1) |> dense(2) |> log_softmax
}
''',
    '''model reg(x: f32[B, 4], scale = 2.0) -> f32[B, 1] {
    h = x * scale - 1 |> tanh
    h = leaky_relu(h, alpha=0.2) ** 2 / 3
    z = mean(h, axis=1, keepdims=true)
    return -z + sum(h[:, 1:3], axis=1, keepdims=true)
}

train reg {
    data = csv("points.csv", label=-1, header=false)
    loss = mse(output, label) + 0.01 * l1(params)
    batch = 16
    clip = 1.0
    normalize = standard
    checkpoint = "reg.ckpt"
}
''',
]

NUMBERS = ["0", "1", "2", "3", "7", "8", "64", "1000", "0.0", "0.5", "1.5", "1e-3", "4096"]


_TOKEN = re.compile(r'\s+|#[^\n]*|"[^"\n]*"|\d+\.\d*(?:[eE][-+]?\d+)?|\d+(?:[eE][-+]?\d+)?|'
                    r'[A-Za-z_]\w*|\|>|->|\*\*|.', re.S)


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


VOCAB = sorted({t for s in SEEDS for t in tokens(s) if not t.isspace() and not t.startswith("#")} | {
    "(", ")", "{", "}", "[", "]", "=", "|>", "->", "@", "**", ":", ",", ".", "-1", "0", "1.5",
    '"s"', "'", '"', "B", "x", "model", "block", "train", "param", "return", "output", "label",
    "true", "false", "params", "weights", "$", ";", "\t", "\n", "0" * 400, "1e999"})


NAMES = sorted({t for t in VOCAB if re.fullmatch(r"[A-Za-z_]\w*", t)} | {
    "x", "h", "B", "C", "H", "W", "N", "f64", "i32", "bool", "f32", "softmax", "flatten", "maxpool",
    "avgpool", "global_avgpool", "rnn", "lstm", "gru", "embedding", "sum", "mean", "reshape", "transpose",
    "concat", "bce", "mse", "l1", "l2", "iris", "npz", "sgd", "adagrad", "step", "cosine", "accuracy",
    "glorot_uniform", "he_normal", "ones", "name", "stride", "kernel", "units", "axis", "keepdims"})


def check_load(text: str):
    """Load `text`; only a DlcError with a usable location may escape, and only DlcWarnings
    with one may be warned. Returns the model or None."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = dlc.load(text)
        for w in caught:
            assert isinstance(w.message, DlcWarning), w.message
            assert w.message.diagnostic.span is not None, str(w.message)
            event(f"warned: {w.message.diagnostic.message.split(':')[0]}")
        event("loaded")
        return model
    except DlcError as e:
        event(f"DlcError: {e.kind}")
        assert e.span is not None, f"error without a location: {e.render()}"
        assert e.span.line >= 1 and e.span.col >= 1, e.render()
        out = e.render()
        assert out.startswith(f"<string>:{e.span.line}:{e.span.col}: "), out
        assert "Traceback" not in out
        return None


# --- (a) random text and mutations ------------------------------------------------------------

ANY_EDIT = ("delete", "duplicate", "swap", "replace", "insert", "same_kind", "char_delete",
            "char_duplicate", "char_swap", "char_insert")


@st.composite
def mutated(draw, edits=ANY_EDIT) -> str:
    toks = tokens(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(edits))
        if op.startswith("char_"):
            text = "".join(toks)
            i = draw(st.integers(0, len(text) - 1))
            j = draw(st.integers(0, len(text) - 1))
            if op == "char_delete":
                text = text[:i] + text[i + 1:]
            elif op == "char_duplicate":
                text = text[:i] + text[i] + text[i:]
            elif op == "char_swap":
                a, b = sorted((i, j))
                text = text[:a] + text[b] + text[a + 1:b] + text[a] + text[b + 1:] if a != b else text
            else:
                text = text[:i] + draw(st.sampled_from("(){}[]=,:.-+*/@|>#\"'0123456789xB_ \n\t;")) + text[i:]
            toks = tokens(text)
            continue
        i = draw(st.integers(0, len(toks) - 1))
        if op == "same_kind":  # keeps the syntax: a name for a name, a number for a number
            words = [k for k, t in enumerate(toks) if re.fullmatch(r"[A-Za-z_]\w*|[0-9][0-9.eE+-]*", t)]
            k = words[i % len(words)]
            toks[k] = draw(st.sampled_from(NUMBERS if toks[k][0].isdigit() else NAMES))
        elif op == "delete":
            del toks[i]
        elif op == "duplicate":
            toks.insert(i, toks[i])
        elif op == "swap":
            j = draw(st.integers(0, len(toks) - 1))
            toks[i], toks[j] = toks[j], toks[i]
        elif op == "replace":
            toks[i] = draw(st.sampled_from(VOCAB))
        else:
            toks.insert(i, " " + draw(st.sampled_from(VOCAB)) + " ")
    return "".join(toks) + "\n"  # a newline: dlc.load reads it as source text, not as a path


@FUZZ
@given(mutated())
def test_mutated_programs_raise_only_dlc_errors(text):
    check_load(text)


@FUZZ
@given(mutated(edits=("same_kind",)))
def test_renamed_programs_raise_only_dlc_errors(text):
    """Names swapped for names and numbers for numbers: still parses, so the checker is fuzzed."""
    check_load(text)


_FRAGMENTS = st.sampled_from(VOCAB + [" ", " ", "\n", "\n    "])


@FUZZ
@given(st.one_of(
    st.lists(_FRAGMENTS, max_size=60).map(" ".join),
    st.text(max_size=120),
    st.text(alphabet=st.sampled_from("model(x:f32[B,4])->{}h=|>dense2relu return\n\t\"'#@*-+/.,;=\x00\x0c\r\u2028é"),
            max_size=150),
))
def test_random_text_raises_only_dlc_errors(text):
    check_load(text + "\n")


# --- (b) structured generation of well-formed models --------------------------------------------

class Gen:
    """Builds a model statement by statement, tracking every binding's shape itself."""

    def __init__(self, draw):
        self.draw = draw
        self.lines: list[str] = []
        self.env: list[tuple[str, tuple]] = []  # (name, shape); shape[0] is "B"
        self.bad_line: int | None = None      # the line of the one injected mistake
        self.n = 0
        self.scale = 1

    def pick(self, values):
        return self.draw(st.sampled_from(values))

    def num(self, lo, hi):
        return self.draw(st.integers(lo, hi))

    def size(self, lo, hi):
        """A feature or channel count: up to `scale` times larger in a wide model (whose
        kernels take the vectorized, blocked and multi-threaded paths of the compiled code)."""
        return self.num(lo, hi * self.scale)

    def fresh(self) -> str:
        self.n += 1
        return f"h{self.n}"

    def emit(self, line: str, shape: tuple | None, name: str | None = None):
        self.lines.append("    " + line)
        if shape is not None and name is not None:
            self.env.append((name, shape))

    def line_no(self) -> int:  # the line the next emitted statement will have (the model header is line 1)
        return len(self.lines) + 2


def _prod(xs):
    return math.prod(xs)


def valid_step(g: Gen) -> None:
    """Emit one statement that must type-check."""
    src, s = g.pick(g.env)
    r = len(s)
    name = g.fresh()
    ops = ["act", "dropout", "scalar", "unary", "reshape"]
    if r >= 2:  # the batch is the only symbolic axis: from rank 2 on, the last one is a number
        ops += ["dense", "param_matmul", "reduce", "flatten", "concat", "layernorm"]
    if r in (2, 4):
        ops.append("batchnorm")
    if r == 4:
        ops += ["conv", "pool", "global_pool", "transpose", "deconv", "upsample"]
    if r == 3:
        ops += ["index", "rnn", "transpose", "conv1d"]
    if r >= 3:
        ops += ["reduce_axes", "stacked_matmul", "pad", "groupnorm"]
    if r >= 2 and isinstance(s[-1], int) and s[-1] > 1:
        ops.append("slice")
    same = [n for n, t in g.env if t == s and n != src]
    if same:
        ops.append("binary")
        if r >= 2:
            ops.append("concat_same")
    if r in (2, 4):
        ops.append("block")
    if r == 2 and not any(line.lstrip().startswith("state ") for line in g.lines):
        ops.append("state")
    if g.num(0, 19) == 0:  # rarely: longer than a kernel's values may nest (fusion's F8)
        ops.append("long_chain")
    op = g.pick(ops)
    if op == "dense":
        u = g.size(1, 9)
        form = g.pick([f"{src} |> dense({u})", f"dense({src}, {u})", f"dense({src}, units={u}, bias=false)",
                       f"{src} |> dense({u}, init=he_normal) |> relu", f"dense({src}, {u}, trainable=false)"])
        g.emit(f"{name} = {form}", s[:-1] + (u,), name)
    elif op == "act":
        a = g.pick(["relu", "tanh", "sigmoid", "gelu", "softmax", "log_softmax", "leaky_relu(alpha=0.2)",
                    "elu", "elu(alpha=0.5)", "selu", "softplus", "silu"])
        g.emit(f"{name} = {src} |> {a}" if g.pick([0, 1]) else
               f"{name} = {a.split('(')[0]}({src})", s, name)
    elif op == "dropout":
        g.emit(f"{name} = dropout({src}, {g.pick(['0.0', '0.1', '0.5', 'p=0.25'])})", s, name)
    elif op == "batchnorm":
        g.emit(f"{name} = {src} |> batchnorm" + g.pick(["", "(momentum=0.2)"]), s, name)
    elif op == "layernorm":
        g.emit(f"{name} = {src} |> layernorm" + g.pick(["", "(eps=0.1)"]), s, name)
    elif op == "groupnorm":  # [B, C, ...]: groups that divide the channels
        groups = g.pick([k for k in range(1, s[1] + 1) if s[1] % k == 0])
        g.emit(f"{name} = groupnorm({src}, {groups}" + g.pick(["", ", eps=0.1", ", affine=false"]) + ")", s, name)
    elif op == "scalar":
        g.emit(f"{name} = " + g.pick([f"{src} * 0.5", f"{src} + 1", f"2 - {src}", f"{src} / 4",
                                      f"{src} ** 2", f"-{src}", f"({src} + 1) * (3 - 1)"]), s, name)
    elif op == "unary":
        g.emit(f"{name} = " + g.pick([f"abs({src})", f"exp(-{src})", f"sqrt({src} * {src} + 1)",
                                      f"clip({src}, -1, 1)", f"maximum({src}, 0.5)",
                                      f"2 ** tanh({src})", f"1 / (1 + {src} * {src})", f"sign({src})",
                                      f"step({src}) * {src}", f"minimum({src}, 0.5)", f"log(1 + {src} * {src})",
                                      f"stop_gradient({src}) * {src}", f"{src} / (1 + abs({src}))",
                                      f"where({src} > 0, {src}, 0.1 * {src})", f"where({src} <= 0.5, 1.0, {src})",
                                      f"where(abs({src}) < 1, {src} * {src}, abs({src}))",
                                      f"where(logical_or(logical_not({src} > -1), {src} > 1), 0.0, {src})"]), s, name)
    elif op == "param_matmul":
        u = g.size(1, 6)
        p = f"w{g.n}"
        g.emit(f"param {p}: f32[{s[-1]}, {u}] = " + g.pick(["normal(0, 0.1)", "glorot_uniform", "zeros",
                                                           "uniform(-1, 1)", "normal(0, 1), trainable=false"]), None)
        g.emit(f"{name} = {src} @ {p}", s[:-1] + (u,), name)
    elif op == "reduce":
        ax = g.num(1, r - 1)
        f = g.pick(["sum", "mean", "max", "min"])
        if g.pick([0, 1]):
            g.emit(f"{name} = {f}({src}, axis={ax}, keepdims=true)", s[:ax] + (1,) + s[ax + 1:], name)
        else:
            g.emit(f"{name} = {f}({src}, axis={ax - r if g.pick([0, 1]) else ax})", s[:ax] + s[ax + 1:], name)
    elif op == "reduce_axes":
        axes = g.pick([[1, 2], [1, -1], [2, 1]] if r == 3 else [[1, 2], [2, 3], [1, -1], [1, 2, 3]])
        f = g.pick(["sum", "mean", "max"])
        kept = {a % r for a in axes}
        g.emit(f"{name} = {f}({src}, axis={axes})", tuple(d for i, d in enumerate(s) if i not in kept), name)
    elif op == "concat_same":
        other = g.pick(same)
        g.emit(f"{name} = concat([{src}, {other}], axis=1)", s[:1] + (2 * s[1],) + s[2:], name)
    elif op == "flatten":
        g.emit(f"{name} = {src} |> flatten", ("B", _prod(s[1:])), name)
    elif op == "reshape":
        g.emit(f"{name} = reshape({src}, [B, -1])", ("B", _prod(s[1:])), name)
    elif op == "conv":
        _, c, h, w = s
        k = g.num(1, min(h, w, 4))
        st_ = g.num(1, 2)
        pad = g.num(0, k // 2)
        ch = g.size(1, 6)
        # dilated (where the wider window fits), grouped by channel (depthwise, 1 or 2 filters each)
        dil = g.pick([1, 1, 2]) if k > 1 and min(h, w) + 2 * pad >= 2 * k - 1 else 1
        groups = g.pick([1, 1, c]) if c > 1 else 1
        ch = c * g.num(1, 2) if groups > 1 else ch
        span = dil * (k - 1) + 1
        ho, wo = (h + 2 * pad - span) // st_ + 1, (w + 2 * pad - span) // st_ + 1
        more = g.pick(["", ", bias=false", ", trainable=false"]) + (f", dilation={dil}" if dil > 1 else "") \
            + (f", groups={groups}" if groups > 1 else "")
        if st_ == 1 and k % 2 and g.pick([False, True]):
            g.emit(f'{name} = conv2d({src}, {ch}, {k}, pad="same"{more})', ("B", ch, h, w), name)
        else:
            g.emit(f"{name} = {src} |> conv2d({ch}, {k}, stride={st_}, pad={pad}{more})", ("B", ch, ho, wo), name)
    elif op == "deconv":  # a transposed convolution: upsampling
        _, c, h, w = s
        k, st_ = g.num(1, 3), g.num(1, 2)
        pad, extra = g.num(0, (k - 1) // 2), g.num(0, st_ - 1)
        dil = g.pick([1, 1, 2]) if k > 1 else 1
        ch = g.size(1, 4)
        span = dil * (k - 1) + 1
        g.emit(f"{name} = {src} |> conv_transpose2d({ch}, {k}, stride={st_}, pad={pad}, output_pad={extra}"
               + g.pick(["", ", bias=false"]) + (f", dilation={dil}" if dil > 1 else "") + ")",
               ("B", ch, (h - 1) * st_ - 2 * pad + span + extra, (w - 1) * st_ - 2 * pad + span + extra), name)
    elif op == "upsample":
        _, c, h, w = s
        fh, fw = g.num(1, 2), g.num(1, 3)
        g.emit(f"{name} = upsample({src}, " + (str(fh) if fh == fw else f"[{fh}, {fw}]") + ")",
               ("B", c, h * fh, w * fw), name)
    elif op == "pool":
        _, c, h, w = s
        k = g.num(1, min(h, w, 3))
        st_ = g.num(1, k)
        pad = g.num(0, k // 2)
        f = g.pick(["maxpool", "avgpool"])
        g.emit(f"{name} = {f}({src}, {k}, stride={st_}" + (f", pad={pad})" if pad else ")"),
               ("B", c, (h + 2 * pad - k) // st_ + 1, (w + 2 * pad - k) // st_ + 1), name)
    elif op == "conv1d":  # [B, C, T]: a convolution or pooling over time
        _, c, t = s
        k = g.num(1, min(t, 4))
        st_ = g.num(1, 2)
        pad = g.num(0, k // 2)
        ch = g.size(1, 6)
        f = g.pick(["conv1d", "conv1d", "maxpool", "avgpool", "global_avgpool"])
        if f == "global_avgpool":
            g.emit(f"{name} = global_avgpool({src})", ("B", c), name)
        elif f == "conv1d":
            g.emit(f"{name} = {src} |> conv1d({ch}, {k}, stride={st_}, pad={pad})",
                   ("B", ch, (t + 2 * pad - k) // st_ + 1), name)
        else:
            g.emit(f"{name} = {f}({src}, {k}, stride={st_}, pad={pad})", ("B", c, (t + 2 * pad - k) // st_ + 1), name)
    elif op == "stacked_matmul":  # [B, ..., m, k]: a product per matrix of the stack
        lead, m, k = s[:-2], s[-2], s[-1]
        perm = list(range(r - 2)) + [r - 1, r - 2]
        form = g.pick(["gram", "cov", "attend", "builtin"])
        if form == "gram":
            g.emit(f"{name} = {src} @ transpose({src}, {perm}) / {k}", lead + (m, m), name)
        elif form == "cov":
            g.emit(f"{name} = transpose({src}, {perm}) @ {src} / {m}", lead + (k, k), name)
        elif form == "attend":  # self-attention with the values themselves as queries, keys and values
            g.emit(f"{name} = softmax({src} @ transpose({src}, {perm}) / {k}) @ {src}", s, name)
        else:
            causal = g.pick(["", ", causal=true", ", scale=0.5", ", causal=true, scale=0.25"])
            g.emit(f"{name} = attention({src}, {src}, {src}{causal})", s, name)
    elif op == "global_pool":
        g.emit(f"{name} = global_avgpool({src})", ("B", s[1]), name)
    elif op == "index":
        t = g.num(-s[1], s[1] - 1)
        g.emit(f"{name} = {src}[:, {t}]", ("B", s[2]), name)
    elif op == "slice":
        d = s[-1]
        lo = g.num(0, d - 1)
        hi = g.num(lo + 1, d)
        step = g.num(1, 2)
        lead = ", ".join([":"] * (r - 1))
        g.emit(f"{name} = {src}[{lead}, {lo}:{hi}:{step}]", s[:-1] + (len(range(lo, hi, step)),), name)
    elif op == "rnn":
        hid = g.size(1, 5)
        seqs = g.pick([True, False])
        f = g.pick(["rnn", "lstm", "gru"])
        both, layers = g.pick([False, True]), g.num(1, 2)
        options = (", bidirectional=true" if both else "") + (f", layers={layers}" if layers > 1 else "")
        options += ", dropout=0.2" if layers > 1 and g.pick([False, True]) else ""
        out = hid * (2 if both else 1)
        one = not both and layers == 1  # (a stack's states are [layers * directions, B, hidden])
        if one and g.pick([False, True]):  # initial states computed from the input
            g.emit(f"{name}_h0 = tanh(dense({src}[:, 0], {hid}))", None)
            options += f", initial=({name}_h0, {name}_h0 * 0.5)" if f == "lstm" else f", initial={name}_h0"
        options += g.pick(["", "", f", mask=padding_mask({src})", ", trainable=false"])
        options += ', activation="relu"' if f == "rnn" and g.num(0, 3) == 0 else ""
        shape = ("B", s[1], out) if seqs else ("B", out)
        call = f"{f}({src}, {hid}, return_sequences={'true' if seqs else 'false'}{options}"
        if one and g.pick([False, True]):  # the final states as results too
            states = f"({name}_h, {name}_c)" if f == "lstm" else f"{name}_h"
            g.emit(f"{name}, {states} = {call}, return_state=true)", shape, name)
            g.env.append((f"{name}_h", ("B", hid)))
        else:
            g.emit(f"{name} = {call})", shape, name)
    elif op == "transpose":
        if r == 3:
            g.emit(f"{name} = transpose({src}, [0, 2, 1])", ("B", s[2], s[1]), name)
        else:
            g.emit(f"{name} = transpose({src}, [0, 1, 3, 2])", ("B", s[1], s[3], s[2]), name)
    elif op == "binary":
        other = g.pick(same)
        g.emit(f"{name} = " + g.pick([f"{src} + {other}", f"{src} - {other}", f"{src} * {other}",
                                      f"where({src} > {other}, {src}, {other})"]), s, name)
    elif op == "pad":  # the axes after the batch, with a value or the input's own cells
        mode = g.pick(["constant", "reflect", "edge", "wrap"])
        most = {"constant": 2, "edge": 2, "reflect": min(s[1:]) - 1, "wrap": min(s[1:])}[mode]
        lo, hi = [0] + [g.num(0, min(most, 2)) for _ in s[1:]], [0] + [g.num(0, min(most, 2)) for _ in s[1:]]
        extra = ", value=0.5" if mode == "constant" and g.pick([False, True]) else \
            ("" if mode == "constant" else f', mode="{mode}"')
        g.emit(f"{name} = pad({src}, {lo}, {hi}{extra})", ("B",) + tuple(d + a + b for d, a, b in
                                                                         zip(s[1:], lo[1:], hi[1:])), name)
    elif op == "block":  # the blocks of BLOCKS: shape-preserving, sizes bound from the argument
        g.emit(f"{name} = " + g.pick([f"{src} |> {'unit' if r == 2 else 'res'}",
                                      f"{'unit' if r == 2 else 'res'}({src})",
                                      f"{'unit' if r == 2 else 'res'}({src}, name=\"b{g.n}\")",
                                      f"{'unit' if r == 2 else 'res'}({src}, trainable=false)"]), s, name)
    elif op == "long_chain":
        g.emit(f"{name} = {src}", s, name)
        for _ in range(g.num(60, 140)):
            g.emit(f"{name} = tanh({name} + 0.1) * 0.9", None)
    elif op == "state":  # carried from one batch to the next: row i continues row i
        c = f"c{g.n}"
        g.emit(f"state {c}: f32[B, {s[1]}]" + g.pick(["", " = zeros", " = constant(0.5)"]), None)
        g.emit(f"{name} = {src} + {c}", s, name)
        g.emit(f"{c} = tanh({name}) * {g.pick(['0.5', '0.9'])}", None)
    elif op == "concat":
        u = g.size(1, 4)
        g.emit(f"{name} = concat([{src}, dense({src}, {u})], axis=-1)", s[:-1] + (s[-1] + u,), name)


def mistake(g: Gen) -> None:
    """Emit one statement that must be rejected (and remember its line)."""
    src, s = g.pick(g.env)
    r = len(s)
    name = g.fresh()
    g.bad_line = g.line_no()
    choices = ["units0", "dropout", "unknown_fn", "unknown_var", "bad_kw", "matmul", "too_many_idx"]
    if r != 4:
        choices.append("conv_rank")
    if r == 4:
        choices += ["conv_big", "pool_big"]
    if r == 3:
        choices.append("index_range")
    if r >= 2 and isinstance(s[-1], int) and s[-1] > 1:
        choices.append("add_mismatch")
    if r >= 2:
        choices.append("symbolic_slice")
    m = g.pick(choices)
    line = {  # (each entry is only meaningful for the shapes that allow its choice above)
        "units0": f"{name} = dense({src}, 0)",
        "dropout": f"{name} = dropout({src}, {g.pick(['1.5', '1', '-0.1'])})",
        "unknown_fn": f"{name} = {src} |> {g.pick(['dens(3)', 'rellu', 'softmaxx', 'conv(3, 3)'])}",
        "unknown_var": f"{name} = relu({src}_typo)",
        "bad_kw": f"{name} = dense({src}, 3, bais=false)",
        "matmul": None,
        "too_many_idx": f"{name} = {src}[{', '.join([':'] * r)}, 0]",
        "conv_rank": f"{name} = conv2d({src}, 4, 3)",
        "conv_big": f"{name} = conv2d({src}, 4, {s[2] + 1 if len(s) == 4 else 9})",
        "pool_big": f"{name} = maxpool({src}, {max(s[2:]) + 1 if len(s) == 4 else 9})",
        "index_range": f"{name} = {src}[:, {s[1] if r == 3 else 0}]",
        "add_mismatch": f"{name} = {src} + dense({src}, {s[-1] + 1 if m == 'add_mismatch' else 2})",
        "symbolic_slice": f"{name} = {src}[0:2]",
    }[m]
    if m == "matmul":  # a parameter whose rows do not match
        if r < 2:
            g.emit(f"{name} = dense({src}, 0)", None)
            return
        g.emit(f"param w{g.n}: f32[{s[-1] + 1}, 2] = zeros", None)
        g.bad_line = g.line_no()
        line = f"{name} = {src} @ w{g.n}"
    g.emit(line, None)


BLOCKS = """block unit(x: f32[B, N], scale = 1.0) -> f32[B, N] {
    h = x |> dense(N) |> relu
    return h * scale + x
}

block res(x: f32[B, C, H, W]) -> f32[B, C, H, W] {
    h = x |> conv2d(C, 3, pad=1) |> batchnorm |> relu
    return relu(h + x)
}

"""


def type_text(dtype: str, shape: tuple) -> str:
    return f"{dtype}[{', '.join(str(d) for d in shape)}]"


@st.composite
def generated(draw, mistakes: bool = True):
    """(text, input dtype, input shape, declared output shape, vocabulary, the line of the
    injected mistake or None); with mistakes=False always a valid model."""
    g = Gen(draw)
    kind = g.pick(["flat", "image", "seq", "tokens"])
    g.scale = g.pick([1, 1, 8])
    if kind == "flat":
        in_shape, dtype = ("B", g.size(1, 12)), "f32"
    elif kind == "image":
        side = 9 if g.scale == 1 else 16
        in_shape, dtype = ("B", g.size(1, 3), g.num(3, side), g.num(3, side)), "f32"
    elif kind == "seq":
        in_shape, dtype = ("B", g.num(2, 5), g.size(1, 6)), "f32"
    else:
        in_shape, dtype = ("B", g.num(2, 6)), "i32"
    vocab = g.num(2, 20)
    if kind == "tokens":
        d = g.size(1, 6)
        g.emit(f"e = embedding(x, {vocab}, {d}{g.pick(['', ', mask_zero=true'])})", ("B", in_shape[1], d), "e")
    else:
        g.env.append(("x", in_shape))
    for _ in range(g.num(1 if kind != "tokens" else 0, 6)):
        if mistakes and draw(st.integers(0, 9)) == 0:
            mistake(g)
            break
        valid_step(g)
    results = [(n, s) for n, s in g.env if n != "x" or kind != "tokens"]
    ret, out_shape = results[-1]
    wrong_result = mistakes and g.bad_line is None and draw(st.integers(0, 14)) == 0
    declared = out_shape
    if wrong_result:
        declared = out_shape[:-1] + (out_shape[-1] + 1,) if len(out_shape) > 1 else out_shape + (2,)
        g.bad_line = g.line_no()
    g.emit(f"return {ret}", None)
    header = f"model net(x: {type_text(dtype, in_shape)}) -> {type_text('f32', declared)} {{"
    text = BLOCKS + "\n".join([header] + g.lines + ["}"]) + "\n"
    if g.bad_line is not None:
        g.bad_line += BLOCKS.count("\n")
    if g.bad_line is None and draw(st.integers(0, 3)) == 0:  # a train block too
        if len(out_shape) == 2:
            loss = g.pick(["cross_entropy(output, label)", "mse(output, label)",
                           "cross_entropy(output, label) + 0.001 * l2(weights)", "huber(output, label)",
                           "cross_entropy(output, label, smoothing=0.1)",
                           "bce(output, label, from_logits=true)", "multi_hinge(output, label)",
                           "hinge(output, label)", "kl_div(output, softmax(output * 0.5))",
                           # targets computed from the output: no labels (and so no accuracy)
                           "bce(output, 0.0 * output + 0.25, from_logits=true)",
                           "cross_entropy(output, softmax(output * 0.5)) + 0.1 * mean(output)"])
        else:  # per-position classes when the output is a sequence [B, T, K]
            loss = g.pick(["mse(output, label)", "mean(output * output) + 0.01 * l1(params)",
                           "bce(output, label, from_logits=true)", "mae(output, label)",
                           "huber(output, label, delta=0.5)"] +
                          ["cross_entropy(output, label)", "multi_hinge(output, label, squared=true)"] * (len(out_shape) == 3))
        opt = g.pick(["sgd(lr=0.1, momentum=0.9)", "adam(lr=1e-3)", "adamw", "rmsprop()", "adagrad(lr=0.5)",
                      "adadelta()", "sgd(lr=0.05, momentum=0.5, nesterov=true, weight_decay=0.01)",
                      "rmsprop(momentum=0.5)"])
        metrics = "\n    metrics = [accuracy]" if loss.startswith("cross") and "label" in loss else ""
        metrics += "\n    clip = 1.0" if g.pick([False, True]) else ""
        text += (f"\ntrain net {{\n    data = arrays()\n    loss = {loss}\n    optimizer = {opt}\n"
                 f"    batch = {g.num(1, 64)}\n    epochs = {g.num(1, 5)}{metrics}\n}}\n")
    return text, dtype, in_shape, declared, vocab, g.bad_line


@FUZZ
@given(generated())
@pytest.mark.filterwarnings("ignore::dlc.core.diagnostics.DlcWarning")  # a generated softmax before cross_entropy
def test_generated_models_check_and_run(case):
    text, dtype, in_shape, declared, vocab, bad_line = case
    if bad_line is not None:
        with pytest.raises(DlcError) as info:
            dlc.load(text)
        e = info.value
        event("mistake rejected")
        assert e.span is not None and e.span.line == bad_line, f"{e.render()}\n--- program:\n{text}"
        return
    try:
        model = dlc.load(text)
    except DlcError as e:
        pytest.fail(f"a valid program was rejected:\n{e.render()}\n--- program:\n{text}")
    batch = (3,) + tuple(in_shape[1:])
    rng = np.random.default_rng(0)
    x = rng.integers(0, vocab, batch).astype(np.int32) if dtype == "i32" else rng.random(batch, dtype=np.float32)
    out = model.forward(x)
    assert out.shape == (3,) + tuple(declared[1:]), f"{out.shape} vs {declared}\n--- program:\n{text}"
    assert np.all(np.isfinite(out)), text
    event("valid: ran" + (" with a train block" if "train net" in text else ""))
    model.built("train")  # the training-mode graph (dropout, batch statistics) builds as well


@settings(FUZZ, max_examples=FUZZ.max_examples // 4)
@given(generated(mistakes=False), st.sampled_from([5, 5, 37]))
@pytest.mark.filterwarnings("ignore::dlc.core.diagnostics.DlcWarning")
def test_generated_models_predict_natively_as_on_the_reference(case, rows):
    """Valid generated models compiled for the CPU predict what the reference interpreter
    does (a quarter as many examples as above: each one compiles), at a batch of 5 and of
    37 (where wide models' kernels split between threads). A random hunt
    (DLC_FUZZ_RANDOM=1) found a matmul's output permuted for an LSTM fused wrongly as the
    matmul's epilogue, 1 in about 850 valid models: test_sequences.py keeps that case."""
    text, dtype, in_shape, declared, vocab, bad_line = case
    if bad_line is not None:
        return
    model = dlc.load(text)
    rng = np.random.default_rng(0)
    batch = (rows,) + tuple(in_shape[1:])
    x = rng.integers(0, vocab, batch).astype(np.int32) if dtype == "i32" else rng.random(batch, dtype=np.float32)
    chunk = rows // 2 + 2  # a padded last batch (a model with state reads x as `chunk` streams)
    want = model.predict(x, target="reference", batch=chunk)
    got = model.predict(x, target="cpu", batch=chunk, no_cache=True, threads=2)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=text)
    event("compiled and compared" + (", with a state" if "\n    state " in text else ""))


PLAIN_SGD = "\ntrain net {\n    data = arrays()\n    loss = mse(output, label)\n    optimizer = sgd(lr=0.1)\n}\n"


def fuzz_labels(text: str, declared: tuple, rows: int):
    """Labels the generated loss reads: class indices, targets in [0, 1), or none."""
    loss = next(line for line in text.splitlines() if line.strip().startswith("loss ="))
    rng = np.random.default_rng(1)
    if "cross_entropy" in loss or "multi_hinge" in loss:  # a class per sample, or per step of a sequence
        return rng.integers(0, int(declared[-1]), (rows,) + tuple(declared[1:-1])).astype(np.int32)
    if "label" in loss:
        return rng.random((rows,) + tuple(int(d) for d in declared[1:]), dtype=np.float32)
    return None


@settings(FUZZ, max_examples=FUZZ.max_examples // 4)
@given(generated(mistakes=False), st.sampled_from([5, 5, 37]))
@pytest.mark.filterwarnings("ignore::dlc.core.diagnostics.DlcWarning")
def test_generated_models_train_natively_as_on_the_reference(case, rows):
    """Three training steps of a valid generated model compiled for the CPU (the last one
    on a short batch, padded to the compiled size) give the reference interpreter's
    losses (its train block, or plain SGD on an mse loss); with
    plain SGD the parameters and states after them match too. (An adaptive optimizer's
    first steps move each weight by about lr times the sign of its gradient, so a gradient
    that is 0 up to rounding may move it either way: there only the losses are compared.
    Likewise `sign`, `step` or a max of a value within rounding of its threshold may flip:
    random hunts met one such case in about 1,500 trained models, a batchnorm's running
    mean off by one element's share.)"""
    text, dtype, in_shape, declared, vocab, bad_line = case
    if bad_line is not None:
        return
    if "train net" not in text:
        text += PLAIN_SGD
    rng = np.random.default_rng(0)
    batch = (rows,) + tuple(in_shape[1:])
    x = rng.integers(0, vocab, batch).astype(np.int32) if dtype == "i32" else rng.random(batch, dtype=np.float32)
    y = fuzz_labels(text, declared, rows)
    short = rows - 2
    batches = [(x, y), (x, y), (x[:short], None if y is None else y[:short])]
    ran = {}
    for target, options in (("reference", {}), ("cpu", {"no_cache": True, "threads": 2})):
        model = dlc.load(text)
        session = model.session(model.train_config, target, **options)
        session.use_batch(rows)
        lr = model.train_config.optimizer.args["lr"]
        losses = [session.train_step(bx, by, lr)["loss"] for bx, by in batches]
        ran[target] = losses, {k: np.array(v) for k, v in model.state.items()}
    (want_losses, want_state), (got_losses, got_state) = ran["reference"], ran["cpu"]
    np.testing.assert_allclose(got_losses, want_losses, rtol=1e-3, atol=1e-5, err_msg=text)
    if PLAIN_SGD in text:
        assert got_state.keys() == want_state.keys()
        for k in want_state:
            np.testing.assert_allclose(got_state[k], want_state[k], rtol=1e-3, atol=1e-4, err_msg=f"{k}\n{text}")
        event("trained with plain SGD and compared")
    else:
        event("trained and compared")
    if "\n    state " in text:
        event("a model with a state")
