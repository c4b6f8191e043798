"""LLVM services: verify and optimize a module for a Target, emit object code, and load
object code into an MCJIT engine (no recompilation: the disk cache and `dlc compile -o`
artifacts store object code)."""
from __future__ import annotations

import contextlib
import mmap
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

import llvmlite.binding as llvm
from llvmlite import ir

from .target import Target, _init_llvm


@dataclass
class Compiled:
    objects: list[bytes]
    seconds_optimize: float   # summed over the modules (they run in parallel)
    seconds_codegen: float


def _compile_one(module: ir.Module, target: Target, pipeline: str = "O3",
                 lsr: bool = False) -> tuple[bytes, float, float]:
    llmod, tm, optimizing = _optimized(module, target, pipeline)
    start = time.perf_counter()
    obj = _machine_code(tm.emit_object, llmod, lsr)
    return obj, optimizing, time.perf_counter() - start


def _optimized(module: ir.Module, target: Target, pipeline: str = "O3"):
    """The module parsed, verified and optimized by PIPELINES[pipeline]: (LLVM's module,
    the target machine for its code, seconds spent optimizing)."""
    _init_llvm()
    llmod = llvm.parse_assembly(str(module))  # printing a large module takes a while: each process its own
    llmod.verify()
    tm = target.machine(opt=1 if pipeline == "quick" else 3)
    start = time.perf_counter()
    PIPELINES[pipeline](llmod, tm)
    return llmod, tm, time.perf_counter() - start


def _pipeline(i: int, pretuned: frozenset, quick: bool = False) -> str:
    """The pipeline for module i: the quick tier's for quick code, else PRETUNED_PASSES
    for the modules numbered in `pretuned`, O3 for the others."""
    return "quick" if quick else "pretuned" if i in pretuned else "O3"


def _machine_code(emit: Callable, llmod, lsr: bool):
    """emit(llmod) (object code or assembly) with LLVM's loop strength reduction only where
    `lsr` asks for it: a module holding a GEMM. Elsewhere it was 11% of the residual
    network's LLVM time, and every benchmark model's step measured within noise without
    it (AVX-512 and AVX2); with none at all the wide MLP's step was 4% slower
    (docs/performance.md, "Compile time"). The switch is one of LLVM's global options,
    set for each module: each compiler process compiles one module at a time."""
    llvm.set_option("dlc", f"-disable-lsr={str(not lsr).lower()}")
    try:
        return emit(llmod)
    finally:
        llvm.set_option("dlc", "-disable-lsr=false")  # LLVM's default, for anyone else in this process


def _optimize(llmod, tm) -> None:
    """LLVM's O3 pipeline with both vectorizers (without its loop unrolling, LLVM time is
    15% less and the MLP's training step 18% slower)."""
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pto.loop_vectorization = True
    pto.slp_vectorization = True
    pb = llvm.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(llmod, pb)


# The quick tier's passes: locals into registers, the cheap scalar clean-ups and redundant
# loads; no loop passes, no vectorizer (the emitters vectorize the hot loops themselves).
# Measured against no pass at all: compile time within noise, the residual network's step
# 22 -> 18.5 ms, the MLP's 2.9 -> 1.8 ms (O3: 14.7 and 0.7 ms; since the GEMM's
# accumulators are allocated in its entry block, the MLP's quick step is the O3 step's);
# LLVM's O1 pipeline costs about what O3 does here. None of them may change a result: the kernels carry no
# fast-math flag, so every pipeline computes the same bits (test_backend_cpu.py).
QUICK_PASSES = ("always_inliner", "sroa", "instruction_combine", "simplify_cfg", "sccp",
                "dead_code_elimination", "new_gvn")


def _quick(llmod, tm) -> None:
    _passes(llmod, tm, QUICK_PASSES)


