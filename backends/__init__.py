"""The registry of backends: `--target NAME` -> the backend object (see base.py).

Registering a backend is one line here: its name and the module holding `BACKEND`.
Modules are imported on first use, so an optional dependency (CuPy, say) costs nothing
until its target is chosen.
"""
from __future__ import annotations

import importlib

from dlc.core.diagnostics import UsageError

REGISTRY = {
    "cpu": "dlc.backends.llvm",
    "reference": "dlc.backends.reference",
}
DEFAULT = "cpu"


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def backend(name: str):
    """The registered backend; an unknown or unusable target is a usage error that says why."""
    module = REGISTRY.get(name)
    if module is None:
        raise UsageError(f"unknown target `{name}`; targets: {', '.join(REGISTRY)}")
    try:
        found = importlib.import_module(module).BACKEND
    except ImportError as e:
        raise UsageError(f"target `{name}` is unavailable: {e}") from None
    reason = found.unavailable()
    if reason:
        raise UsageError(f"target `{name}` is unavailable: {reason}")
    return found


def describe() -> list[tuple[str, str, str | None]]:
    """(name, what it is, why it is unavailable or None) for every registered target."""
    out = []
    for name, module in REGISTRY.items():
        try:
            found = importlib.import_module(module).BACKEND
            out.append((name, found.doc, found.unavailable()))
        except ImportError as e:
            out.append((name, "", str(e)))
    return out
