"""The Python API's keywords (fit, evaluate, predict, ...): what each takes, checked before
any work, so a wrong value is one clear error rather than a failure deep inside training or a
silent default."""
from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import os

from dlc.core.diagnostics import ArgumentError, did_you_mean
from dlc.language.recipe import INT_OPTION_MAX


FLAG = ("True or False", lambda v: isinstance(v, bool))


def _whole(low: int):
    return lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and low <= v <= INT_OPTION_MAX


def _real(ok):
    return lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and ok(v)


# The numbers fit/evaluate/predict take as keywords: what each takes (the CLI's flags take
# the same ranges). A wrong type would fail deep inside training; a zero or negative batch
# or epoch count would silently mean the default, and a negative rate gradient ascent.
VALUES = {
    "epochs": (f"a whole number from 1 to {INT_OPTION_MAX:,}", _whole(1)),
    "batch": (f"a whole number from 1 to {INT_OPTION_MAX:,}", _whole(1)),
    "lr": ("a positive finite number", _real(lambda v: v > 0)),
    "clip": ("a positive finite number, or False for none", _real(lambda v: v > 0)),
    "seed": (f"a whole number from 0 to {INT_OPTION_MAX:,}", _whole(0)),
    "test": ("a share from 0 up to (not including) 1", _real(lambda v: 0 <= v < 1)),
    "top_k": (f"a whole number from 1 to {INT_OPTION_MAX:,}", _whole(1)),
}


def checked(method: str, name: str, value):
    """`value` as a Python number if `name` takes it (None passes: the recipe's), else an
    ArgumentError."""
    what, ok = VALUES[name]
    if value is None:
        return None
    if not ok(value):
        raise ArgumentError(f"{method}({name}={value!r}): `{name}` takes {what}")
    return int(value) if isinstance(value, numbers.Integral) else float(value)


# The compiler options fit/evaluate/predict pass on (`**options`): what each takes.
BACKEND_OPTIONS = {
    "threads": ("a positive number of CPU threads, or \"auto\"",
                lambda v: v is None or v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v > 0)),
    "verbose": ("0, 1 or 2 (Keras: whether to show progress), or a function that receives the "
                "compiler's messages, such as print", lambda v: v is None or v is False or callable(v)),
    "no_cache": FLAG,
    "profile": FLAG,
    # on a cache miss, start on quickly compiled code while the optimized code compiles
    # (DLC_QUICK_START=1 makes it the default)
    "quick_start": FLAG,
    "cache_dir": ("a folder path", lambda v: isinstance(v, (str, os.PathLike))),
    # data-parallel jobs: start each bucket's exchange when it is ready and wait for it only
    # where its sums are read; gradient bytes per bucket (passes/data_parallel.py)
    "overlap": FLAG,
    "bucket_bytes": ("a positive number of bytes", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0),
}


# Keras keywords dlc does not take, and what to use instead
KERAS_ONLY = {
    "initial_epoch": "resume=CHECKPOINT continues a run where it stopped (epoch, batch and optimizer state)",
    "steps_per_epoch": "an epoch is always one pass over the training split; set `epochs` and `batch`",
    "validation_steps": "the whole validation split is scored after every epoch",
    "validation_freq": "the validation split is scored after every epoch",
    "validation_batch_size": "evaluation uses the training batch size",
    "class_weight": "not supported: weight the loss in the train block instead",
    "sample_weight": "not supported: weight the loss in the train block instead",
    "workers": "not needed: the data is in memory", "use_multiprocessing": "not needed: the data is in memory",
    "max_queue_size": "not needed: the data is in memory",
}


