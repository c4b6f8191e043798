"""From a symbolic graph to loadable object code for one batch size: the lowering passes,
the kernel IR, LLVM IR, LLVM's optimizer -- through the on-disk cache."""
from __future__ import annotations

import functools
import hashlib
import time
from pathlib import Path

from dlc import __version__
from dlc.core.graph import Graph
from dlc.pipeline import LOWER_PASSES, Compilation, PassContext, run_passes
from dlc.core.printer import print_graph

from .cache import Cache
from .runtime import StepLayout
from .target import Target



@functools.lru_cache(maxsize=1)
def compiler_fingerprint() -> str:
    """A hash of the compiler's own source (passes and this backend): cached object code
    from another version of the code generator is never reused."""
    h = hashlib.sha256()
    for folder in (Path(__file__).parent, Path(__file__).parent.parent.parent / "passes"):
        for f in sorted(folder.glob("*.py")):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def cache_key(what: str, batch: int, target: Target, profile: bool) -> str:
    """`what` identifies the graph: its text, or the source and recipe it is built from."""
    h = hashlib.sha256()
    for part in (what, str(batch), target.key(), __version__, compiler_fingerprint(), str(profile)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def lower(graph: Graph, batch: int, log: Compilation | None = None) -> Graph:
    return run_passes(graph, LOWER_PASSES, PassContext(batch=batch), log)


def generate(graph: Graph, batch: int, target: Target, profile: bool = False, lowered: bool = False,
             tag: str | None = None):
    """(lowered graph, kernel program, module builder with its LLVM module)."""
    from dlc.passes.schedule import schedule
    from .codegen import ModuleBuilder
    lowered = graph if lowered else lower(graph, batch)
    program = schedule(lowered)
    mb = ModuleBuilder(program, target, name=graph.name, profile=profile, tag=tag)
    mb.build()
    return lowered, program, mb


def codegen_stages(lowered: Graph, names, target: Target | None = None) -> list[tuple[str, str]]:
    """Text of the kernel / llvm / llvm-opt / asm stages for an already lowered graph."""
    from dlc.core.kernel import format_program
    from .jit import assembly, optimized_ir
    target = target or Target.host()
    _, program, mb = generate(lowered, 0, target, lowered=True, tag="dump")  # stable names in dumps
    texts = {"kernel": lambda: format_program(program), "llvm": mb.text,
             "llvm-opt": lambda: optimized_ir(mb.modules, target), "asm": lambda: assembly(mb.modules, target)}
    return [(n, texts[n]()) for n in names]


def layout_of(program, mb, batch: int, target: Target) -> StepLayout:
    slots = []
    for name in mb.layout.slots:
        buf = program.inputs.get(name) or program.state[name]
        slots.append([name, buf.kind, buf.dtype.value, list(buf.shape)])
    outputs = {}
    for name, buf in program.outputs.items():  # a result is in the arena, or is an input/state
        where = buf.offset if buf.kind == "arena" else buf.name
        outputs[name] = [where, buf.dtype.value, list(buf.shape)]
    kernels = [[kname, phase, list(next(k.lines for k in program.kernels if k.name == kname))]
               for phase, kname, _, _ in mb.parts]
    return StepLayout(batch, program.arena_bytes, mb.layout.scratch_bytes, slots, outputs, kernels,
                      target.threads)


def build_step(graph, batch: int, target: Target, cache: Cache | None = None, verbose=None,
               profile: bool = False, source_key: str | None = None) -> tuple[list[bytes], StepLayout]:
    """Object code and layout for one batch size. `graph` may be a function that builds
    the graph: with a `source_key`, a cache hit never builds it."""
    from .jit import compile_modules
    start = time.perf_counter()
    get_graph = graph if callable(graph) else (lambda: graph)
    key = cache_key(source_key or print_graph(get_graph()), batch, target, profile) if cache else None
    hit = cache.get(key) if cache else None
    if hit is not None:
        obj, layout_json = hit
        if verbose:
            verbose(f"compile cache hit {key[:12]} (batch {batch}): {(time.perf_counter() - start) * 1e3:.0f} ms")
        return obj, StepLayout.from_json(layout_json)
    graph = get_graph()
    t0 = time.perf_counter()
    lowered, program, mb = generate(graph, batch, target, profile)
    t1 = time.perf_counter()
    compiled = compile_modules(mb.modules, target)
    layout = layout_of(program, mb, batch, target)
    if cache:
        cache.put(key, compiled.objects, layout.to_json())
    if verbose:
        verbose(f"compile cache {'miss ' + key[:12] if key else 'off'} ({graph.name}, batch {batch}): "
                f"passes+codegen {(t1 - t0) * 1e3:.0f} ms, "
                f"LLVM optimize {compiled.seconds_optimize * 1e3:.0f} ms, "
                f"machine code {compiled.seconds_codegen * 1e3:.0f} ms")
    return compiled.objects, layout
