"""The optimizers, proved against the textbook.

Every optimizer of `passes/optimizer.py` (through a real .dln train block, the real
pass pipeline and the reference backend) trains a tiny linear model for a few steps;
after every step its parameters and optimizer state are compared with a direct numpy
implementation of the update rule written here (PyTorch's conventions), fed by the
analytic gradient of the model. The analytic gradient is itself checked against the
autodiff graph's `grad:` outputs and against central finite differences. With torch
installed, the same runs are compared against `torch.optim`. Learning-rate schedules
and the numerics guard (a non-finite loss changes nothing and is reported with the
step and the .dln line of the op that went wrong) are checked too.
"""
from __future__ import annotations

import inspect
import math

import numpy as np
import pytest

import dlc
from dlc.language import recipe
from dlc.program import make_program
from dlc.backends.reference import run_graph
from dlc.core.diagnostics import ArgumentError, NumericsError
from dlc.passes.autodiff import autodiff
from dlc.runtime.trainer import learning_rate

B, IN, OUT = 8, 3, 2
STEPS = 5

SOURCE = """\
model lin(x: f32[B, 3]) -> f32[B, 2] {{
    param w: f32[3, 2] = normal(0, 0.5)
    param b: f32[2] = zeros
    return x @ w + b
}}

train lin {{
    data = arrays()
    loss = mse(output, label)
    optimizer = {optimizer}
    batch = 8{extra}
}}
"""

# id: (optimizer expression, clip). Hyper-parameters are chosen so that every term of
# every rule (weight decay, momentum, bias correction, eps...) moves the result by far
# more than the tolerance.
CASES = {
    "sgd": ("sgd(lr=0.1)", None),
    "sgd_momentum": ("sgd(lr=0.1, momentum=0.9)", None),
    "sgd_nesterov": ("sgd(lr=0.1, momentum=0.9, nesterov=true)", None),
    "sgd_weight_decay": ("sgd(lr=0.1, weight_decay=0.1)", None),
    "sgd_nesterov_weight_decay": ("sgd(lr=0.05, momentum=0.8, nesterov=true, weight_decay=0.1)", None),
    "adagrad": ("adagrad(lr=0.1)", None),
    "adagrad_weight_decay": ("adagrad(lr=0.1, eps=0.01, weight_decay=0.1)", None),
    "adadelta": ("adadelta()", None),
    "adadelta_custom": ("adadelta(lr=0.5, rho=0.8, eps=0.0001, weight_decay=0.1)", None),
    "rmsprop": ("rmsprop(lr=0.01)", None),
    "rmsprop_momentum": ("rmsprop(lr=0.01, alpha=0.9, eps=0.001, momentum=0.9)", None),
    "rmsprop_weight_decay": ("rmsprop(lr=0.01, weight_decay=0.1)", None),
    "adam": ("adam(lr=0.1)", None),
    "adam_betas": ("adam(lr=0.05, beta1=0.5, beta2=0.9, eps=0.001)", None),
    "adam_weight_decay": ("adam(lr=0.1, weight_decay=0.1)", None),
    "adamw": ("adamw(lr=0.1, weight_decay=0.1)", None),
    "adamw_default_decay": ("adamw(lr=0.1)", None),
    "sgd_clip": ("sgd(lr=0.1, momentum=0.9)", 0.1),
    "adam_clip": ("adam(lr=0.1)", 0.1),
    "adamw_clip": ("adamw(lr=0.1, weight_decay=0.1)", 0.1),
    # a clip above the global norm must leave the gradients alone (min(1, ...))
    "adam_clip_inactive": ("adam(lr=0.1)", 50.0),
}

# The state slots each optimizer keeps per parameter (`<param>:<slot>`, in checkpoints too).
SLOTS = {
    "sgd": ("momentum",),  # only with momentum > 0
    "adagrad": ("sum",),
    "adadelta": ("square_avg", "acc_delta"),
    "rmsprop": ("square_avg",),  # + momentum with momentum > 0
    "adam": ("m", "v"),
    "adamw": ("m", "v"),
}

# per-step learning-rate multipliers: the rate is the `lr` input, fed every step (schedules
# never recompile), so the rules must use the fed value, not the train block's constant
LR_FACTORS = (1.0, 0.9, 1.2, 0.7, 1.0)


def source(optimizer: str, clip: float | None = None, extra: str = "") -> str:
    more = (f"\n    clip = {clip}" if clip is not None else "") + extra
    return SOURCE.format(optimizer=optimizer, extra=more)


