"""`dlc check`'s model summary, like Keras' `summary()`: one row per layer or function called in
the model's body (a block call is one row) with its output type and parameter count, then the
trainable and non-trainable totals."""
from __future__ import annotations

from dlc.language.frontend import Built


def _count(t) -> int:
    n = 1
    for d in t.shape:
        n *= d
    return n


def format_summary(built: Built, source_name: str) -> str:
    rows = [("name", "layer", "output", "params")]
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
    specs = [p for p in built.params.values() if p.type.dtype.is_float]
    trainable = sum(_count(p.type) for p in specs if p.role == "param" and p.trainable)
    total = sum(_count(p.type) for p in specs)
    size = f"{total * 4:,} bytes" if total * 4 < 1024 else f"{total * 4 / 1024:.1f} KiB"
    lines.append(f"  total params: {total:,} ({size}) in {len(specs)} tensors")
    lines.append(f"  trainable params: {trainable:,}")
    frozen = [p for p in specs if p.role == "param" and not p.trainable]
    what = [w for w, has in (("frozen parameters", frozen), ("layer state such as batchnorm statistics",
                                                          any(p.role == "state" for p in specs))) if has]
    lines.append(f"  non-trainable params: {total - trainable:,}" + (f" ({', '.join(what)})" if what else ""))
    if built.carries:
        lines.append("  carried from batch to batch: " + ", ".join(f"{c.name} {c.type}" for c in built.carries))
    t = built.train
    if t is not None:
        lines.append(f"  train: data {t.data}, optimizer {t.optimizer}, batch {t.batch}, "
                     f"{t.epochs} epochs, seed {t.seed}"
                     + (f", metrics {', '.join(t.metrics)}" if t.metrics else "")
                     + (f", schedule {t.schedule}" if t.schedule.name != "constant" else "")
                     + (f", validation {t.validation}" if t.validation is not None else "")
                     + (f", {t.early_stop}" if t.early_stop is not None else "")
                     + (", keep_best" if t.keep_best else "")
                     + (f", clip {t.clip:g}" if t.clip is not None else "")
                     + (", check_numerics" if t.check_numerics else "")
                     + (f", augment [{', '.join(map(str, t.augment))}]" if t.augment else ""))
    return "\n".join(lines) + "\n"
