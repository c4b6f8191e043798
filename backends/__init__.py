"""The registry of backends: `--target NAME` -> the backend object (see base.py).

Registering a backend is one line here: its name and the module holding `BACKEND`.
Modules are imported on first use, so an optional dependency (CuPy, say) costs nothing
until its target is chosen.
"""
from __future__ import annotations

import importlib

from dlc.core.diagnostics import DlcError, UsageError

REGISTRY = {
    "cpu": "dlc.backends.llvm",
    "reference": "dlc.backends.reference",
    "cuda": "dlc.backends.cuda",
}
DEFAULT = "cpu"
_loaded: dict[str, object] = {}  # backends imported so far


class TargetUnavailable(DlcError):
    """A known target that cannot run on this machine (the message says why)."""


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def backend(name: str, runnable: bool = True):
    """The registered backend. An unknown target is a usage error; one that cannot run here
    (with `runnable`, the default) is TargetUnavailable, saying why. Without `runnable`,
    a backend that only renders (dumps, tests) is enough."""
    module = REGISTRY.get(name)
    if module is None:
        raise UsageError(f"unknown target `{name}`; targets: {', '.join(REGISTRY)}")
    try:
        found = importlib.import_module(module).BACKEND
    except ImportError as e:
        raise TargetUnavailable(f"target `{name}` is unavailable: {e}") from None
    _loaded[name] = found
    reason = found.unavailable() if runnable else None
    if reason:
        raise TargetUnavailable(f"target `{name}` is unavailable: {reason}")
    return found


def sync_state(state: dict, keep=None) -> None:
    """Make the host arrays of `state` current: every backend imported so far, except `keep`,
    copies back any state it holds elsewhere (see Backend.sync_state)."""
    for found in list(_loaded.values()):
        if found is not keep:
            found.sync_state(state)


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
