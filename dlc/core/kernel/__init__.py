"""The kernel IR (see ir.py for the contract every backend honours), its analyses, its
template kinds with their generic loop-nest meaning, and its text form."""
from dlc.core.kernel.analysis import (ContractError, FreeVars, all_kernels, buffers_of, bytes_touched, check_program,
                                      collectives_of, hoistable, nests_of, viewed_buffers, walk_ex)
from dlc.core.kernel.ir import (COLLECTIVE_MODES, INT_MAX, INT_MIN, SCALAR_OPS, Add, Buffer, Clamp, Collective,
                                Const, Div, Ex, Exprs, Gather, Index, Ix, Kernel, KernelProgram, Lit, Load, Loop,
                                LoopNest, Mod, Mul, Op, Rand, Reduce, ScalarOp, Store, Template, Var)
from dlc.core.kernel.templates import MULTIPLY_ADDS, TEMPLATES, expand_templates, multiply_adds
from dlc.core.kernel.text import format_ex, format_ix, format_program

__all__ = ["COLLECTIVE_MODES", "INT_MAX", "INT_MIN", "MULTIPLY_ADDS", "SCALAR_OPS", "TEMPLATES", "Add", "Buffer", "Clamp",
           "Collective", "Const", "ContractError", "Div", "Ex", "Exprs", "FreeVars", "Gather", "hoistable", "Index", "Ix",
           "Kernel", "KernelProgram", "Lit", "Load", "Loop", "LoopNest", "Mod", "Mul", "Op", "Rand", "Reduce",
           "ScalarOp", "Store", "Template", "Var", "all_kernels", "buffers_of", "bytes_touched", "check_program", "collectives_of",
           "expand_templates", "format_ex", "format_ix", "format_program", "multiply_adds", "nests_of", "viewed_buffers", "walk_ex"]
