"""dlc beside PyTorch (eager, and torch.compile with --compile) and numpy's BLAS, in one run.

    python benchmarks/run.py [--quick] [--compile] [--threads N] [--out results.json]
                             [--only gemm|training|recurrent|inference|compile|roofline|shared]
                             [--workloads NAMES]

Every figure is the median over repeats of the mean time of a block of steps, measured
in this process on this machine; ratios (dlc / peer) are what to compare, never figures
from different runs. torch is optional (`pip install torch==2.13.0` gives a CPU build);
without it only dlc and numpy are timed.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
os.environ["DLC_QUICK_START"] = "0"  # steps are timed on the optimized code (compile_times: both)
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

import dlc  # noqa: E402


LEAD_IN = 0.05  # seconds of untimed calls at the start of each block of an interleaved comparison


def interleaved(fns: list, steps: int, repeats: int, pause: float = 0.0,
                lead_in: float = LEAD_IN) -> tuple[list[float], list[float]]:
    """Blocks of `steps` calls of each function in turn, `repeats` rounds: the median
    seconds per call of each, and the median over rounds of the first one's time over
    each one's (a ratio of adjacent blocks, which load on the machine slows alike).
    Each block starts with `lead_in` seconds of untimed calls, so that the timed calls
    run in a steady state: the other side's idle threads keep spinning for a while after
    its block and take a core from whatever runs next (PyTorch's OpenMP threads for
    several milliseconds: measured, a dlc LSTM step right after a PyTorch step took 2.4x
    its time, the next one 1.0x). `pause` seconds before each block let threads that spin
    longer stop first (OpenBLAS's, about 0.1 s after a call)."""
    for fn in fns:
        for _ in range(3):
            fn()  # warm up (and compile: torch.compile may compile again on a second call)
    times = [[] for _ in fns]
    for _ in range(repeats):
        for t, fn in zip(times, fns):
            time.sleep(pause)
            start = time.perf_counter()
            while time.perf_counter() - start < lead_in:
                fn()
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            t.append((time.perf_counter() - start) / steps)
    ratios = [statistics.median(a / b for a, b in zip(times[0], t)) for t in times]
    return [statistics.median(t) for t in times], ratios


def median_time(fn, steps: int, repeats: int) -> float:
    """Median over `repeats` of the mean seconds per call over `steps` calls."""
    fn()  # warm up (and compile)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


# --- dlc ---------------------------------------------------------------------------------------

def dlc_train_step(path: Path, batch: int, threads: int | None):
    m = dlc.load(path)
    session = m.session(m.train_config, "cpu", threads=threads)
    name, t = m.input_types[0]
    rng = np.random.default_rng(0)
    x = rng.random((batch,) + tuple(int(d) for d in t.shape[1:]), dtype=np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    return lambda: session.train_step(x, y, 0.01)


def dlc_forward(path: Path, batch: int, threads: int | None):
    """The evaluation step alone: model output for a batch (no loss)."""
    from dlc.pipeline import step_graph
    from dlc.program import make_program
    m = dlc.load(path)
    graph = m.built("eval").graph.copy()
    graph.outputs = {"output": graph.outputs["output"]}
    graph.remove_unused(keep_inputs=False)
    name, t = m.input_types[0]
    program = make_program("cpu", step_graph(graph, None), dict(m.state), data_name=name,
                           options={"threads": threads})
    x = np.random.default_rng(0).random((batch,) + tuple(int(d) for d in t.shape[1:]), dtype=np.float32)
    program.step_for(batch)
    return lambda: program.run({name: x})


def gemm_model(n: int) -> Path:
    """models/gemm.dln at N = n, written to a temporary folder."""
    src = (HERE / "models" / "gemm.dln").read_text().replace("N]", f"{n}]").replace("[N,", f"[{n},")
    path = Path(tempfile.mkdtemp()) / f"gemm{n}.dln"
    path.write_text(src.replace("f32[B, N]", f"f32[B, {n}]"))
    return path


def compile_times(path: Path, threads: int | None, colds: int = 3) -> tuple[float, float, list[float]]:
    """(cold, warm, each cold) seconds from loading the .dln to a compiled training step
    ready to run: cold with an empty compile cache (the median of `colds` compiles, each
    into a cache of its own: one cold compile moves by a third from minute to minute on a
    shared machine), warm with the cache the last cold compile filled."""
    cold = []
    for _ in range(colds - 1):
        with tempfile.TemporaryDirectory() as cache:
            cold.append(_ready(path, threads, cache)[0])
    with tempfile.TemporaryDirectory() as cache:
        cold.append(_ready(path, threads, cache)[0])
        return statistics.median(cold), _ready(path, threads, cache)[0], cold


def quick_start_times(path: Path, threads: int | None, colds: int = 3) -> tuple[float, float]:
    """With `quick_start`, medians over `colds` cold compiles: seconds from loading the
    .dln to the quick code's step ready, and to the optimized code swapped in (nothing
    runs meanwhile)."""
    times = []
    for _ in range(colds):
        with tempfile.TemporaryDirectory() as cache:
            times.append(_ready(path, threads, cache, quick_start=True))
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def _ready(path: Path, threads: int | None, cache: str, quick_start: bool = False) -> tuple[float, float]:
    """Seconds to the training step ready, and to its optimized code in use."""
    gc.collect()  # not to time the collection of the earlier benchmarks' garbage
    start = time.perf_counter()
    m = dlc.load(path)
    session = m.session(m.train_config, "cpu", threads=threads, cache_dir=cache, quick_start=quick_start)
    session.train_program.step_for(m.train_config.batch)
    ready = time.perf_counter() - start
    session.train_program.use_optimized(wait=True)
    return ready, time.perf_counter() - start


def shared_machine(path: Path, batch: int, steps: int, repeats: int) -> list[dict]:
    """A small training step beside a busy process this benchmark starts (`while True:
    pass`), against the same step on the machine as it was and on one thread: the step
    time per setting, the auto setting choosing its threads after the competitor started;
    then the target's pair interleaved (the last row, the figure)."""
    import subprocess
    from dlc.backends.llvm import threads as cpu_threads

    def loaded(threads_opt):
        """A session that has chosen its threads (now), its step and a step's call."""
        cpu_threads.restart_probe()  # `auto` measures the other processes' load from here
        m = dlc.load(path)
        options = {} if threads_opt == "auto" else {"threads": threads_opt}
        session = m.session(m.train_config, "cpu", **options)
        name, t = m.input_types[0]
        rng = np.random.default_rng(0)
        x = rng.random((batch,) + tuple(int(d) for d in t.shape[1:]), dtype=np.float32)
        y = rng.integers(0, 10, batch).astype(np.int32)
        session.program.batch = batch
        return session.train_program.step_for(batch), lambda: session.train_step(x, y, 0.01)

    def threads_used(step) -> int:
        check = getattr(step, "check", None)
        return check.current if check is not None else step.threads

    def timed(threads_opt, start_competitor=None) -> tuple[float, int]:
        """The step's time; with start_competitor, the busy process starts after the
        session has chosen its threads, and the steps of two run-time check periods pass
        before the timing."""
        step, call = loaded(threads_opt)
        if start_competitor is not None:
            start_competitor()
            for _ in range(2 * cpu_threads.RunTimeCheck.PERIOD):
                call()
        sec = median_time(call, steps, repeats)
        return sec, threads_used(step)

    rows = []
    competitor = None

    def start_competitor():
        nonlocal competitor
        competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.3)

    def stop_competitor():
        nonlocal competitor
        if competitor is not None:
            competitor.kill()
            competitor.wait()
            competitor = None
    for label in ("as it is", "beside a busy process", "busy from after load"):
        if label == "beside a busy process":
            start_competitor()
        try:
            for setting in ("auto", 1, os.cpu_count() or 1) if label != "busy from after load" else ("auto",):
                sec, used = timed(setting, start_competitor if label == "busy from after load" else None)
                rows.append({"machine": label, "threads": str(setting), "used": used, "ms": sec * 1e3})
                print(f"  {label:<22} --threads {str(setting):<5} ({used} used)  {sec * 1e3:8.3f} ms")
        finally:
            stop_competitor()
    idle = next(r["ms"] for r in rows if r["machine"] == "as it is" and r["threads"] == "auto")
    busy = next(r["ms"] for r in rows if r["machine"] == "beside a busy process" and r["threads"] == "auto")
    later = next(r["ms"] for r in rows if r["machine"] == "busy from after load")
    print(f"  one after the other: auto beside a busy process / auto as it is {busy / idle:.2f}x; "
          f"the busy process started after load {later / idle:.2f}x")

    # The target's pair interleaved, as the training rows are: one auto session loaded on
    # the machine as it is, one loaded beside the busy process (each chooses its threads
    # then), timed in alternating blocks with the competitor stopped and running; the
    # median of the rounds' ratios, so that a slow minute slows both sides alike.
    alone_step, alone = loaded("auto")
    try:
        start_competitor()
        beside_step, beside = loaded("auto")
        for _ in range(2 * cpu_threads.RunTimeCheck.PERIOD):
            beside()
        ratios, times = [], ([], [])
        for _ in range(max(3, repeats)):
            stop_competitor()
            times[0].append(median_time(alone, steps, 1))
            start_competitor()
            times[1].append(median_time(beside, steps, 1))
            ratios.append(times[1][-1] / times[0][-1])
    finally:
        stop_competitor()
    counts = threads_used(alone_step), threads_used(beside_step)
    pair = {"machine": "interleaved", "threads": "auto", "used": f"{counts[0]} / {counts[1]}",
            "ms": statistics.median(times[0]) * 1e3, "ms_beside": statistics.median(times[1]) * 1e3,
            "ratio": statistics.median(ratios)}
    rows.append(pair)
    print(f"  interleaved, {len(ratios)} rounds: auto as it is {pair['ms']:.3f} ms ({counts[0]} used), "
          f"beside a busy process {pair['ms_beside']:.3f} ms ({counts[1]} used): "
          f"{pair['ratio']:.2f}x (target <= 1.5x)")
    return rows


# --- torch -------------------------------------------------------------------------------------

def torch_models():
    import torch
    from torch import nn

    def mlp():
        return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))

    def lenet():
        return nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))

    class Recurrent(nn.Module):
        def __init__(self, layer=nn.LSTM, features=64):
            super().__init__()
            self.rnn = layer(features, 128, batch_first=True)
            self.out = nn.Linear(128, 10)

        def forward(self, x):
            return self.out(self.rnn(x)[0][:, -1])

    def cifar_cnn():
        return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(1024, 128), nn.ReLU(), nn.Linear(128, 10))

    def separable(cin, cout, stride):  # as models/mobilenet.dln
        return [nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False), nn.ReLU(),
                nn.Conv2d(cin, cout, 1), nn.ReLU()]

    def mobilenet():
        return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), *separable(32, 64, 1),
                             *separable(64, 128, 2), *separable(128, 128, 2), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(128, 10))

    def dilated():  # as models/dilated.dln
        return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=2, dilation=2),
                             nn.ReLU(), nn.Conv2d(32, 32, 3, padding=4, dilation=4), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    class WaveNet(nn.Module):  # as models/wavenet.dln
        def __init__(self):
            super().__init__()
            self.first = nn.Conv1d(16, 32, 1)
            self.convs = nn.ModuleList(nn.Conv1d(32, 32, 2, dilation=2 ** i) for i in range(7))
            self.out = nn.Linear(32, 10)

        def forward(self, x):
            h = self.first(x)
            for conv in self.convs:
                h = torch.relu(conv(nn.functional.pad(h, (conv.dilation[0], 0))))
            return self.out(h.mean(2))

    def wide_mlp():
        return nn.Sequential(nn.Linear(3072, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                             nn.Linear(1024, 10))

    def conv_bn(cin, cout, k, stride=1):
        return [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout)]

    class Basic(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.a = nn.Sequential(*conv_bn(c, c, 3), nn.ReLU(), *conv_bn(c, c, 3))

        def forward(self, x):
            return torch.relu(self.a(x) + x)

    class Down(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.a = nn.Sequential(*conv_bn(cin, cout, 3, 2), nn.ReLU(), *conv_bn(cout, cout, 3))
            self.s = nn.Sequential(*conv_bn(cin, cout, 1, 2))

        def forward(self, x):
            return torch.relu(self.a(x) + self.s(x))

    def resnet():
        return nn.Sequential(*conv_bn(3, 16, 3), nn.ReLU(), Basic(16), Down(16, 32), Down(32, 64),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

    class Transformer(nn.Module):  # as models/transformer.dln: PyTorch's own encoder layer
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(64, 128)
            self.block = nn.TransformerEncoderLayer(128, 4, 256, dropout=0.0, batch_first=True)
            self.out = nn.Linear(128, 10)

        def forward(self, x):
            return self.out(self.block(self.inp(x)).mean(1))

    models = {"mlp": (mlp, (784,), lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9)),
            "lenet": (lenet, (1, 28, 28), lambda p: torch.optim.Adam(p, lr=1e-3)),
            "lstm": (Recurrent, (32, 64), lambda p: torch.optim.Adam(p, lr=1e-3)),
            "cifar_cnn": (cifar_cnn, (3, 32, 32), lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9)),
            "wide_mlp": (wide_mlp, (3072,), lambda p: torch.optim.Adam(p, lr=1e-3)),
            "mobilenet": (mobilenet, (3, 32, 32), lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9)),
            "dilated": (dilated, (3, 32, 32), lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9)),
            "wavenet": (WaveNet, (16, 256), lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9)),
            "resnet": (resnet, (3, 32, 32),
                       lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True)),
            "transformer": (Transformer, (64, 64), lambda p: torch.optim.Adam(p, lr=1e-3))}
    for layer, steps in RECURRENT:  # as recurrent_source
        models[f"{layer}_T{steps}"] = (lambda layer=layer: Recurrent(getattr(nn, layer.upper()), 32), (steps, 32),
                                       lambda p: torch.optim.Adam(p, lr=1e-3))
    return models


