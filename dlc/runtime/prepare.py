"""From a train block's data source to arrays shaped for the model: load, split,
normalize (fitted on the training split), and fit inputs and labels to the declared types."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from dlc.data.sources import Dataset, check_float32_range, fit_inputs, fit_labels, load_dataset
from dlc.core.diagnostics import DataError
from dlc.runtime.trainer import Normalizer


def per_sample(t, span=None) -> tuple[int, ...]:
    """A declared type's shape without its (leading, symbolic) batch axis."""
    rest = t.shape[1:]
    if not all(isinstance(d, int) for d in rest):
        raise DataError(f"only the first (batch) dimension of {t} may be symbolic when training "
                        "on a data set", span, hint="write the other dimensions as numbers")
    return tuple(rest)


def shape_inputs(model, x: np.ndarray, normalizer: Normalizer, span=None) -> np.ndarray:
    _, t = model.input_types[0]
    x = np.asarray(x)
    if t.dtype.is_float:
        check_float32_range(x, "the inputs", span)
        x = normalizer(x.reshape(len(x), -1)).reshape(x.shape) if normalizer.active else x.astype(np.float32)
    try:
        return fit_inputs(x, per_sample(t, span)).astype(t.dtype.np, copy=False)
    except DataError as e:
        raise e.with_span(span)


def shape_labels(label_type, y: np.ndarray, span=None, classes: int | None = None) -> np.ndarray:
    """Labels in the label input's dtype and shape; class ids are checked against `classes`.
    Without a label input (the loss does not use labels) they pass through unused."""
    if label_type is None:
        return np.asarray(y)
    try:
        return fit_labels(np.asarray(y), label_type.dtype.value, per_sample(label_type, span),
                          classes=classes)
    except DataError as e:
        raise e.with_span(span)


def classes_of(model, label_type) -> int | None:
    """The number of classes integer labels index: the model output's last dimension."""
    if label_type is None:
        return None
    out = model.built().graph.node(model.built().graph.outputs["output"]).type
    return out.shape[-1] if label_type.dtype.value == "i32" and isinstance(out.shape[-1], int) else None


def prepare(model, config, label_type, base_dir: Path, seed: int, arrays=None,
            normalizer: Normalizer | None = None) -> tuple[Dataset, Normalizer]:
    """Load the data set of the train block (or the given arrays) ready for training."""
    span = config.span("data")
    data = load_dataset(config.data, base_dir, seed, arrays=arrays, span=span)
    if normalizer is None:
        mode = config.normalize if config.normalize is not None else data.default_normalize
        flat = np.asarray(data.x_train).reshape(len(data.x_train), -1)
        normalizer = Normalizer.fit(flat, mode) if model.input_types[0][1].dtype.is_float \
            else Normalizer.fit(flat, "none")
    classes = classes_of(model, label_type)
    data = replace(
        data,
        x_train=shape_inputs(model, data.x_train, normalizer, span),
        y_train=shape_labels(label_type, data.y_train, span, classes),
        x_test=shape_inputs(model, data.x_test, normalizer, span) if len(data.x_test) else data.x_test,
        y_test=shape_labels(label_type, data.y_test, span, classes) if len(data.y_test) else data.y_test,
    )
    return data, normalizer
