"""The processes of a data-parallel job, as the ops and the backends see them.

A collective op (`allreduce`) means: the element-wise sum of one tensor over every
process of the job, the same result in each. The graph and the kernel IR only name the
op; what runs it is the process's communicator, installed once by the runtime
(dlc/runtime/distributed.py, over MPI) before any step runs. Without one, the process is
a job of one: the sum over ranks is the value itself.

MPI's communicator is per process, so this one is too: `current()` is what the
reference interpreter's `allreduce` and a native step's host call use.

Sums are formed in rank order (rank 0 + rank 1 + ...), the same order in every process
whatever the transport does, so every rank ends a step with bit-identical parameters.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np


class Communicator(Protocol):
    rank: int
    size: int

    def allreduce(self, arrays: Sequence[np.ndarray], out: Sequence[np.ndarray]) -> None:
        """out[i] = the sum over ranks of arrays[i], in rank order (one bucket: one exchange)."""

    def start(self, arrays: Sequence[np.ndarray]) -> object:
        """Begin the same sum without waiting (a non-blocking exchange); `finish` ends it."""

    def finish(self, handle: object, out: Sequence[np.ndarray]) -> None:
        """Wait for a sum begun by `start` and write it to `out`."""


class Single:
    """The job of one process: every sum over ranks is the value itself."""

    rank = 0
    size = 1

    def allreduce(self, arrays, out) -> None:
        for a, o in zip(arrays, out):
            if o is not a:
                np.copyto(o, a)

    def start(self, arrays):
        return [np.array(a, copy=True) for a in arrays]

    def finish(self, handle, out) -> None:
        self.allreduce(handle, out)


_current: Communicator = Single()


def current() -> Communicator:
    return _current


def install(comm: Communicator | None) -> Communicator:
    """Make `comm` the process's communicator (None: back to a job of one); returns the
    previous one."""
    global _current
    previous, _current = _current, comm or Single()
    return previous


def sum_over_ranks(x: np.ndarray) -> np.ndarray:
    """The value of `allreduce(x)` in this process (the op's reference semantics)."""
    x = np.asarray(x)
    out = np.empty_like(x)
    current().allreduce([np.ascontiguousarray(x)], [out])
    return out