def check_options(method, options: dict) -> None:
    """Refuse a keyword the compiler does not take before it fails deep inside the compiler."""
    for name, value in options.items():
        if name in KERAS_ONLY:
            raise ArgumentError(f"{method.__name__}() does not take Keras' `{name}`", hint=KERAS_ONLY[name])
        if name not in BACKEND_OPTIONS:
            known = [*(p for p in inspect.signature(method).parameters if p != "options"), *BACKEND_OPTIONS]
            raise ArgumentError(f"{method.__name__}() got an unknown keyword `{name}`",
                                hint=did_you_mean(name, known) or f"its keywords: {', '.join(known)}")
        what, ok = BACKEND_OPTIONS[name]
        if not ok(value):
            raise ArgumentError(f"{method.__name__}({name}={value!r}): `{name}` takes {what}",
                                hint="quiet=False shows training progress" if name == "verbose" else None)


def keras_verbose(options: dict, quiet: bool) -> bool:
    """Keras' verbose=0/1/2 (or True/False) says whether to show progress; a function given as
    `verbose` receives the compiler's messages (and stays in options)."""
    v = options.get("verbose")
    if isinstance(v, bool) or (isinstance(v, int) and v in (0, 1, 2)):
        del options["verbose"]
        return not v
    return quiet


def alias(name: str, value, keras: str, keras_value):
    """A keyword and its Keras spelling (batch, batch_size): either, not both."""
    if keras_value is None:
        return value
    if value is not None:
        raise ArgumentError(f"give `{name}` or Keras' `{keras}`, not both")
    return keras_value


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ArgumentError(f"`{name}` takes True or False, got {value!r}")
    return value


def validation_value(v):
    """fit(validation=...): a share (0.1), a data-source expression ('npz("v.npz")') or (x, y)."""
    from dlc.language.overrides import option_value
    if v is None:
        return None
    if isinstance(v, (tuple, list)) and len(v) == 2:
        return tuple(v)
    if isinstance(v, str):
        return option_value(v, "validation")[0]
    if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1:
        return float(v)
    raise ArgumentError(f"validation={v!r}: give a share of the training data in (0, 1), a data source "
                        "such as 'npz(\"val.npz\")', or (x, y) arrays")


def early_stop_value(v, config):
    """fit(early_stop=...): None keeps the train block's, False turns it off; a .dln expression
    or a dlc.EarlyStopping."""
    from dlc.runtime.callbacks import EarlyStopping, from_spec
    if v is None:
        return from_spec(config.early_stop) if config.early_stop is not None else None
    if v is False:
        return None
    if isinstance(v, EarlyStopping):
        return v
    if isinstance(v, str):
        from dlc.language.overrides import option_value
        return from_spec(option_value(v, "early_stop")[0])
    raise ArgumentError(f"early_stop={v!r}: give 'early_stop(monitor=val_loss, patience=5)', a "
                        "dlc.EarlyStopping, or False")


def with_spec(config, option: str, value, example: str):
    """fit(optimizer=...) or fit(schedule=...): an expression as `--optimizer` takes it
    ("adam", "sgd(lr=0.1, momentum=0.9)") or a recipe Spec; None keeps the train block's."""
    from dlc.language.overrides import option_value
    from dlc.language.recipe import Spec
    if value is None:
        return config
    spans = {k: v for k, v in config.spans.items() if k != option}  # (the train block's no longer applies)
    if isinstance(value, str):
        value, spans[option] = option_value(value, option)
    elif not (isinstance(value, Spec) and value.kind == option):
        raise ArgumentError(f"fit({option}={value!r}): `{option}` takes an expression such as {example}")
    return dataclasses.replace(config, **{option: value}, spans=spans)


def with_augment(config, value):
    """fit(augment=...): a list as the train block writes it ("[flip, crop(pad=4)]"), or False
    for none."""
    from dlc.language.overrides import option_value
    spans = {k: v for k, v in config.spans.items() if k != "augment"}
    if value is False:
        return dataclasses.replace(config, augment=(), spans=spans)
    if not isinstance(value, str):
        raise ArgumentError(f"fit(augment={value!r}): `augment` takes an expression such as "
                            "\"[flip, crop(pad=4)]\", or False")
    value, spans["augment"] = option_value(value, "augment")
    return dataclasses.replace(config, augment=value, spans=spans)
