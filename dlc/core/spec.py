"""A call in a train block, as data: what the optimizer pass and the runtime read."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Spec:
    """A call in a train block: `adam(lr=1e-3)` is Spec("optimizer", "adam", {...})."""

    kind: str
    name: str
    args: dict = field(hash=False)

    def __str__(self) -> str:
        return f"{self.name}(" + ", ".join(f"{k}={v!r}" for k, v in self.args.items()) + ")"