def torch_train_step(kind: str, batch: int, compiled: bool = False):
    import torch
    make, shape, opt = torch_models()[kind]
    model = make()
    if compiled:
        model = torch.compile(model)
    optimizer = opt(model.parameters())
    loss_fn = torch.nn.CrossEntropyLoss()
    x = torch.rand((batch,) + shape)
    y = torch.randint(0, 10, (batch,))

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.item()
    return step


def torch_forward(kind: str, batch: int):
    import torch
    make, shape, _ = torch_models()[kind]
    model = make().eval()
    x = torch.rand((batch,) + shape)

    def step():
        with torch.no_grad():
            return model(x)
    return step


# --- the run ---------------------------------------------------------------------------------

SECTIONS = ("gemm", "training", "recurrent", "inference", "compile", "roofline", "shared")
# (label, model file, batch): the training workloads measured against the roofline
ROOFLINE = [("mlp_b128", "mlp784.dln", 128), ("mlp_b8", "mlp784.dln", 8), ("lenet_b64", "lenet28.dln", 64),
            ("cnn_b64", "cifar_cnn.dln", 64), ("wide_mlp_b128", "wide_mlp.dln", 128),
            ("resnet_b64", "resnet_cifar.dln", 64), ("dilated_b32", "dilated.dln", 32), ("lstm_b32", "lstm32.dln", 32),
            ("transformer_b32", "transformer.dln", 32)]

