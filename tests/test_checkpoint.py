"""Checkpoints: exact round trips, atomic writes, and a clear error for every bad file."""
from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from dlc.core.diagnostics import CheckpointError
from dlc.runtime import checkpoint
from dlc.runtime.checkpoint import load_checkpoint, save_checkpoint


def _arrays():
    rng = np.random.default_rng(0)
    return {
        "dense1.w": rng.standard_normal((4, 3)).astype(np.float32),
        "dense1.b": np.array([0.0, -0.0, np.nan], dtype=np.float32),
        "bn.mean": rng.standard_normal(5),
        "step": np.array(7, dtype=np.int32),
        "file": np.zeros((0, 2), dtype=np.float32),  # a name np.savez's keywords could not take
    }


META = {"model": "mlp", "epoch": 3, "step": 1500, "rng": [12, 34]}


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "model.ckpt.npz"
    save_checkpoint(path, _arrays(), META)
    return path


def _error(path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, **kwargs)
    return str(info.value)


def _expect(arrays):
    return {name: (a.shape, a.dtype.name) for name, a in arrays.items()}


def _write_zip(path, members: dict[str, np.ndarray | str]):
    """An .npz written by hand: any member names, arrays or raw text."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, value in members.items():
            if isinstance(value, np.ndarray):
                buffer = io.BytesIO()
                np.save(buffer, value)
                name, value = f"{name}.npy", buffer.getvalue()
            zf.writestr(name, value)


def _meta_bytes(meta: dict) -> np.ndarray:
    return np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)


# ---- saving and loading ----

def test_round_trip_is_bit_identical(ckpt):
    arrays, meta = load_checkpoint(ckpt, expect=_expect(_arrays()), model="mlp")
    original = _arrays()
    assert arrays.keys() == original.keys()
    for name, a in original.items():
        assert arrays[name].dtype == a.dtype and arrays[name].shape == a.shape
        assert arrays[name].tobytes() == a.tobytes(), name  # NaN and -0.0 included
    assert {k: meta[k] for k in META} == META
    assert meta["format"] == checkpoint.FORMAT_VERSION and "dlc" in meta
    assert meta["signature"]["dense1.w"] == {"shape": [4, 3], "dtype": "<f4"}


def test_expect_accepts_dlc_dtype_names(ckpt):
    expect = {**_expect(_arrays()), "dense1.w": ((4, 3), "f32"), "step": ((), "i32")}
    load_checkpoint(ckpt, expect=expect)


def test_save_creates_parent_folders(tmp_path):
    path = tmp_path / "runs" / "a" / "last.npz"
    save_checkpoint(path, {"w": np.ones(2)}, {})
    assert load_checkpoint(path)[0]["w"].tolist() == [1.0, 1.0]


def test_meta_key_is_reserved(tmp_path):
    with pytest.raises(CheckpointError, match="reserved"):
        save_checkpoint(tmp_path / "c.npz", {"__meta__": np.ones(1)}, {})


def test_object_arrays_are_not_saved(tmp_path):
    with pytest.raises(CheckpointError, match="cannot save tensor `w`"):
        save_checkpoint(tmp_path / "c.npz", {"w": np.array([{}, None], dtype=object)}, {})
    assert os.listdir(tmp_path) == []


def test_meta_must_be_json(tmp_path):
    with pytest.raises(CheckpointError, match="not JSON-serialisable"):
        save_checkpoint(tmp_path / "c.npz", {"w": np.ones(1)}, {"when": object()})


# ---- atomicity ----

def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def _disk_full(fp, array, **kwargs):
    fp.write(b"partial")
    raise OSError(28, "No space left on device")


def test_failed_write_keeps_previous_checkpoint(ckpt, monkeypatch):
    monkeypatch.setattr(np.lib.format, "write_array", _disk_full)
    with pytest.raises(CheckpointError, match="cannot write checkpoint .*: No space left"):
        save_checkpoint(ckpt, {"w": np.ones(3)}, {"model": "other"})
    monkeypatch.undo()
    assert _files(ckpt.parent) == [ckpt.name]  # no temporary left behind
    arrays, meta = load_checkpoint(ckpt, model="mlp")
    assert arrays["dense1.w"].tobytes() == _arrays()["dense1.w"].tobytes()


def test_failed_rename_leaves_no_temporary(ckpt, monkeypatch):
    def broken_replace(src, dst):
        raise KeyboardInterrupt  # Ctrl-C at the worst moment

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(ckpt, {"w": np.ones(3)}, {"model": "other"})
    monkeypatch.undo()
    assert _files(ckpt.parent) == [ckpt.name]
    assert load_checkpoint(ckpt)[1]["model"] == "mlp"


def test_unwritable_folder(tmp_path):
    blocker = tmp_path / "runs"
    blocker.write_text("a file where the folder should be")
    with pytest.raises(CheckpointError, match="cannot write checkpoint"):
        save_checkpoint(blocker / "last.npz", {"w": np.ones(1)}, {})


def test_overwrite_replaces_whole_file(ckpt):
    save_checkpoint(ckpt, {"w": np.ones(3)}, {"model": "mlp", "epoch": 4})
    arrays, meta = load_checkpoint(ckpt)
    assert list(arrays) == ["w"] and meta["epoch"] == 4
    assert _files(ckpt.parent) == [ckpt.name]


def test_keep_previous_moves_the_old_file_aside(ckpt):
    assert save_checkpoint(ckpt, {"w": np.ones(3)}, {"model": "new"}, keep_previous=True) \
        == ckpt.parent / "model.ckpt.prev.npz"
    assert _files(ckpt.parent) == ["model.ckpt.npz", "model.ckpt.prev.npz"]
    assert load_checkpoint(ckpt)[1]["model"] == "new"
    assert load_checkpoint(ckpt.parent / "model.ckpt.prev.npz")[1]["model"] == "mlp"


def test_keep_previous_without_a_previous_file(tmp_path):
    assert save_checkpoint(tmp_path / "c.npz", {"w": np.ones(1)}, {}, keep_previous=True) is None
    assert _files(tmp_path) == ["c.npz"]


def test_failed_write_with_keep_previous_leaves_the_old_file_in_place(ckpt, monkeypatch):
    monkeypatch.setattr(np.lib.format, "write_array", _disk_full)
    with pytest.raises(CheckpointError):
        save_checkpoint(ckpt, {"w": np.ones(3)}, {"model": "other"}, keep_previous=True)
    assert _files(ckpt.parent) == [ckpt.name]


def test_keep_previous_never_leaves_the_path_empty(ckpt, monkeypatch):
    """A kill after the old file is kept aside and before the new one is in place must still
    find a checkpoint at the path (the old one), not only the .prev copy."""
    real_replace = os.replace

    def killed_before_the_new_file_lands(src, dst):
        if Path(dst) == ckpt:
            raise KeyboardInterrupt
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", killed_before_the_new_file_lands)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(ckpt, {"w": np.ones(3)}, {"model": "new"}, keep_previous=True)
    assert load_checkpoint(ckpt)[1]["model"] == "mlp"
    assert sorted(name for name in _files(ckpt.parent) if not name.endswith(".tmp")) == \
        ["model.ckpt.npz", "model.ckpt.prev.npz"]


_KILLED_SAVE = """
import os, sys, numpy as np
from dlc.runtime.checkpoint import save_checkpoint
np.lib.format.write_array = lambda *a, **k: os._exit(9)  # killed in the middle of the write
save_checkpoint(sys.argv[1], {"w": np.ones(3)}, {})
"""


def test_temporaries_of_a_killed_save_are_removed_by_the_next_save(ckpt):
    subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(ckpt)], check=False)
    stale = [name for name in _files(ckpt.parent) if name.endswith(".tmp")]
    assert len(stale) == 1 and stale[0].startswith(".model.ckpt.npz.")
    others = [".model.ckpt.npz.notours.tmp", ".other.npz.abcd1234.tmp", "model.ckpt.npz.tmp"]
    for name in others:
        (ckpt.parent / name).write_text("not dlc's")
    save_checkpoint(ckpt, {"w": np.ones(3)}, {"model": "mlp"})
    assert _files(ckpt.parent) == sorted([ckpt.name, *others])


# ---- damaged and foreign files ----

def test_missing_file(tmp_path):
    assert "does not exist" in _error(tmp_path / "nope.npz")


def test_empty_file(tmp_path):
    path = tmp_path / "c.npz"
    path.write_bytes(b"")
    assert "damaged" in _error(path) and "empty" in _error(path)


def test_truncated_file(ckpt):
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    message = _error(ckpt)
    assert "damaged (truncated or corrupted)" in message and str(ckpt) in message


def test_flipped_bytes_in_the_middle(ckpt):
    data = bytearray(ckpt.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4] = bytes(b ^ 0xFF for b in data[middle:middle + 4])
    ckpt.write_bytes(bytes(data))
    assert "damaged" in _error(ckpt)


def test_no_single_byte_flip_escapes_or_goes_unnoticed(tmp_path):
    """Flip every byte of a small checkpoint: each load fails cleanly or returns the original."""
    path = tmp_path / "c.npz"
    save_checkpoint(path, {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, {"model": "m"})
    data = path.read_bytes()
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 0x55
        path.write_bytes(bytes(flipped))
        try:
            arrays, meta = load_checkpoint(path)
        except CheckpointError:
            continue
        # Only bytes no reader checks (zip timestamps, "version made by") may change silently.
        assert arrays["w"].tolist() == [[0, 1, 2], [3, 4, 5]] and meta["model"] == "m", i


def test_not_an_npz(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_text("hello, I am a text file\n")
    message = _error(path)
    assert "is not a dlc checkpoint" in message and "not an .npz archive" in message


def test_plain_npy_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "w.npy"
    np.save(path, np.ones(3))
    assert "not an .npz archive" in _error(path)


def test_npz_without_meta(tmp_path):
    path = tmp_path / "plain.npz"
    np.savez(path, w=np.ones(3))
    message = _error(path)
    assert "is not a dlc checkpoint" in message and "no `__meta__`" in message


def test_meta_that_is_not_json(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, w=np.ones(3), __meta__=np.frombuffer(b"{not json", dtype=np.uint8))
    assert "not valid JSON" in _error(path)


def test_meta_without_format(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, __meta__=_meta_bytes({"model": "m"}))
    assert "no format version" in _error(path)


def _rewrite_meta(path, change):
    with np.load(path) as npz:
        arrays = {name: npz[name] for name in npz.files}
    meta = json.loads(arrays["__meta__"].tobytes())
    change(meta)
    _write_zip(path, {**arrays, "__meta__": _meta_bytes(meta)})


def test_format_from_the_future(ckpt):
    _rewrite_meta(ckpt, lambda meta: meta.update(format=99, dlc="9.0.0"))
    message = _error(ckpt)
    assert "format version 99" in message and "dlc 9.0.0" in message
    assert "upgrade dlc" in message


def test_tensors_that_contradict_the_signature(ckpt):
    _rewrite_meta(ckpt, lambda meta: meta["signature"].pop("bn.mean"))
    assert "do not match the signature" in _error(ckpt)


def test_pickled_object_array_is_refused(tmp_path, monkeypatch):
    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.npz"
    np.savez(path, w=np.array([Boom()], dtype=object),
             __meta__=_meta_bytes({"format": 1, "signature": {}}))
    monkeypatch.setattr(os, "system", lambda cmd: pytest.fail("checkpoint ran code"))
    message = _error(path)
    assert "pickled Python object in `w`" in message and "never unpickles" in message


def test_pickle_renamed_to_npz_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    path.write_bytes(pickle.dumps({"w": [1, 2, 3]}))
    assert "not an .npz archive" in _error(path)


def test_non_array_member(tmp_path):
    path = tmp_path / "c.npz"
    _write_zip(path, {"__meta__": _meta_bytes({"format": 1, "signature": {}}), "notes.txt": "hi"})
    assert "member `notes.txt` is not an array" in _error(path)


def _inflating_checkpoint(path, member: bytes, signature: dict):
    """A checkpoint of one deflated member `w.npy` (small on disk, large once decompressed)."""
    meta = _meta_bytes({"format": 1, "model": "m", "signature": signature})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("w.npy", member)
        buffer = io.BytesIO()
        np.save(buffer, meta)
        zf.writestr("__meta__.npy", buffer.getvalue())


@pytest.fixture
def bytes_decompressed(monkeypatch):
    """How many bytes were read out of zip members."""
    total = [0]
    read = zipfile.ZipExtFile.read

    def counting(self, n=-1):
        data = read(self, n)
        total[0] += len(data)
        return data
    monkeypatch.setattr(zipfile.ZipExtFile, "read", counting)
    return total


BIG = 1 << 22  # 16 MiB of float32 zeros: 16 KiB deflated


def test_huge_tensor_is_refused_from_its_header_before_decompressing(tmp_path, bytes_decompressed):
    path = tmp_path / "bomb.npz"
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(BIG, np.float32))
    _inflating_checkpoint(path, buffer.getvalue(), {"w": {"shape": [BIG], "dtype": "<f4"}})
    assert path.stat().st_size < BIG // 100
    message = _error(path, expect={"w": ((3,), "f32")}, model="m")
    assert f"tensor `w`: checkpoint has f32[{BIG}], model expects f32[3]" in message
    assert bytes_decompressed[0] < 1 << 16


def test_member_larger_than_its_header_says_is_refused_before_decompressing(tmp_path,
                                                                            bytes_decompressed):
    path = tmp_path / "bomb.npz"
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(3, np.float32))
    _inflating_checkpoint(path, buffer.getvalue() + bytes(BIG * 4),
                          {"w": {"shape": [3], "dtype": "<f4"}})
    message = _error(path, expect={"w": ((3,), "f32")}, model="m")
    assert "damaged" in message and "`w.npy` is" in message and "declares f32[3] (140 bytes)" in message
    assert bytes_decompressed[0] < 1 << 16


# ---- checkpoint against model ----

def test_model_name_mismatch(ckpt):
    message = _error(ckpt, model="lenet")
    assert "is for model `mlp`, not model `lenet`" in message


def test_checkpoint_without_model_name(tmp_path):
    path = tmp_path / "c.npz"
    save_checkpoint(path, {"w": np.ones(1)}, {})
    assert "is for no model name, not model `mlp`" in _error(path, model="mlp")


def test_missing_and_unexpected_tensors(ckpt):
    expect = _expect(_arrays())
    expect["dense2.w"] = expect.pop("dense1.w")
    message = _error(ckpt, expect=expect, model="mlp")
    assert "does not fit model `mlp` (2 problems)" in message
    assert "missing tensor `dense2.w` (f32[4,3])" in message
    assert "unexpected tensor `dense1.w` (f32[4,3])" in message


def test_shape_mismatch_names_both_shapes(ckpt):
    expect = {**_expect(_arrays()), "dense1.w": ((3, 4), "float32")}
    message = _error(ckpt, expect=expect)
    assert "tensor `dense1.w`: checkpoint has f32[4,3], model expects f32[3,4]" in message


def test_dtype_mismatch(ckpt):
    expect = {**_expect(_arrays()), "bn.mean": ((5,), "f32")}
    message = _error(ckpt, expect=expect)
    assert "tensor `bn.mean`: checkpoint has f64[5], model expects f32[5]" in message
