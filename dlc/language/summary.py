"""`dlc check`'s model summary: each binding's output type and parameter count, then totals."""
from __future__ import annotations

from dlc.language.frontend import Built


def _count(t) -> int:
    n = 1
    for d in t.shape:
        n *= d
    return n


def format_summary(built: Built, source_name: str) -> str:
    rows = [("name", "layers", "output", "params")]
    for name, t in built.inputs:
        rows.append((name, "input", str(t), "0"))
    for r in built.summary:
        rows.append((r.name, r.what, str(r.type), f"{r.params:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"model {built.model.name} ({source_name})"]
    for i, r in enumerate(rows):
        lines.append("  " + "  ".join([r[0].ljust(widths[0]), r[1].ljust(widths[1]),
                                       r[2].ljust(widths[2]), r[3].rjust(widths[3])]).rstrip())
        if i == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    params = [p for p in built.params.values() if p.role == "param"]
    state = [p for p in built.params.values() if p.role == "state" and p.type.dtype.is_float]
    n_params = sum(_count(p.type) for p in params)
    lines.append(f"  parameters: {n_params:,} in {len(params)} tensors ({n_params * 4 / 1024:.1f} KiB)")
    if state:
        lines.append(f"  state: {sum(_count(p.type) for p in state):,} values in {len(state)} tensors")
    if built.carries:
        lines.append("  carried from batch to batch: " + ", ".join(f"{c.name} {c.type}" for c in built.carries))
    t = built.train
    if t is not None:
        lines.append(f"  train: data {t.data}, optimizer {t.optimizer}, batch {t.batch}, "
                     f"{t.epochs} epochs, seed {t.seed}"
                     + (f", metrics {', '.join(t.metrics)}" if t.metrics else ""))
    return "\n".join(lines) + "\n"