PINNED_BELOW = 8  # training workloads of this batch or smaller are also timed with dlc pinned to torch's threads

TARGETS = {  # workload -> target ratio dlc / torch eager
    "mlp_b128": 0.7, "lenet_b64": 0.7, "lstm_b32": 0.7, "mlp_b8": 1 / 3, "mlp_b1": 1 / 3,
    "cnn_b64": 0.7, "wide_mlp_b128": 0.7, "resnet_b64": 0.7, "transformer_b32": 0.7, "mobilenet_b64": 0.7,
    "dilated_b32": 0.7, "wavenet_b16": 0.7,
    "lstm_T32": 0.8, "lstm_T128": 0.8, "lstm_T512": 0.8, "gru_T128": 0.8,
}
RECURRENT = [("lstm", 32), ("lstm", 128), ("lstm", 512), ("gru", 128)]  # (layer, time steps)
RECURRENT_COMPILE_TARGET = 2.0  # seconds, cold, at every T


def recurrent_source(layer: str, steps: int) -> str:
    """A recurrent classifier: T steps of 32 features, hidden 128, batch 32, Adam."""
    return (f"model {layer}{steps}(x: f32[B, {steps}, 32]) -> f32[B, 10] {{\n"
            f"    h = x |> {layer}(128)\n    return dense(h, 10)\n}}\n\n"
            f"train {layer}{steps} {{\n    data = arrays()\n    loss = cross_entropy(output, label)\n"
            f"    optimizer = adam(lr=1e-3)\n    batch = 32\n}}\n")


