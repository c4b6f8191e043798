"""Checkpoints: arrays and JSON metadata in one `.npz`, written atomically, read without pickle."""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from dlc import __version__
from dlc.core.diagnostics import CheckpointError
from dlc.core.types import DType, shape_str

FORMAT_VERSION = 1
META_KEY = "__meta__"

# What reading a damaged archive can raise: zipfile and zlib errors, short reads, headers
# that do not parse, sizes that do not fit in memory, unknown compression or encryption
# flags (a flipped bit in a zip header reads as "encrypted": RuntimeError).
_DAMAGE = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError, KeyError,
           struct.error, NotImplementedError, RuntimeError, MemoryError)

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a first member, or an empty archive
_DLC_DTYPES = {d.np: d.value for d in DType}

_META_LIMIT = 64 << 20  # bytes of JSON metadata: far more than any model's tensor list needs

Specs = dict[str, tuple[tuple[int, ...], np.dtype]]  # name -> (shape, dtype), as the .npy headers say
ExpectedTensors = Mapping[str, tuple[tuple[int, ...], str]]


def save_checkpoint(path: str | os.PathLike, arrays: Mapping[str, np.ndarray],
                    meta: Mapping[str, Any], keep_previous: bool = False) -> Path | None:
    """Write `arrays` and `meta` to `path` so that it holds either the old or the new checkpoint.

    With `keep_previous`, a file already at `path` is moved to `previous_path(path)` once the
    new one is written; returns where it went (None when there was none)."""
    path = Path(path)
    arrays = {name: np.asarray(a) for name, a in arrays.items()}
    if META_KEY in arrays:
        raise CheckpointError(f"`{META_KEY}` is reserved for checkpoint metadata, "
                              "not a tensor name")
    members = {**arrays, META_KEY: _encode_meta(arrays, meta)}
    try:
        return _write_atomically(path, members, keep_previous)
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint `{path}`: {e.strerror or e}",
                              hint="check that the folder is writable and the disk has room; "
                                   "the previous checkpoint, if any, is untouched") from None


