"""Reading inputs for `dlc predict` from .npz files."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dlc.core.diagnostics import DataError


def read_input_array(path: Path, key: str | None = None) -> np.ndarray:
    """The array `key` of an .npz (default: `x`, or the only array in the file)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            names = list(z.keys())
            if key is None:
                key = "x" if "x" in names else names[0] if len(names) == 1 else None
            if key is None or key not in names:
                raise DataError(f"{path}: no array named `{key or 'x'}`; it has {', '.join(names) or 'none'}",
                                hint="choose one with --key NAME")
            return z[key]
    except FileNotFoundError:
        raise DataError(f"no such file: {path}") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from None
