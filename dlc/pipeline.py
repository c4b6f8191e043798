"""The compilation pipeline: the ordered IR stages that `--dump-ir` can show."""
from __future__ import annotations

from .diagnostics import UsageError

STAGES = {
    "ast": "the parsed program (frozen dataclasses with locations)",
    "graph": "the model and loss as a typed graph of primitives, training mode",
}


def select_stages(spec: str) -> list[str]:
    """`ast,graph` or `all` -> stage names in pipeline order."""
    if not spec:
        return []
    if spec == "all":
        return list(STAGES)
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    for s in wanted:
        if s not in STAGES:
            raise UsageError(f"unknown IR stage `{s}`; stages: {', '.join(STAGES)}, all")
    return [s for s in STAGES if s in wanted]
