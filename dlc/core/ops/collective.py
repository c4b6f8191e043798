"""Collectives: ops whose value depends on every process of a data-parallel job.

allreduce(x) is the element-wise sum of x over the ranks of the job (dlc/core/collective.py:
in rank order, the same in every rank); in a job of one process it is x itself. Its
gradient is the allreduce of the cotangent: every rank differentiates its own share of
the loss, and the sum over ranks of those shares is the loss of the whole job.

`bucket` numbers the exchanges of a data-parallel step (passes/data_parallel.py): the
allreduces of one bucket travel together, packed in the order of their `part`, and the
buckets run in the order of their numbers -- in every rank, whatever batch size its
shard has. -1 (a job of one process, before that pass): on its own, in any order.
"""
from __future__ import annotations

from dlc.core.collective import sum_over_ranks
from dlc.core.ops.base import Kind, OpDef, register, require_float
from dlc.core.types import TensorType


def _allreduce_infer(x: TensorType, bucket: int = -1, part: int = 0) -> TensorType:
    require_float("allreduce", x)
    return x


ALLREDUCE = register(OpDef("allreduce", Kind.COLLECTIVE, _allreduce_infer,
                           lambda x, bucket=-1, part=0: sum_over_ranks(x),
                           lambda b, g, y, x, **attrs: (b.emit(ALLREDUCE, (g,), bucket=-1, part=0),), 1,
                           doc="the sum of x over the ranks of a data-parallel job", attrs=("bucket", "part")))
