"""The metrics log: one JSON object per line, a `start` header then one record per epoch
(read_log also reads the `--csv` log's rows)."""
from __future__ import annotations

import csv
import datetime
import json
import os
from pathlib import Path
from typing import Any, Mapping

from dlc import __version__
from dlc.core.diagnostics import DataError, Source, Span


class MetricsLog:
    """Appends epoch records to `path` as JSON lines, flushed one by one.

    The first line written is `{"event": "start", "dlc": ..., "time": ..., **header}`.
    With `append=True` an existing log (a resumed run) is continued: the new header
    line marks where the new run starts.
    """

    def __init__(self, path: str | os.PathLike, header: Mapping[str, Any], append: bool = False):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a" if append else "w", encoding="utf-8")
        except OSError as e:
            raise DataError(f"cannot write metrics log `{path}`: {e.strerror or e}") from None
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        # `event` comes first and is "start" whatever the header says: read_log skips it.
        line = {"event": "start", "dlc": __version__, "time": now, **header}
        line["event"] = "start"
        self._write_line(line)

    def write(self, epoch: int, step: int, metrics: Mapping[str, float], lr: float | None = None,
              seconds: float | None = None) -> None:
        """Record one epoch: `{"epoch", "step", **metrics, "lr", "seconds"}` (None left out)."""
        extra = {"lr": lr, "seconds": seconds}
        self._write_line({"epoch": epoch, "step": step, **metrics,
                          **{k: v for k, v in extra.items() if v is not None}})

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write_line(self, obj: Mapping[str, Any]) -> None:
        # Flushed per line so `dlc plot` and `tail -f` see each epoch as it ends.
        self._file.write(json.dumps(obj, default=_plain) + "\n")
        self._file.flush()


def read_log(path: str | os.PathLike) -> list[dict]:
    """The epoch records of a metrics log, in file order (event lines skipped)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"metrics log `{path}` does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read metrics log `{path}`: {e}") from None
    source = Source(str(path), text)
    if text.startswith("epoch,"):  # the --csv log: a header, then one row per epoch
        return _read_csv(source)
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines) and not text.endswith("\n"):
                break  # the writer is still writing this line (or died mid-line)
            raise _bad_line(source, number, e.colno, f"malformed JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise _bad_line(source, number, 1, "expected a JSON object")
        if "event" in obj:  # the start header, the test score after training
            continue
        if not isinstance(obj.get("epoch"), int):
            raise _bad_line(source, number, 1, "an epoch record needs an integer `epoch`")
        records.append(obj)
    return records


def _read_csv(source: Source) -> list[dict]:
    lines = source.text.splitlines()
    if lines and not source.text.endswith("\n"):
        lines.pop()  # the writer is still writing this row (or died mid-row)
    rows = csv.reader(lines)
    fields = next(rows, None)  # (None: the header itself is still being written)
    records = []
    for number, row in enumerate(rows, 2):
        if len(row) != len(fields):
            raise _bad_line(source, number, 1, f"{len(row)} values where the header names {len(fields)}")
        record = {}
        for name, text in zip(fields, row):
            try:
                record[name] = None if text == "" else int(text) if name in ("epoch", "step") else float(text)
            except ValueError:
                raise _bad_line(source, number, 1, f"`{name}` is {text!r}, not a number") from None
        records.append(record)
    return records


def _bad_line(source: Source, line: int, col: int, what: str) -> DataError:
    span = Span(source, line, col, line, col + 1)
    return DataError(f"line {line} of metrics log `{source.name}`: {what}", span)


def _plain(value: Any) -> Any:
    # numpy values (np.float32 losses, np.int64 steps, shapes) and paths in the header.
    return value.tolist() if hasattr(value, "tolist") else str(value)
