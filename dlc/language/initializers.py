"""Named parameter initializers (`glorot_uniform`, `he_normal`, `normal(m, s)`, ...).

Parameters are initialized by the runtime in numpy, from a generator seeded by the
run's seed and the parameter's name, so a name always gets the same values.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Init:
    name: str
    args: tuple[float, ...] = ()

    def __str__(self) -> str:
        return self.name if not self.args else f"{self.name}({', '.join(repr(a) for a in self.args)})"

    def sample(self, rng: np.random.Generator, shape: tuple[int, ...], fan_in: int, fan_out: int) -> np.ndarray:
        """float32 values, drawn a chunk at a time so that a large weight never has a float64
        copy; the generator's stream is sequential, so they equal one draw of the whole shape."""
        out = np.empty(shape, dtype=np.float32)
        flat = out.reshape(-1)
        for start in range(0, flat.size, _CHUNK):
            n = min(_CHUNK, flat.size - start)
            flat[start:start + n] = _SAMPLERS[self.name](rng, (n,), fan_in, fan_out, *self.args)
        return out


_CHUNK = 1 << 20  # elements per draw: 8 MB of float64 at a time


def _uniform_limit(rng, shape, limit):
    return rng.uniform(-limit, limit, size=shape)


_SAMPLERS = {
    "zeros": lambda rng, s, fi, fo: np.zeros(s),
    "ones": lambda rng, s, fi, fo: np.ones(s),
    "constant": lambda rng, s, fi, fo, v: np.full(s, v),
    "normal": lambda rng, s, fi, fo, mean=0.0, std=1.0: rng.normal(mean, std, size=s),
    "uniform": lambda rng, s, fi, fo, lo=0.0, hi=1.0: rng.uniform(lo, hi, size=s),
    "glorot_uniform": lambda rng, s, fi, fo: _uniform_limit(rng, s, math.sqrt(6.0 / (fi + fo))),
    "glorot_normal": lambda rng, s, fi, fo: rng.normal(0.0, math.sqrt(2.0 / (fi + fo)), size=s),
    "he_uniform": lambda rng, s, fi, fo: _uniform_limit(rng, s, math.sqrt(6.0 / fi)),
    "he_normal": lambda rng, s, fi, fo: rng.normal(0.0, math.sqrt(2.0 / fi), size=s),
    "lecun_normal": lambda rng, s, fi, fo: rng.normal(0.0, math.sqrt(1.0 / fi), size=s),
}

# name -> (number of arguments it takes at least, at most)
ARITY = {"zeros": (0, 0), "ones": (0, 0), "constant": (1, 1), "normal": (0, 2), "uniform": (0, 2),
         "glorot_uniform": (0, 0), "glorot_normal": (0, 0), "he_uniform": (0, 0), "he_normal": (0, 0),
         "lecun_normal": (0, 0)}

ZEROS, ONES = Init("zeros"), Init("ones")
GLOROT_UNIFORM, HE_NORMAL = Init("glorot_uniform"), Init("he_normal")


def fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """Fan-in/fan-out: [in, out] for matrices, [out, in, kh, kw] for conv kernels."""
    if len(shape) == 2:
        return shape[0], shape[1]
    if len(shape) > 2:
        field = math.prod(shape[2:])
        return shape[1] * field, shape[0] * field
    n = shape[0] if shape else 1
    return n, n


def param_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(name.encode())])
