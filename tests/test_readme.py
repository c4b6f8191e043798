"""The README runs as written: every command of its tour, in order, as a real subprocess in a
fresh folder (training for 1 epoch instead of the written count, to stay fast); its Python
snippet; its error example, reproduced from a real run; and its words about `pytest -m slow`.
Also the command-line claims of docs/language.md (--data, --optimizer, the run header's rate)."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else None]


def code_blocks(text: str, lang: str = "") -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def tour_commands() -> list[list[str]]:
    """The `dlc ...` lines of the tour's code block, comments removed."""
    block = code_blocks(section("A short tour"))[0]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.startswith("dlc ")]


def one_epoch(argv: list[str]) -> list[str]:
    """`dlc run` trains for 1 epoch (the tour's own --epochs value replaced)."""
    if argv[1] != "run":
        return argv
    if "--epochs" in argv:
        i = argv.index("--epochs")
        return argv[:i + 1] + ["1"] + argv[i + 2:]
    return argv + ["--epochs", "1"]


@pytest.fixture
def folder(tmp_path, tmp_path_factory):
    """A fresh folder holding the repository's examples, as a user's checkout would."""
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    return tmp_path


def env(tmp_path_factory) -> dict:
    return dict(os.environ, DLC_CACHE_DIR=str(tmp_path_factory.getbasetemp() / "cache"),
                PYTHONDONTWRITEBYTECODE="1")


def run(argv: list[str], cwd: Path, environ: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dlc", *argv[1:]], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=900)


def _importable(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def missing(argv: list[str]) -> str | None:
    """What a tour command needs that is not installed here (an extra, Graphviz's `dot`):
    the install command its error must name, as the README does."""
    if argv[1] == "plot" and not _importable("matplotlib"):
        return "pip install 'dlc[plot]'"
    if argv[1] == "export" and not _importable("onnx"):
        return "pip install 'dlc[onnx]'"
    if argv[1] == "graph":
        if not _importable("graphviz"):
            return "pip install 'dlc[graph]'"
        if Path(argv[argv.index("-o") + 1]).suffix in (".svg", ".png", ".pdf") and shutil.which("dot") is None:
            return "apt-get install graphviz"
    return None


def test_the_tour_runs_as_written(folder, tmp_path_factory):
    commands = tour_commands()
    assert len(commands) >= 10 and {c[1] for c in commands} >= {"check", "compile", "run", "eval", "data",
                                                                  "predict", "plot", "graph", "export"}
    environ = env(tmp_path_factory)
    for argv in commands:
        r = run(one_epoch(argv), folder, environ)
        shown = f"$ {shlex.join(argv)}\n{r.stdout}{r.stderr}"
        needs = missing(argv)
        if needs:  # the README says what these need; without it, the error says how to install it
            assert needs in README, needs
            assert r.returncode == 2 and needs in r.stderr and "Traceback" not in r.stderr, shown
            continue
        assert r.returncode == 0, shown
        assert "Traceback" not in r.stderr, shown
    assert (folder / "images.npz").exists() and (folder / "lenet.npz").exists()
    for argv in commands:  # what the commands with optional needs wrote, where they ran
        if argv[1] in ("graph", "export") and not missing(argv):
            assert (folder / argv[argv.index("-o") + 1]).stat().st_size > 0, shlex.join(argv)
    assert sorted(p.name for p in (folder / "out").iterdir())[0] == "00_ast.txt"


def test_the_python_snippet_runs(folder, tmp_path_factory):
    snippet = code_blocks(README, "python")[0]
    assert "epochs=10" in snippet
    snippet = snippet.replace("epochs=10", "epochs=1")
    r = subprocess.run([sys.executable, "-c", snippet], cwd=folder, env=env(tmp_path_factory),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    assert (folder / "mlp.npz").exists()


def test_the_error_example_is_what_dlc_prints(folder, tmp_path_factory):
    """The README's diagnostic for a typo on line 5 of a copy of lenet5.dln, reproduced."""
    text = section("A short tour")
    block = next(b for b in code_blocks(text) if "error:" in b)
    source_line = re.search(r"^\s*5 \| (.*)$", block, flags=re.M).group(1)
    lines = (ROOT / "examples" / "lenet5.dln").read_text().split("\n")
    lines[4] = source_line
    (folder / "lenet.dln").write_text("\n".join(lines))
    r = run(["dlc", "check", "lenet.dln"], folder, env(tmp_path_factory))
    assert r.returncode == 1
    assert r.stderr == block, r.stderr


def test_what_the_readme_says_about_slow_tests():
    """`pytest -m slow` selects only the slow tests (pytest's -m replaces the default
    `-m 'not slow'`): the README must say so."""
    def collected(*args):
        r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                            *args, "tests/test_fuzz_files.py"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
        return {line for line in r.stdout.splitlines() if "::" in line}
    plain, slow = collected(), collected("-m", "slow")
    assert slow and plain and not plain & slow
    assert "`pytest -m slow` runs only those" in README


def test_docs_command_line_overrides_work(tmp_path_factory, tmp_path):
    """docs/language.md: --data and --optimizer take .dln expressions; the run header shows the
    rate --lr sets."""
    docs = (ROOT / "docs" / "language.md").read_text()
    assert "ImportError" not in docs
    r = subprocess.run([sys.executable, "-m", "dlc", "run", str(ROOT / "examples" / "digits_mlp.dln"),
                        "--epochs", "1", "--lr", "0.01", "--data", "digits(test=0.1)",
                        "--optimizer", "sgd(lr=0.5, momentum=0.9)"],
                       cwd=tmp_path, env=env(tmp_path_factory), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    header = r.stderr.splitlines()[0]
    assert header.startswith("training mlp on digits(test=0.1) with sgd(lr=0.01, momentum=0.9"), header
