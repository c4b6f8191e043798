"""`dlc compile FILE -o OUT`: compiled training and evaluation steps in one file.

The file is a zip: `manifest.json` (format, dlc version, target, the model and its .dln
source) and, per compiled step, its object code and layout. `dlc run OUT` and `dlc eval
OUT` load the object code into the JIT without compiling; a batch size the file lacks
is compiled from the embedded source. A file built for another CPU or another dlc
version is refused with a clear message, and a damaged one is an error, never loaded.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path

from dlc import __version__
from dlc.core.diagnostics import UsageError

from .runtime import StepLayout
from .target import Target

FORMAT = 1


def is_artifact(path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return "manifest.json" in z.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def write(path, source_name: str, source_text: str, model: str, target: Target,
          steps: dict[tuple[str, int], tuple[bytes, StepLayout]]) -> None:
    manifest = {"format": FORMAT, "dlc": __version__, "model": model, "source_name": source_name,
                "source": source_text, "target": {"cpu": target.cpu, "features": target.features,
                                                  "threads": target.threads, "triple": target.triple},
                "steps": [{"mode": m, "batch": b} for (m, b) in sorted(steps)]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("manifest.json", json.dumps(manifest, indent=1))
            for (mode, batch), (objects, layout) in steps.items():
                for i, obj in enumerate(objects):
                    z.writestr(f"steps/{mode}-{batch}.{i}.o", obj)
                z.writestr(f"steps/{mode}-{batch}.json", layout.to_json())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read(path) -> tuple[dict, dict[tuple[str, int], tuple[bytes, StepLayout]]]:
    """(manifest, steps); refuses files for another CPU or dlc version."""
    try:
        with zipfile.ZipFile(path) as z:
            manifest = json.loads(z.read("manifest.json"))
            steps = {}
            for s in manifest["steps"]:
                stem = f"steps/{s['mode']}-{s['batch']}"
                objects = [z.read(n) for n in sorted(z.namelist())
                           if n.startswith(stem + ".") and n.endswith(".o")]
                steps[(s["mode"], s["batch"])] = (objects,
                                                  StepLayout.from_json(z.read(stem + ".json").decode()))
    except (OSError, KeyError, ValueError, TypeError, zipfile.BadZipFile) as e:
        raise UsageError(f"{path}: not a readable dlc artifact ({e})",
                         hint="rebuild it with `dlc compile FILE.dln -o OUT`") from None
    if manifest.get("format") != FORMAT or manifest.get("dlc") != __version__:
        raise UsageError(f"{path} was built by dlc {manifest.get('dlc')} (format {manifest.get('format')}); "
                         f"this is dlc {__version__}", hint="rebuild it with `dlc compile`")
    host = Target.host()
    t = manifest["target"]
    if (t["cpu"], t["features"], t["triple"]) != (host.cpu, host.features, host.triple):
        raise UsageError(f"{path} was compiled for a {t['cpu']} CPU ({_isa(t['features'])}); this machine "
                         f"is a {host.cpu} ({_isa(host.features)})", hint="rebuild it here with `dlc compile`")
    return manifest, steps


def _isa(features: str) -> str:
    f = features.split(",")
    return "AVX-512" if "+avx512f" in f else "AVX2" if "+avx2" in f else "no AVX"
