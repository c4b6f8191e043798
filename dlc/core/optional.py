"""The optional packages (the extras: matplotlib, graphviz, onnx, tensorboardX), imported
where a command needs one. Missing is one usage error; installed but failing to import is
another, with the reason: a package built against numpy 1.x raises under numpy 2, and
"needs matplotlib" would send the user to install what they already have."""
from __future__ import annotations

import contextlib
import importlib
import io
import sys

from .diagnostics import UsageError


def optional_module(name: str, needed_by: str, what: str, hint: str):
    """`import name`, or a UsageError "`needed_by` needs `what`" with `hint` (not
    installed), or the same saying it is installed but does not import, why, and to
    upgrade it (the package is named as it is imported: matplotlib, graphviz, onnx,
    tensorboardX)."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):  # numpy prints its complaint about the ABI here
            module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is None or name == e.name or name.startswith(e.name + "."):
            raise UsageError(f"{needed_by} needs {what}", hint=hint) from None
        failure: BaseException = e
    except Exception as e:  # noqa: BLE001 - a broken install raises ImportError, AttributeError, ...
        failure = e
    else:
        sys.stderr.write(printed.getvalue())  # warnings of an import that worked
        return module
    raise UsageError(f"{needed_by} needs {what}, which is installed but does not import: {_reason(printed, failure)}",
                     hint=f"reinstall or upgrade it: pip install --upgrade {name.split('.')[0]}") from None


def _reason(printed: io.StringIO, failure: BaseException) -> str:
    """The first sentence of what the import printed (numpy explains itself there, in
    lines wrapped at 60 columns), else of the error, else the error's type."""
    for text in (printed.getvalue(), str(failure)):
        paragraph = " ".join(text.strip().split("\n\n")[0].split())
        if paragraph:
            head, dot, _ = paragraph.partition(". ")
            return head + dot.strip()
    return type(failure).__name__
