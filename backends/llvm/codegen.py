"""Kernel IR -> LLVM modules: one function per kernel part (rendered by emit.py, or by a
template in templates.py), and one step function per program.

The step function `dlc_step(ptr table, i32 tid, i32 nthreads)` runs every kernel part in
phase order with a barrier between phases; every thread runs it (SPMD). Its buffers are
table[0] = arena, table[1] = barrier state, table[2] = scratch, table[3] = profile
counters, table[4] = the host's collective function, then one slot per input/state
buffer in `Layout.slots` order.

A kernel-IR Loop is a loop in the step function: at each t it computes the addresses of
the loop's views and calls the body's parts (functions like any other, taking the views
as pointers), with a barrier after each body phase -- so the code is the same size for
any T.

A Collective part (a data-parallel job's exchange) is a call from thread 0 to the host
function, `void host(i32 bucket, i32 mode)` (mode: COLLECTIVE_MODES' index), through
table[4]; the runtime (runtime.py) runs the exchange on the bucket's buffers and returns.
"""
from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Callable

from llvmlite import ir

from dlc.core.kernel import COLLECTIVE_MODES, Buffer, Collective, KernelProgram, Loop, LoopNest, Template, all_kernels
from dlc.core.kernel import buffers_of as kernel_buffers
from dlc.core.types import DType

from .barrier import emit_barrier, team_words
from .emit import Emitter, emit_nest
from .jit import compile_workers
from .irutil import I1, I8, I32, I64, PTR, VOID, byte_size, gep, i32, i64, loop, memory_type, set_target
from .templates import PRETUNED_TEMPLATES, emit_template

FIXED_SLOTS = 5  # arena, barrier, scratch, profile, host collective function
# templates that use the per-thread scratch space (GEMM and im2col packing)
SCRATCH_TEMPLATES = frozenset({"matmul", "batch_matmul", "conv2d", "conv2d_bwd_data", "conv2d_bwd_filter"})
TEAM_TEMPLATES = frozenset({"conv2d_bwd_filter"})  # they get `__team__` (barrier.team_words)
# Loop nests with fewer iterations than this (reductions counted in), and serial ones, are
# optimized for size: LLVM neither unrolls nor interleaves them (they gain nothing from it,
# and at O3 a tiny loop with a static trip count becomes a page of unrolled code).
LIGHT_BELOW = 1024
# Modules per compiler process: LLVM's time per module varies several-fold with what the
# kernels are (a convolution's packer costs far more per instruction than a loop nest),
# so a few modules each, taken from a queue largest first, keep the processes equally
# busy (LeNet-5: 3.6 s -> 2.9 s to a ready step on 2 cores, medians of 7 runs)
MODULES_PER_WORKER = 4


def is_light(part) -> bool:
    """A part compiled with `optsize`: a small or serial loop nest."""
    if not isinstance(part, LoopNest):
        return False
    from .threads import _nest_elements
    return part.serial or not part.outer or _nest_elements(part) < LIGHT_BELOW


@dataclass
class Layout:
    """Where every buffer lives at run time."""

    slots: list[str] = field(default_factory=list)  # table slot (after FIXED_SLOTS) -> buffer name
    scratch_bytes: int = 0                          # per thread (GEMM packing)

    def slot(self, name: str) -> int:
        return FIXED_SLOTS + self.slots.index(name)


# --- the module ------------------------------------------------------------------------------------

def buffers_of(part) -> list[Buffer]:
    """The buffers a part's function takes: the kernel IR's, plus per-thread packing
    space for the GEMM."""
    out = kernel_buffers(part)
    if isinstance(part, Template) and part.op in SCRATCH_TEMPLATES:
        out.append(Buffer("__scratch__", DType.f32, (0,), "scratch"))
    if isinstance(part, Template) and part.op in TEAM_TEMPLATES:
        out.append(Buffer("__team__", DType.f32, (0,), "team"))
    return out


