"""The `dlc` command. User errors print one message and exit 1; bad command-line use exits 2."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from collections import Counter
from pathlib import Path

from dlc import __version__
from dlc.core.diagnostics import DlcError, DlcWarning, UsageError
from dlc.language.recipe import INT_OPTION_MAX

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


def _add_model_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument("file", help="a .dln program", **({"nargs": "?"} if optional else {}))
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
    _add_model_args(p, optional=True)
    p.add_argument("--dump-ir", metavar="STAGES", default=None,
                   help="comma-separated stages to print, or `all` (see --list-stages)")
    p.add_argument("--dump-dir", metavar="DIR", help="write each dumped stage to DIR/NN_stage.txt")
    p.add_argument("--list-stages", action="store_true", help="list the IR stages and exit")
    p.add_argument("--stats", action="store_true",
                   help="print node count, kernel count and planned memory after each stage")
    p.add_argument("--time-passes", action="store_true", help="print how long each pass took")
    p.add_argument("--explain-fusion", action="store_true",
                   help="say, for each producer/consumer pair in different kernels, which rule kept them apart")
    p.add_argument("--disable-pass", metavar="NAME", action="append", default=[],
                   help="skip an optional pass (repeatable), for debugging")
    p.add_argument("--batch", type=_positive_int, help="batch size to compile for (default: the train block's)")
    p.add_argument("--eval", action="store_true", help="compile the evaluation graph instead of the training step")
    p.add_argument("--ranks", type=_positive_int, default=1, metavar="N",
                   help="compile the step of one rank of an N-process data-parallel job (with the `shard` "
                        "and `allreduce` stages; --batch is then the rank's share)")
    p.add_argument("-o", "--output", metavar="OUT",
                   help="write the compiled training and evaluation steps (one program, for the train "
                        "block's batch size and --batch's) to OUT (e.g. model.dlcx), which `dlc run OUT` "
                        "and `dlc eval OUT` load without compiling")
    _add_target(p, steps=False)

    p = sub.add_parser("run", help="train a model with its train block (a .dln file or a compiled artifact)",
                       description="Train a model with the recipe of its train block. Its values can be "
                                   "overridden here, all but loss, metrics, normalize and shuffle; --data, "
                                   "--optimizer and --schedule take "
                                   ".dln expressions such as 'digits(test=0.1)' or 'sgd(lr=0.1, momentum=0.9)'. "
                                   "FILE may be an artifact from `dlc compile -o`: loading it runs the native "
                                   "code inside it, so run only artifacts you trust (dlc checks that the file "
                                   "is intact and built for this machine, not who built it). Its steps are "
                                   "those of its train block's recipe: with another --optimizer, --clip or "
                                   "--check-numerics the step is compiled from the source inside it.")
    _add_model_args(p)
    p.add_argument("--epochs", type=_positive_int, help="number of epochs")
    p.add_argument("--batch", type=_positive_int, help="mini-batch size (1 = stochastic, the data "
                   "set size = full batch); the training and evaluation steps are compiled once for "
                   "it, and a smaller last batch is padded to it with exactly the unpadded results; with "
                   "several ranks, the global batch, which the ranks split")
    p.add_argument("--lr", type=_positive_float, help="initial learning rate")
    p.add_argument("--seed", type=_non_negative_int, help="random seed (initialization, shuffling, dropout)")
    p.add_argument("--data", metavar="EXPR", help="data source, e.g. 'npz(\"d.npz\")'")
    p.add_argument("--optimizer", metavar="EXPR", help="optimizer, e.g. 'adam(lr=1e-3)'")
    p.add_argument("--schedule", metavar="EXPR", help="learning-rate schedule, e.g. 'cyclic(1e-3, 1e-2, 100)'")
    p.add_argument("--clip", type=_positive_float, metavar="NORM",
                   help="scale all gradients together so their global L2 norm is at most NORM")
    p.add_argument("--augment", metavar="EXPR",
                   help="random changes to the inputs of each training batch, e.g. '[flip, crop(pad=4)]' "
                        "('[]': none)")
    p.add_argument("--validation", metavar="EXPR",
                   help="validation split scored after every epoch: a share of the training split "
                        "(0.1) or a data source ('npz(\"val.npz\")')")
    p.add_argument("--early-stop", metavar="EXPR",
                   help="stop when a metric stops improving: a metric (val_loss) or "
                        "'early_stop(monitor=val_loss, patience=5, min_delta=0)'")
    p.add_argument("--keep-best", action="store_true",
                   help="end with (and --save) the weights of the best epoch by the early-stop metric "
                        "(val_loss without one)")
    p.add_argument("--check-numerics", action="store_true",
                   help="also stop at a step whose gradients are not finite though its loss is, naming "
                        "the op (as `check_numerics = true` in the train block; slower steps)")
    _add_target(p)
    p.add_argument("--save", metavar="FILE",
                   help="write a checkpoint after every epoch (and on Ctrl-C, once a step has run); "
                        "a FILE already there, unless it is the --resume checkpoint, is kept "
                        "(ck.npz as ck.prev.npz, replacing an older one)")
    p.add_argument("--resume", metavar="FILE", help="continue from a checkpoint written by --save")
    p.add_argument("--log", metavar="FILE", help="write per-epoch metrics as JSON lines (see `dlc plot`)")
    p.add_argument("--csv", metavar="FILE", help="write per-epoch metrics as CSV")
    p.add_argument("--tensorboard", metavar="DIR",
                   help="write TensorBoard event files into DIR (needs: pip install 'dlc[tensorboard]')")
    p.add_argument("--quiet", "-q", action="store_true", help="print only the final result")
    p.add_argument("--ranks", type=_positive_int, metavar="N",
                   help="train as N data-parallel processes on this machine: runs `mpiexec -n N` on this "
                        "command (pip install 'dlc[mpi]'). The recipe's batch stays the global batch: each "
                        "rank trains on its share of every batch and the gradients are summed, so N ranks "
                        "train the same model as one process. Under mpiexec (e.g. `mpiexec -f hosts -n 8 "
                        "dlc run FILE` across machines) leave it out")
    p.add_argument("--profile", action="store_true",
                   help="after training, print the time spent in each kernel and each .dln line")

    p = sub.add_parser("eval", help="evaluate saved weights on the held-out data",
                       description="Load weights saved by `dlc run --save` and report loss and metrics "
                                   "on the train block's held-out split (or --data); for a classifier "
                                   "also top-k accuracy, precision, recall and F1 per class and the "
                                   "confusion matrix (`-o report.json`, drawn by `dlc plot report.json`).")
    _add_model_args(p)
    p.add_argument("--weights", metavar="FILE", help="a checkpoint from `dlc run --save` (required unless "
                   "the model has no parameters)")
    p.add_argument("--data", metavar="EXPR", help="data source to evaluate on instead")
    p.add_argument("--batch", type=_positive_int, help="batch size for evaluation")
    p.add_argument("--top-k", type=_positive_int, default=5, metavar="K", help="k of top-k accuracy (default 5)")
    p.add_argument("-o", "--output", metavar="FILE", help="write the metrics and confusion matrix as JSON")
    _add_target(p)

    p = sub.add_parser("predict", help="run a trained model on new inputs",
                       description="Load weights and print (or save) the model's outputs for the "
                                   "inputs in an .npy or .npz file.")
    _add_model_args(p)
    p.add_argument("--weights", metavar="FILE", help="a checkpoint from `dlc run --save` (required unless "
                   "the model has no parameters)")
    p.add_argument("--input", metavar="FILE", required=True,
                   help=".npy file of the inputs, or .npz file holding them (see --key)")
    p.add_argument("--key", default=None, help="array name in the .npz (default: `x`, or its only array)")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="write the outputs to FILE: an .npz holds them, the model's named results and a "
                        "classifier's predicted classes; an .npy the outputs alone")
    p.add_argument("--proba", action="store_true",
                   help="class probabilities instead of the raw outputs (logits for a cross_entropy model)")
    _add_target(p)

    p = sub.add_parser("data", help="write a split of a train block's data set to an .npz (inputs for predict)",
                       description="Write samples of the train block's data set (or --data) as stored, before "
                                   "normalization, to an .npz with arrays x and y: for example test images for "
                                   "`dlc predict --input`.")
    _add_model_args(p)
    p.add_argument("--data", metavar="EXPR", help="data source instead of the train block's")
    p.add_argument("--split", choices=["train", "test"], default="test", help="which split (default test)")
    p.add_argument("--count", type=_positive_int, help="only the first N samples")
    p.add_argument("-o", "--output", metavar="FILE", required=True, help="the .npz to write")

    sub.add_parser("targets", help="list the targets (backends) and whether each can run here",
                   description="List every registered target (--target NAME): what it is, and why it "
                               "cannot run on this machine when it cannot.")

    p = sub.add_parser("cache", help="show or clear the compile cache",
                       description="Show the compile cache: its directory, entry count and size. Compiled "
                                   "code is kept there (DLC_CACHE_DIR moves it; at most DLC_CACHE_MAX_BYTES, "
                                   "default 1G, least recently used entries go first).")
    p.add_argument("action", nargs="?", choices=["show", "clear"], default="show",
                   help="`clear` removes every entry (dlc's own files only)")

    p = sub.add_parser("graph", help="draw the model's layer graph, or its fused kernels (Graphviz)",
                       description="Draw the model as a graph: one node per layer, function or block call "
                                   "of its body (with the output type, parameters and .dln line), edges for "
                                   "the data flow. With --stage fuse, the graph after fusion instead: each "
                                   "kernel a cluster coloured by its kind and labelled with its .dln lines. "
                                   "-o FILE.dot (or .gv) writes DOT text; .svg, .png and .pdf are rendered by "
                                   "Graphviz's `dot` program (apt-get install graphviz, brew install "
                                   "graphviz). Needs: pip install 'dlc[graph]'.")
    _add_model_args(p)
    p.add_argument("-o", "--output", metavar="FILE", required=True,
                   help="the picture to write: .svg, .png, .pdf (needs `dot`) or .dot/.gv (DOT text)")
    p.add_argument("--stage", choices=["layers", "fuse"], default="layers",
                   help="`layers` (default): the model's layers; `fuse`: the fused kernels")
    p.add_argument("--train", action="store_true",
                   help="with --stage fuse: the training step (forward, gradients, update) instead of "
                        "the evaluation graph")
    p.add_argument("--batch", type=_positive_int, help="with --stage fuse: the batch size to compile for "
                   "(default: the train block's)")

    p = sub.add_parser("export", help="write a trained model's evaluation graph as ONNX",
                       description="Write the graph that `dlc predict` runs (dropout off, batchnorm on its "
                                   "running statistics) with the weights of a checkpoint as an ONNX model, "
                                   "checked with onnx.checker. The batch dimension stays symbolic; the input "
                                   "normalization saved in the checkpoint is part of the model, so it takes "
                                   "the same raw inputs as `dlc predict`. Layers become ONNX operators (Gemm, "
                                   "Conv, ConvTranspose, MaxPool, BatchNormalization, LSTM, GRU, RNN, ...); "
                                   "other loops become ONNX Scan. Needs: pip install 'dlc[onnx]'.")
    _add_model_args(p)
    p.add_argument("--weights", metavar="FILE", help="a checkpoint from `dlc run --save` (required unless "
                   "the model has no parameters)")
    p.add_argument("-o", "--output", metavar="FILE", required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=_positive_int, help="ONNX opset to target (default: the newest the "
                   "installed onnx package knows; at least 18)")
    p.add_argument("--no-normalize", action="store_true",
                   help="leave the checkpoint's input normalization out: the model then takes normalized inputs")
    p.add_argument("--loops-as-scan", action="store_true",
                   help="write recurrent layers as ONNX Scan loops instead of LSTM/GRU/RNN operators")

    p = sub.add_parser("import", help="turn an ONNX model into a .dln file and a checkpoint",
                       description="Translate an ONNX model into a readable .dln program and its weights (a "
                                   "checkpoint for --weights and `dlc run --resume`). Known layer patterns "
                                   "become layers (Gemm/MatMul+Add -> dense, Conv -> conv2d or conv1d, pools, "
                                   "BatchNormalization -> batchnorm, LayerNormalization -> layernorm, "
                                   "LSTM/GRU/RNN -> lstm/gru/rnn, MatMul of stacks -> @ (self-attention, "
                                   "PyTorch's TransformerEncoderLayer too), Flatten, "
                                   "activations); other operators become .dln arithmetic, and an operator "
                                   "with no counterpart is an error naming it. The .dln ends with a train "
                                   "block template for fine-tuning. Needs: pip install 'dlc[onnx]'.")
    p.add_argument("file", help="an .onnx model")
    p.add_argument("-o", "--output", metavar="FILE", required=True, help="the .dln file to write")
    p.add_argument("--weights", metavar="FILE",
                   help="the checkpoint to write (default: the .dln's name with .npz)")
    p.add_argument("--name", metavar="NAME", help="the model's name (default: the ONNX graph's)")
    p.add_argument("--no-train", action="store_true", help="leave out the train block template")

    p = sub.add_parser("plot", help="draw loss, accuracy and learning-rate curves from a metrics log",
                       description="Draw per-epoch loss, accuracy (train and validation) and the learning rate "
                                   "from a `dlc run --log` or `--csv` file, or the confusion matrix of a "
                                   "`dlc eval -o` report (needs matplotlib: pip install 'dlc[plot]').")
    p.add_argument("log", help="a metrics log (JSON lines from --log, or --csv's rows), or a JSON report "
                               "from `dlc eval -o`")
    p.add_argument("-o", "--output", metavar="FILE", default="curves.png", help="image to write (.png, .svg, .pdf)")
    return parser


def _target_arg(p: argparse.ArgumentParser) -> None:
    from dlc import backends
    p.add_argument("--target", choices=backends.names(), default=backends.DEFAULT,
                   help=f"where the step runs: {', '.join(backends.names())} (default {backends.DEFAULT}; "
                        "`dlc targets` describes each and says which are usable here)")


def _add_target(p: argparse.ArgumentParser, steps: bool = True) -> None:
    """steps: the command runs steps (run, eval, predict), not only compiles them."""
    _target_arg(p)
    p.add_argument("--threads", type=_threads, default="auto", metavar="N",
                   help="CPU threads: a number, or `auto` (the default): every core no other process keeps "
                        "busy (measured at start), and one thread for a step too small to share out")
    p.add_argument("--no-cache", action="store_true", help="compile afresh, ignoring the compile cache")
    if steps:
        p.add_argument("--quick-start", action="store_true",
                       help="on a cache miss, start training on quickly compiled code while the optimized code "
                            "compiles in the background, and swap it in between steps: the first step comes "
                            "sooner, the results are the same bits, and the optimized code is cached (on 2 "
                            "cores the whole run is no sooner: the compile and the steps share them; not with "
                            "--profile, which profiles the optimized code)")
    p.add_argument("--no-templates", action="store_true",
                   help="render matmuls, convolutions, pooling and gathers as plain loop nests instead of "
                        "the backend's dedicated code (slow; for testing a backend)")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="print the target, the one compile of the run (training and evaluation steps "
                        "together: cache hit or miss, time per phase" + ("; with --quick-start, when the "
                        "optimized code replaced the quick code" if steps else "") + "), and the threads each "
                        "step chose")


def _backend_options(args) -> dict:
    options = {}
    if getattr(args, "threads", None) not in (None, "auto"):
        options["threads"] = args.threads
    if getattr(args, "no_cache", False):
        options["no_cache"] = True
    if getattr(args, "quick_start", False):
        options["quick_start"] = True
    if getattr(args, "no_templates", False):
        options["templates"] = False
    if getattr(args, "verbose", False):
        from dlc import backends
        backend = backends.backend(args.target)
        if backend.lowers:
            print(f"dlc: target {args.target}: {backend.target(options).describe()}", file=sys.stderr)
        options["verbose"] = lambda msg: print(f"dlc: {msg}", file=sys.stderr)
    if getattr(args, "profile", False):
        options["profile"] = True
    return options


def _number(kind, check, what):
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not check(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v
    return parse


_positive_int = _number(int, lambda v: 0 < v <= INT_OPTION_MAX, f"a positive integer up to {INT_OPTION_MAX:,}")
_non_negative_int = _number(int, lambda v: 0 <= v <= INT_OPTION_MAX, f"an integer from 0 to {INT_OPTION_MAX:,}")
_positive_float = _number(float, lambda v: 0 < v < float("inf"), "a positive finite number")


def _threads(text: str):
    return "auto" if text == "auto" else _number(int, lambda v: v > 0, "a positive integer or `auto`")(text)


def _output_path(path: str, flag: str, folder: bool = False, suffixes: dict | None = None) -> Path:
    """An output path of the wrong kind is refused before any work, not when writing at the end
    (`suffixes`: the file types it may have, and what each holds)."""
    p = Path(path)
    if p.exists() and p.is_dir() != folder:
        want = "a folder (it is created if missing)" if folder else "the name of the file to write"
        raise UsageError(f"{flag} {path} is a {'file' if folder else 'folder'}; give {want}")
    if suffixes and p.suffix not in suffixes:  # (numpy would add .npz to another name)
        kinds = " or ".join(f"{k} ({v})" for k, v in suffixes.items())
        raise UsageError(f"{flag} {path}: give a {kinds} file name")
    blocker = next((q for q in p.parents if q.exists() and not q.is_dir()), None)
    if blocker is not None:
        raise UsageError(f"{flag} {path}: {blocker} is a file, not a folder")
    return p


def cmd_check(args) -> int:
    from dlc.api import load
    model = load(args.file, args.model)
    print(model.summary(), end="")
    return 0


def cmd_compile(args) -> int:
    from dlc.api import load
    from dlc import backends
    from dlc.pipeline import Compilation, check_disabled, select_stages, stages_for
    stages = stages_for(backends.backend(args.target, runnable=False))  # dumps need no GPU
    if args.list_stages:
        for name, doc in stages.items():
            print(f"{name:<15} {doc}")
        return 0
    if args.file is None:
        raise UsageError("compile needs a .dln file (or --list-stages)")
    if args.output:
        _output_path(args.output, "-o")
    if args.dump_dir:
        _output_path(args.dump_dir, "--dump-dir", folder=True)
    model = load(args.file, args.model)
    disabled = check_disabled(args.disable_pass)
    _check_stage_targets(args.dump_ir, stages, args.target)
    names = select_stages(args.dump_ir or ("all" if args.dump_dir else ""), stages)
    mode = "eval" if args.eval or model.train_config is None else "train"
    log = Compilation()
    dumps = model.stages(names, batch=args.batch, mode=mode, disabled=disabled, log=log, target=args.target,
                         world=args.ranks)
    if args.dump_dir:
        out = Path(args.dump_dir)
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("[0-9][0-9]_*.txt"):
            old.unlink()  # a stale stage from an earlier run would mislead
        for i, (stage, text) in enumerate(dumps):
            (out / f"{i:02d}_{stage}.txt").write_text(text)
        print(f"wrote {len(dumps)} stage(s) to {out}/")
    else:
        for stage, text in dumps:
            if len(dumps) > 1:
                print(f";; ---- {stage} ----")
            print(text, end="")
    if args.time_passes:
        total = sum(r.seconds for r in log.records)
        print(f"{'pass':<16}{'ms':>9}{'nodes':>8}")
        for r in log.records:
            print(f"{r.name:<16}{r.seconds * 1e3:>9.2f}{r.nodes:>8}")
        print(f"{'total':<16}{total * 1e3:>9.2f}")
    if args.stats:
        print(_stats_table(log))
    if args.explain_fusion:
        fused = log.last("fuse")
        print(fused.graph.meta["fusion"].explain(fused.graph), end="")
    if args.output and args.ranks > 1:
        raise UsageError("-o writes one-process steps; a data-parallel job compiles its own (through the cache)",
                         hint="leave out --ranks to write an artifact")
    if args.output:
        steps = model.compile_artifact(args.output, batches=[args.batch] if args.batch else None,
                                       target=args.target, **_backend_options(args))
        print(f"wrote {args.output}: {model.name}, steps " + ", ".join(f"{m} batch {b}" for m, b in steps))
        return 0
    if not (dumps or args.time_passes or args.stats or args.explain_fusion):
        final = log.last("memory")
        plan, mem = final.graph.meta["fusion"], final.graph.meta["memory"]
        print(f"{args.file}: {model.name} compiles to {len(plan.kernels)} kernels in {plan.phases} phases; "
              f"working memory {mem.arena_bytes:,} bytes")
    return 0


def _stats_table(log) -> str:
    rows = [("stage", "nodes", "kernels", "peak memory")]
    for r in log.records:
        rows.append((r.name, str(r.nodes), "-" if r.kernels is None else str(r.kernels),
                     "-" if r.arena_bytes is None else f"{r.arena_bytes:,} B"))
    mem = log.last("memory")
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    if mem is not None:
        m = mem.graph.meta["memory"]
        lines.append(f"planned peak working memory {m.arena_bytes:,} B vs {m.naive_bytes:,} B with one "
                     f"buffer per node ({m.saving:.0%} less)")
    return "\n".join(lines)


def _load_with_overrides(args):
    from dlc.api import load
    from dlc.language.overrides import override_config
    model = load(args.file, args.model)
    if model.train_config is None:
        raise UsageError(f"{args.file}: model {model.name} has no train block",
                         hint="add `train <model> { data = ..., loss = ... }`")
    model.train_config = override_config(model.train_config, **{
        k: getattr(args, k, None) for k in ("data", "optimizer", "schedule", "validation", "early_stop", "augment")})
    if getattr(args, "clip", None) is not None:
        model.train_config = dataclasses.replace(model.train_config, clip=args.clip)
    return model


def cmd_run(args) -> int:
    from dlc import backends
    from dlc.runtime import distributed
    from dlc.runtime.trainer import Interrupted, kept_note
    launched = distributed.launched_size()
    if args.ranks and args.ranks > 1 and launched == 1:  # start the job: this command, N times
        return distributed.launch(args.ranks, distributed.without_ranks(args.argv))
    if args.ranks and launched > 1 and args.ranks != launched:
        raise UsageError(f"--ranks {args.ranks}, but mpiexec started {launched} ranks",
                         hint="under mpiexec, leave --ranks out")
    backends.backend(args.target)  # a target that cannot run here fails before anything starts
    world = distributed.world_from_env()
    lead = world is None or world.lead
    model = _load_with_overrides(args)
    cfg = model.train_config
    save = args.save or cfg.checkpoint
    quiet = args.quiet or not lead
    if args.tensorboard:
        _output_path(args.tensorboard, "--tensorboard", folder=True)
    for path, flag in ((args.csv, "--csv"), (args.log, "--log")):
        if path:
            _output_path(path, flag)
    if not quiet:
        print(_header(model, cfg, args, world), file=sys.stderr)
    options = _backend_options(args)  # once: --profile reads the session fit ran (the same options)
    try:
        history = model.fit(epochs=args.epochs, batch=args.batch, lr=args.lr, seed=args.seed,
                            target=args.target, quiet=quiet, log=args.log, csv=args.csv,
                            tensorboard=args.tensorboard, save=save, resume=args.resume,
                            keep_best=True if args.keep_best else None, world=world,
                            check_numerics=True if args.check_numerics else None, **options)
    except Interrupted as e:
        if lead:
            print(f"dlc: {e}", file=sys.stderr)
        return 130
    if not lead:
        return 0
    last = dict(history.epochs[-1]) if history.epochs else {}
    last.update({f"test_{k}": v for k, v in history.test.items()})
    if history.best_epoch is not None:
        best = history.epochs[[e["epoch"] for e in history.epochs].index(history.best_epoch)]
        last.update({k: v for k, v in best.items() if k.startswith(("train_", "val_"))})
    print(_final_line(model.name, last, sum(e["seconds"] for e in history.epochs), history))
    if args.profile:
        session = model.session(model.train_config, args.target, world, **options)
        print(session.profile_report(), end="")
        if world is not None:
            print(f"rank 0 spent {world.comm_seconds:.3f} s in gradient exchanges")
    if save:
        print(f"saved {save}{kept_note(history)}")
    return 0


def _header(model, cfg, args, world=None) -> str:
    """`training mlp on digits(test=0.2) with adam(lr=0.01, ...)`: the optimizer as it runs,
    --lr included, and the schedule's own rates when it sets them; a data-parallel job's ranks."""
    opt = cfg.optimizer
    if args.lr is not None:
        opt = dataclasses.replace(opt, args={**opt.args, "lr": args.lr})
    extra = [f"schedule {cfg.schedule}"] if cfg.schedule.name != "constant" else []
    if cfg.validation is not None:
        extra.append(f"validation {cfg.validation}")
    if cfg.early_stop is not None:
        extra.append(f"{cfg.early_stop}")
    if cfg.clip is not None:
        extra.append(f"clip {cfg.clip:g}")
    ranks = "" if world is None else \
        f", {world.size} ranks: " + ", ".join(f"{r}: pid {p} on {h}" for r, (p, h) in enumerate(world.places))
    return (f"training {model.name} on {cfg.data} with {opt}" + "".join(f", {e}" for e in extra) +
            f" (batch {args.batch or cfg.batch}, {args.epochs or cfg.epochs} epochs, target {args.target}{ranks})")


def _final_line(name: str, rec: dict, seconds: float, history=None) -> str:
    parts = [f"{name}:"]
    for split in ("train", "val", "test"):
        vals = [f"{k[len(split) + 1:]} {rec[k]:.4f}" for k in rec if k.startswith(split + "_")]
        if vals:
            parts.append(f"{split} " + ", ".join(vals))
    from dlc.runtime.progress import format_seconds
    n = rec.get('epoch', 0)
    epochs = f"after {n} epoch{'' if n == 1 else 's'} ({format_seconds(seconds)})"
    if history is not None and history.best_epoch is not None:
        epochs += f", weights of epoch {history.best_epoch}"
    if history is not None and history.stopped:
        epochs += ", stopped early"
    parts.append(epochs)
    return " ".join(parts[:1]) + " " + "; ".join(parts[1:])


def _load_weights(model, args) -> None:
    """--weights, which a model with parameters needs: without them its outputs would be
    those of freshly initialized weights."""
    if args.weights is not None:
        model.load_weights(args.weights)
    elif model.params:
        raise UsageError(f"`dlc {args.command}` needs --weights FILE: model {model.name} has parameters",
                         hint=f"train it and save them with `dlc run {args.file} --save ck.npz`")


def cmd_eval(args) -> int:
    import json
    from dlc.runtime.metrics import format_report
    if args.output:
        _output_path(args.output, "-o")
    model = _load_with_overrides(args)
    _load_weights(model, args)
    metrics = model.evaluate(batch=args.batch, target=args.target, **_backend_options(args))
    report = None
    if model.is_classifier and not model.masks_positions:
        report = model.classification_report(top_k=args.top_k, batch=args.batch, target=args.target,
                                             **_backend_options(args))
        metrics.update({k: v for k, v in report.items() if k.startswith("top_")})
        metrics.update({f"macro_{k}": report[k] for k in ("precision", "recall", "f1")})
    print(f"{model.name}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if report is not None:
        print(format_report(report), end="")
    if args.output:
        Path(args.output).write_text(json.dumps({"model": model.name, **metrics, **(report or {})}, indent=1) + "\n")
        print(f"wrote {args.output}")
    return 0


def cmd_predict(args) -> int:
    import numpy as np
    from dlc.api import load
    from dlc.runtime.inputs import read_input_array
    from dlc.runtime.metrics import predicted_classes
    if args.output:
        _output_path(args.output, "-o", suffixes={".npz": "the outputs, named results and classes",
                                                 ".npy": "the outputs alone"})
    model = load(args.file, args.model)
    _load_weights(model, args)
    x = read_input_array(Path(args.input), args.key)
    predict = model.predict_proba if args.proba else model.predict
    results = predict(x, target=args.target, results=True, **_backend_options(args))
    out = results["output"]
    classes = None  # a classifier's: the argmax of cross_entropy's scores, bce's thresholded outputs
    if model.classifier is not None and out.ndim >= 2:
        kind, from_logits = model.classifier
        if kind == "bce" or out.shape[-1] > 1:  # (bce's one output column: one class per row)
            classes = predicted_classes(out, kind, from_logits and not args.proba).reshape(
                out.shape if kind == "bce" and out.shape[-1] > 1 else out.shape[:-1])
    if args.output:  # the output, the model's named results, and predicted classes
        if args.output.endswith(".npy"):
            np.save(args.output, out)
        else:
            np.savez(args.output, **(results if classes is None else {"classes": classes, **results}))
        print(f"wrote {len(out)} predictions to {args.output}")
    else:
        for i, row in enumerate(out):
            label = "" if classes is None else f"class {classes[i]}  " if np.ndim(classes[i]) == 0 else \
                f"classes {' '.join(str(c) for c in np.ravel(classes[i]))}  "
            print(f"{i}: {label}" + " ".join(f"{v:.4f}" for v in np.ravel(row)))
    return 0


def cmd_data(args) -> int:
    import numpy as np
    from dlc.data.sources import load_dataset
    _output_path(args.output, "-o", suffixes={".npz": "x and y"})
    model = _load_with_overrides(args)
    cfg = model.train_config
    data = load_dataset(cfg.data, model.base_dir, cfg.seed, span=cfg.span("data"))
    x, y = (data.x_train, data.y_train) if args.split == "train" else (data.x_test, data.y_test)
    if not len(x):
        raise UsageError(f"the {args.split} split of {cfg.data} is empty")
    x, y = x[:args.count], y[:args.count]
    np.savez(args.output, x=x, y=y)
    print(f"wrote {len(x)} {args.split} samples of {cfg.data} to {args.output} (x {list(x.shape)}, y {list(y.shape)})")
    return 0


def cmd_targets(args) -> int:
    from dlc import backends
    for name, doc, reason in backends.describe():
        print(f"{name:<10} {doc}" + (f"\n{'':<10} unavailable: {reason}" if reason else ""))
    return 0


def cmd_cache(args) -> int:
    from dlc.cache import Cache, insecure
    from dlc.program import format_bytes as _bytes
    cache = Cache()
    if args.action == "clear":
        removed = cache.clear()
        print(f"removed {removed.entries} entries ({_bytes(removed.bytes)}) from {cache.dir}")
        return 0
    usage = cache.usage()
    print(f"compile cache: {cache.dir}")
    print(f"{usage.entries} entries, {_bytes(usage.bytes)} of at most {_bytes(cache.max_bytes)}")
    reason = insecure(cache.dir)
    if reason:
        print(f"not used: {reason} (`chmod 700 {cache.dir}` if it is yours)")
    return 0


def cmd_graph(args) -> int:
    from dlc.api import load
    from dlc.graphviz import kernel_graph, layer_graph, write
    _output_path(args.output, "-o")
    model = load(args.file, args.model)
    if args.stage == "fuse":
        mode = "train" if args.train else "eval"
        if mode == "train" and model.train_config is None:
            raise UsageError(f"--train: model {model.name} has no train block")
        dot = kernel_graph(model, mode, args.batch)
    else:
        if args.train or args.batch:
            raise UsageError("--train and --batch go with --stage fuse")
        dot = layer_graph(model)
    path = write(dot, args.output)
    print(f"wrote {path}")
    return 0


def cmd_export(args) -> int:
    from dlc.api import load
    from dlc.interchange import require_onnx
    from dlc.interchange.onnx_export import export_model, summary
    require_onnx()
    _output_path(args.output, "-o")
    model = load(args.file, args.model)
    _load_weights(model, args)
    proto = export_model(model, None if args.no_normalize else model.normalizer, opset=args.opset,
                         recognize=not args.loops_as_scan)
    import onnx
    onnx.save(proto, args.output)
    print(f"wrote {args.output}: {summary(proto)}")
    return 0


def cmd_import(args) -> int:
    from dlc.interchange import require_onnx
    from dlc.interchange.onnx_import import import_model, write
    require_onnx()
    out = _output_path(args.output, "-o")
    weights = _output_path(args.weights, "--weights") if args.weights else out.with_suffix(".npz")
    imported = import_model(args.file, args.name, train=not args.no_train)
    model = write(imported, out, weights)
    for w in imported.warnings:
        print(f"dlc: warning: {w}", file=sys.stderr)
    layers = ", ".join(f"{k} {v}" for k, v in Counter(imported.layers).items()) or "no layers"
    print(f"wrote {out} (model {model.name}: {layers}) and {weights} "
          f"({sum(v.size for v in model.params.values()):,} parameters)")
    return 0


def cmd_plot(args) -> int:
    from dlc.runtime.plot import plot_log
    plot_log(args.log, args.output)
    print(f"wrote {args.output}")
    return 0


COMMANDS = {"check": cmd_check, "compile": cmd_compile, "run": cmd_run, "eval": cmd_eval,
            "predict": cmd_predict, "data": cmd_data, "targets": cmd_targets, "cache": cmd_cache,
            "plot": cmd_plot, "export": cmd_export, "import": cmd_import, "graph": cmd_graph}


def _show_warning(message, category, filename, lineno, file=None, line=None):
    # dlc's warnings read like its errors (location, source line, hint); others as Python shows them.
    # In a data-parallel job every rank meets the same warnings: rank 0 shows them.
    from dlc.runtime.distributed import World
    world = World.current()
    if world is not None and not world.lead:
        return
    if issubclass(category, DlcWarning):
        print(message, file=sys.stderr)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


def _check_stage_targets(spec: str | None, stages: dict, target: str) -> None:
    """`--dump-ir=ptx` without `--target cuda`: name the target that has the stage."""
    from dlc import backends
    for name in (s.strip() for s in (spec or "").split(",")):
        if name and name != "all" and name not in stages:
            owners = [t for t in backends.names()
                      if name in backends.backend(t, runnable=False).stages]
            if owners:
                raise UsageError(f"IR stage `{name}` belongs to target `{owners[0]}`, not `{target}`",
                                 hint=f"add --target {owners[0]}")


def main(argv: list[str] | None = None) -> int:
    shown, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        return _main(argv)
    finally:
        warnings.showwarning = shown


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command is None:
        parser.print_help()
        return 2
    try:
        code = COMMANDS[args.command](args)
    except UsageError as e:
        code = _report(f"dlc: {e.render()}", 2)
    except DlcError as e:
        code = _report(e.render(), 1)
    except KeyboardInterrupt:
        code = _report("dlc: interrupted", 130)
    except BrokenPipeError:
        code = 0
    return _end_job(code)


def _report(message: str, code: int) -> int:
    """Print an error; in a data-parallel job, rank 0 says it, and another rank only when
    rank 0 has not ended the job within a second (the error was its own)."""
    from dlc.runtime.distributed import World
    world = World.current()
    if world is not None and not world.lead:
        import time
        time.sleep(1.0)
        message = f"[rank {world.rank}] {message}"
    print(message, file=sys.stderr)
    return code


def _end_job(code: int) -> int:
    """A rank of a data-parallel job that ends: after every rank, or stopping them all."""
    from dlc.runtime.distributed import World
    world = World.current()
    if world is not None:
        world.end(code)
    return code
