"""The `dlc` command. User errors print one message and exit 1; bad command-line use exits 2."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .diagnostics import DlcError, UsageError

DESCRIPTION = """\
dlc compiles neural networks written in the .dln language into native training steps.

  dlc check model.dln                 check a program and print the model summary
  dlc compile model.dln --dump-ir=all show every IR stage (or write them with --dump-dir)
  dlc run model.dln                   train with the file's train block
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's exit status 2, with our one-line format
        self.print_usage(sys.stderr)
        print(f"dlc: usage error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a .dln program")
    p.add_argument("--model", metavar="NAME", help="which model, when the file defines several")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dlc", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"dlc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("check", help="check a program and print the model summary",
                       description="Parse and type-check a .dln program, then print each binding's output "
                                   "shape and parameter count (like Keras' summary()).")
    _add_model_args(p)

    p = sub.add_parser("compile", help="compile a program; dump IR stages",
                       description="Compile a .dln program through the pipeline. --dump-ir prints "
                                   "stages to stdout, or writes one numbered file per stage with --dump-dir.")
    _add_model_args(p)
    p.add_argument("--dump-ir", metavar="STAGES", default=None,
                   help="comma-separated stages to print, or `all` (see --list-stages)")
    p.add_argument("--dump-dir", metavar="DIR", help="write each dumped stage to DIR/NN_stage.txt")
    p.add_argument("--list-stages", action="store_true", help="list the IR stages and exit")
    return parser


def cmd_check(args) -> int:
    from .api import load
    model = load(args.file, args.model)
    print(model.summary(), end="")
    return 0


def cmd_compile(args) -> int:
    from .api import load
    from .pipeline import STAGES, select_stages
    if args.list_stages:
        for name, doc in STAGES.items():
            print(f"{name:<12} {doc}")
        return 0
    model = load(args.file, args.model)
    stages = select_stages(args.dump_ir or ("all" if args.dump_dir else ""))
    if args.dump_dir:
        out = Path(args.dump_dir)
        out.mkdir(parents=True, exist_ok=True)
        for i, stage in enumerate(stages):
            (out / f"{i:02d}_{stage}.txt").write_text(model.ir(stage))
        print(f"wrote {len(stages)} stage(s) to {out}/")
    else:
        for stage in stages:
            if len(stages) > 1:
                print(f";; ---- {stage} ----")
            print(model.ir(stage), end="")
    if not stages:
        print(f"{args.file}: ok (model {model.name})")
    return 0


COMMANDS = {"check": cmd_check, "compile": cmd_compile}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except UsageError as e:
        print(f"dlc: {e.render()}", file=sys.stderr)
        return 2
    except DlcError as e:
        print(e.render(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dlc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
