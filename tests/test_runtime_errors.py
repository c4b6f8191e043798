"""Mistakes in using the driver (Python API and CLI) are one diagnostic each, never a traceback:
unknown keywords, models training cannot feed, unreadable inputs, output paths of the wrong kind."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dlc
from dlc.core.diagnostics import ArgumentError

EXAMPLES = Path(__file__).parent.parent / "examples"
MLP = EXAMPLES / "digits_mlp.dln"


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DLC_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def run_dlc(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dlc", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=600, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))


# ---- keywords of fit / evaluate / predict ----

@pytest.mark.parametrize("method, kwargs, message, hint", [
    ("fit", {"verbose": 1}, "fit(verbose=1): `verbose` takes a function", "quiet=False"),
    ("fit", {"callbacks": []}, "fit() got an unknown keyword `callbacks`", "its keywords: x, y, epochs"),
    ("fit", {"epoch": 3}, "fit() got an unknown keyword `epoch`", "did you mean `epochs`?"),
    ("fit", {"threads": "2"}, "fit(threads='2'): `threads` takes a positive number", None),
    ("evaluate", {"batch_size": 8}, "evaluate() got an unknown keyword `batch_size`", "did you mean `batch`?"),
    ("predict", {"verbose": True}, "predict(verbose=True): `verbose` takes a function", None),
])
def test_unknown_or_mistyped_keywords_are_clear_errors(method, kwargs, message, hint):
    m = dlc.load(MLP)
    args = (np.zeros((2, 64), np.float32),) if method == "predict" else ()
    with pytest.raises(ArgumentError) as info:
        getattr(m, method)(*args, **kwargs)
    assert info.value.message.startswith(message), info.value.message
    if hint:
        assert hint in info.value.hint
