"""From a train block's data source to arrays shaped for the model: load, split,
normalize (fitted on the training split), and fit inputs and labels to the declared types."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from dlc.data.sources import Dataset, check_float32_range, fit_inputs, fit_labels, load_dataset
from dlc.core.diagnostics import DataError, warn
from dlc.core.spec import Spec
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
    if x.dtype.kind not in "biuf":
        raise DataError(f"the inputs are not numbers (dtype {x.dtype})", span)
    if x.ndim == 0:
        raise DataError("the inputs are one number, not a batch of samples", span)
    if t.dtype.is_float:
        check_float32_range(x, "the inputs", span)
        x = normalizer(x.reshape(len(x), -1)).reshape(x.shape) if normalizer.active else x.astype(np.float32)
    _warn_channels_last(x.shape, per_sample(t, span), span)
    try:
        return fit_inputs(x, per_sample(t, span)).astype(t.dtype.np, copy=False)
    except DataError as e:
        raise e.with_span(span)


def _warn_channels_last(shape: tuple, want: tuple, span) -> None:
    """[N, H, W, C] arrays for an NCHW model hold the same number of values, so they would be
    reshaped without complaint, scrambling every image (with C = 1 the reshape is right)."""
    if len(want) == 3 and len(shape) == 4 and want[0] > 1 and tuple(shape[1:]) == (want[1], want[2], want[0]) \
            and tuple(shape[1:]) != tuple(want):
        warn(f"the inputs look channels-last ([N, {', '.join(map(str, shape[1:]))}]) but the model takes "
             f"channels first ([B, {', '.join(map(str, want))}], NCHW): they are reshaped, not transposed, "
             "which scrambles the images", span, hint="transpose them first: x.transpose(0, 3, 1, 2)")


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


def _in_order(spec, base_dir: Path, seed: int, arrays, span) -> Dataset:
    """For a model that carries state between batches, the samples stay in their order and
    the test share is the last one: the held-out samples continue the training ones."""
    share = spec.args.get("test", 0.0)
    data = load_dataset(replace(spec, args={**spec.args, "test": 0.0}), base_dir, seed, arrays=arrays, span=span)
    n = len(data.x_train)
    n_test = int(round(n * share))
    if n_test >= n:
        raise DataError(f"test={share} of {n} sample(s) leaves none to train on", span,
                        hint="use a smaller test fraction or more data")
    if data.x_test is not None and len(data.x_test) or not n_test:  # a source's own test set (mnist)
        return data
    x, y = data.x_train, data.y_train
    return replace(data, x_train=x[:n - n_test], y_train=y[:n - n_test], x_test=x[n - n_test:], y_test=y[n - n_test:])


def prepare(model, config, label_type, base_dir: Path, seed: int, arrays=None,
            normalizer: Normalizer | None = None, validation=None) -> tuple[Dataset, Normalizer]:
    """Load the data set of the train block (or the given arrays) ready for training.
    `validation` (default: the train block's) is a share of the training split, a data
    source Spec, or (x, y) arrays; the normalization is fitted on what is left to train on."""
    span = config.span("data")
    in_order = bool(model.built().carries)
    if in_order:
        data = _in_order(config.data, base_dir, seed, arrays, span)
    else:
        data = load_dataset(config.data, base_dir, seed, arrays=arrays, span=span)
    # the train block's validation line, or the data's; none for a value fit() was given
    vspan = (config.span("validation") or span) if validation is None else None
    data = split_validation(data, config.validation if validation is None else validation, base_dir, seed,
                            vspan, in_order=in_order)
    if normalizer is None:
        mode = config.normalize if config.normalize is not None else data.default_normalize
        flat = np.asarray(data.x_train).reshape(len(data.x_train), -1)
        normalizer = Normalizer.fit(flat, mode) if model.input_types[0][1].dtype.is_float \
            else Normalizer.fit(flat, "none")
    classes = classes_of(model, label_type)

    def inputs(x, where):
        return shape_inputs(model, x, normalizer, where) if len(x) else x

    def labels(y, where):
        return shape_labels(label_type, y, where, classes) if len(y) else y
    try:
        x_train = shape_inputs(model, data.x_train, normalizer, span)
    except DataError as e:
        want = per_sample(model.input_types[0][1], span)
        if data.name == "images" and len(want) == 3:  # the likely fix is the source's, not the model's
            gray = ", gray=true" if want[0] == 1 else ""
            e.hint = (f"images(..., size=[{want[1]}, {want[2]}]{gray}) makes every image the model's input "
                      f"[{'x'.join(map(str, want))}]")
        raise
    data = replace(
        data,
        x_train=x_train,
        y_train=shape_labels(label_type, data.y_train, span, classes),
        x_test=inputs(data.x_test, span), y_test=labels(data.y_test, span),
    )
    if data.x_val is not None:
        try:
            data = replace(data, x_val=inputs(data.x_val, vspan), y_val=labels(data.y_val, vspan))
        except DataError as e:  # (which split: its line may be the data's, or none)
            e.message = f"in the validation split: {e.message}"
            raise
    return data, normalizer


def split_validation(data: Dataset, validation, base_dir: Path, seed: int, span=None,
                     in_order: bool = False) -> Dataset:
    """Hold out the validation split: a share of the training split (a seeded draw, separate
    from the test split's), every sample of another data source, or arrays from Python.
    `in_order` (a model that carries state between batches): the share is the training
    split's last samples, so that each split stays a run of consecutive samples."""
    if validation is None:
        return data
    if isinstance(validation, tuple):
        x, y = (np.asarray(a) for a in validation)
        if len(x) != len(y):
            raise DataError(f"validation_data has {len(x)} inputs but {len(y)} labels", span)
        return replace(data, x_val=x, y_val=y)
    if isinstance(validation, Spec):
        args = {**validation.args, "test": 0.0} if "test" in validation.args else validation.args
        other = load_dataset(replace(validation, args=args), base_dir, seed, span=span)
        return replace(data, x_val=other.x_train, y_val=other.y_train)
    n = len(data.x_train)
    n_val = int(round(n * validation))
    if not 0 < n_val < n:
        raise DataError(f"validation={validation:g} of {n} training sample(s) leaves "
                        f"{'no validation samples' if n_val == 0 else 'none to train on'}", span,
                        hint="use another share, or more data")
    if in_order:
        val, train = np.arange(n - n_val, n), np.arange(n - n_val)
    else:
        order = np.random.default_rng([seed, 1]).permutation(n)  # [seed, 1]: not the test split's draw
        val, train = order[:n_val], order[n_val:]
    return replace(data, x_train=data.x_train[train], y_train=data.y_train[train],
                   x_val=data.x_train[val], y_val=data.y_train[val])