# The passes for code whose emitters vectorized and unrolled it themselves (the
# convolutions, and the loop nests they vectorize whole: codegen._pretuned): the quick
# tier's but NewGVN, then LLVM's full unrolling of the loops left with a few iterations
# (without it LeNet-5's step was 22% slower: its data gradient's col2im 2.4x); machine
# code at level 3, not the quick tier's 1. Against O3, for the convolutions: LLVM CPU -24%
# on the residual network, -13% on the CIFAR CNN, -9% on LeNet-5; the nests a further -22%
# on the residual network; steps within noise (docs/performance.md, "Compile time").
# NewGVN was 7% of these modules' LLVM time and changed their machine code by a few
# addressing modes (the emitters hoist what it would find): the residual network's cold
# compile 5% sooner without it, its step, the CNN's, LeNet-5's and the LSTM's within noise.
PRETUNED_PASSES = tuple(p for p in QUICK_PASSES if p != "new_gvn") + (
    "loop_simplify", "loop_rotate", "loop_unroll", "instruction_combine", "simplify_cfg")


def _pretuned(llmod, tm) -> None:
    _passes(llmod, tm, PRETUNED_PASSES)


def _passes(llmod, tm, names) -> None:
    mpm = llvm.create_new_module_pass_manager()
    for name in names:
        getattr(mpm, f"add_{name}_pass")()
    mpm.run(llmod, llvm.create_pass_builder(tm, llvm.create_pipeline_tuning_options(speed_level=1)))


PIPELINES = {"O3": _optimize, "quick": _quick, "pretuned": _pretuned}
# LLVM's time per instruction of each pipeline, O3's as 1 (the residual network's modules;
# it orders the compile queue)
PIPELINE_COST = {"O3": 1.0, "quick": 0.4, "pretuned": 0.5}