def batches(seed: int = 1234):
    rng = np.random.default_rng(seed)
    xs = rng.normal(size=(STEPS, B, IN)).astype(np.float32)
    ys = (rng.normal(size=(STEPS, B, OUT)) * 2.0).astype(np.float32)
    return xs, ys


def analytic_grads(w, b, x, y):
    """loss = mean((x @ w + b - y)^2) over all B*OUT elements."""
    r = x @ w + b - y
    scale = 2.0 / r.size
    return {"w": scale * (x.T @ r), "b": scale * r.sum(axis=0)}


def analytic_loss(w, b, x, y):
    return float(np.mean((x @ w + b - y) ** 2))


# --- the textbook rules, directly in numpy (float64) ------------------------------------------

class Textbook:
    """PyTorch's update rules (torch.optim docs), one parameter dict at a time."""

    def __init__(self, name: str, args: dict, clip: float | None):
        self.name, self.a, self.clip = name, dict(args), clip
        self.state: dict[str, dict[str, np.ndarray]] = {}
        self.t = 0
        self.clip_was_active: list[bool] = []

    def slot(self, param: str, slot: str, like: np.ndarray) -> np.ndarray:
        return self.state.setdefault(param, {}).setdefault(slot, np.zeros_like(like))

    def step(self, params: dict, grads: dict, lr: float) -> dict:
        self.t += 1
        a, t = self.a, self.t
        if self.clip is not None:
            norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))
            coef = self.clip / (norm + 1e-6)
            self.clip_was_active.append(coef < 1.0)
            grads = {k: g * min(1.0, coef) for k, g in grads.items()}
        out = {}
        for n, p in params.items():
            g = grads[n]
            wd = a.get("weight_decay", 0.0)
            if self.name == "adamw":
                p = p * (1.0 - lr * wd)
            elif wd:
                g = g + wd * p
            st = self.state.setdefault(n, {})
            if self.name == "sgd":
                mu = a["momentum"]
                if mu:
                    buf = st["momentum"] = mu * st.get("momentum", np.zeros_like(p)) + g
                    g = g + mu * buf if a["nesterov"] else buf
                p = p - lr * g
            elif self.name == "adagrad":
                s = st["sum"] = st.get("sum", np.zeros_like(p)) + g * g
                p = p - lr * g / (np.sqrt(s) + a["eps"])
            elif self.name == "adadelta":
                rho, eps = a["rho"], a["eps"]
                sq = st["square_avg"] = rho * st.get("square_avg", np.zeros_like(p)) + (1 - rho) * g * g
                acc = st.get("acc_delta", np.zeros_like(p))
                delta = np.sqrt(acc + eps) / np.sqrt(sq + eps) * g
                st["acc_delta"] = rho * acc + (1 - rho) * delta * delta
                p = p - lr * delta
            elif self.name == "rmsprop":
                al, mu = a["alpha"], a["momentum"]
                sq = st["square_avg"] = al * st.get("square_avg", np.zeros_like(p)) + (1 - al) * g * g
                avg = np.sqrt(sq) + a["eps"]
                if mu:
                    buf = st["momentum"] = mu * st.get("momentum", np.zeros_like(p)) + g / avg
                    p = p - lr * buf
                else:
                    p = p - lr * g / avg
            elif self.name in ("adam", "adamw"):
                b1, b2 = a["beta1"], a["beta2"]
                m = st["m"] = b1 * st.get("m", np.zeros_like(p)) + (1 - b1) * g
                v = st["v"] = b2 * st.get("v", np.zeros_like(p)) + (1 - b2) * g * g
                mhat, vhat = m / (1 - b1 ** t), v / (1 - b2 ** t)
                p = p - lr * mhat / (np.sqrt(vhat) + a["eps"])
            else:  # pragma: no cover
                raise AssertionError(f"no textbook rule for {self.name}")
            out[n] = p
        return out


# --- running dlc ---------------------------------------------------------------------------------

def train_program(text: str):
    m = dlc.load(text)
    graph = m.compile_graph("train", m.train_config)
    m.ensure_state(graph)
    return m, graph, make_program("reference", graph, m.state)


def close(actual, expected, what: str, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol,
                               err_msg=what)


