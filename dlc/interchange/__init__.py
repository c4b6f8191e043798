"""Interchange with other frameworks (driver side: nothing below the driver imports it).

  onnx_export   a model's evaluation graph as an ONNX model  (`dlc export`)
  onnx_import   an ONNX model as a readable .dln file and a checkpoint  (`dlc import`)

Both need the optional extra `dlc[onnx]` (onnx, and onnxruntime to run what they make).
"""
from __future__ import annotations

from dlc.core.diagnostics import DlcError
from dlc.core.optional import optional_module


class InterchangeError(DlcError):
    """A model that cannot be exported, or an ONNX file that cannot be imported."""

    kind = "error"


ONNX_EXTRA = "pip install 'dlc[onnx]'  (onnx and onnxruntime)"


def require_onnx():
    """The onnx package, or a usage error that says how to install it."""
    return optional_module("onnx", "this command", "the `onnx` package", ONNX_EXTRA)