def compile_workers() -> int:
    """Processes that compile modules at once: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def compile_modules(modules: list[ir.Module], target: Target, workers: int | None = None,
                    sizes: list[int] | None = None, quick: bool = False, lsr: frozenset = frozenset(),
                    pretuned: frozenset = frozenset()) -> Compiled:
    """Optimize and emit every module (ModuleCompiler, all in one batch)."""
    compiler = ModuleCompiler(target, workers, quick)
    compiler.add(modules, sizes, pretuned, lsr)
    return compiler.finish()


def can_fork() -> bool:
    import multiprocessing
    return "fork" in multiprocessing.get_all_start_methods()


class ModuleCompiler:
    """Optimizes and emits modules, batch after batch as they are built: with the quick
    tier's passes if `quick`, else those numbered in a batch's `pretuned` with
    PRETUNED_PASSES and the others with LLVM's O3; those numbered in `lsr` with LLVM's
    loop strength reduction (_machine_code).

    llvmlite serializes its calls behind one lock, so threads would not overlap: `workers`
    processes compile at once, this one and forked children (which inherit the modules
    built so far and an initialized LLVM, and need no imports). Each batch (`add`) is a
    queue, its costliest modules first (`sizes` in instructions, weighed by PIPELINE_COST:
    the modules' LLVM costs differ several-fold and are hard to predict, and a queue of
    several modules per process keeps the processes busy until the end). Children start on
    a batch as soon as it is added, while this process builds the next one
    (ModuleBuilder.build). A child takes from the queues of the batches it was forked
    after, the latest first, until they are empty; when a later batch is added, children
    forked for it take over from the earlier ones, which stop after the module they are
    on (they could not take the later modules: they do not have them). `finish` has this
    process take modules too. (An earlier child instead ending only when its queues were
    empty left a core idle until this process, busy compiling, noticed it: the residual
    network's 70 ms.)"""

    def __init__(self, target: Target, workers: int | None = None, quick: bool = False):
        _init_llvm()
        self.target, self.quick = target, quick
        self.workers = workers or compile_workers()
        self.jobs: list[tuple[ir.Module, str, bool]] = []  # (module, pipeline, lsr) in order added
        self.queues: list[int] = []  # per batch: the reading end of its queue
        self.children: list[tuple[int, int]] = []  # (pid, the reading end of its result pipe)
        self.results: dict = {}
        self.failure: str | None = None
        self._stop: mmap.mmap | None = None  # shared with the latest batch's children: 1 stops them

    def add(self, modules: list[ir.Module], sizes: list[int] | None = None, pretuned: frozenset = frozenset(),
            lsr: frozenset = frozenset()) -> None:
        """A batch: those of the built `modules` not added before (`sizes`, and the
        positions in `pretuned` and `lsr`, are the list's)."""
        first = len(self.jobs)
        known = {id(job[0]) for job in self.jobs}
        new = [i for i, m in enumerate(modules) if id(m) not in known]
        self.jobs += [(modules[i], _pipeline(i, pretuned, self.quick), i in lsr) for i in new]
        sizes = [sizes[i] for i in new] if sizes else None
        if self.workers == 1 or not new or not can_fork():
            return  # finish() compiles them
        order = sorted(range(first, len(self.jobs)),
                       key=lambda j: -sizes[j - first] * PIPELINE_COST[self.jobs[j][1]]) if sizes else \
            range(first, len(self.jobs))
        queue, fill = os.pipe()
        os.write(fill, b"".join(j.to_bytes(4, "little") for j in order))
        os.close(fill)  # an empty queue then reads as the end
        self.queues.append(queue)
        if self._stop is not None:
            self._stop[0] = 1
        self._stop = stop = mmap.mmap(-1, 1)
        held = self.queues[::-1]
        for _ in range(min(self.workers - 1, sum(_queued(q) for q in self.queues))):
            self.children.append(_spawn(lambda: _take_modules(held, self._one, stop)))

    def _one(self, j: int) -> tuple[bytes, float, float]:
        module, pipeline, lsr = self.jobs[j]
        return _compile_one(module, self.target, pipeline, lsr)

    def finish(self, order: list[ir.Module] | None = None) -> Compiled:
        """Every module's object: in the order the modules were added, or in `order`."""
        try:
            if not self.queues:
                self.results = {j: self._one(j) for j in range(len(self.jobs))}
            self.results.update(_take_modules(self.queues[::-1], self._one))
        except Exception as e:  # noqa: BLE001 - raised once the children are collected
            self.failure = repr(e)
        finally:
            self._close_queues()
        while self.children:
            self._collect(*self.children.pop())
        if self.failure is not None or len(self.results) != len(self.jobs):
            raise RuntimeError(f"compiling a module failed: {self.failure or 'a module was not compiled'}")
        jobs = range(len(self.jobs))
        if order is not None:
            added = {id(job[0]): j for j, job in enumerate(self.jobs)}
            jobs = [added[id(m)] for m in order]
        done = [self.results[j] for j in jobs]
        return Compiled([r[0] for r in done], sum(r[1] for r in done), sum(r[2] for r in done))

    def _collect(self, pid: int, read: int) -> None:
        status, value = _outcome(pid, read)
        if status == "ok":
            self.results.update(value)
        else:
            self.failure = self.failure or value

    def cancel(self) -> None:
        """The children stopped and collected (the build failed before `finish`)."""
        import signal
        self._close_queues()
        for pid, read in self.children:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            _outcome(pid, read)
        self.children = []

    def _close_queues(self) -> None:
        for queue in self.queues:
            os.close(queue)
        self.queues = []


def _queued(queue: int) -> int:
    """Modules left in a queue (the bytes its pipe holds, as FIONREAD reports them)."""
    import fcntl
    import termios
    return int.from_bytes(fcntl.ioctl(queue, termios.FIONREAD, bytes(4)), "little") // 4


def _take_modules(queues: list[int], one: Callable, stop: mmap.mmap | None = None) -> dict:
    """Compile module after module, one(index), from each queue in turn (a pipe of 4-byte
    indices, each read whole by one process) until they are empty, or until `stop` is set:
    {index: result}."""
    done = {}
    for queue in queues:
        while not (stop is not None and stop[0]) and len(item := os.read(queue, 4)) == 4:
            i = int.from_bytes(item, "little")
            done[i] = one(i)
    return done


def _spawn(fn: Callable, detach: bool = False, send_exception: bool = False,
           close: tuple = ()) -> tuple[int, int]:
    """fn() in a forked child, which sends ("ok", its result) or ("error", why) pickled
    through a pipe and leaves without running any of this process's Python cleanup:
    (its pid, the pipe's reading end; _outcome reads it). `send_exception`: an exception
    fn raised is sent as ("raise", it) where it can be pickled. `detach`: the child may
    outlive this process, so it keeps none of its files and leads a process group of its
    own (both sides set it: a kill may come before the child runs). `close`: this
    process's descriptors the child closes first (the writing end of a pipe to it)."""
    import pickle
    read, write = os.pipe()
    pid = _fork()
    if pid == 0:
        try:
            for fd in close:
                os.close(fd)
            if detach:
                _keep_only(write)
                os.setpgid(0, 0)
            else:
                os.close(read)
            payload = pickle.dumps(("ok", fn()))
        except BaseException as e:  # noqa: BLE001 - reported by the parent
            try:
                payload = pickle.dumps(("raise", e) if send_exception else ("error", repr(e)))
            except Exception:  # noqa: BLE001 - an exception that cannot be pickled
                payload = pickle.dumps(("error", repr(e)))
        try:
            with os.fdopen(write, "wb") as f:
                f.write(payload)
        finally:  # (a reader that is gone is no error)
            os._exit(0)
    os.close(write)
    if detach:
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)
    return pid, read