@pytest.mark.parametrize("case", list(CASES))
def test_optimizer_matches_textbook_rule(case):
    expr, clip = CASES[case]
    m, graph, program = train_program(source(expr, clip))
    spec = m.train_config.optimizer
    assert m.train_config.clip == clip
    lr0 = spec.args["lr"]
    ref = Textbook(spec.name, spec.args, clip)

    # the state the pass asked for: exactly these slots, zero-initialized, plus `step`
    slots = set(SLOTS[spec.name])
    if spec.name in ("sgd", "rmsprop") and spec.args["momentum"]:
        slots.add("momentum")
    if spec.name == "sgd" and not spec.args["momentum"]:
        slots = set()
    expected_state = {"w", "b", "step"} | {f"{p}:{s}" for p in ("w", "b") for s in slots}
    assert set(m.state) == expected_state
    assert [graph.node(i).attrs["name"] for i in graph.inputs("hyper")] == ["valid_rows", "lr"]

    params = {k: m.state[k].astype(np.float64) for k in ("w", "b")}
    xs, ys = batches()
    for k in range(STEPS):
        lr = lr0 * LR_FACTORS[k]
        x, y = xs[k].astype(np.float64), ys[k].astype(np.float64)
        out = program.run({"x": xs[k], "label": ys[k], "lr": np.float32(lr)})
        # the loss is the one before the update (same parameters on both sides)
        close(out["loss"], analytic_loss(params["w"], params["b"], x, y), f"{case}: loss, step {k + 1}")
        params = ref.step(params, analytic_grads(params["w"], params["b"], x, y), lr)
        for n in ("w", "b"):
            close(m.state[n], params[n], f"{case}: parameter {n} after step {k + 1}")
            for s, v in ref.state.get(n, {}).items():
                close(m.state[f"{n}:{s}"], v, f"{case}: state {n}:{s} after step {k + 1}")
        assert int(m.state["step"]) == k + 1
        # re-anchor on dlc's float32 parameters (the reference state continues in float64)
        params = {n: m.state[n].astype(np.float64) for n in ("w", "b")}
    if clip is not None:  # the clip is active on every step of the clipping cases, or on none
        assert ref.clip_was_active == [clip < 1.0] * STEPS


def test_the_cases_change_the_parameters_measurably():
    """Guard against a vacuous comparison: each setting moves the parameters by much more
    than the tolerance, and the settings differ from one another."""
    finals = {}
    for case, (expr, clip) in CASES.items():
        m, _, program = train_program(source(expr, clip))
        w0 = m.state["w"].copy()
        xs, ys = batches()
        for k in range(STEPS):
            program.run({"x": xs[k], "label": ys[k], "lr": np.float32(m.train_config.optimizer.args["lr"])})
        assert np.max(np.abs(m.state["w"] - w0)) > 1e-3, case
        finals[case] = np.concatenate([m.state["w"].ravel(), m.state["b"]])
    names = list(finals)
    for i, a in enumerate(names):
        for b_ in names[i + 1:]:
            if {a, b_} == {"adam", "adam_clip_inactive"}:  # the same by design
                np.testing.assert_array_equal(finals[a], finals[b_])
                continue
            assert np.max(np.abs(finals[a] - finals[b_])) > 1e-4, f"{a} and {b_} train identically"


NO_PARAMETERS = """\
model sums(x: f32[B, 3]) -> f32[B, 1] {
    return sum(relu(x), axis=1, keepdims=true)
}

train sums {
    data = arrays()
    loss = mse(output, label)
    optimizer = sgd(lr=0.1, momentum=0.9)
    batch = 8
    clip = 1.0
}
"""


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_a_model_without_trainable_parameters_trains_with_clipping_and_is_warned_about(target):
    """Clipping's global norm over no gradients at all: the step runs (it used to crash the
    optimizer pass with an AttributeError) and the load warns that training changes nothing."""
    with pytest.warns(dlc.DlcWarning, match="`sums` has no trainable parameters") as caught:
        m = dlc.load(NO_PARAMETERS)
    assert caught[0].message.diagnostic.span.line == 5  # the train block names the model
    sess = m.session(m.train_config, target)
    x, y = np.arange(24, dtype=np.float32).reshape(8, 3) - 10, np.ones((8, 1), np.float32)
    losses = [sess.train_step(x, y, 0.1)["loss"] for _ in range(2)]
    want = float(np.mean((np.maximum(x, 0).sum(axis=1, keepdims=True) - y) ** 2))
    np.testing.assert_allclose(losses, [want, want], rtol=1e-6)
    assert int(m.state["step"]) == 2


