"""Building and damaging compiled files for the trust and file-fuzzing tests: a small
model's artifact and cache entry, a second build of it (other symbol names), and helpers
that rewrite them."""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import dlc
from dlc import cache as cache_mod
from dlc.program import make_program

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "examples" / "logreg.dln"   # small and quick to compile; reads a CSV next to it
THREADS = 2                                # two modules per step: objects that call each other


SMALL = 5                                  # a second batch size the artifact holds


def build_artifact(path: Path, cache_dir: Path) -> Path:
    """MODEL's training and evaluation steps, at its batch size and at SMALL."""
    dlc.load(MODEL).compile_artifact(path, batches=[SMALL], threads=THREADS, cache_dir=cache_dir)
    return path


def members(path: Path) -> tuple[dict, dict[str, bytes]]:
    with zipfile.ZipFile(path) as z:
        manifest = json.loads(z.read("manifest.json"))
        return manifest, {n: z.read(n) for n in z.namelist() if n != "manifest.json"}


def write_members(path: Path, manifest, blobs: dict[str, bytes], reseal: bool = True) -> Path:
    """A zip with these members; `reseal` makes every listed digest match its blob again
    (damage that checksums alone cannot see)."""
    if reseal and isinstance(manifest, dict):
        for step in manifest.get("steps", []):
            for entry in step.get("blobs", []):
                if isinstance(entry, dict) and entry.get("name") in blobs:
                    data = blobs[entry["name"]]
                    entry["sha256"], entry["size"] = hashlib.sha256(data).hexdigest(), len(data)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("manifest.json", manifest if isinstance(manifest, (str, bytes)) else json.dumps(manifest))
        for name, data in blobs.items():
            z.writestr(name, data)
    return path


def compiled_step(cache_dir: Path, mode: str = "eval", batch: int = 5):
    """(program, key, blobs, layout) of one step of MODEL, through the cache in cache_dir."""
    m = dlc.load(MODEL)
    config = m.train_config
    program = make_program("cpu", lambda: m.compile_graph(mode, config), m.state, key=m.source_key(mode, config),
                           options={"cache_dir": cache_dir, "threads": THREADS})
    blobs, layout = program.compiled(batch)
    return program, program._cache_key(batch), blobs, layout


def another_build(mode: str = "eval", batch: int = 5):
    """The same step compiled again: the same code under other symbol names."""
    m = dlc.load(MODEL)
    p = make_program("cpu", lambda: m.compile_graph(mode, m.train_config), m.state,
                     options={"no_cache": True, "threads": THREADS})
    return p.compiled(batch)


def another_unit(batch: int = SMALL):
    """The artifact's program for `batch` (training and evaluation entries) compiled again:
    the same code under other symbol names."""
    m = dlc.load(MODEL)
    return m.session(m.train_config, "cpu", no_cache=True, threads=THREADS).program.compiled(batch)


def entry_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / key[:2] / f"{key}.obj"


def write_entry(cache_dir: Path, key: str, blobs, layout_json: str, stored_key: str | None = None) -> Path:
    path = entry_path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_bytes(cache_mod.pack(stored_key or key, list(blobs), layout_json))
    return path
