"""The corpus of broken programs: every user error is one message with `file:line:col`,
the source line, a caret and (where one helps) a hint; the CLI exits 1 without a traceback.

Each `tests/errors/*.dln` starts with its expected diagnostic:

    # expect: 3:14: unknown function `dens`
    # hint: did you mean `dense`?

`expect:` is `line:col: <substring of the message>`; `hint:` (optional) a substring of the hint.
A new file in the directory is picked up automatically.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import dlc
from dlc.core.diagnostics import SHOWN_COLUMNS, DlcError

ROOT = Path(__file__).resolve().parent.parent
CORPUS_DIR = Path(__file__).resolve().parent / "errors"
CORPUS = sorted(CORPUS_DIR.glob("*.dln"))
MIN_CORPUS = 30

_EXPECT = re.compile(r"^#\s*expect:\s*(\d+):(\d+):\s*(.+?)\s*$")
_HINT = re.compile(r"^#\s*hint:\s*(.+?)\s*$")


@dataclass
class Expected:
    line: int
    col: int
    message: str
    hint: str | None


def expected(path: Path) -> Expected:
    """The header: `# expect:` (required) and `# hint:` (optional) among the leading comments."""
    exp, hint = None, None
    for text in path.read_text(encoding="utf-8").splitlines():
        if not text.startswith("#"):
            break
        if m := _EXPECT.match(text):
            assert exp is None, f"{path.name}: two `# expect:` lines"
            exp = m
        elif m := _HINT.match(text):
            hint = m.group(1)
    assert exp is not None, f"{path.name}: the file must start with `# expect: LINE:COL: message`"
    return Expected(int(exp.group(1)), int(exp.group(2)), exp.group(3), hint)


def load_error(source, **kw) -> DlcError:
    try:
        dlc.load(source, **kw)
    except DlcError as e:
        return e
    pytest.fail("the program loaded without an error")


def check_rendered(e: DlcError, name: str, source_text: str, exp: Expected) -> None:
    """`name:line:col: kind: message`, then `  N | <source line>`, then a caret under col."""
    out = e.render()
    assert "Traceback" not in out
    lines = out.splitlines()
    assert lines[0].startswith(f"{name}:{exp.line}:{exp.col}: "), out
    assert exp.message in lines[0], out
    src = source_text.splitlines()
    code = src[exp.line - 1] if exp.line <= len(src) else ""
    gutter = f"{exp.line:>4} | "
    caret = lines[2]
    assert caret.strip().startswith("| ") and "^" in caret, out
    if len(code) <= SHOWN_COLUMNS:
        assert lines[1] == gutter + code, out
        assert caret.index("^") == len(gutter) + exp.col - 1, out
    else:  # clipped around the caret, the cut ends marked `…`, the caret still on its character
        shown = lines[1][len(gutter):]
        assert lines[1].startswith(gutter) and len(shown) <= SHOWN_COLUMNS + 2, out
        assert shown.removeprefix("…").removesuffix("…") in code, out
        assert shown[caret.index("^") - len(gutter)] == code[exp.col - 1], out
    if exp.hint:
        assert any(ln.startswith("hint: ") and exp.hint in ln for ln in lines), out


def test_corpus_is_big_enough():
    assert len(CORPUS) >= MIN_CORPUS, f"only {len(CORPUS)} programs in {CORPUS_DIR}"


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_corpus_program(path: Path):
    exp = expected(path)
    e = load_error(path)
    assert e.span is not None, f"no source location: {e.render()}"
    assert (e.span.line, e.span.col) == (exp.line, exp.col), e.render()
    assert exp.message in e.message, e.render()
    if exp.hint:
        assert e.hint is not None and exp.hint in e.hint, e.render()
    assert e.span.source.name == str(path)
    check_rendered(e, str(path), path.read_text(encoding="utf-8"), exp)


@pytest.mark.parametrize("path", CORPUS[::7], ids=[p.stem for p in CORPUS[::7]])
def test_corpus_program_from_text(path: Path):
    """The same diagnostic when the program is passed as text (reported as `<string>`)."""
    exp = expected(path)
    text = path.read_text(encoding="utf-8")
    e = load_error(text)
    assert (e.span.line, e.span.col) == (exp.line, exp.col), e.render()
    check_rendered(e, "<string>", text, exp)


# --- the real command line --------------------------------------------------------------------

def run_dlc(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-m", "dlc", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


CLI_CASES = ["unknown_layer", "missing_rparen", "shape_mismatch_add", "unknown_train_option",
             "empty_file", "recursive_block", "unterminated_string"]


@pytest.mark.parametrize("stem", CLI_CASES)
def test_cli_reports_user_error(stem: str):
    path = CORPUS_DIR / f"{stem}.dln"
    exp = expected(path)
    r = run_dlc("check", str(path))
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert f"{path}:{exp.line}:{exp.col}:" in r.stderr
    assert exp.message in r.stderr
    assert "^" in r.stderr
    if exp.hint:
        assert exp.hint in r.stderr


@pytest.mark.parametrize("args", [
    ["check"],                                  # missing file argument
    ["check", "--bogus", "model.dln"],          # unknown option
    ["frobnicate", "model.dln"],                # unknown command
    ["check", str(CORPUS_DIR / "does_not_exist.dln")],
    ["check", str(CORPUS_DIR / "two_models_ambiguous.dln"), "--model", "smal"],
], ids=["missing-file-argument", "unknown-option", "unknown-command", "no-such-file", "unknown-model"])
def test_cli_bad_usage_exits_2(args):
    r = run_dlc(*args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout
    assert "usage" in r.stderr.lower()


# --- dlc.load on strings that are neither a program nor a readable path ---------------------------

@pytest.mark.parametrize("text", ["model\x00.dln", "x" * 5000], ids=["nul-byte", "name-too-long"])
def test_load_of_an_unreadable_path_is_a_dlc_error(text):
    with pytest.raises(DlcError):
        dlc.load(text)
