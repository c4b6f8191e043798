"""Golden text: the printed IR of every stage, and `dlc check`'s summary, pinned in files.

- `dlc compile examples/digits_mlp.dln --dump-ir=all --dump-dir DIR`, through the real
  command (`python -m dlc` in a subprocess, from the repository root), writes one file
  per stage, NN_stage.txt; each must equal tests/golden/digits_mlp/NN_stage.txt, and
  there must be no more and no fewer files than those. The code generator's LLVM IR and
  assembly (stages llvm, llvm-opt, asm) name the host CPU and its features and follow its
  vector width, so they are not pinned: they must exist and be stable, like the rest.
- The same command run twice (with different PYTHONHASHSEEDs, into a folder holding a
  stale dump) writes identical files: the text forms are stable from run to run.
- `dlc check examples/NAME.dln` prints the model summary of every example: it must equal
  tests/golden/check/NAME.txt.

After an intended change of a text form, regenerate the files and review the diff:

    pytest tests/test_golden.py --update-golden
    git diff tests/golden/
"""
from __future__ import annotations

import difflib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
DUMP_GOLDEN = GOLDEN / "digits_mlp"
CHECK_GOLDEN = GOLDEN / "check"
EXAMPLES = sorted(p.stem for p in (ROOT / "examples").glob("*.dln"))
DUMP_ARGS = ("compile", "examples/digits_mlp.dln", "--dump-ir=all")
HOST_STAGES = {"llvm", "llvm-opt", "asm"}  # depend on the machine: not pinned


def stage_of(file_name: str) -> str:
    return file_name.split("_", 1)[1].removesuffix(".txt")


def dlc(*args: str, hashseed: str = "0") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONHASHSEED=hashseed, COLUMNS="100", NO_COLOR="1")
    return subprocess.run([sys.executable, "-m", "dlc", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def dump(out: Path, hashseed: str = "0") -> dict[str, str]:
    r = dlc(*DUMP_ARGS, "--dump-dir", str(out), hashseed=hashseed)
    assert r.returncode == 0, r.stderr
    files = {p.name: p.read_text() for p in sorted(out.iterdir())}
    assert r.stdout.strip() == f"wrote {len(files)} stage(s) to {out}/"
    return files


def update_golden(request) -> bool:
    return bool(request.config.getoption("--update-golden"))


def write_golden(folder: Path, files: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.txt"):
        if stale.name not in files:
            stale.unlink()
    for name, text in files.items():
        (folder / name).write_text(text)


def assert_text(actual: str, golden: Path) -> None:
    assert golden.exists(), f"no golden file {golden.relative_to(ROOT)}: run pytest with --update-golden"
    expected = golden.read_text()
    if actual != expected:
        diff = list(difflib.unified_diff(expected.splitlines(), actual.splitlines(), f"{golden.name} (golden)",
                                         f"{golden.name} (now)", lineterm="", n=2))
        shown = "\n".join(diff[:80]) + ("\n..." if len(diff) > 80 else "")
        pytest.fail(f"{golden.relative_to(ROOT)} differs (if intended: pytest --update-golden, then "
                    f"review git diff):\n{shown}", pytrace=False)


# --- the IR dump of every stage ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def dumped(request, tmp_path_factory) -> dict[str, str]:
    files = dump(tmp_path_factory.mktemp("dump"))
    if update_golden(request):
        write_golden(DUMP_GOLDEN, pinned(files))
    return files


def pinned(files: dict[str, str]) -> dict[str, str]:
    return {name: text for name, text in files.items() if stage_of(name) not in HOST_STAGES}


def test_dump_writes_one_file_per_stage(dumped):
    stages = [stage_of(name) for name in dumped]
    assert [name[:2] for name in dumped] == [f"{i:02d}" for i in range(len(dumped))]
    assert stages[:2] == ["ast", "graph"]
    assert {"autodiff", "optimizer", "simplify", "fold_constants", "cse", "dce", "specialize", "fuse",
            "memory"} <= set(stages)
    for name, text in dumped.items():
        assert text.strip(), f"{name} is empty"
    for name, text in pinned(dumped).items():
        assert text.endswith("\n"), f"{name} does not end with a newline"


def test_dump_stage_files_are_the_golden_ones(dumped):
    golden = sorted(p.name for p in DUMP_GOLDEN.glob("*.txt"))
    assert sorted(pinned(dumped)) == golden, "stages were added or removed: run pytest with --update-golden"


@pytest.mark.parametrize("name", sorted(p.name for p in DUMP_GOLDEN.glob("*.txt")) or ["(none yet)"])
def test_dump_stage_matches_golden(request, dumped, name):
    if name == "(none yet)":  # collected before the first --update-golden wrote any
        assert update_golden(request), "no golden files yet: run pytest with --update-golden"
        return
    assert name in dumped, f"the dump has no {name} any more"
    assert_text(dumped[name], DUMP_GOLDEN / name)


def test_dump_is_stable_from_run_to_run(dumped, tmp_path):
    again = tmp_path / "again"
    again.mkdir()
    (again / "99_stale.txt").write_text("from an earlier run\n")  # a stale stage is removed
    second = dump(again, hashseed="12345")
    assert list(second) == list(dumped)
    for name in dumped:
        assert second[name] == dumped[name], f"{name} differs between two runs"


# --- dlc check ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("example", EXAMPLES)
def test_check_summary_matches_golden(request, example):
    r = dlc("check", f"examples/{example}.dln")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    golden = CHECK_GOLDEN / f"{example}.txt"
    if update_golden(request):
        CHECK_GOLDEN.mkdir(parents=True, exist_ok=True)
        golden.write_text(r.stdout)
    assert_text(r.stdout, golden)


def test_every_check_golden_has_an_example():
    stale = sorted(p.stem for p in CHECK_GOLDEN.glob("*.txt") if p.stem not in EXAMPLES)
    assert not stale, f"golden summaries of examples that no longer exist: {stale}"
