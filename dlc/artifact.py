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
import struct
import tempfile
import zipfile
import zlib
from pathlib import Path

from dlc import __version__
from dlc.backends.base import Entries, StepLayout, entries_of, layout_from_json
from dlc.core.diagnostics import ArtifactError

FORMAT = 3
REBUILD = "rebuild it with `dlc compile FILE.dln -o OUT`"


MAGIC = b"PK\x03\x04"  # a zip file's first member


def is_artifact(path) -> bool:
    """A .dlcx file or a zip file (the container), intact or not: never .dln source. A file
    cut short inside the zip signature still counts (its first two bytes are `PK`)."""
    if str(path).endswith(".dlcx"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return len(head) >= 2 and MAGIC.startswith(head)


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
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("manifest.json", json.dumps(manifest, indent=1))
            for name, blob in blobs.items():
                z.writestr(name, blob)
        os.replace(tmp, path)
    except OSError as e:
        raise ArtifactError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


# What reading a damaged zip can raise: a flipped bit in a header reads as "encrypted"
# (RuntimeError) or as an unknown compression (NotImplementedError), a truncated stream as
# EOFError or zlib.error, a size field as MemoryError.
_DAMAGE = (OSError, KeyError, ValueError, EOFError, NotImplementedError, RuntimeError, MemoryError,
           RecursionError, struct.error, zipfile.BadZipFile, zlib.error)


def read(path) -> tuple[dict, dict[int, tuple[list[bytes], StepLayout | Entries]]]:
    """(manifest, steps), every part checked; ArtifactError otherwise."""
    if not os.path.isfile(path):
        raise ArtifactError(f"{path} does not exist or is not a file", hint=REBUILD)
    try:
        with zipfile.ZipFile(path) as z:
            manifest = _manifest(path, _member(z, "manifest.json"))
            steps = {}
            for s in manifest["steps"]:
                parts = []
                for blob in s["blobs"]:
                    data = _member(z, blob["name"])
                    if len(data) != blob["size"] or hashlib.sha256(data).hexdigest() != blob["sha256"]:
                        raise ArtifactError(f"{path} is damaged: {blob['name']} does not match its digest",
                                            hint=REBUILD)
                    parts.append(data)
                if s["batch"] in steps:
                    raise ValueError(f"the program for batch {s['batch']} is there twice")
                steps[s["batch"]] = (parts, _layout(path, s["layout"]))
    except _DAMAGE as e:
        raise ArtifactError(f"{path} is a damaged dlc artifact ({_why(e)})", hint=REBUILD) from None
    return manifest, steps


def _member(z: zipfile.ZipFile, name: str) -> bytes:
    try:
        return z.read(name)
    except KeyError:
        raise ValueError(f"it has no member `{name}`") from None


def check_target(path, manifest: dict, backend, target) -> None:
    """Refuses code built for another backend or machine (before any of it is loaded)."""
    if manifest["backend"] != backend.name:
        raise ArtifactError(f"{path} holds code for target `{manifest['backend']}`, not `{backend.name}`",
                            hint=f"run it with --target {manifest['backend']}, or {REBUILD}")
    reason = backend.check_target(manifest["target"], target)
    if reason:
        raise ArtifactError(f"{path} cannot run here: {reason}", hint="rebuild it here with `dlc compile`")


def _why(e: Exception) -> str:
    """What went wrong, in words: a reader's messages (zlib's "Error -3 while decompressing")
    say little to someone holding a damaged file."""
    if isinstance(e, zlib.error):
        return "its compressed data is corrupted"
    if isinstance(e, (EOFError, struct.error)) or str(e) == "File is not a zip file":
        return "it is truncated, or not a zip file"
    if isinstance(e, (RuntimeError, NotImplementedError)):
        return "its zip headers are corrupted"
    if isinstance(e, UnicodeDecodeError) or type(e).__name__ == "JSONDecodeError":
        return "its manifest is not valid JSON"
    return str(e) or type(e).__name__


_SCHEMA = {"format": int, "dlc": str, "model": str, "source_name": str, "source": str, "backend": str,
           "target": dict, "steps": list}
_STEP = {"batch": int, "layout": str, "blobs": list}
_BLOB = {"name": str, "sha256": str, "size": int}


def _manifest(path, raw: bytes) -> dict:
    manifest = json.loads(raw.decode("utf-8"))
    if not isinstance(manifest, dict):
        raise ValueError("the manifest is not an object")
    _fields(manifest, {"format": int, "dlc": str}, "the manifest")  # what any version writes
    if manifest["format"] != FORMAT or manifest["dlc"] != __version__:
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


def _layout(path, text: str) -> StepLayout | Entries:
    try:
        return layout_from_json(text)
    except ValueError as e:
        raise ArtifactError(f"{path} is damaged: a step's layout is invalid ({_why(e)})", hint=REBUILD) from None


def check_code(path, steps: dict, backend, target) -> None:
    """The backend's own checks of every program's code (before any of it is loaded)."""
    for batch, (blobs, layout) in sorted(steps.items()):
        reason = backend.validate(blobs, layout, target)
        if reason:
            raise ArtifactError(f"{path} is damaged: in its program for batch {batch}, {reason}", hint=REBUILD)


def check_fits(path, batch: int, layout, inputs: list[str], state: dict) -> None:
    """Each entry must take the model's inputs at its batch size and its parameters at their
    shapes (a step for another model or batch would be refused only when it runs), and the
    learning rate exactly when it trains."""
    for mode, entry in entries_of(layout).items():
        slots = {name: (kind, shape) for name, kind, _, shape in entry.slots}
        problem = None
        for name in inputs:
            kind, shape = slots.get(name, (None, None))
            if kind != "input" or not shape or shape[0] != batch:
                problem = f"it does not take input `{name}` for batch {batch}"
        for name, (kind, shape) in slots.items():
            if kind == "state" and name in state and tuple(shape) != state[name].shape:
                problem = f"its `{name}` has shape {shape}, the model's has {list(state[name].shape)}"
        if ("lr" in slots) != (mode == "train"):
            problem = "it is not " + ("a training" if mode == "train" else "an evaluation") + " step"
        if problem:
            raise ArtifactError(f"{path} is damaged: its {mode} step for batch {batch} does not fit the model "
                                f"({problem})", hint=REBUILD)