def test_textbook_gradient_matches_autodiff_and_finite_differences():
    """The analytic gradient the textbook side uses is the graph's own `grad:` outputs,
    and both agree with central finite differences (float64)."""
    m = dlc.load(source("sgd(lr=0.1)"))
    graph = autodiff(m.built("train").graph)  # the autodiff pass alone
    assert {"grad:w", "grad:b", "loss"} <= set(graph.outputs)
    xs, ys = batches(7)
    x, y = xs[0].astype(np.float64), ys[0].astype(np.float64)
    w = m.state["w"].astype(np.float64)
    b = np.array([0.3, -0.2])
    feeds = {"x": x, "label": y, "w": w, "b": b}
    got = run_graph(graph, feeds, float_dtype=np.float64)
    want = analytic_grads(w, b, x, y)
    np.testing.assert_allclose(got["grad:w"], want["w"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got["grad:b"], want["b"], rtol=1e-10, atol=1e-12)
    h = 1e-6
    for name, value in (("w", w), ("b", b)):
        fd = np.zeros_like(value)
        for i in np.ndindex(value.shape):
            plus, minus = value.copy(), value.copy()
            plus[i] += h
            minus[i] -= h
            args = {"w": w, "b": b}
            fd[i] = (analytic_loss(**{**args, name: plus}, x=x, y=y)
                     - analytic_loss(**{**args, name: minus}, x=x, y=y)) / (2 * h)
        np.testing.assert_allclose(got[f"grad:{name}"], fd, rtol=1e-6, atol=1e-8)


# --- PyTorch (optional) -------------------------------------------------------------------------

def torch_optimizer(torch, name, args, params):
    o = torch.optim
    if name == "sgd":
        return o.SGD(params, lr=args["lr"], momentum=args["momentum"], nesterov=args["nesterov"],
                     weight_decay=args["weight_decay"])
    if name == "adagrad":
        return o.Adagrad(params, lr=args["lr"], eps=args["eps"], weight_decay=args["weight_decay"])
    if name == "adadelta":
        return o.Adadelta(params, lr=args["lr"], rho=args["rho"], eps=args["eps"],
                          weight_decay=args["weight_decay"])
    if name == "rmsprop":
        return o.RMSprop(params, lr=args["lr"], alpha=args["alpha"], eps=args["eps"],
                         momentum=args["momentum"], weight_decay=args["weight_decay"])
    cls = o.AdamW if name == "adamw" else o.Adam
    return cls(params, lr=args["lr"], betas=(args["beta1"], args["beta2"]), eps=args["eps"],
               weight_decay=args["weight_decay"])


TORCH_MISSING = "PyTorch is not installed (a CPU build: pip install torch==2.13.0, the bench extra)"


@pytest.mark.parametrize("case", list(CASES))
def test_optimizer_matches_torch(case):
    torch = pytest.importorskip("torch", reason=TORCH_MISSING)
    expr, clip = CASES[case]
    m, _, program = train_program(source(expr, clip))
    spec = m.train_config.optimizer
    lr0 = spec.args["lr"]
    w = torch.tensor(m.state["w"].astype(np.float64), requires_grad=True)
    b = torch.tensor(m.state["b"].astype(np.float64), requires_grad=True)
    opt = torch_optimizer(torch, spec.name, spec.args, [w, b])
    xs, ys = batches()
    for k in range(STEPS):
        lr = lr0 * LR_FACTORS[k]
        program.run({"x": xs[k], "label": ys[k], "lr": np.float32(lr)})
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(torch.from_numpy(xs[k]).double() @ w + b,
                                            torch.from_numpy(ys[k]).double())
        loss.backward()
        if clip is not None:
            norm = torch.nn.utils.clip_grad_norm_([w, b], clip)
            assert (float(norm) > clip) == (clip < 1.0)
        opt.step()
        for n, t in (("w", w), ("b", b)):
            close(m.state[n], t.detach().numpy(), f"{case} vs torch: {n} after step {k + 1}")
        with torch.no_grad():  # continue from dlc's float32 values, as the textbook test does
            w.copy_(torch.from_numpy(m.state["w"].astype(np.float64)))
            b.copy_(torch.from_numpy(m.state["b"].astype(np.float64)))


def test_optimizer_defaults_match_torch():
    """The .dln optimizers' defaults are PyTorch's (sgd's lr aside: torch has none/1e-3)."""
    torch = pytest.importorskip("torch", reason=TORCH_MISSING)
    pairs = {"adagrad": torch.optim.Adagrad, "adadelta": torch.optim.Adadelta,
             "rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
             "sgd": torch.optim.SGD}
    for name, cls in pairs.items():
        ours = {k: p.default for k, p in inspect.signature(recipe.RECIPE[name].fn).parameters.items()}
        theirs = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()}
        if "betas" in theirs:
            theirs["beta1"], theirs["beta2"] = theirs["betas"]
        for k, v in ours.items():
            if name == "sgd" and k == "lr":
                continue
            assert float(v) == pytest.approx(float(theirs[k])), f"{name}({k}=...) default"


