"""Compiled code from disk is checked completely before any of it is loaded (issue 10):
damaged artifacts are refused in one sentence, damaged cache entries rebuilt; the cache
directory is private, bounded and shared safely; a step that cannot fit in memory is
refused before allocating. Loads that used to crash the interpreter run in a child
process (tests/isolated.py), so a regression fails a test instead of killing the run."""
from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

import dlc
from artifacts import (MODEL, SMALL, THREADS, another_build, another_unit, build_artifact, compiled_step, members,
                       write_entry, write_members)
from dlc import cache as cache_mod
from dlc import cli
from dlc.backends.llvm import BACKEND as CPU
from dlc.backends.llvm.elf import ElfError, symbols
from dlc.core.diagnostics import ArtifactError, DlcError, ResourceError, UsageError
from isolated import CLI, describe_crash, run_cases


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """An artifact of MODEL (programs for two batch sizes, each with a training and an
    evaluation entry), and another build of its program for the smaller batch."""
    d = tmp_path_factory.mktemp("built")
    path = build_artifact(d / "model.dlcx", d / "cache")
    return d, path, SMALL, another_unit(SMALL)


def _step(manifest, batch):
    return next(s for s in manifest["steps"] if s["batch"] == batch)


def _edit_layout(step, edit):
    layout = json.loads(step["layout"])
    edit(layout)
    step["layout"] = json.dumps(layout)


# --- artifacts -------------------------------------------------------------------------------------

def _artifact_cases(built, out):
    """(label, file, what the one-line message must say): every way to damage an artifact
    that reached MCJIT (and crashed the interpreter) or gave an unclear message before."""
    d, path, small, (other_blobs, other_layout) = built
    cases = [("intact", path, None)]

    def variant(label, edit, expect, reseal=True):
        manifest, blobs = members(path)
        edit(manifest, blobs)
        cases.append((label, write_members(out / f"{len(cases)}.dlcx", manifest, blobs, reseal), expect))

    def drop_objects(m, b):
        for s in m["steps"]:
            del b[s["blobs"].pop()["name"]]
    objects = len(members(path)[0]["steps"][0]["blobs"])  # a few per compiler process
    variant("a missing kernel object", drop_objects,
            f"it has {objects - 1} object(s) where its layout lists {objects}")

    def swap_between_steps(m, b):
        x, y = (s["blobs"][1]["name"] for s in m["steps"][:2])
        b[x], b[y] = b[y], b[x]
    variant("objects swapped between steps", swap_between_steps, "is not the one compiled with this layout")

    def swap_within(m, b):
        x, y = (e["name"] for e in m["steps"][0]["blobs"][:2])
        b[x], b[y] = b[y], b[x]
    variant("objects swapped within a step", swap_within, "is not the one compiled with this layout")

    def garbage(m, b):
        b[m["steps"][0]["blobs"][0]["name"]] = b"\x7fELF\x02\x01\x01" + bytes(range(256)) * 8
    variant("a garbage object", garbage, "object 0 is not valid object code")

    def foreign(m, b):
        b[_step(m, small)["blobs"][1]["name"]] = other_blobs[1]
    variant("an object from another build", foreign, "object 1 is not the one compiled with this layout")

    def foreign_layout(m, b):
        _step(m, small)["layout"] = other_layout.to_json()
    variant("a layout from another build", foreign_layout, "is not the one compiled with this layout")

    def edited_layout(m, b):
        _edit_layout(m["steps"][0], lambda layout: layout["entries"]["train"].update(
            arena_bytes=layout["entries"]["train"]["arena_bytes"] + 64))
    variant("an edited layout", edited_layout, "its layout is not the one the code was compiled for")

    def other_machine(m, b):
        name = m["steps"][0]["blobs"][0]["name"]
        b[name] = b[name][:18] + (183 if b[name][18] != 183 else 62).to_bytes(2, "little") + b[name][20:]
    variant("code for another machine", other_machine, "is machine code for ELF machine")

    def unknown_function(m, b):  # MCJIT aborts the process on a symbol it cannot resolve
        s = m["steps"][0]
        name = s["blobs"][0]["name"]
        assert b"sched_yield\0" in b[name]
        b[name] = b[name].replace(b"sched_yield\0", b"sched_yielx\0")
        s["layout"] = s["layout"].replace('"sched_yield"', '"sched_yielx"')
    variant("a call into a function the process lacks", unknown_function,
            "needs `sched_yielx`, which this process does not provide")

    variant("a manifest without a target", lambda m, b: m.pop("target"), "the manifest has no valid `target`")
    variant("a mistyped target", lambda m, b: m.update(target="x86_64"), "the manifest has no valid `target`")
    variant("a step for another batch", lambda m, b: m["steps"][0].update(batch=7), "does not fit the model")
    def swap_entries(layout):
        entries = layout["entries"]
        entries["train"], entries["eval"] = entries["eval"], entries["train"]
    variant("the evaluation entry filed as the training entry", lambda m, b: _edit_layout(_step(m, small), swap_entries),
            "step for batch 5 does not fit the model (it is not an evaluation step)")
    variant("an unknown backend", lambda m, b: m.update(backend="tpu"), "unknown target `tpu`")

    (out / "flipped.dlcx").write_bytes(_flipped(path.read_bytes()))
    cases.append(("a flipped bit", out / "flipped.dlcx", "damaged"))
    (out / "truncated.dlcx").write_bytes(path.read_bytes()[:100])
    cases.append(("a truncated file", out / "truncated.dlcx", "it is truncated, or not a zip file"))
    (out / "cut.bin").write_bytes(path.read_bytes()[:2])
    cases.append(("a file cut inside the zip signature", out / "cut.bin", "it is truncated, or not a zip file"))
    (out / "empty.dlcx").write_bytes(b"")
    cases.append(("an empty .dlcx", out / "empty.dlcx", "it is truncated, or not a zip file"))
    return cases


