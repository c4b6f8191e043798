"""The route is one-way: language -> graph -> passes -> kernel IR -> backends, with the
driver on top. Every import of every module (inside functions too) is checked."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ("dlc.api", "dlc.cli", "dlc.pipeline", "dlc.program", "dlc.cache", "dlc.artifact", "dlc.runtime",
          "dlc.data", "dlc.__main__", "dlc.interchange", "dlc.graphviz", "dlc.keywords")
SPECIFIC_BACKENDS = ("dlc.backends.llvm", "dlc.backends.cuda", "dlc.backends.reference")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in ("passes", "backends", "grammar"):
        parts = ["dlc"] + parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, int]]:
    """(absolute module, line) for every import in the file, relative ones resolved."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            # `from dlc import backends` imports the module dlc.backends
            out += [(f"{mod}.{a.name}", node.lineno) for a in node.names] if mod in ("dlc", "dlc.core") \
                else [(mod, node.lineno)]
    return out


def _inside(mod: str, prefixes) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def _sources():
    for folder in ("dlc", "passes", "backends"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def _rule(module: str, imported: str) -> str | None:
    """Why `module` may not import `imported`, or None."""
    if not imported.startswith("dlc"):
        return None
    if _inside(module, ("dlc.core",)) and not _inside(imported, ("dlc.core",)) and imported != "dlc":
        return "the core imports nothing above it"
    if _inside(module, ("dlc.language",)) and not _inside(imported, ("dlc.core", "dlc.language", "dlc.grammar")):
        return "the language imports only the core"
    if _inside(module, ("dlc.passes",)) and not _inside(imported, ("dlc.core", "dlc.passes")):
        return "a pass imports only the core and other passes"
    if _inside(module, ("dlc.backends",)):
        if _inside(imported, DRIVER + ("dlc.language",)):
            return "a backend never imports the driver or the language"
        own = next((b for b in SPECIFIC_BACKENDS if _inside(module, (b,))), None)
        other = next((b for b in SPECIFIC_BACKENDS if _inside(imported, (b,))), None)
        if other and other != own:
            return "a backend never imports another backend (the registry names them by string)"
    elif _inside(imported, SPECIFIC_BACKENDS):
        return "only the registry (dlc.backends) reaches a specific backend"
    return None


def test_imports_follow_the_route():
    broken = []
    for path in _sources():
        module = _module_name(path)
        for imported, line in _imports(path):
            why = _rule(module, imported)
            if why:
                broken.append(f"{path.relative_to(ROOT)}:{line}: {module} imports {imported}: {why}")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("module, imported, allowed", [
    ("dlc.core.graph", "dlc.passes.fuse", False),
    ("dlc.passes.fuse", "dlc.backends.reference", False),
    ("dlc.backends.llvm.codegen", "dlc.backends.reference", False),
    ("dlc.backends.llvm.codegen", "dlc.backends.base", True),
    ("dlc.api", "dlc.backends.llvm.target", False),
    ("dlc.runtime.trainer", "dlc.backends", True),
    ("dlc.language.nn", "dlc.pipeline", False),
])
def test_the_rules_catch_what_they_should(module, imported, allowed):
    assert (_rule(module, imported) is None) == allowed


def test_relative_imports_resolve():
    """`from .target import Target` in backends/llvm/jit.py is dlc.backends.llvm.target."""
    assert "dlc.backends.llvm.target" in {m for m, _ in _imports(ROOT / "backends" / "llvm" / "jit.py")}


def test_every_package_is_installed():
    """pyproject lists packages by hand (three top-level folders install under `dlc`);
    a package missing there imports fine from the checkout but not after `pip install .`."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {_module_name(init) for top in ("dlc", "passes", "backends", "grammar")
               for init in (ROOT / top).rglob("__init__.py")}
    assert on_disk - listed == set(), "packages missing from pyproject.toml [tool.setuptools] packages"
