"""Source spans and user-facing errors: `file:line:col`, the source line, a caret, a hint."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Iterable


@dataclass(frozen=True, eq=False)
class Source:
    """A .dln text and the name it is reported under (a path, or `<string>`)."""

    name: str
    text: str

    def line(self, n: int) -> str:
        # lines end at "\n" only, as the parser counts them (not at form feeds, U+2028, ...)
        lines = self.text.split("\n")
        return lines[n - 1].rstrip("\r") if 1 <= n <= len(lines) else ""

    def end(self) -> "Span":
        """Just past the last non-blank character: where `unexpected end of file` points."""
        text = self.text.rstrip()
        line = text.count("\n") + 1
        col = len(text) - (text.rfind("\n") + 1) + 1
        return Span(self, line, col, line, col + 1)


@dataclass(frozen=True)
class Span:
    source: Source = field(compare=False)
    line: int
    col: int
    end_line: int
    end_col: int  # exclusive

    def __str__(self) -> str:
        return f"{self.source.name}:{self.line}:{self.col}"

    @property
    def short(self) -> str:
        """`file.dln:3:14` with the directory dropped: stable in IR dumps."""
        name = self.source.name.replace("\\", "/").rsplit("/", 1)[-1]
        return f"{name}:{self.line}:{self.col}"


class DlcError(Exception):
    """Every error a user can cause. The CLI prints `render()` and exits 1."""

    kind = "error"

    def __init__(self, message: str, span: Span | None = None, hint: str | None = None,
                 notes: Iterable[str] = ()):
        super().__init__(message)
        self.message = message
        self.span = span
        self.hint = hint
        self.notes = list(notes)

    def with_span(self, span: Span | None) -> "DlcError":
        if self.span is None and span is not None:
            self.span = span
        return self

    def render(self) -> str:
        where = f"{self.span}: " if self.span else ""
        out = [_clip(f"{where}{self.kind}: {self.message}")]
        if self.span is not None:
            text = self.span.source.line(self.span.line)
            if self.span.line >= 1:  # an empty line (or file) still gets its caret
                width = (self.span.end_col - self.span.col
                         if self.span.end_line == self.span.line else len(text) - self.span.col + 1)
                shown, col, width = _shown_line(text, self.span.col, max(1, width))
                gutter = f"{self.span.line:>4} | "
                out.append(gutter + shown)
                out.append(" " * (len(gutter) - 2) + "| " + " " * col + "^" * width)
        for note in self.notes:
            out.append(_clip(f"note: {note}"))
        if self.hint:
            out.append(_clip(f"hint: {self.hint}"))
        return "\n".join(out)

    def __str__(self) -> str:
        return self.render()


class ParseError(DlcError):
    kind = "syntax error"


class NameError_(DlcError):
    kind = "error"


class TypeError_(DlcError):
    kind = "type error"


class ShapeMismatch(DlcError):
    kind = "shape error"


class ArgumentError(DlcError):
    kind = "error"


class DataError(DlcError):
    kind = "data error"


class CheckpointError(DlcError):
    kind = "checkpoint error"


class NumericsError(DlcError):
    kind = "numerics error"


class ResourceError(DlcError):
    """Not enough of the machine (memory) for what was asked."""

    kind = "error"


class UsageError(DlcError):
    """Bad command-line use: the CLI exits 2."""

    kind = "usage error"


class DlcWarning(UserWarning):
    """A likely mistake that is not an error, rendered like an error (location, line, hint).
    Raised through Python's `warnings`; `dlc` prints it on stderr."""

    def __init__(self, message: str, span: Span | None = None, hint: str | None = None):
        self.diagnostic = DlcError(message, span, hint)
        self.diagnostic.kind = "warning"
        super().__init__(self.diagnostic.render())


def warn(message: str, span: Span | None = None, hint: str | None = None) -> None:
    import warnings
    warnings.warn(DlcWarning(message, span, hint), stacklevel=3)


SHOWN_COLUMNS = 120  # of a source line around the caret; longer lines are cut, the cuts marked `…`
MESSAGE_CHARS = 500  # a message quoting something huge (a 100,000-character name) is cut too


def _shown_line(text: str, col: int, width: int) -> tuple[str, int, int]:
    """The source line as printed, with the caret's 0-based column and width in it: a tab as a
    space, other unprintable characters escaped (`\\x00`), clipped around the caret."""
    pieces = [" " if c == "\t" else c if c.isprintable() else ascii(c)[1:-1] for c in text]
    start = sum(map(len, pieces[:col - 1]))
    width = max(1, sum(map(len, pieces[col - 1:col - 1 + width])))
    shown = "".join(pieces)
    if len(shown) <= SHOWN_COLUMNS:
        return shown, start, width
    lo = max(0, start - SHOWN_COLUMNS // 3)  # some context before the caret, more after it
    hi = min(len(shown), lo + SHOWN_COLUMNS)
    lo = max(0, min(lo, hi - SHOWN_COLUMNS))
    left, right = ("…" if lo > 0 else ""), ("…" if hi < len(shown) else "")
    return left + shown[lo:hi] + right, start - lo + len(left), max(1, min(width, hi - start))


def _clip(line: str) -> str:
    """A message line for a terminal: control characters (from a quoted name or string)
    escaped, and cut when huge."""
    line = "".join(c if c.isprintable() or c == "\n" else ascii(c)[1:-1] for c in line)
    return line if len(line) <= MESSAGE_CHARS else line[:MESSAGE_CHARS - 1] + "…"


def did_you_mean(name: str, candidates: Iterable[str]) -> str | None:
    close = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return f"did you mean `{close[0]}`?" if close else None


class ArtifactError(DlcError):
    """A compiled artifact that cannot be used: damaged, or built for another machine."""

    kind = "artifact error"