def _flipped(data: bytes) -> bytes:
    """data with one bit flipped near its middle, where the flip changes what the zip holds
    (some flips inside compressed data decode to the same bytes: nothing is damaged)."""
    import io
    import zipfile

    def contents(blob):
        try:
            with zipfile.ZipFile(io.BytesIO(blob)) as z:
                return [(n, z.read(n)) for n in z.namelist()]
        except Exception:  # noqa: BLE001 - unreadable: damaged
            return None
    intact = contents(data)
    for at in range(len(data) // 2, len(data)):
        flipped = bytearray(data)
        flipped[at] ^= 0x40
        if contents(bytes(flipped)) != intact:
            return bytes(flipped)
    raise AssertionError("no bit flip changes the artifact")


def test_damaged_artifacts_are_refused_in_one_sentence_before_any_code_is_loaded(built, tmp_path):
    cases = _artifact_cases(built, tmp_path)
    argv = [["run", str(f), "--epochs", "1", "--quiet", "--threads", str(THREADS)] for _, f, _ in cases]
    run = run_cases(CLI, argv, tmp_path, env={"DLC_CACHE_DIR": str(tmp_path / "cache")})
    labels = [label for label, _, _ in cases]
    assert run.crashed is None and run.returncode == 0, describe_crash(run, labels)
    for i, (label, _, expect) in enumerate(cases):
        r = run.results[i]
        assert r["outcome"] == "exit", f"{label}: {r.get('trace')}"
        if expect is None:
            assert r["rc"] == 0, f"{label}: {r['stderr']}"
            continue
        lines = r["stderr"].strip().splitlines()
        assert r["rc"] == 1, f"{label}: exit {r['rc']}: {r['stderr']}"
        assert lines[0].startswith("artifact error: ") and expect in lines[0], f"{label}: {r['stderr']}"
        assert len(lines) == 2 and lines[1].startswith("hint: "), f"{label}: {r['stderr']}"


def test_a_truncated_artifact_is_never_read_as_source(built, tmp_path):
    _, path, _, _ = built
    for name, size in (("cut.dlcx", 100), ("cut.bin", 2), ("empty.dlcx", 0)):
        (tmp_path / name).write_bytes(path.read_bytes()[:size])
        with pytest.raises(ArtifactError, match="damaged dlc artifact"):
            dlc.load(tmp_path / name)


# --- the ELF reader --------------------------------------------------------------------------------

def test_elf_reader_lists_the_symbols_and_rejects_anything_out_of_bounds(built):
    _, _, _, (blobs, layout) = built
    found = symbols(blobs[0])
    assert {"dlc_step_train", "dlc_step_eval"} <= set(found.defines) and any(n.endswith("." + layout.meta["tag"]) for n in found.needs)
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


# --- the compile cache -----------------------------------------------------------------------------

CACHE_CHILD = '''
import numpy as np, dlc
from dlc.core.diagnostics import DlcError
from dlc.program import make_program
m = dlc.load(MODEL_PATH)
config = m.train_config
rng = np.random.default_rng(0)
feeds = {"x": rng.normal(size=(5, 2)).astype(np.float32), "label": (rng.random((5, 1)) > 0.5).astype(np.float32)}
for i, case in enumerate(CASES):
    begin(i)
    said = []
    p = make_program("cpu", lambda: m.compile_graph("eval", config), dict(m.state), key=m.source_key("eval", config),
                     options={"cache_dir": case, "threads": THREADS, "verbose": said.append})
    try:
        out = p.run(feeds)
        report(i, "ran", said=said, output=out["output"].tolist())
    except DlcError as e:
        report(i, "error", said=said, error=str(e))
'''


def test_damaged_cache_entries_are_rebuilt_with_a_verbose_note(tmp_path):
    program, key, blobs, layout = compiled_step(tmp_path / "orig")
    other_blobs, other_layout = another_build()
    edited = json.loads(layout.to_json())
    edited["arena_bytes"] += 64
    text = layout.to_json()
    cases = [("intact", blobs, text, None, "compile cache hit"),
             ("objects swapped", blobs[::-1], text, None, "object 0 is not the one compiled with this layout"),
             ("a missing object", blobs[:1], text, None, f"it has 1 object(s) where its layout lists {len(blobs)}"),
             ("a garbage object", [b"\x7fELF" + bytes(200), blobs[1]], text, None, "object 0 is not valid object code"),
             ("an object from another build", [blobs[0], other_blobs[1]], text, None,
              "object 1 is not the one compiled with this layout"),
             ("a layout from another build", blobs, other_layout.to_json(), None, "is not the one compiled with"),
             ("an edited layout", blobs, json.dumps(edited), None, "its layout is not the one the code was compiled for"),
             ("a layout that is not JSON", blobs, "{", None, "its layout is invalid"),
             ("an entry of another key", blobs, text, "0" * 64, "the entry belongs to another key")]
    dirs = []
    for i, (label, parts, layout_json, stored, _) in enumerate(cases):
        dirs.append(str(tmp_path / f"c{i}"))
        write_entry(tmp_path / f"c{i}", key, parts, layout_json, stored)
    flipped = tmp_path / "flip"
    entry = write_entry(flipped, key, blobs, text)
    data = bytearray(entry.read_bytes())
    data[-10] ^= 1
    entry.write_bytes(bytes(data))
    cases.append(("a flipped bit", None, None, None, "(checksum mismatch)"))
    dirs.append(str(flipped))
    script = f"MODEL_PATH, THREADS = {str(MODEL)!r}, {THREADS}\n" + CACHE_CHILD
    run = run_cases(script, dirs, tmp_path)
    labels = [c[0] for c in cases]
    assert run.crashed is None and run.returncode == 0, describe_crash(run, labels)
    expected = run.results[0]["output"]
    for i, (label, *_, note) in enumerate(cases):
        r = run.results[i]
        assert r["outcome"] == "ran", f"{label}: {r}"
        said = "\n".join(r["said"])
        assert note in said, f"{label}: {said}"
        if label != "intact":
            assert "was damaged" in said and "rebuilding it" in said and "compile cache miss" in said, said
        assert r["output"] == expected, label  # rebuilt code computes what the intact entry did


def test_cache_directory_is_private_and_a_shared_one_is_not_used(tmp_path, capsys, monkeypatch):
    d = tmp_path / "new" / "cache"
    c = cache_mod.Cache(d)
    c.put("a" * 64, [b"x"], "{}")
    assert stat.S_IMODE(d.stat().st_mode) == 0o700 and c.get("a" * 64) == ([b"x"], "{}")
    assert capsys.readouterr().err == ""
    for mode, why in ((0o770, "other users can write to it"), (0o707, "other users can write to it")):
        os.chmod(d, mode)
        monkeypatch.setattr(cache_mod, "_warned", set())
        c = cache_mod.Cache(d)
        assert c.get("a" * 64) is None  # not read ...
        c.put("b" * 64, [b"y"], "{}")
        assert not (d / "bb").exists()  # ... nor written
        err = capsys.readouterr().err
        assert why in err and "compiling without it" in err and "hint: `chmod 700" in err
        assert not cache_mod.Cache(d).usable() and capsys.readouterr().err == ""  # said once per process
    os.chmod(d, 0o700)
    monkeypatch.setattr(cache_mod, "_warned", set())
    monkeypatch.setattr(os, "getuid", lambda: os.stat(d).st_uid + 1)
    assert not cache_mod.Cache(d).usable()
    assert "owned by another user" in capsys.readouterr().err


def test_a_run_with_a_shared_cache_directory_still_trains(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    run = run_cases(CLI, [["run", str(MODEL), "--epochs", "1", "--quiet", "--threads", "1"]], tmp_path,
                    env={"DLC_CACHE_DIR": str(shared)})
    r = run.results[0]
    assert r["rc"] == 0 and "not using the compile cache" in r["stderr"], r
    assert list(shared.iterdir()) == []


def _fake_entries(c: cache_mod.Cache, names: str, size: int = 1000) -> dict:
    keys = {}
    for t, n in enumerate(names):
        keys[n] = n * 64
        c.put(keys[n], [bytes(size)], "{}")
        os.utime(c._path(keys[n]), (t + 1, t + 1))  # used in this order, long ago
    return keys


def test_cache_evicts_the_least_recently_used_entries(tmp_path, monkeypatch):
    monkeypatch.setenv("DLC_CACHE_MAX_BYTES", "3500")
    c = cache_mod.Cache(tmp_path / "c")
    keys = _fake_entries(c, "abc")
    assert c.get(keys["a"])  # a hit: now the most recently used
    c.put("d" * 64, [bytes(1000)], "{}")
    assert c.get(keys["a"]) and c.get("d" * 64) and not c.get(keys["b"])
    assert c.usage().bytes <= 3500
    monkeypatch.setenv("DLC_CACHE_MAX_BYTES", "100")
    big = cache_mod.Cache(tmp_path / "c")
    big.put("e" * 64, [bytes(1000)], "{}")  # over the bound by itself: kept, everything else goes
    assert big.usage().entries == 1 and big.get("e" * 64)


def test_eviction_tolerates_entries_removed_by_another_process(tmp_path, monkeypatch):
    c = cache_mod.Cache(tmp_path / "c")
    keys = _fake_entries(c, "abc")
    files = c.files()
    c._path(keys["a"]).unlink()  # gone between listing and evicting
    monkeypatch.setattr(cache_mod.Cache, "files", lambda self: files)
    c.max_bytes = 1500
    c.evict()
    assert not c._path(keys["b"]).exists() and c._path(keys["c"]).exists()


def test_cache_size_bound_must_be_a_size(monkeypatch):
    for good, value in (("2G", 2 << 30), ("500M", 500 << 20), ("4096", 4096)):
        monkeypatch.setenv("DLC_CACHE_MAX_BYTES", good)
        assert cache_mod.max_bytes() == value
    monkeypatch.setenv("DLC_CACHE_MAX_BYTES", "lots")
    with pytest.raises(UsageError, match="DLC_CACHE_MAX_BYTES"):
        cache_mod.max_bytes()


def test_dlc_cache_shows_and_clears_only_its_own_files(tmp_path, monkeypatch, capsys):
    d = tmp_path / "c"
    monkeypatch.setenv("DLC_CACHE_DIR", str(d))
    _fake_entries(cache_mod.Cache(d), "ab")
    (d / "notes.txt").write_text("mine")
    (d / "aa" / "other.txt").write_text("mine too")
    assert cli.main(["cache"]) == 0
    out = capsys.readouterr().out
    assert str(d) in out and "2 entries" in out and "of at most 1.0 GiB" in out
    assert cli.main(["cache", "clear"]) == 0
    assert "removed 2 entries" in capsys.readouterr().out
    assert sorted(p.name for p in d.rglob("*")) == ["aa", "notes.txt", "other.txt"]
    assert cli.main(["cache"]) == 0 and "0 entries" in capsys.readouterr().out


def test_run_help_says_to_run_only_trusted_artifacts(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    assert "run only artifacts you trust" in " ".join(capsys.readouterr().out.split())


# --- memory ----------------------------------------------------------------------------------------

def test_a_step_larger_than_memory_is_refused_before_compiling_and_before_loading(tmp_path, monkeypatch):
    from dlc import program as program_mod
    free = CPU.free_memory(None)
    assert free is None or free > 0
    compiled_step(tmp_path)  # in the cache now
    monkeypatch.setattr(CPU, "free_memory", lambda target: 10)
    monkeypatch.setattr(CPU, "compile", lambda *a, **k: pytest.fail("compiled a step that cannot fit"))
    monkeypatch.setattr(CPU, "load", lambda *a, **k: pytest.fail("loaded a step that cannot fit"))
    for batch in (5, 6):  # from the cache, and not yet compiled
        m = dlc.load(MODEL)
        p = program_mod.make_program("cpu", lambda: m.compile_graph("eval", m.train_config), m.state,
                                     key=m.source_key("eval", m.train_config),
                                     options={"cache_dir": tmp_path, "threads": THREADS})
        with pytest.raises(ResourceError, match=r"needs \d+ bytes of memory .* only 10 bytes is available"):
            p.step_for(batch)


def test_the_cli_reports_a_step_larger_than_memory_in_one_sentence(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DLC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(CPU, "free_memory", lambda target: 10)
    assert cli.main(["run", str(MODEL), "--epochs", "1", "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: the compiled step for batch") and err[1].startswith("hint: use a smaller batch")


PARSE_ONCE = """
import sys, time
from dlc.language.syntax import parse
program = parse.parse(open(sys.argv[1]).read(), sys.argv[1])
print(len(program.defs))
"""


def test_the_parser_tables_are_kept_only_in_a_private_cache_directory(tmp_path):
    """The parser's LALR tables (unpickled when read) go to the private cache directory and
    are read from there (the file is not written again); a damaged table file is rebuilt
    without a word; a directory other users can write to is not used for them."""
    import subprocess
    import sys
    from pathlib import Path
    example = str(Path(__file__).resolve().parents[1] / "examples" / "lenet5.dln")

    def parse_in(directory: Path):
        env = {**os.environ, "DLC_CACHE_DIR": str(directory)}
        r = subprocess.run([sys.executable, "-c", PARSE_ONCE, example], capture_output=True, text=True, env=env,
                           timeout=60)
        assert r.returncode == 0 and r.stderr == "" and r.stdout.strip() == "1", r
        return sorted(directory.glob("dln-parser.*"))

    private = tmp_path / "private"
    (tables,) = parse_in(private)
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    written = tables.stat().st_mtime_ns
    assert parse_in(private) == [tables] and tables.stat().st_mtime_ns == written
    good = tables.read_bytes()
    tables.write_bytes(good[:len(good) // 2])  # cut short: not loadable
    assert parse_in(private) == [tables]
    rebuilt = tables.read_bytes()  # (the same tables; a pickle's set order differs between processes)
    assert rebuilt.split(b"\n")[0] == good.split(b"\n")[0] and abs(len(rebuilt) - len(good)) < 100
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    assert parse_in(shared) == []
