"""`dlc compile FILE -o OUT`: compiled training and evaluation steps in one file.

The file is a zip: `manifest.json` (format, dlc version, the model and its .dln source,
the backend and the target it was compiled for, and per compiled batch size the layout of
its entry points -- the training and the evaluation step -- and the SHA-256 and size of
each compiled blob), plus the blobs. `dlc run OUT` and `dlc eval OUT` load the code without
compiling; a batch size the file lacks is compiled from the embedded source.

Loading an artifact runs the native code inside it: run only artifacts you trust. Every
part is checked before any code is loaded -- the manifest's schema, every blob against its
digest, every layout -- and a file for another dlc version, backend or machine is refused;
a damaged one is one sentence, never a crash.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
import zlib
from pathlib import Path

from dlc import __version__
from dlc.backends.base import Entries, StepLayout, layout_from_json
from dlc.core.diagnostics import ArtifactError

FORMAT = 3
REBUILD = "rebuild it with `dlc compile FILE.dln -o OUT`"


def is_artifact(path) -> bool:
    """A zip file (the container), whether intact or not: such a file is never .dln source."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def write(path, source_name: str, source_text: str, model: str, backend: str, target: dict,
          steps: dict[int, tuple[list[bytes], Entries]]) -> None:
    """steps: batch size -> (blobs, layout) of the program compiled for it."""
    manifest = {"format": FORMAT, "dlc": __version__, "model": model, "source_name": source_name,
                "source": source_text, "backend": backend, "target": target, "steps": []}
    blobs = {}
    for batch, (parts, layout) in sorted(steps.items()):
        stem = f"steps/batch-{batch}"
        entry = {"batch": batch, "layout": layout.to_json(), "blobs": []}
        for i, blob in enumerate(parts):
            name = f"{stem}.{i}.bin"
            blobs[name] = blob
            entry["blobs"].append({"name": name, "sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)})
        manifest["steps"].append(entry)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("manifest.json", json.dumps(manifest, indent=1))
            for name, blob in blobs.items():
                z.writestr(name, blob)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read(path) -> tuple[dict, dict[int, tuple[list[bytes], Entries]]]:
    """(manifest, steps), every part checked; ArtifactError otherwise."""
    try:
        with zipfile.ZipFile(path) as z:
            manifest = _manifest(path, z.read("manifest.json"))
            steps = {}
            for s in manifest["steps"]:
                parts = []
                for blob in s["blobs"]:
                    data = z.read(blob["name"])
                    if len(data) != blob["size"] or hashlib.sha256(data).hexdigest() != blob["sha256"]:
                        raise ArtifactError(f"{path} is damaged: {blob['name']} does not match its digest",
                                            hint=REBUILD)
                    parts.append(data)
                steps[s["batch"]] = (parts, _layout(path, s["layout"]))
    except (OSError, KeyError, ValueError, EOFError, NotImplementedError, zipfile.BadZipFile, zlib.error) as e:
        raise ArtifactError(f"{path} is not a readable dlc artifact ({_why(e)})", hint=REBUILD) from None
    return manifest, steps


def check_target(path, manifest: dict, backend, target) -> None:
    """Refuses code built for another backend or machine (before any of it is loaded)."""
    if manifest["backend"] != backend.name:
        raise ArtifactError(f"{path} holds code for target `{manifest['backend']}`, not `{backend.name}`",
                            hint=f"run it with --target {manifest['backend']}, or {REBUILD}")
    reason = backend.check_target(manifest["target"], target)
    if reason:
        raise ArtifactError(f"{path} cannot run here: {reason}", hint="rebuild it here with `dlc compile`")


def _why(e: Exception) -> str:
    return str(e) or type(e).__name__


_SCHEMA = {"format": int, "dlc": str, "model": str, "source_name": str, "source": str, "backend": str,
           "target": dict, "steps": list}
_STEP = {"batch": int, "layout": str, "blobs": list}
_BLOB = {"name": str, "sha256": str, "size": int}


def _manifest(path, raw: bytes) -> dict:
    manifest = json.loads(raw)
    if not isinstance(manifest, dict):
        raise ValueError("the manifest is not an object")
    if manifest.get("format") != FORMAT or manifest.get("dlc") != __version__:
        raise ArtifactError(f"{path} was built by dlc {manifest.get('dlc')} (format {manifest.get('format')}); "
                            f"this is dlc {__version__}", hint=REBUILD)
    _fields(manifest, _SCHEMA, "the manifest")
    for s in manifest["steps"]:
        _fields(s, _STEP, "a step")
        if s["batch"] < 1:
            raise ValueError(f"a step has batch {s['batch']}")
        for blob in s["blobs"]:
            _fields(blob, _BLOB, "a blob entry")
    return manifest


def _fields(obj, schema: dict, what: str) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{what} is not an object")
    for key, kind in schema.items():
        if not isinstance(obj.get(key), kind) or (kind is int and isinstance(obj.get(key), bool)):
            raise ValueError(f"{what} has no valid `{key}`")


def _layout(path, text: str) -> Entries:
    try:
        layout = layout_from_json(text)
        assert isinstance(layout, Entries) and layout.entries
        for entry in layout.entries.values():
            assert isinstance(entry.arena_bytes, int) and entry.arena_bytes >= 0
            assert isinstance(entry.scratch_bytes, int) and entry.scratch_bytes >= 0
            for slot in entry.slots:
                name, kind, dtype, shape = slot
                assert isinstance(name, str) and kind in ("input", "state") and isinstance(dtype, str)
                assert all(isinstance(d, int) and d >= 0 for d in shape)
            assert isinstance(entry.outputs, dict) and isinstance(entry.kernels, list)
            assert isinstance(entry.meta, dict)
    except (ValueError, TypeError, KeyError, AssertionError) as e:
        raise ArtifactError(f"{path} is damaged: a step's layout is invalid ({_why(e)})", hint=REBUILD) from None
    return layout
