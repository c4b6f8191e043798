"""Compiled code from disk is checked completely before any of it is loaded (issue 10):
damaged artifacts are refused in one sentence, damaged cache entries rebuilt; the cache
directory is private, bounded and shared safely; a step that cannot fit in memory is
refused before allocating. Loads that used to crash the interpreter run in a child
process (tests/isolated.py), so a regression fails a test instead of killing the run."""
from __future__ import annotations

import numpy as np
import pytest

from artifacts import THREADS, another_build, build_artifact, members
from dlc.backends.llvm import BACKEND as CPU
from dlc.backends.llvm.elf import ElfError, symbols
from dlc.core.diagnostics import DlcError


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """An artifact of MODEL, and another build of its eval step for the last batch."""
    d = tmp_path_factory.mktemp("built")
    path = build_artifact(d / "model.dlcx", d / "cache")
    manifest, blobs = members(path)
    eval_batch = min(s["batch"] for s in manifest["steps"] if s["mode"] == "eval")
    return d, path, eval_batch, another_build("eval", eval_batch)


def _step(manifest, mode, batch):
    return next(s for s in manifest["steps"] if (s["mode"], s["batch"]) == (mode, batch))


# --- the ELF reader --------------------------------------------------------------------------------

def test_elf_reader_lists_the_symbols_and_rejects_anything_out_of_bounds(built):
    _, _, _, (blobs, layout) = built
    found = symbols(blobs[0])
    assert "dlc_step" in found.defines and any(n.endswith("." + layout.meta["tag"]) for n in found.needs)
    assert layout.meta["objects"][0] == {"defines": found.defines, "needs": found.needs}
    rng = np.random.default_rng(0)
    obj = blobs[0]
    for _ in range(400):  # every damage is an ElfError, never an IndexError or struct.error
        data = bytearray(obj)
        kind = rng.integers(3)
        if kind == 0:
            data = data[:rng.integers(len(data))]
        elif kind == 1:  # the header and section headers: where offsets and counts live
            for _ in range(rng.integers(1, 4)):
                at = int(rng.choice([rng.integers(64), len(obj) - 1 - rng.integers(min(len(obj), 64 * 12))]))
                data[at] = int(rng.integers(256))
        else:
            at = rng.integers(len(data) - 8)
            data[at:at + 8] = rng.integers(256, size=8, dtype=np.uint8).tobytes()
        try:
            symbols(bytes(data))
        except ElfError:
            pass


def test_validate_accepts_its_own_code_and_load_refuses_damaged_code(built):
    _, _, _, (blobs, layout) = built
    target = CPU.target({"threads": THREADS})
    assert CPU.validate(blobs, layout, target) is None
    with pytest.raises(DlcError, match="refusing to load damaged compiled code"):
        CPU.load(blobs[::-1], layout, target)