def load_checkpoint(path: str | os.PathLike,
                    expect: ExpectedTensors | Callable[[Specs], ExpectedTensors] | None = None,
                    model: str | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Read a checkpoint, check it against `model` and `expect` {name: (shape, dtype)}, or a
    function giving that from the checkpoint's own {name: (shape, dtype)}.

    Every way the file can be missing, damaged, foreign or for another model is a
    CheckpointError. The zip directory, the .npy headers and `expect` are checked before any
    tensor is decompressed, so a small file declaring huge tensors is refused without reading
    them. Pickled data is never loaded: it could run arbitrary code.
    """
    path = Path(path)
    _check_is_zip(path)
    try:
        with zipfile.ZipFile(path) as zf:
            members = {info.filename[:-len(".npy")]: _member(path, zf, info) for info in zf.infolist()}
            meta = _decode_meta(path, zf, members.pop(META_KEY, None))
            _check_meta(path, meta, model)
            specs = {name: (shape, dtype) for name, (_, shape, dtype) in members.items()}
            _check_signature(path, specs, meta.get("signature"))
            if expect is not None:
                _check_expected(path, specs, expect(specs) if callable(expect) else expect, model)
            arrays = {name: _read(zf, info) for name, (info, _, _) in members.items()}
            # a member's CRC is checked only once it is read to its end: testzip reads them all
            damaged = zf.testzip()
    except _DAMAGE as e:
        raise _damaged(path, e) from None
    if damaged is not None:
        raise _damaged(path, f"bad CRC in `{damaged}`")
    return arrays, meta


def signature(arrays: Mapping[str, np.ndarray]) -> dict[str, dict]:
    """{name: {"shape": [4, 3], "dtype": "<f4"}}: what a checkpoint records about its tensors."""
    return _signature({name: (a.shape, a.dtype) for name, a in arrays.items()})


def _signature(specs: Specs) -> dict[str, dict]:
    return {name: {"shape": list(shape), "dtype": dtype.str}
            for name, (shape, dtype) in sorted(specs.items())}


# ---- writing ----

def _encode_meta(arrays: dict[str, np.ndarray], meta: Mapping[str, Any]) -> np.ndarray:
    full = {"dlc": __version__, **meta, "format": FORMAT_VERSION, "signature": signature(arrays)}
    try:
        text = json.dumps(full, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint metadata is not JSON-serialisable: {e}") from None
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def previous_path(path: Path) -> Path:
    """Where `keep_previous` moves an existing checkpoint: `ck.npz` -> `ck.prev.npz`."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _write_atomically(path: Path, members: dict[str, np.ndarray], keep_previous: bool) -> Path | None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    previous = None
    try:
        with os.fdopen(fd, "wb") as fh:
            _write_npz(fh, members)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; a checkpoint is an ordinary file
        if keep_previous and path.is_file():
            previous = previous_path(path)
            _keep_copy(path, previous)  # `path` stays in place until the new file replaces it
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C included: never leave a half-written temporary behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return previous


def _keep_copy(path: Path, copy: Path) -> None:
    """`copy` becomes the file at `path` (a hard link, or a copy where links are not
    supported), atomically: a kill at any moment leaves `path` intact."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.unlink(tmp)
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copy2(path, tmp)
        os.replace(tmp, copy)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _remove_stale_temporaries(path: Path) -> None:
    # A process killed while saving (SIGKILL, power loss) leaves its temporary behind; only
    # names mkstemp gives ours (`.ck.npz.` + 8 random characters + `.tmp`) are removed.
    stale = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent):
            if stale.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def _write_npz(fh, arrays: dict[str, np.ndarray]) -> None:
    # What np.savez does, without its keyword-argument interface: a tensor may be called
    # `file` or `arr_0`, and object arrays are refused here rather than pickled.
    with zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                try:
                    np.lib.format.write_array(member, array, allow_pickle=False)
                except ValueError as e:
                    raise CheckpointError(f"cannot save tensor `{name}`: {e}") from None


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable. Not possible everywhere (Windows): then the
    # file's own fsync is the best we can do.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---- reading ----

def _member(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo):
    """(info, shape, dtype) of a member `<name>.npy` from its .npy header, once the size the zip
    directory gives is the one the header implies: nothing else of it is decompressed."""
    if not info.filename.endswith(".npy"):
        raise CheckpointError(f"`{path}` is not a dlc checkpoint: member `{info.filename}` "
                              "is not an array")
    with zf.open(info) as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise ValueError(f"`{info.filename}` has .npy format version {version}")
        header = fh.tell()
    if dtype.hasobject:
        raise CheckpointError(
            f"checkpoint `{path}` holds a pickled Python object in `{info.filename[:-len('.npy')]}`",
            hint="dlc never unpickles checkpoint data, because unpickling can run "
                 "arbitrary code; re-save the tensors as plain numeric arrays")
    size = header + math.prod(shape) * dtype.itemsize
    if info.file_size != size:
        raise _damaged(path, f"`{info.filename}` is {info.file_size} bytes, but its header "
                             f"declares {_describe(shape, dtype)} ({size} bytes)")
    return info, shape, dtype


def _read(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    with zf.open(info) as fh:
        return np.lib.format.read_array(fh, allow_pickle=False)


def _check_is_zip(path: Path) -> None:
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint `{path}` does not exist",
                              hint="check the path, or train without --resume to start "
                                   "fresh") from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint `{path}`: {e.strerror}") from None
    if not magic:
        raise _damaged(path, "the file is empty")
    if magic not in _ZIP_MAGIC:
        raise CheckpointError(f"`{path}` is not a dlc checkpoint: it is not an .npz archive",
                              hint="dlc checkpoints are .npz files written by `dlc run` or "
                                   "dlc.runtime.checkpoint.save_checkpoint")


def _damaged(path: Path, reason: object) -> CheckpointError:
    detail = str(reason) or "unexpected end of data"  # zipfile raises a bare EOFError
    return CheckpointError(f"checkpoint `{path}` is damaged (truncated or corrupted): {detail}",
                           hint="it was probably cut short by a crash, a full disk or an "
                                "interrupted copy; use an older checkpoint or train from scratch")


def _decode_meta(path: Path, zf: zipfile.ZipFile, member) -> dict:
    not_ours = f"`{path}` is not a dlc checkpoint"
    if member is None:
        raise CheckpointError(f"{not_ours}: it has no `{META_KEY}` entry",
                              hint="it looks like a plain numpy .npz; dlc checkpoints are written "
                                   "by `dlc run` or save_checkpoint")
    info, shape, dtype = member
    if dtype != np.uint8 or len(shape) != 1:
        raise CheckpointError(f"{not_ours}: `{META_KEY}` is a {dtype}{shape_str(shape)} "
                              "array, not UTF-8 JSON bytes")
    if shape[0] > _META_LIMIT:
        raise _damaged(path, f"`{META_KEY}` declares {shape[0]} bytes of metadata")
    try:
        meta = json.loads(_read(zf, info).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{not_ours}: its `{META_KEY}` entry is not valid "
                              f"JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("format"), int):
        raise CheckpointError(f"{not_ours}: its `{META_KEY}` entry has no format version")
    return meta


def _check_meta(path: Path, meta: dict, model: str | None) -> None:
    if meta["format"] > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint `{path}` has format version {meta['format']}, written by dlc "
            f"{meta.get('dlc', '?')}; this dlc {__version__} reads versions up to {FORMAT_VERSION}",
            hint="upgrade dlc to load it")
    if model is not None and meta.get("model") != model:
        saved = f"model `{meta['model']}`" if "model" in meta else "no model name"
        raise CheckpointError(f"checkpoint `{path}` is for {saved}, not model `{model}`",
                              hint="pass a checkpoint saved while training this model")


def _check_signature(path: Path, specs: Specs, recorded: object) -> None:
    # The tensors must be exactly the ones the writer recorded: catches members that were
    # added, dropped or rewritten by anything but save_checkpoint.
    if _signature(specs) != recorded:
        raise _damaged(path, "its tensors do not match the signature recorded when it was saved")


def _check_expected(path: Path, specs: Specs, expect: ExpectedTensors, model: str | None) -> None:
    problems = [f"missing tensor `{name}` ({_describe(shape, dtype)})"
                for name, (shape, dtype) in expect.items() if name not in specs]
    problems += [f"unexpected tensor `{name}` ({_describe(*specs[name])})"
                 for name in specs if name not in expect]
    for name, (shape, dtype) in expect.items():
        if name in specs and specs[name] != (tuple(shape), _np_dtype(dtype)):
            problems.append(f"tensor `{name}`: checkpoint has {_describe(*specs[name])}, "
                            f"model expects {_describe(shape, dtype)}")
    if problems:
        what = f"model `{model}`" if model else "the model"
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        raise CheckpointError(f"checkpoint `{path}` does not fit {what} ({count}): {problems[0]}",
                              notes=problems[1:],
                              hint="the model changed since the checkpoint was saved; train "
                                   "from scratch or restore the matching .dln file")


def _np_dtype(dtype: str | np.dtype) -> np.dtype:
    """A dtype from either dlc's spelling (`f32`) or numpy's (`float32`, `<f4`)."""
    try:
        return DType(dtype).np
    except ValueError:
        return np.dtype(dtype)


def _describe(shape, dtype) -> str:
    dt = _np_dtype(dtype)
    return f"{_DLC_DTYPES.get(dt, dt.name)}{shape_str(tuple(shape))}"
