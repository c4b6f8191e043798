"""Fuzzing the files dlc reads back: artifacts (.dlcx), compile-cache entries and
checkpoints, damaged at random -- flipped bytes, truncation, zip members removed or
swapped, manifest and layout fields changed, objects from another build -- with and
without the digests made to match again.

Whatever the damage, loading and running must end in success or a DlcError: no other
exception, and never a crash of the interpreter. The loads run in one child process per
test (tests/isolated.py), which names the case that killed it.

Deterministic: fixed seeds. FUZZ_FILES cases per kind by default; the `slow` tests run
ten times as many (pytest -m slow tests/test_fuzz_files.py), and DLC_FUZZ_SEED picks
other cases.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import zipfile

import numpy as np
import pytest

import dlc
from artifacts import MODEL, THREADS, another_build, build_artifact, compiled_step, members
from dlc import cache as cache_mod
from isolated import describe_crash, run_cases

FUZZ_FILES = int(os.environ.get("DLC_FUZZ_FILES", "24"))
SEED = int(os.environ.get("DLC_FUZZ_SEED", "0"))


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    d = tmp_path_factory.mktemp("originals")
    artifact = build_artifact(d / "model.dlcx", d / "cache")
    _, key, blobs, layout = compiled_step(d / "cache")
    other = another_build()
    model = dlc.load(MODEL)
    checkpoint = d / "weights.npz"
    model.save(checkpoint)
    return {"dir": d, "artifact": artifact, "entry": (key, blobs, layout.to_json()), "other": other,
            "checkpoint": checkpoint}


# --- mutations --------------------------------------------------------------------------------------

ODD_VALUES = [None, True, 0, -1, 1, 7, 2 ** 40, 0.5, "", "x", "cpu", [], [0], {}, {"a": 1}]


def flip(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data)


def truncate(rng: random.Random, data: bytes) -> bytes:
    return data[:rng.randrange(len(data))]


def mutate_json(rng: random.Random, value, top: bool = True):
    """The value with one field somewhere inside it changed, removed or retyped (JSON held
    in a string -- a step's layout -- counts as part of the tree)."""
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return json.dumps(mutate_json(rng, json.loads(value), top=False))
        except ValueError:
            pass
    if isinstance(value, dict) and value and (top or rng.random() < 0.8):
        key = rng.choice(sorted(value))
        out = dict(value)
        if rng.random() < 0.15:
            del out[key]
        else:
            out[key] = mutate_json(rng, value[key], top=False)
        return out
    if isinstance(value, list) and value and rng.random() < 0.8:
        out, i = list(value), rng.randrange(len(value))
        r = rng.random()
        if r < 0.15:
            del out[i]
        elif r < 0.25:
            out.insert(i, out[i])
        else:
            out[i] = mutate_json(rng, value[i], top=False)
        return out
    if isinstance(value, bool) or value is None:
        return rng.choice(ODD_VALUES)
    if isinstance(value, int):
        return rng.choice([value + 1, value - 1, value * 2, 0, -value, value + 64, str(value)] + ODD_VALUES[:4])
    if isinstance(value, str):
        return rng.choice([value + "x", value[:-1], value.upper(), "", value * 2] + ODD_VALUES[:3])
    return rng.choice(ODD_VALUES)


def artifact_mutant(rng: random.Random, original, other_blobs) -> tuple[str, bytes]:
    data = original.read_bytes()
    kind = rng.choice(["flip", "truncate", "remove", "swap", "garbage", "foreign", "field", "field", "field"])
    if kind == "flip":
        return kind, flip(rng, data)
    if kind == "truncate":
        return kind, truncate(rng, data)
    manifest, blobs = members(original)
    names = sorted(blobs)
    reseal = rng.random() < 0.7  # most damage here comes with digests that match again
    if kind == "remove":
        victim = rng.choice(names + ["manifest.json"])
        if victim == "manifest.json":
            manifest = None
        else:
            del blobs[victim]
    elif kind == "swap":
        a, b = rng.sample(names, 2)
        blobs[a], blobs[b] = blobs[b], blobs[a]
    elif kind == "garbage":
        name = rng.choice(names)
        head = blobs[name][:rng.choice([0, 4, 16, 64])]
        blobs[name] = head + rng.randbytes(rng.randrange(1, 4096))
    elif kind == "foreign":
        name = rng.choice(names)
        blobs[name] = rng.choice(other_blobs)
    else:
        manifest = mutate_json(rng, manifest)
        reseal = False
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        if manifest is not None:
            z.writestr("manifest.json", json.dumps(_resealed(manifest, blobs) if reseal else manifest))
        for name, blob in blobs.items():
            z.writestr(name, blob)
    return f"{kind}{' (resealed)' if reseal else ''}", buf.getvalue()


def _resealed(manifest, blobs):
    """The manifest with every digest matching its blob again."""
    for step in manifest["steps"]:
        for entry in step["blobs"]:
            if entry["name"] in blobs:
                entry["sha256"] = hashlib.sha256(blobs[entry["name"]]).hexdigest()
                entry["size"] = len(blobs[entry["name"]])
    return manifest


def entry_mutant(rng: random.Random, original, other) -> tuple[str, bytes]:
    key, blobs, layout = original
    other_blobs, other_layout = other
    packed = cache_mod.pack(key, blobs, layout)
    kind = rng.choice(["flip", "truncate", "swap", "drop", "garbage", "foreign", "foreign layout", "field", "field"])
    if kind == "flip":
        return kind, flip(rng, packed)
    if kind == "truncate":
        return kind, truncate(rng, packed)
    blobs = list(blobs)
    if kind == "swap":
        blobs.reverse()
    elif kind == "drop":
        del blobs[rng.randrange(len(blobs))]
    elif kind == "garbage":
        i = rng.randrange(len(blobs))
        blobs[i] = blobs[i][:rng.choice([0, 4, 16, 64])] + rng.randbytes(rng.randrange(1, 4096))
    elif kind == "foreign":
        i = rng.randrange(len(blobs))
        blobs[i] = other_blobs[i]
    elif kind == "foreign layout":
        layout = other_layout.to_json()
    else:
        layout = json.dumps(mutate_json(rng, json.loads(layout)))
    return kind + " (checksum valid)", cache_mod.pack(key, blobs, layout)


def checkpoint_mutant(rng: random.Random, original) -> tuple[str, bytes]:
    data = original.read_bytes()
    kind = rng.choice(["flip", "truncate", "remove", "swap", "meta", "meta"])
    if kind == "flip":
        return kind, flip(rng, data)
    if kind == "truncate":
        return kind, truncate(rng, data)
    with zipfile.ZipFile(original) as z:
        parts = {n: z.read(n) for n in z.namelist()}
    names = sorted(parts)
    if kind == "remove":
        del parts[rng.choice(names)]
    elif kind == "swap":
        a, b = rng.sample(names, 2)
        parts[a], parts[b] = parts[b], parts[a]
    else:
        meta = json.loads(np.load(io.BytesIO(parts["__meta__.npy"])).tobytes())
        text = json.dumps(mutate_json(rng, meta)).encode()
        buf = io.BytesIO()
        np.lib.format.write_array(buf, np.frombuffer(text, dtype=np.uint8))
        parts["__meta__.npy"] = buf.getvalue()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, blob in parts.items():
            z.writestr(name, blob)
    return kind, buf.getvalue()


# --- the child processes ---------------------------------------------------------------------------

# Loads an artifact and trains and evaluates from it: every step it holds gets loaded.
ARTIFACT_CHILD = '''
import traceback, dlc
from dlc.core.diagnostics import DlcError
for i, path in enumerate(CASES):
    begin(i)
    try:
        m = dlc.load(path)
        m.fit(epochs=1, threads=THREADS)
        m.evaluate(threads=THREADS)
        report(i, "ok")
    except DlcError as e:
        report(i, "error", error=str(e).splitlines()[0])
    except Exception as e:
        report(i, "escaped", error=f"{type(e).__name__}: {e}", trace=traceback.format_exc())
'''

# Puts each entry under the key a program looks up, then runs that program's step. A
# rebuild means the damage was seen; compiling is replaced by a marker to keep this quick.
ENTRY_CHILD = '''
import traceback, numpy as np, dlc
from dlc.backends.llvm import BACKEND
from dlc.core.diagnostics import DlcError
from dlc.program import make_program

class Rebuilt(Exception):
    pass

def rebuild(*args, **kwargs):
    raise Rebuilt()

BACKEND.compile = rebuild
m = dlc.load(MODEL_PATH)
config = m.train_config
rng = np.random.default_rng(0)
feeds = {"x": rng.normal(size=(5, 2)).astype(np.float32), "label": (rng.random((5, 1)) > 0.5).astype(np.float32)}
for i, data in enumerate(CASES):
    begin(i)
    with open(ENTRY, "wb") as f:
        f.write(bytes.fromhex(data))
    p = make_program("cpu", lambda: m.compile_graph("eval", config), dict(m.state), key=m.source_key("eval", config),
                     options={"cache_dir": CACHE_DIR, "threads": THREADS})
    try:
        report(i, "ran", output=p.run(feeds)["output"].tolist())
    except Rebuilt:
        report(i, "rebuilt")
    except DlcError as e:
        report(i, "error", error=str(e).splitlines()[0])
    except Exception as e:
        report(i, "escaped", error=f"{type(e).__name__}: {e}", trace=traceback.format_exc())
'''

# Restores weights, then predicts with them on the compiled step.
CHECKPOINT_CHILD = '''
import traceback, numpy as np, dlc
from dlc.core.diagnostics import DlcError
x = np.random.default_rng(0).normal(size=(4, 2))
for i, path in enumerate(CASES):
    begin(i)
    try:
        m = dlc.load(MODEL_PATH)
        m.load_weights(path)
        m.predict(x, threads=THREADS)
        report(i, "ok")
    except DlcError as e:
        report(i, "error", error=str(e).splitlines()[0])
    except Exception as e:
        report(i, "escaped", error=f"{type(e).__name__}: {e}", trace=traceback.format_exc())
'''


def _check(run, labels):
    assert run.crashed is None and run.returncode == 0, describe_crash(run, labels)
    escaped = [f"{labels[i]}: {r['error']}\n{r['trace']}" for i, r in sorted(run.results.items())
               if r["outcome"] == "escaped"]
    assert not escaped, f"{len(escaped)} exception(s) other than DlcError escaped; the first:\n{escaped[0]}"
    assert len(run.results) == len(labels)


def _fuzz_artifacts(originals, tmp_path, n, seed):
    rng = random.Random(seed)
    labels, paths = [], []
    for i in range(n):
        label, data = artifact_mutant(rng, originals["artifact"], originals["other"][0])
        path = tmp_path / f"{i}.dlcx"
        path.write_bytes(data)
        labels.append(f"case {i}: {label} ({path})")
        paths.append(str(path))
    script = f"THREADS = {THREADS}\n" + ARTIFACT_CHILD
    run = run_cases(script, paths, tmp_path, env={"DLC_CACHE_DIR": str(originals["dir"] / "cache")})
    _check(run, labels)
    return run


def _fuzz_entries(originals, tmp_path, n, seed):
    rng = random.Random(seed)
    key = originals["entry"][0]
    cache_dir = tmp_path / "cache"
    entry = cache_dir / key[:2] / f"{key}.obj"
    entry.parent.mkdir(parents=True, mode=0o700)
    os.chmod(cache_dir, 0o700)
    cases = [("intact", cache_mod.pack(*originals["entry"]))]
    cases += [entry_mutant(rng, originals["entry"], originals["other"]) for _ in range(n)]
    labels = [f"case {i}: {label}" for i, (label, _) in enumerate(cases)]
    script = (f"MODEL_PATH, THREADS, CACHE_DIR, ENTRY = {str(MODEL)!r}, {THREADS}, {str(cache_dir)!r}, "
              f"{str(entry)!r}\n" + ENTRY_CHILD)
    run = run_cases(script, [data.hex() for _, data in cases], tmp_path)
    _check(run, labels)
    assert run.results[0]["outcome"] == "ran"
    for i, r in run.results.items():  # code that was accepted computes what the intact entry does
        if r["outcome"] == "ran":
            assert r["output"] == run.results[0]["output"], labels[i]
    return run


def _fuzz_checkpoints(originals, tmp_path, n, seed):
    rng = random.Random(seed)
    labels, paths = [], []
    for i in range(n):
        label, data = checkpoint_mutant(rng, originals["checkpoint"])
        path = tmp_path / f"{i}.npz"
        path.write_bytes(data)
        labels.append(f"case {i}: {label} ({path})")
        paths.append(str(path))
    script = f"MODEL_PATH, THREADS = {str(MODEL)!r}, {THREADS}\n" + CHECKPOINT_CHILD
    run = run_cases(script, paths, tmp_path, env={"DLC_CACHE_DIR": str(originals["dir"] / "cache")})
    _check(run, labels)
    return run


def test_fuzz_artifacts(originals, tmp_path):
    run = _fuzz_artifacts(originals, tmp_path, FUZZ_FILES, SEED)
    assert any(r["outcome"] == "error" for r in run.results.values())


def test_fuzz_cache_entries(originals, tmp_path):
    run = _fuzz_entries(originals, tmp_path, FUZZ_FILES, SEED)
    assert any(r["outcome"] == "rebuilt" for r in run.results.values())


def test_fuzz_checkpoints(originals, tmp_path):
    run = _fuzz_checkpoints(originals, tmp_path, FUZZ_FILES, SEED)
    assert any(r["outcome"] == "error" for r in run.results.values())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["artifacts", "entries", "checkpoints"])
def test_fuzz_files_long(originals, tmp_path, kind):
    fuzz = {"artifacts": _fuzz_artifacts, "entries": _fuzz_entries, "checkpoints": _fuzz_checkpoints}[kind]
    fuzz(originals, tmp_path, 10 * FUZZ_FILES, SEED + 1)