def _outcome(pid: int, read: int) -> tuple[str, object]:
    """What a _spawn child sent, once it has exited: ("ok", result) or ("error", why)."""
    import pickle
    with os.fdopen(read, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        how = f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else \
            f"exit status {os.WEXITSTATUS(status)}"
        return "error", f"the compiler process died ({how})"
    try:
        return pickle.loads(data)
    except Exception as e:  # noqa: BLE001 - a cut-off payload
        return "error", f"its result could not be read ({e!r})"


def in_child(fn: Callable, feed: Callable[[], object] | None = None):
    """fn()'s result, computed by a forked child (_spawn) while this process waits; an
    exception it raised is raised here (as it was, where it can be pickled). With `feed`,
    the child runs fn(receive) while this process computes feed(), and receive() there
    returns feed()'s value (pickled through a pipe; it waits for it). A value that
    cannot be pickled raises Unsent here, with the value (the child is stopped)."""
    _init_llvm()
    fed = os.pipe() if feed is not None else None
    work = fn if fed is None else (lambda: fn(lambda: _receive(fed[0])))
    pid, read = _spawn(work, send_exception=True, close=fed[1:] if fed else ())
    try:
        if fed is not None:
            os.close(fed[0])
            try:
                value = feed()
            except BaseException:
                os.close(fed[1])
                raise
            _send(fed[1], value)
        status, value = _outcome(pid, read)
    except BaseException:
        import signal
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        raise
    if status == "raise":
        raise value
    if status != "ok":
        from dlc.core.diagnostics import DlcError
        raise DlcError(f"compiling the step failed: {value}",
                       hint="out of memory, or a bug in dlc or LLVM: `dlc compile --verbose` shows how far it got")
    return value


class Unsent(Exception):
    """in_child's feed made a value that could not be pickled for the child: `value`."""

    def __init__(self, value, why: str):
        super().__init__(why)
        self.value = value


def _send(write: int, value) -> None:
    """value pickled into the pipe, which is then closed (a child that has gone: no error;
    _outcome says why it went)."""
    import pickle
    with os.fdopen(write, "wb") as f:
        try:
            data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, RecursionError, TypeError, AttributeError) as e:
            raise Unsent(value, repr(e)) from None
        with contextlib.suppress(BrokenPipeError):
            f.write(data)


def _receive(read: int):
    """What the other end of the pipe sent (_send), once it has all come."""
    import pickle
    with os.fdopen(read, "rb") as f:
        data = f.read()
    if not data:
        raise RuntimeError("the compiling process sent nothing: it stopped")
    return pickle.loads(data)


