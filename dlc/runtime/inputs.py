"""Reading inputs for `dlc predict` from .npy and .npz files."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dlc.core.diagnostics import DataError
from dlc.data.sources import numpy_errors, open_numpy


def read_input_array(path: Path, key: str | None = None) -> np.ndarray:
    """The array of an .npy file, or the array `key` of an .npz (default: `x`, or its only array)."""
    z = open_numpy(path, str(path))
    if isinstance(z, np.ndarray):
        if key is not None:
            raise DataError(f"{path} is an .npy file, which holds one array: --key {key} picks an "
                            "array in an .npz", hint="leave out --key")
        return z
    with z, numpy_errors(str(path)):
        names = list(z.keys())
        if key is None:
            key = "x" if "x" in names else names[0] if len(names) == 1 else None
        if key is None or key not in names:
            raise DataError(f"{path}: no array named `{key or 'x'}`; it has {', '.join(names) or 'none'}",
                            hint="choose one with --key NAME")
        return z[key]
