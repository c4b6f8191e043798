"""Command-line overrides of train-block options (`--data 'npz("d.npz")'`, `--optimizer adam`).

The text is a .dln expression, parsed with the same grammar (from its `expr` rule) and
checked by the same frontend code as the train block, so errors read the same way.
"""
from __future__ import annotations

import dataclasses
import functools

from lark import Lark
from lark.exceptions import UnexpectedInput

from dlc.core.diagnostics import Source
from dlc.language.recipe import TrainConfig
from dlc.language.syntax.parse import _syntax_error, _ToAst


@functools.lru_cache(maxsize=1)
def _expr_parser() -> Lark:
    return Lark.open_from_package("dlc.grammar", "dln.lark", parser="lalr", start="expr",
                                  propagate_positions=True, maybe_placeholders=True)


def parse_expression(text: str, name: str):
    source = Source(name, text)
    try:
        tree = _expr_parser().parse(text)
    except UnexpectedInput as e:
        raise _syntax_error(e, source) from None
    return _ToAst(source).transform(tree)


def option_value(text: str, option: str, name: str | None = None):
    """A train option given as text (a flag's, or a Python keyword's): its value, checked as
    the train block's would be, and the span of the text (errors point there)."""
    from dlc.language.frontend import eval_recipe
    expr = parse_expression(text, name or option)
    return eval_recipe(expr, option), expr.span


def override_config(config: TrainConfig, **options: str | None) -> TrainConfig:
    """The config with train options replaced by .dln expressions (None: kept as it is)."""
    if options.get("early_stop") and options["early_stop"].strip().isidentifier():
        options["early_stop"] = f"early_stop(monitor={options['early_stop'].strip()})"  # `--early-stop val_loss`
    given = {option: option_value(text, option, f"--{option.replace('_', '-')}")
             for option, text in options.items() if text is not None}
    if not given:
        return config
    # runtime errors about an overridden option point at the flag's text, not the train block's
    return dataclasses.replace(config, **{option: value for option, (value, _) in given.items()},
                               spans={**config.spans, **{option: span for option, (_, span) in given.items()}})