class ModuleBuilder:
    """Builds the LLVM modules of a KernelProgram (one step function, `dlc_step`), or of
    several programs compiled as one unit ({entry: program}: one `dlc_step_<entry>` each,
    e.g. a training and an evaluation step). The kernel parts are spread over `pieces`
    modules of similar size (LLVM optimizes them in parallel, a few per core); a part whose
    function comes out identical to one already built (the same kernel in both entries,
    or twice in one: the same layer shape) is not built again: both calls go to one
    function. Module 0 also holds the step functions, which call the parts.

    Programs given as None come later (add_programs): build_first builds the others'
    parts into a quarter of the modules and hands those over, to be compiled while the
    rest is made."""

    def __init__(self, program, target, name: str = "dlc", profile: bool = False,
                 pieces: int | None = None, tag: str | None = None):
        self.programs = dict(program) if isinstance(program, dict) else {"": program}
        self.program = next(p for p in self.programs.values() if p is not None)
        self.target = target
        self.modules = []
        pieces = max(1, pieces or MODULES_PER_WORKER * compile_workers())
        # `pieces` modules for LLVM's O3, then as many for the parts whose emitters tuned
        # their code themselves (_pretuned), which get a shorter pipeline (jit)
        for i in range(2 * pieces):
            mod = ir.Module(name=f"{name}.{i}")
            mod.triple = target.triple
            self.modules.append(mod)
        self._pools = (range(pieces), range(pieces, 2 * pieces))
        self.step_module = self.module = self.modules[0]  # the module being filled (templates add GEMMs to it)
        self.sizes = [0] * len(self.modules)  # instructions per module (to fill the emptiest)
        self.layout = Layout(slots=list(self.program.inputs) + list(self.program.state))
        self.profile = profile
        # per entry: (phase, kernel, fn, buffers) in call order
        self.entry_parts: dict[str, list[tuple[int, str, ir.Function, list[Buffer]]]] = {}
        self.parts = []  # the first entry's (a single program's)
        self.entry_calls: dict[str, list] = {}  # per entry: what its step calls (ModuleBuilder._functions)
        self.gemms: dict = {}  # (module index, spec, tile epilogue key) -> GemmInfo: one function each
        self.shared = 0  # parts that reuse an identical function
        self.lsr = frozenset()  # the modules that hold a GEMM (jit._machine_code), once built
        self.pretuned = frozenset()  # the modules of _pretuned parts (jit), once built
        self._by_key: dict = {}
        self._built: dict = {}  # name -> function: the parts build(finished=...) built first
        self.closed: set = set()  # those modules: nothing more goes there
        self._helpers: dict = {}  # key -> function (ModuleBuilder.helper)
        self._names: dict = {}  # prefix -> last number (ModuleBuilder.fresh_name)
        # kernels are external symbols (the step calls them across modules): a name unique to
        # this build keeps two programs in one process from ever binding to each other's
        self.tag = tag or uuid.uuid4().hex[:10]

    @staticmethod
    def symbol(entry: str) -> str:
        return f"dlc_step_{entry}" if entry else "dlc_step"

    def new_function(self, name: str, buffers: list[Buffer]) -> tuple[ir.Function, ir.IRBuilder, dict]:
        ftype = ir.FunctionType(VOID, [PTR] * len(buffers) + [I32, I32])
        fn = ir.Function(self.module, ftype, name=name)
        fn.attributes.add("noinline")
        set_target(fn, self.target)
        pointers = {}
        for arg, buf in zip(fn.args, buffers):
            arg.add_attribute("noalias")
            pointers[buf.name] = arg
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        return fn, b, pointers

    def build_first(self, finished: Callable) -> None:
        """The parts of the programs at hand, built into the first quarter of each pool's
        modules (the step module aside), which are then closed and handed to
        `finished(modules, sizes, pretuned, lsr)`: LLVM compiles them while the programs
        given as None are made (dlc.program.STAGED_LOWERING)."""
        pieces = len(self._pools[0])
        first = set(range(1, 1 + max(1, pieces // 4))) | set(range(pieces, pieces + max(1, pieces // 4)))
        self.closed = set(range(len(self.modules))) - first  # (reopened below)
        for entry, program in self.programs.items():
            if program is not None:
                self._build_entry(entry, program)
        staged = sorted(i for i in first if self._defines(i))
        self.closed = set(staged)
        finished([self.modules[i] for i in staged], [self.sizes[i] for i in staged],
                 frozenset(j for j, i in enumerate(staged) if i in self._pools[1]), self._holding_gemm(staged))

    def add_programs(self, programs: dict) -> None:
        """The programs given as None (build_first)."""
        self.programs = {entry: programs.get(entry, program) for entry, program in self.programs.items()}

    def build(self, finished: Callable | None = None) -> list[ir.Module]:
        """The modules (the step module first). The parts for O3 are built first, then the
        pretuned parts (_pretuned), then the step functions. Where convolutions are left to
        build (their packers and kernels take longest: the residual network's 150 ms,
        LeNet-5's 95), `finished(modules, sizes, pretuned, lsr)`, if given, is called with
        the O3 modules as soon as their parts are built (the caller starts compiling them
        meanwhile: jit.ModuleCompiler.add), and nothing goes there afterwards. (Without
        convolutions the rest takes a few ms to build, and a second batch cost the LSTM's
        compile 4%.) The step module stays open: it gets the step functions, and the
        pretuned parts built again for O3 (_part). Entries build_first built are not
        built again."""
        rest = {entry: program for entry, program in self.programs.items() if entry not in self.entry_calls}
        for entry, program in rest.items():
            self.program = program
            self._functions(program.kernels, self._prefix(entry), [], only=lambda part: not _pretuned(part))
        if finished is not None and any(isinstance(part, Template) and _pretuned(part) for program
                                         in rest.values() for k in all_kernels(program.kernels)
                                         for part in k.parts):
            staged = [i for i in self._pools[0] if self._defines(i) and self.modules[i] is not self.step_module
                      and i not in self.closed]
            self.closed.update(staged)
            finished([self.modules[i] for i in staged], [self.sizes[i] for i in staged], frozenset(),
                     self._holding_gemm(staged))
        for entry, program in rest.items():
            self._build_entry(entry, program)
        self.entry_parts = {entry: self.entry_parts[entry] for entry in self.programs}  # the unit's order
        self.parts = next(iter(self.entry_parts.values()))
        self.program = next(iter(self.programs.values()))
        self.module = self.step_module
        for entry, program in self.programs.items():
            self._step(entry, program)
        # a small program leaves some modules empty: nothing to compile or load there
        kept = [i for i in range(len(self.modules)) if self.modules[i] is self.step_module or self._defines(i)]
        self.modules, self.sizes = [self.modules[i] for i in kept], [self.sizes[i] for i in kept]
        self.lsr = self._holding_gemm(kept)
        self.pretuned = frozenset(j for j, i in enumerate(kept) if i in self._pools[1])
        return self.modules

    def _build_entry(self, entry: str, program: KernelProgram) -> None:
        """An entry's parts (those `build` built first are taken as they are)."""
        self.entry_parts[entry] = []
        self.program = program  # the program being built (templates look at its other kernels)
        self.entry_calls[entry] = self._functions(program.kernels, self._prefix(entry), self.entry_parts[entry])

    def _holding_gemm(self, indices: list[int]) -> frozenset:
        """The positions in `indices` of the modules that hold a GEMM (jit._machine_code)."""
        with_gemm = {key[0] for key in self.gemms}
        return frozenset(j for j, i in enumerate(indices) if i in with_gemm)

    @staticmethod
    def _prefix(entry: str) -> str:
        return f"{entry}." if entry else ""

    def _defines(self, i: int) -> bool:
        return any(not f.is_declaration for f in self.modules[i].functions)

    def _functions(self, entries, prefix: str, parts: list, only: Callable | None = None) -> list:
        """One function per kernel part (loop bodies' too), appended to `parts`; returns what
        the step calls, in order: (phase, index in parts) per part, (loop, the same for its
        body) per loop. only(part): build those parts alone (kept for the call that builds
        the rest, which uses them)."""
        calls = []
        for k in entries:
            if isinstance(k, Loop):
                calls.append((k, self._functions(k.body, prefix, parts, only)))
                continue
            for j, part in enumerate(k.parts):
                if isinstance(part, Collective):  # a call to the host from the step itself
                    calls.append((k.phase, len(parts)))
                    parts.append((k.phase, k.name, None, part))
                    continue
                if only is not None and not only(part):
                    continue
                name, buffers = f"{prefix}{k.name}.{j}.{self.tag}", buffers_of(part)
                fn = self._built.pop(name, None)
                if fn is None:
                    fn = self._part(part, name, buffers)
                if only is not None:
                    self._built[name] = fn
                calls.append((k.phase, len(parts)))
                parts.append((k.phase, k.name, fn, buffers))
        return calls

    def _part(self, part, name: str, buffers: list[Buffer]) -> ir.Function:
        """The part's function (an identical one built before, if any)."""
        index = self._module_for(part)
        fn, known, scalar = self._emit(part, index, name, buffers)
        if scalar and isinstance(part, LoopNest) and index in self._pools[1]:
            # a sum or store loop the emitter left scalar: LLVM's O3 vectorizes it
            del self.module.globals[name]
            index = self._emptiest(self._pools[0])
            fn, known, _ = self._emit(part, index, name, buffers)
        fn = self._dedupe(fn, _shape_key(part))
        # what the part added to its module: its function (unless an identical one
        # existed) and the helpers it built (a GEMM, a convolution's packers: in one
        # residual-network build they were left out, and the module counted
        # smallest took the second-longest to compile)
        self.sizes[index] += sum(_size(f) for f in self.module.functions[known:])
        return fn

    def _emit(self, part, index: int, name: str, buffers: list[Buffer]):
        """The part's function, built into module `index`: (it, how many functions the
        module had before, whether the emitter left a loop scalar)."""
        self.module = self.modules[index]
        known = len(self.module.functions)
        fn, b, pointers = self.new_function(name, buffers)
        if is_light(part):
            fn.attributes.add("optsize")
        tid, nthreads = fn.args[-2], fn.args[-1]
        em = Emitter(b, pointers)
        em.licm = pretuned = index in self._pools[1]  # (LLVM runs no LICM there)
        if isinstance(part, LoopNest):
            emit_nest(em, part, tid, nthreads, vectorize=pretuned)
        else:
            emit_template(self, em, part, tid, nthreads)
        b.ret_void()
        return fn, known, em.scalar_loops > 0

    def _module_for(self, part) -> int:
        """The emptiest module so far of the part's pool (pretuned or not); for a matmul,
        one that already has a GEMM of its shape (the evaluation step's forward matmuls
        have the training step's shapes)."""
        spec = _gemm_spec(part, self.target.vector_width)
        if spec is not None:
            for key in self.gemms:  # (module index, spec, register-tile epilogue key)
                if key[1] == spec and key[0] not in self.closed:
                    return key[0]
        return self._emptiest(self._pools[_pretuned(part)])

    def _emptiest(self, pool: range) -> int:
        return min((i for i in pool if i not in self.closed), key=self.sizes.__getitem__)

    def _dedupe(self, fn: ir.Function, key) -> ir.Function:
        """An identical function built before, with this one removed; else fn. Only parts
        of the same kind over the same shapes (`key`) are compared as text (printing a
        function costs as much as building it)."""
        same = self._by_key.setdefault(key, [])
        if not same:
            same.append(fn)
            return fn
        body = _body(fn)
        for i, other in enumerate(same):
            if not isinstance(other, str) and _body(other) == body:
                del fn.module.globals[fn.name]
                self.shared += 1
                return other
        same.append(fn)
        return fn

    def text(self) -> str:
        return "\n".join(str(m) for m in self.modules)

    def fresh_name(self, prefix: str) -> str:
        """prefix.<n>.<tag>: a name no other function of this build has."""
        n = self._names[prefix] = self._names.get(prefix, -1) + 1
        return f"{prefix}.{n}.{self.tag}"

    def helper(self, key, build) -> ir.Function:
        """A helper function (a convolution's packer or microkernel) built once for the
        whole build by `build()` into the module being filled, the first time `key` is
        asked for; a kernel in another module calls it through a declaration. (Per module,
        each would be compiled again wherever a layer of its shape lands.)"""
        fn = self._helpers.get(key)
        if fn is None:
            fn = self._helpers[key] = build()
            fn.linkage = ""  # external: the other modules' calls bind to it when loaded
        return self.callee(fn)

    def callee(self, fn: ir.Function) -> ir.Function:
        """fn as seen from the module being filled (a declaration when it lives in another)."""
        if fn.module is self.module:
            return fn
        decl = self.module.globals.get(fn.name)
        if decl is None:
            decl = ir.Function(self.module, fn.function_type, name=fn.name)
            for arg, orig in zip(decl.args, fn.args):
                if "noalias" in orig.attributes:
                    arg.add_attribute("noalias")
        return decl

    def _step(self, entry: str, program: KernelProgram) -> None:
        """dlc_step(table, tid, nthreads): every part in phase order, barriers between."""
        fn = ir.Function(self.module, ir.FunctionType(VOID, [PTR, I32, I32]), name=self.symbol(entry))
        set_target(fn, self.target)
        fn.attributes.add("optsize")  # a sequence of calls and barriers
        table, tid, nthreads = fn.args
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        restore = _flush_denormals(b, self.target)
        slot = lambda k: b.load(gep(b, table, i64(k), PTR), typ=PTR)  # noqa: E731
        arena, barrier, scratch, counters, host = slot(0), slot(1), slot(2), slot(3), slot(4)
        host = _Indirect(host, HOST_FN)
        pointers = {}
        slots = list(program.inputs) + list(program.state)
        for i, name in enumerate(slots):
            pointers[name] = slot(FIXED_SLOTS + i)
        for buf in program.buffers.values():
            if buf.kind == "arena":
                pointers[buf.name] = gep(b, arena, i64(buf.offset), I8)
        pointers["__scratch__"] = b.call(_scratch_fn(self.module), [scratch, tid, i64(self.layout.scratch_bytes)])
        pointers["__team__"] = team_words(b, barrier, scratch, self.layout.scratch_bytes)
        barrier_fn = emit_barrier(self.module)
        is_main = b.icmp_signed("==", tid, i32(0))
        parts = self.entry_parts[entry]

        def sync():
            b.call(barrier_fn, [barrier, nthreads])

        def run(calls, pointers: dict, loop_vars: dict) -> None:
            """The calls in order, a barrier between phases; each loop a loop (a barrier after
            every iteration, so none is needed after it)."""
            last_phase = synced = None
            for call in calls:
                phase = call[0].phase if isinstance(call[0], Loop) else call[0]
                if last_phase is not None and phase != last_phase and not synced:
                    sync()
                last_phase, synced = phase, False
                if isinstance(call[0], Loop):
                    run_loop(*call, pointers, loop_vars)
                    synced = True
                    continue
                _, kname, part_fn, buffers = parts[call[1]]
                t0 = b.call(_cycles(self.module), []) if self.profile else None
                if part_fn is None:  # a Collective: thread 0 calls the host, the others go on
                    with b.if_then(is_main):
                        b.call(host, [i32(buffers.bucket), i32(COLLECTIVE_MODES.index(buffers.mode))])
                else:
                    args = [pointers[buf.name] if buf.name in pointers else pointers["__scratch__"]
                            for buf in buffers]
                    b.call(self.callee(part_fn), args + [tid, nthreads])
                if self.profile:
                    with b.if_then(is_main):
                        cell = gep(b, counters, i64(call[1]), I64)
                        spent = b.sub(b.call(_cycles(self.module), []), t0)
                        b.store(b.add(b.load(cell, typ=I64), spent), cell)

        def run_loop(lp: Loop, body, pointers: dict, loop_vars: dict) -> None:
            extent = lp.var.extent

            def iteration(i, _):
                t = b.sub(i64(extent - 1), i) if lp.reverse else i
                em = Emitter(b, {})
                em.vars.update(loop_vars)
                em.vars[lp.var.name] = t
                inner = dict(pointers)
                for v in lp.views:  # the views' addresses at this t
                    inner[v.name] = gep(b, inner[v.base.name], em.ix(v.at), memory_type(v.dtype))
                run(body, inner, em.vars)
                sync()  # the next iteration reads what this one wrote
                return []
            loop(b, 0, extent, (), iteration, name=lp.name)

        run(self.entry_calls[entry], pointers, {})
        if program.copies:
            b.call(barrier_fn, [barrier, nthreads])
            with b.if_then(is_main):
                for src, dst in program.copies:
                    size = src.size * byte_size(memory_type(src.dtype))
                    b.call(_memcpy(self.module), [pointers[dst.name], pointers[src.name], i64(size),
                                                  ir.Constant(I1, 0)])
        b.call(barrier_fn, [barrier, nthreads])
        restore()
        b.ret_void()


# MXCSR bits: denormal results are flushed to zero (FTZ), denormal operands read as zero (DAZ)
FTZ_DAZ = 0x8040


def _flush_denormals(b: ir.IRBuilder, target):
    """On x86, run the step with denormals flushed to zero, as XLA and TensorFlow do on CPUs:
    gradients vanishing over hundreds of recurrent steps become denormals, and arithmetic on
    them is ~100x slower. Returns the call that restores the caller's mode at the end.
    (Values below 1.2e-38 become 0; the reference interpreter keeps them.)"""
    if not any(arch in target.triple for arch in ("x86_64", "i386", "i686")):
        return lambda: None
    module = b.module
    st = module.globals.get("llvm.x86.sse.stmxcsr") or ir.Function(module, ir.FunctionType(VOID, [PTR]),
                                                                   name="llvm.x86.sse.stmxcsr")
    ld = module.globals.get("llvm.x86.sse.ldmxcsr") or ir.Function(module, ir.FunctionType(VOID, [PTR]),
                                                                   name="llvm.x86.sse.ldmxcsr")
    saved, mode = b.alloca(I32), b.alloca(I32)
    b.call(st, [saved])
    b.store(b.or_(b.load(saved, typ=I32), i32(FTZ_DAZ)), mode)
    b.call(ld, [mode])
    return lambda: b.call(ld, [saved])


HOST_FN = ir.FunctionType(VOID, [I32, I32])


class _Indirect:
    """A function pointer as a callee: llvmlite reads the type of a call's callee from it
    (with opaque pointers a loaded pointer does not know it)."""

    def __init__(self, pointer: ir.Value, function_type: ir.FunctionType):
        self.pointer, self.function_type, self.type = pointer, function_type, pointer.type

    def get_reference(self) -> str:
        return self.pointer.get_reference()


def _pretuned(part) -> bool:
    """Whether a part goes to the modules LLVM compiles with a short pipeline
    (jit.PRETUNED_PASSES), its emitter having vectorized and unrolled its code: a
    convolution template's, and a loop nest over at least LIGHT_BELOW elements (emit.py
    vectorizes its sums and innermost stores and hoists its loop-invariant values; one
    where it leaves a loop scalar is built again for O3: ModuleBuilder._part). A
    light nest stays with O3 (optimized for size there): in the pretuned pool the MLP's
    three (a softmax and its gradient) made its training step 3% slower, for 10% less
    LLVM time."""
    if isinstance(part, LoopNest):
        return not is_light(part)
    return part.op in PRETUNED_TEMPLATES


def _gemm_spec(part, w: int):
    """The GemmSpec templates.matmul (or batch_matmul) emits a GEMM function for at
    vector width w (None: no GEMM)."""
    if not isinstance(part, Template) or part.op not in ("matmul", "batch_matmul"):
        return None
    from .gemm import GemmSpec
    from .templates import uses_dots, uses_gemm
    a = part.inputs[0].shape
    m, n = part.output.shape[-2:]
    ta, tb = part.attrs.get("ta", False), part.attrs.get("tb", False)
    k = a[-2] if ta else a[-1]
    if part.op == "matmul" and uses_dots(m, k, ta, tb, w):
        return None
    return GemmSpec(m, n, k, ta=ta, tb=tb) if uses_gemm(m, n, k) else None


_METADATA_REF = re.compile(r"!(\d+)\b")
# a local value or block as the text refers to it (%"r17.head"), or a block's label (r17.head:)
_LOCAL_NAME = re.compile(r'%"([^"]*)"|^"?([^\s":]+)"?:', re.M)


def _body(fn: ir.Function) -> str:
    """fn's IR text with its own name left out, its local names (values and blocks) numbered
    in the order the text uses them -- they come from the kernel IR's loop variables (r17
    in one layer's epilogue, r33 in the next one's), so only the numbering tells two layers'
    code apart -- and the metadata it refers to (loop IDs, branch weights) written out,
    numbered in the same way: a module numbers its metadata as it is added, so the same loop
    ID is !1 in one module and !2 in another (cached on the function)."""
    text = getattr(fn, "_dlc_body", None)
    if text is None:
        nodes = {md.name: str(md).split(" = ", 1)[1] for md in fn.module.metadata}
        used: list[str] = []  # metadata numbers in the order the text refers to them

        def renumber(match) -> str:
            if match.group(1) not in used:
                used.append(match.group(1))
            return f"!m{used.index(match.group(1))}"
        local: dict[str, int] = {}

        def rename(match) -> str:
            n = local.setdefault(match.group(1) if match.group(1) is not None else match.group(2), len(local))
            return f"%L{n}" if match.group(1) is not None else f"L{n}:"
        code = _LOCAL_NAME.sub(rename, str(fn).replace(fn.get_reference(), "@F", 1))
        lines = [_METADATA_REF.sub(renumber, code)]
        for ref in used:  # grows while it is read: the nodes that nodes refer to
            lines.append(_METADATA_REF.sub(renumber, nodes[ref]))
        text = fn._dlc_body = "\n".join(lines)
    return text


def _shape_key(part) -> tuple:
    """What two parts with identical code certainly share: kind, loop extents, shapes."""
    if isinstance(part, LoopNest):
        return ("nest", tuple(v.extent for v in part.outer), tuple(v.extent for v in part.inner),
                len(part.row_stores), len(part.stores), part.serial)
    return ("template", part.op, tuple(b.shape for b in part.inputs), part.output.shape,
            repr(sorted(part.attrs.items())), _shape_key(part.epilogue) if part.epilogue is not None else None)


def _size(fn: ir.Function) -> int:
    """Instructions (none for a declaration)."""
    return sum(len(blk.instructions) for blk in fn.blocks)


def _cycles(module: ir.Module) -> ir.Function:
    fn = module.globals.get("llvm.readcyclecounter")
    return fn or ir.Function(module, ir.FunctionType(I64, []), name="llvm.readcyclecounter")


def _memcpy(module: ir.Module) -> ir.Function:
    name = "llvm.memcpy.p0.p0.i64"
    return module.globals.get(name) or ir.Function(module, ir.FunctionType(VOID, [PTR, PTR, I64, I1]), name=name)


def _scratch_fn(module: ir.Module) -> ir.Function:
    """scratch + tid * bytes_per_thread"""
    fn = module.globals.get("dlc_scratch")
    if fn is None:
        fn = ir.Function(module, ir.FunctionType(PTR, [PTR, I32, I64]), name="dlc_scratch")
        fn.linkage = "internal"
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        base, tid, per = fn.args
        b.ret(gep(b, base, b.mul(b.sext(tid, I64), per), I8))
    return fn