def test_schedules_match_torch():
    torch = pytest.importorskip("torch", reason=TORCH_MISSING)
    lr0, epochs = 0.1, 10
    cases = [(recipe.step(3, 0.5), lambda o: torch.optim.lr_scheduler.StepLR(o, 3, 0.5)),
             (recipe.exponential(0.8), lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.8)),
             (recipe.cosine(0.01), lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, epochs, 0.01)),
             (recipe.constant(), lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1.0))]
    for spec, make in cases:
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr0)
        sched = make(opt)
        for epoch in range(epochs):
            assert learning_rate(spec, lr0, epoch, epochs) == pytest.approx(opt.param_groups[0]["lr"],
                                                                           rel=1e-9, abs=1e-12), (spec, epoch)
            opt.step()
            sched.step()


# --- learning-rate schedules ---------------------------------------------------------------------

@pytest.mark.parametrize("spec, formula", [
    (recipe.constant(), lambda lr0, e, n: lr0),
    (recipe.step(3), lambda lr0, e, n: lr0 * 0.1 ** (e // 3)),
    (recipe.step(every=2, gamma=0.5), lambda lr0, e, n: lr0 * 0.5 ** (e // 2)),
    (recipe.exponential(0.9), lambda lr0, e, n: lr0 * 0.9 ** e),
    (recipe.cosine(), lambda lr0, e, n: lr0 * 0.5 * (1 + math.cos(math.pi * e / n))),
    (recipe.cosine(min_lr=0.001), lambda lr0, e, n: 0.001 + (lr0 - 0.001) * 0.5 * (1 + math.cos(math.pi * e / n))),
], ids=["constant", "step-default", "step", "exponential", "cosine", "cosine-min"])
def test_learning_rate_schedule(spec, formula):
    for lr0, epochs in ((0.1, 10), (1e-3, 7), (0.5, 1)):
        rates = [learning_rate(spec, lr0, e, epochs) for e in range(epochs)]
        for e, r in enumerate(rates):
            assert r == pytest.approx(formula(lr0, e, epochs), rel=1e-12, abs=1e-15), (spec, lr0, e)
        assert rates[0] == pytest.approx(lr0)  # every schedule starts at the given rate
        if spec.name != "constant":
            assert all(b <= a + 1e-15 for a, b in zip(rates, rates[1:]))  # and never rises


def test_schedule_is_fed_to_the_step_by_fit():
    """`schedule = step(...)` in the train block reaches the recorded per-epoch rate, and
    that rate is what the steps used: one batch per epoch, so four sgd steps with rates
    0.2, 0.2, 0.1, 0.1, recomputed by hand (mse's gradient ignores the shuffle's row order)."""
    text = source("sgd(lr=0.2)", extra="\n    epochs = 4\n    schedule = step(every=2, gamma=0.5)")
    m = dlc.load(text)
    assert m.train_config.schedule == recipe.step(2, 0.5)
    xs, ys = batches()
    x, y = xs[0], ys[0]
    w, b = m.state["w"].astype(np.float64), m.state["b"].astype(np.float64)
    seen = []
    history = m.fit(x, y, test=0.0, batch=8, quiet=True, on_epoch=lambda r: seen.append(r["lr"]))
    expected = [0.2, 0.2, 0.1, 0.1]
    assert history["lr"] == pytest.approx(expected)
    assert seen == pytest.approx(expected)
    for lr in expected:
        g = analytic_grads(w, b, x.astype(np.float64), y.astype(np.float64))
        w, b = w - lr * g["w"], b - lr * g["b"]
    close(m.state["w"], w, "w after four scheduled sgd steps")
    close(m.state["b"], b, "b after four scheduled sgd steps")
    assert int(m.state["step"]) == 4


def test_warmup_raises_the_rate_step_by_step():
    """`warmup=N` on a schedule: step s < N takes (s + 1) / N of the schedule's rate, set
    every step (recomputed by hand, as above: one batch per epoch, so the steps' rates are
    0.2 / 3, 0.4 / 3, then cosine's); a warmup of 0 is the schedule itself."""
    for e in range(5):
        for s_ in range(12):
            plain = learning_rate(recipe.cosine(0.01), 0.5, e, 5, s_)
            warm = learning_rate(recipe.cosine(0.01, warmup=4), 0.5, e, 5, s_)
            assert warm == pytest.approx(plain * min(1.0, (s_ + 1) / 4), rel=1e-12)
    assert recipe.cosine(warmup=0) == recipe.cosine() and str(recipe.constant(warmup=3)) == "constant(warmup=3)"
    text = source("sgd(lr=0.2)", extra="\n    epochs = 4\n    schedule = cosine(warmup=2)")
    m = dlc.load(text)
    xs, ys = batches()
    x, y = xs[0], ys[0]
    w, b = m.state["w"].astype(np.float64), m.state["b"].astype(np.float64)
    history = m.fit(x, y, test=0.0, batch=8, quiet=True)
    cos = [0.2 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
    expected = [cos[0] / 2, cos[1], cos[2], cos[3]]
    assert history["lr"] == pytest.approx(expected)
    for lr in expected:
        g = analytic_grads(w, b, x.astype(np.float64), y.astype(np.float64))
        w, b = w - lr * g["w"], b - lr * g["b"]
    close(m.state["w"], w, "w after four warmed-up cosine sgd steps")
    with pytest.raises(ArgumentError, match="`warmup` must be a number of steps"):
        recipe.cosine(warmup=-1)


PLATEAU = """
model reg(x: f32[B, 3]) -> f32[B, 1] { return x |> dense(1) }
train reg { data = arrays()  loss = mse(output, label)  optimizer = sgd(lr=0.5)  batch = 16  epochs = 6
            schedule = plateau(factor=0.5, patience=2, monitor="train_loss", min_delta=MIN_DELTA, min_lr=0.05) }
"""


def test_plateau_cuts_the_rate_after_patience_epochs_and_resumes_where_it_was(tmp_path):
    """plateau(...): each time the monitored value goes `patience` epochs without improving
    by more than min_delta, the rate is multiplied by `factor`, down to min_lr; the count
    and the cut are saved with the checkpoint, so a resumed run goes on with them."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)).astype(np.float32)
    y = x[:, :1] * 2
    never = dlc.load(PLATEAU.replace("MIN_DELTA", "1000.0"))  # no epoch after the first improves
    h = never.fit(x, y, quiet=True, test=0.0, save=tmp_path / "p.npz")
    assert h["lr"] == pytest.approx([0.5, 0.5, 0.5, 0.25, 0.25, 0.125])
    again = dlc.load(PLATEAU.replace("MIN_DELTA", "1000.0"))
    h = again.fit(x, y, quiet=True, test=0.0, epochs=10, resume=tmp_path / "p.npz")
    assert h["lr"] == pytest.approx([0.125, 0.0625, 0.0625, 0.05])  # (epochs 7-10; min_lr 0.05)
    always = dlc.load(PLATEAU.replace("MIN_DELTA", "0.0"))  # the loss falls every epoch here
    assert always.fit(x, y, quiet=True, test=0.0)["lr"] == pytest.approx([0.5] * 6)
    with pytest.raises(ArgumentError, match="`schedule` monitors `val_loss`, but there is no validation split"):
        dlc.load(PLATEAU.replace('monitor="train_loss", ', "").replace("MIN_DELTA", "0.0")).fit(x, y, quiet=True)
    with pytest.raises(ArgumentError, match="`factor` must be in"):
        recipe.plateau(factor=1.5)


def test_a_damaged_plateau_state_in_a_checkpoint_is_a_clear_error(tmp_path):
    from dlc.core.diagnostics import CheckpointError
    from dlc.runtime.checkpoint import load_checkpoint, save_checkpoint
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)).astype(np.float32)
    m = dlc.load(PLATEAU.replace("MIN_DELTA", "0.0"))
    m.fit(x, x[:, :1], quiet=True, test=0.0, epochs=1, save=tmp_path / "p.npz")
    arrays, meta = load_checkpoint(tmp_path / "p.npz")
    save_checkpoint(tmp_path / "bad.npz", arrays, {**meta, "plateau": {"scale": -1, "wait": 0, "best": None}})
    with pytest.raises(CheckpointError, match="damaged metadata: `plateau`"):
        dlc.load(PLATEAU.replace("MIN_DELTA", "0.0")).fit(x, x[:, :1], quiet=True, test=0.0,
                                                           resume=tmp_path / "bad.npz")


# --- the numerics guard ----------------------------------------------------------------------

GUARDED = """\
model g(x: f32[B, 3]) -> f32[B, 2] {
    param w: f32[3, 2] = normal(0, 0.5)
    param b: f32[2] = zeros
    h = log(x)
    return h @ w + b
}

train g {
    data = arrays()
    loss = mse(output, label)
    optimizer = OPT
    batch = 8
}
"""
LOG_LINE, LOSS_LINE = 4, 10


def guarded(opt: str = "adam(lr=0.01)"):
    m = dlc.load(GUARDED.replace("OPT", opt))
    rng = np.random.default_rng(5)
    good_x = rng.uniform(0.5, 2.0, size=(B, IN)).astype(np.float32)
    y = rng.normal(size=(B, OUT)).astype(np.float32)
    bad_x = good_x.copy()
    bad_x[3, 1] = 0.0  # log(0) = -inf
    bad_x[5, 0] = -1.0  # log(-1) = NaN
    return m, good_x, bad_x, y


def snapshot(state):
    return {k: np.array(v, copy=True) for k, v in state.items()}


def assert_unchanged(before, after):
    assert set(before) == set(after)
    for k in before:
        assert before[k].dtype == after[k].dtype
        np.testing.assert_array_equal(after[k], before[k], err_msg=f"`{k}` changed in a non-finite step")


@pytest.mark.parametrize("opt", ["sgd(lr=0.01, momentum=0.9)", "adagrad()", "adadelta()",
                                 "rmsprop(momentum=0.5)", "adam(lr=0.01)", "adamw(lr=0.01)"])
def test_nonfinite_loss_leaves_every_array_unchanged(opt):
    m, good_x, bad_x, y = guarded(opt)
    graph = m.compile_graph("train", m.train_config)
    m.ensure_state(graph)
    program = make_program("reference", graph, m.state)
    lr = np.float32(0.01)
    for _ in range(2):  # non-zero moments first
        assert np.isfinite(program.run({"x": good_x, "label": y, "lr": lr})["loss"])
    before = snapshot(m.state)
    assert any(":" in k and np.any(v != 0) for k, v in before.items())
    out = program.run({"x": bad_x, "label": y, "lr": lr})
    assert not np.isfinite(out["loss"])
    assert_unchanged(before, m.state)
    # and training carries on from there
    out = program.run({"x": good_x, "label": y, "lr": lr})
    assert np.isfinite(out["loss"]) and int(m.state["step"]) == 3


def test_nonfinite_with_clipping_leaves_every_array_unchanged():
    m = dlc.load(GUARDED.replace("OPT", "adam(lr=0.01)").replace("batch = 8", "batch = 8\n    clip = 0.5"))
    _, good_x, bad_x, y = guarded()
    graph = m.compile_graph("train", m.train_config)
    m.ensure_state(graph)
    program = make_program("reference", graph, m.state)
    program.run({"x": good_x, "label": y, "lr": np.float32(0.01)})
    before = snapshot(m.state)
    assert not np.isfinite(program.run({"x": bad_x, "label": y, "lr": np.float32(0.01)})["loss"])
    assert_unchanged(before, m.state)


def test_session_reports_the_step_and_the_op_that_went_nonfinite():
    m, good_x, bad_x, y = guarded()
    sess = m.session(m.train_config, "reference")
    for _ in range(2):
        sess.train_step(good_x, y, 0.01)
    before = snapshot(m.state)
    with pytest.raises(NumericsError) as info:
        sess.train_step(bad_x, y, 0.01)
    err = info.value
    assert "step 3" in err.message
    assert err.span is not None and err.span.line == LOG_LINE, err.render()
    text = err.span.source.line(err.span.line)
    assert "log" in text[err.span.col - 1:err.span.end_col - 1]
    rendered = err.render()
    assert "h = log(x)" in rendered and f"{err.span.line}:" in rendered
    assert_unchanged(before, m.state)
    assert sess.global_step == 2
    # a good batch afterwards is step 3
    sess.train_step(good_x, y, 0.01)
    assert sess.global_step == 3 and int(m.state["step"]) == 3


def test_huge_learning_rate_is_caught_at_the_loss():
    """lr = 1e30: the first step is finite but throws the parameters to ~1e30; the next
    loss overflows in mse's square (the train block's loss line), and that step changes nothing."""
    m, good_x, _, y = guarded("sgd(lr=0.01)")
    sess = m.session(m.train_config, "reference")
    sess.train_step(good_x, y, 0.01)
    sess.train_step(good_x, y, 1e30)
    assert np.all(np.isfinite(m.state["w"])) and np.max(np.abs(m.state["w"])) > 1e20
    before = snapshot(m.state)
    with pytest.raises(NumericsError) as info:
        sess.train_step(good_x, y, 0.01)
    err = info.value
    assert "step 3" in err.message
    assert err.span is not None and err.span.line == LOSS_LINE, err.render()
    assert_unchanged(before, m.state)
    assert sess.global_step == 2


def test_nonfinite_step_leaves_batchnorm_running_statistics_unchanged():
    """The guard covers the model's own updates (batchnorm running mean/variance) too."""
    text = """\
model bn(x: f32[B, 3]) -> f32[B, 2] {
    h = log(x) |> dense(4) |> batchnorm |> relu
    return dense(h, 2)
}

train bn {
    data = arrays()
    loss = mse(output, label)
    optimizer = adam(lr=0.01)
    batch = 8
}
"""
    m = dlc.load(text)
    _, good_x, bad_x, y = guarded()
    sess = m.session(m.train_config, "reference")
    before_any = snapshot(m.state)
    sess.train_step(good_x, y, 0.01)
    moved = [k for k in m.state if ":" not in k and k not in ("step", "seed")
             and not np.array_equal(m.state[k], before_any[k])]
    assert len(moved) > 4  # weights and running statistics did move in the good step
    before = snapshot(m.state)
    with pytest.raises(NumericsError) as info:
        sess.train_step(bad_x, y, 0.01)
    assert "step 2" in info.value.message and info.value.span.line == 2
    assert_unchanged(before, m.state)


SQRT_AT_ZERO = """\
model g(x: f32[B, 3]) -> f32[B, 2] {
    param w: f32[3, 2] = normal(0, 0.5)
    param b: f32[2] = zeros
    h = sqrt((x * x) @ (w * w))
    return h + b
}

train g {
    data = arrays()
    loss = mse(output, label)
    optimizer = sgd(lr=0.01)
    batch = 8
}
"""


def test_a_nonfinite_gradient_with_a_finite_loss_is_named_at_the_next_step():
    """By default the guard reads the loss alone (a global test of every gradient would keep
    the weight gradients from being updated in their GEMM's epilogue): sqrt'(0) = inf, times
    0 = NaN, writes NaN into `w`; the next step names `w` and points to check_numerics."""
    m = dlc.load(SQRT_AT_ZERO)
    sess = m.session(m.train_config, "reference")
    x, y = np.zeros((B, IN), np.float32), np.ones((B, OUT), np.float32)
    sess.train_step(x, y, 0.01)
    with pytest.raises(NumericsError) as info:
        sess.train_step(x, y, 0.01)
    assert "step 2" in info.value.message and "`w` holds non-finite values" in info.value.message
    assert "check_numerics = true" in info.value.hint and info.value.span.line == 2


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_check_numerics_stops_at_a_nonfinite_gradient_with_a_finite_loss(target):
    """With `check_numerics = true` every gradient is checked before any update: the step
    with sqrt'(0) changes nothing and is reported at the sqrt's line, in its backward pass."""
    m = dlc.load(SQRT_AT_ZERO.replace("batch = 8", "batch = 8\n    check_numerics = true"))
    sess = m.session(m.train_config, target)
    x, y = np.zeros((B, IN), np.float32), np.ones((B, OUT), np.float32)
    good = np.ones((B, IN), np.float32)
    sess.train_step(good, y, 0.01)  # finite gradients pass the check
    before = snapshot(m.state)
    with pytest.raises(NumericsError) as info:
        sess.train_step(x, y, 0.01)
    err = info.value
    assert "the gradients became non-finite at step 2 (the loss was" in err.message, err.render()
    assert "in the backward pass of this line" in err.message and err.span.line == 4, err.render()
    assert_unchanged(before, m.state)
    assert sess.global_step == 1
    sess.train_step(good, y, 0.01)  # and training carries on
    assert int(m.state["step"]) == 2


def test_check_numerics_from_the_command_line(tmp_path):
    """The same model from a file: plain `dlc run` stops at step 2, naming the parameter the
    update wrote NaN into, and hints at --check-numerics, which stops at step 1 and names the
    sqrt's line."""
    import subprocess
    import sys
    np.savez(tmp_path / "zeros.npz", x=np.zeros((16, IN), np.float32), y=np.ones((16, OUT), np.float32))
    (tmp_path / "nan.dln").write_text(SQRT_AT_ZERO.replace("data = arrays()", 'data = npz("zeros.npz", test=0.25)'))
    runs = [subprocess.run([sys.executable, "-m", "dlc", "run", "nan.dln", "-q", *flags], capture_output=True,
                           text=True, cwd=tmp_path, timeout=600) for flags in ([], ["--check-numerics"])]
    for r in runs:
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "nan.dln:2:5: numerics error: the loss became nan at step 2" in runs[0].stderr, runs[0].stderr
    assert "--check-numerics" in runs[0].stderr  # the hint
    assert "nan.dln:4:9: numerics error: the gradients became non-finite at step 1" in runs[1].stderr, runs[1].stderr