class ForkedJob:
    """fn() run by a detached forked process (_spawn) while this one goes on (the child
    forks again, for its compiler workers, single-threaded); cancel() stops it and its
    workers. `cores`: how many cores it keeps busy; `ForkedJob.busy` counts them over the
    jobs still running (the steps of this process leave them alone)."""
    busy = 0
    _count = threading.Lock()

    def __init__(self, fn: Callable, cores: int = 1):
        _init_llvm()
        self.pid, read = _spawn(fn, detach=True)
        self.cores = cores
        with ForkedJob._count:
            ForkedJob.busy += cores
        self._outcome: tuple | None = None
        self._done = threading.Event()
        threading.Thread(target=self._collect, args=(read,), name="dlc-optimize", daemon=True).start()

    def _collect(self, read: int) -> None:
        self._outcome = _outcome(self.pid, read)
        with ForkedJob._count:
            ForkedJob.busy -= self.cores
        self._done.set()

    def ready(self) -> bool:
        return self._done.is_set()

    def result(self):
        self._done.wait()
        status, value = self._outcome
        if status != "ok":
            raise RuntimeError(value)
        return value

    def cancel(self) -> None:
        if not self._done.is_set():
            import signal
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)


def _keep_only(fd: int) -> None:
    """In a forked child that may outlive its parent: every file but `fd` closed, and the
    standard streams on /dev/null (a pipe the parent's output goes to, `dlc run | tee`,
    ends when the parent does)."""
    null = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):
        os.dup2(null, std)
    os.closerange(3, fd)
    os.closerange(fd + 1, os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 1024)


def _fork() -> int:
    """os.fork() holding llvmlite's lock, so that no other thread of this process is inside
    LLVM at that moment: the child would inherit LLVM's state half-changed, and the lock
    held by a thread it does not have, and wait for it forever (a test run hung so: a
    compile forked on `fit`'s background thread while another thread was in llvmlite)."""
    with _llvm_lock():
        return os.fork()


def _llvm_lock():
    """llvmlite's own lock around every LLVM call (a private attribute: without it, no lock)."""
    from llvmlite.binding import ffi
    return getattr(ffi.lib, "_lock", None) or contextlib.nullcontext()


def compile_ir_text(text: str, target: Target) -> bytes:
    """Object code for a module written as LLVM IR text (the worker pool)."""
    _init_llvm()
    llmod = llvm.parse_assembly(text)
    llmod.verify()
    tm = target.machine()
    pb = llvm.create_pass_builder(tm, llvm.create_pipeline_tuning_options(speed_level=2))
    pb.getModulePassManager().run(llmod, pb)
    return tm.emit_object(llmod)


def optimized_ir(modules: list[ir.Module], target: Target, pretuned: frozenset = frozenset()) -> str:
    """LLVM IR after the optimizer (`--dump-ir=llvm-opt`), module by module as compiled."""
    return "\n".join(str(_optimized(m, target, _pipeline(i, pretuned))[0]) for i, m in enumerate(modules))


def assembly(modules: list[ir.Module], target: Target, lsr: frozenset = frozenset(),
             pretuned: frozenset = frozenset()) -> str:
    """Optimized machine code as text (`--dump-ir=asm`), module by module as compiled."""
    texts = []
    for i, module in enumerate(modules):
        llmod, tm, _ = _optimized(module, target, _pipeline(i, pretuned))
        texts.append(_machine_code(tm.emit_assembly, llmod, i in lsr))
    return "\n".join(texts)


_process_ready = False


def process_symbol(name: str) -> bool:
    """Whether MCJIT would find `name` in this process (the C library, mostly)."""
    global _process_ready
    if not _process_ready:  # creating an engine makes the process's own symbols searchable
        _init_llvm()
        llvm.create_mcjit_compiler(llvm.parse_assembly(""), llvm.Target.from_default_triple().create_target_machine())
        _process_ready = True
    return bool(llvm.address_of_symbol(name))


class Engine:
    """Object code loaded into an MCJIT engine; function addresses by name."""

    def __init__(self, objects, target: Target):
        _init_llvm()
        empty = llvm.parse_assembly(f'target triple = "{target.triple}"\n')
        self._engine = llvm.create_mcjit_compiler(empty, target.machine())
        objects = [objects] if isinstance(objects, bytes) else list(objects)
        # the step's object (the first) refers to the kernels in the others: load those
        # first, or MCJIT binds the calls before their definitions are known
        for obj in reversed(objects):
            self._engine.add_object_file(llvm.ObjectFileRef.from_data(obj))
        self._engine.finalize_object()

    def address(self, name: str) -> int:
        addr = self._engine.get_function_address(name)
        if not addr:
            raise RuntimeError(f"compiled code has no function {name!r}")
        return addr