class StealMeter:
    """The share of this machine's CPU time its host gave to others while each section ran
    ("steal" in /proc/stat: a virtual CPU that was ready to run and did not). A section
    whose ratios moved with a few percent of steal was timed on a slowed machine, which a
    two-thread step that meets at barriers feels more than PyTorch's. (No shares where
    there is no /proc/stat.)"""

    def __init__(self):
        self.shares: dict[str, float] = {}
        self._open: tuple[str, list[int]] | None = None

    @staticmethod
    def _ticks() -> list[int] | None:
        try:  # cpu  user nice system idle iowait irq softirq steal ...
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
            return [int(f) for f in fields[:8]]
        except (OSError, ValueError, IndexError):
            return None

    def start(self, name: str) -> None:
        """Ends the section before, begins `name`."""
        self.stop()
        ticks = self._ticks()
        if ticks is not None and len(ticks) == 8:
            self._open = (name, ticks)

    def stop(self) -> None:
        if self._open is None:
            return
        name, before = self._open
        self._open = None
        after = self._ticks()
        spent = [a - b for a, b in zip(after or before, before)]
        if sum(spent) > 0:
            self.shares[name] = spent[7] / sum(spent)
            print(f"  (the host took {100 * self.shares[name]:.1f}% of the CPU time while {name} ran: steal)")


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats (for a smoke test)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for dlc and torch (default: each side's own default -- dlc's `auto`, which "
                         "picks each step's count from its work and checks it while the steps run, and "
                         "PyTorch's every core)")
    ap.add_argument("--out", default=str(HERE / "results.json"), help="where to write the figures")
    ap.add_argument("--only", choices=SECTIONS, help="run one section only")
    ap.add_argument("--workloads", default=None,
                    help="training workloads whose name contains one of these (comma separated); "
                         "with no --only, runs the training section only")
    args = ap.parse_args()
    if args.workloads and args.only is None:
        args.only = "training"

    def section(name: str) -> bool:
        return args.only in (None, name)
    steal = StealMeter()
    threads = args.threads or os.cpu_count()  # PyTorch's, and the roofline's ceilings'
    dlc_threads = args.threads  # None: dlc's default, `auto`
    repeats, scale = (3, 0.3) if args.quick else (7, 1.0)
    try:
        import torch
        torch.set_num_threads(threads)
        have_torch = True
    except ImportError:
        print("torch is not installed: timing dlc and numpy only (pip install torch==2.13.0)")
        have_torch = False
    from dlc import backends
    info = {"machine": platform.machine(), "cpu": backends.backend("cpu").target({"threads": dlc_threads}).describe(), "python": platform.python_version(),
            "numpy": np.__version__, "dlc": dlc.__version__, "threads": threads,
            "dlc_threads": dlc_threads or "auto",
            "torch": torch.__version__ if have_torch else None,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    print(f"dlc {info['dlc']} on {info['cpu']}; numpy {info['numpy']}; torch {info['torch']}; "
          f"load average {info['load_average']}; torch on {threads} threads")
    rows = []

    def record(name, dlc_s, peer_name, peer_s, target=None, ratio=None):
        ratio = ratio if ratio is not None else dlc_s / peer_s if peer_s else None
        rows.append({"workload": name, "dlc_ms": dlc_s * 1e3, "peer": peer_name,
                     "peer_ms": peer_s * 1e3 if peer_s else None, "ratio": ratio, "target": target,
                     "met": None if target is None or ratio is None else ratio <= target})
        shown = f"{ratio:.2f}x" if ratio else "-"
        print(f"  {name:<22} dlc {dlc_s * 1e3:9.3f} ms   {peer_name:<14} "
              f"{peer_s * 1e3 if peer_s else float('nan'):9.3f} ms   dlc/peer {shown}")

    if section("gemm"):
        steal.start("gemm")
        # GEMM against numpy's BLAS (forward of a one-matmul model)
        print("GEMM (float32, N x N @ N x N)")
        for n in (256, 512, 1024, 2048):
            path = gemm_model(n)
            steps = max(1, int((40 if n <= 512 else 8 if n == 1024 else 2) * scale))
            a = np.random.rand(n, n).astype(np.float32)
            b = np.random.rand(n, n).astype(np.float32)
            (d, p), (_, r) = interleaved([dlc_forward(path, n, dlc_threads), lambda: a @ b], steps, repeats,
                                         pause=0.15)
            record(f"gemm_{n}", d, "numpy BLAS", p, 1 / 0.9 if n == 1024 else None, ratio=r)

    if section("training"):
        steal.start("training")
        print("training steps")
        workloads = [("mlp_b128", "mlp784.dln", "mlp", 128, 50), ("mlp_b8", "mlp784.dln", "mlp", 8, 200),
                     ("mlp_b1", "mlp784.dln", "mlp", 1, 300), ("lenet_b64", "lenet28.dln", "lenet", 64, 30),
                     ("lstm_b32", "lstm32.dln", "lstm", 32, 20),
                     ("cnn_b64", "cifar_cnn.dln", "cifar_cnn", 64, 4),
                     ("wide_mlp_b128", "wide_mlp.dln", "wide_mlp", 128, 4),
                     ("resnet_b64", "resnet_cifar.dln", "resnet", 64, 3),
                     ("mobilenet_b64", "mobilenet.dln", "mobilenet", 64, 4),
                     ("dilated_b32", "dilated.dln", "dilated", 32, 4),
                     ("wavenet_b16", "wavenet.dln", "wavenet", 16, 20),
                     ("transformer_b32", "transformer.dln", "transformer", 32, 10)]
        for name, file, kind, batch, steps in workloads:
            if args.workloads and not any(o in name for o in args.workloads.split(",")):
                continue
            steps = max(2, int(steps * scale))
            dlc_step = dlc_train_step(HERE / "models" / file, batch, dlc_threads)
            if have_torch:
                # dlc and torch blocks alternate; the ratio is the median of adjacent blocks'
                (d, t), (_, r) = interleaved([dlc_step, torch_train_step(kind, batch)], steps, repeats)
                record(name, d, "torch eager", t, TARGETS.get(name), ratio=r)
                if dlc_threads is None and batch <= PINNED_BELOW:
                    # where `auto` matters most: dlc pinned to PyTorch's thread count as well
                    pinned = dlc_train_step(HERE / "models" / file, batch, threads)
                    (d, t), (_, r) = interleaved([pinned, torch_train_step(kind, batch)], steps, repeats)
                    record(f"{name}_{threads}threads", d, "torch eager", t, ratio=r)
                if args.compile:
                    try:
                        (d, c), (_, r) = interleaved([dlc_step, torch_train_step(kind, batch, compiled=True)],
                                                     steps, repeats)
                        record(name, d, "torch.compile", c, ratio=r)
                    except Exception as e:  # torch.compile needs a C++ compiler and may fail
                        print(f"  {name}: torch.compile failed: {type(e).__name__}: {str(e)[:80]}")
            else:
                record(name, median_time(dlc_step, steps, repeats), "-", None)

    if section("recurrent"):
        steal.start("recurrent")
        print("recurrent layers: training step (blocks interleaved with PyTorch's; median ratio) and cold compile")
        for layer, steps in RECURRENT:
            name = f"{layer}_T{steps}"
            path = Path(tempfile.mkdtemp()) / f"{layer}{steps}.dln"
            path.write_text(recurrent_source(layer, steps))
            cold, _, _ = compile_times(path, dlc_threads)
            n = max(3, int(512 // steps * scale))
            dlc_step = dlc_train_step(path, 32, dlc_threads)
            if have_torch:
                (d, t), (_, r) = interleaved([dlc_step, torch_train_step(name, 32)], n, repeats)
                record(name, d, "torch eager", t, TARGETS.get(name), ratio=r)
            else:
                record(name, median_time(dlc_step, n, repeats), "-", None)
            compile_ok = "met" if cold <= RECURRENT_COMPILE_TARGET else "missed"
            print(f"  {name:<22} cold compile {cold:6.2f} s   (target <= {RECURRENT_COMPILE_TARGET:.0f} s: "
                  f"{compile_ok})")
            rows[-1].update(cold_compile_s=cold)

    if section("inference"):
        steal.start("inference")
        print("inference")
        steps = max(2, int(300 * scale))
        d = median_time(dlc_forward(HERE / "models" / "mlp784.dln", 1, dlc_threads), steps, repeats)
        t = median_time(torch_forward("mlp", 1), steps, repeats) if have_torch else None
        record("mlp_infer_b1", d, "torch eager" if have_torch else "-", t)

    compile_rows, shared, roofline_rows = [], [], []
    if section("compile"):
        steal.start("compile")
        print("compile time (load .dln -> training step ready)")
        for file in ("mlp784.dln", "lenet28.dln", "lstm32.dln", "cifar_cnn.dln", "resnet_cifar.dln", "mobilenet.dln",
                     "dilated.dln", "wavenet.dln", "transformer.dln"):
            cold, warm, each = compile_times(HERE / "models" / file, dlc_threads)
            quick, optimized = quick_start_times(HERE / "models" / file, dlc_threads)
            compile_rows.append({"model": file, "cold_s": cold, "cold_s_each": each, "warm_s": warm,
                                 "quick_start_ready_s": quick, "quick_start_optimized_s": optimized})
            print(f"  {file:<14} cold {cold:6.2f} s ({min(each):.2f}-{max(each):.2f})   warm (cache) {warm:6.3f} s   "
                  f"--quick-start: ready {quick:5.2f} s, optimized code in use {optimized:5.2f} s")

    if section("roofline"):
        steal.start("roofline")
        import roofline
        n = 1024
        gemm_rate = n ** 3 / median_time(dlc_forward(gemm_model(n), n, threads), max(2, int(8 * scale)), repeats)
        bytes_rate = roofline.bandwidth(threads)
        print(f"roofline (kernel time per training step; ceilings: dlc's GEMM {gemm_rate / 1e9:.1f} G multiply-adds/s, "
              f"copy bandwidth {bytes_rate / 1e9:.1f} GB/s on {threads} threads)")
        for label, file, batch in ROOFLINE:
            measured = roofline.profile(HERE / "models" / file, batch, threads, max(3, int(20 * scale)))
            roofline_rows.append(roofline.report(label, measured, gemm_rate, bytes_rate))
        roofline_rows.insert(0, {"gemm_multiply_adds_per_s": gemm_rate, "copy_bytes_per_s": bytes_rate})

    if section("shared"):
        steal.start("shared")
        print("shared machine (MLP 784-512-256-10 batch 8, one training step; load before: "
              f"{_loadavg()})")
        shared = shared_machine(HERE / "models" / "mlp784.dln", 8, max(2, int(200 * scale)), repeats)

    steal.stop()
    info["steal"] = steal.shares
    Path(args.out).write_text(json.dumps({"info": info, "rows": rows, "compile": compile_rows,
                                          "roofline": roofline_rows, "shared_machine": shared}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
