"""Data augmentation: the train block's `augment` list applied to the inputs of each
training batch (never to evaluation or prediction).

The random draws come from the run's seed, the epoch and the batch's place in it, so a
resumed run augments its batches as the uninterrupted run did, and every rank of a
data-parallel job augments the global batch alike before taking its shard of it."""
from __future__ import annotations

import numpy as np

from dlc.core.spec import Spec

_STREAM = 0xA06  # keeps these draws apart from the shuffle's, which is seeded by (seed, epoch)


def generator(seed: int, epoch: int, batch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, batch, _STREAM])


def augment(x: np.ndarray, specs: tuple[Spec, ...], rng: np.random.Generator) -> np.ndarray:
    """x [N, ...] changed by each spec in turn; x itself is left as it was."""
    x = np.array(x, copy=True)  # (a batch of an unshuffled pass is a view of the data)
    for spec in specs:
        x = _APPLY[spec.name](x, rng, **spec.args)
    return x


def _flip(x: np.ndarray, rng, axis: int, p: float) -> np.ndarray:
    axis = axis + x.ndim if axis < 0 else axis + 1  # an axis of a sample -> of the batch
    chosen = rng.random(len(x)) < p
    x[chosen] = np.flip(x[chosen], axis=axis)
    return x


def _crop(x: np.ndarray, rng, pad: int, dims: int) -> np.ndarray:
    """Each sample shifted by whole offsets in [-pad, pad] along its last `dims` axes, drawn
    per sample and axis: a window of the zero-padded sample, as a random crop of it."""
    sizes = x.shape[x.ndim - dims:]
    padded = np.zeros(x.shape[:x.ndim - dims] + tuple(n + 2 * pad for n in sizes), x.dtype)
    padded[(...,) + tuple(slice(pad, pad + n) for n in sizes)] = x
    windows = np.lib.stride_tricks.sliding_window_view(padded, sizes, axis=tuple(range(x.ndim - dims, x.ndim)))
    starts = tuple(rng.integers(0, 2 * pad + 1, len(x)) for _ in sizes)
    # windows [N, ..., 2 pad + 1 per axis, *sizes]: sample i's window at its starts
    return windows[(np.arange(len(x)),) + (slice(None),) * (x.ndim - 1 - dims) + starts]


def _cutout(x: np.ndarray, rng, size: int) -> np.ndarray:
    """A size x size square of zeros per sample, centred on a random cell of the last two axes."""
    h, w = x.shape[-2:]
    rows, cols = np.arange(h), np.arange(w)
    top = rng.integers(0, h, len(x)) - size // 2
    left = rng.integers(0, w, len(x)) - size // 2
    inside_rows = (rows >= top[:, None]) & (rows < top[:, None] + size)     # [N, H]
    inside_cols = (cols >= left[:, None]) & (cols < left[:, None] + size)   # [N, W]
    keep = ~(inside_rows[:, :, None] & inside_cols[:, None, :])            # [N, H, W]
    x *= keep.reshape((len(x),) + (1,) * (x.ndim - 3) + (h, w)).astype(x.dtype)
    return x


def _noise(x: np.ndarray, rng, std: float) -> np.ndarray:
    x += rng.standard_normal(x.shape, dtype=np.float32).astype(x.dtype, copy=False) * x.dtype.type(std)
    return x


_APPLY = {"flip": _flip, "crop": _crop, "cutout": _cutout, "noise": _noise}
