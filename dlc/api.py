"""The public Python API: `dlc.load(path_or_source)` gives a Model to inspect and train."""
from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from dlc import backends
from dlc.backends import DEFAULT as DEFAULT_TARGET
from dlc.core.diagnostics import (ArgumentError, DataError, DlcError, Source, Span, UsageError, did_you_mean,
                                  warn)
from dlc.core.graph import Graph
from dlc.core.kernel import format_program
from dlc.core.printer import print_graph
from dlc.keywords import (alias, check_options, checked, early_stop_value, flag, keras_verbose,
                          validation_value, with_augment, with_spec)
from dlc.language import frontend
from dlc.language.frontend import Built
from dlc.language.initializers import param_rng
from dlc.language.recipe import INT_OPTION_MAX
from dlc.language.summary import format_summary
from dlc.language.syntax.parse import parse
from dlc.language.syntax.printer import format_ast


def read_source(path_or_source) -> tuple[str, str]:
    """(text, name): a path to a .dln file, or the program text itself."""
    if not isinstance(path_or_source, (str, os.PathLike)) or path_or_source == "":
        raise ArgumentError(f"dlc.load() takes a .dln file's path or a program's text, got {path_or_source!r}")
    if isinstance(path_or_source, os.PathLike) or (
            isinstance(path_or_source, str) and "\n" not in path_or_source and "{" not in path_or_source):
        path = Path(path_or_source)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise UsageError(f"no such file: {path}") from None
        except (OSError, ValueError) as e:  # ValueError: a NUL in the name
            raise UsageError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
        try:
            return data.decode("utf-8"), str(path_or_source)
        except UnicodeDecodeError as e:
            raise _not_utf8(data, e, str(path_or_source)) from None
    return str(path_or_source), "<string>"


def _not_utf8(data: bytes, e: UnicodeDecodeError, name: str) -> DlcError:
    """Where the first byte that is not UTF-8 is, as a line and a column of characters."""
    line_start = data.rfind(b"\n", 0, e.start) + 1
    line = data.count(b"\n", 0, e.start) + 1
    col = len(data[line_start:e.start].decode("utf-8")) + 1  # the bytes before it decode
    source = Source(name, data.decode("utf-8", errors="replace"))
    return DlcError(f"the file is not UTF-8: byte 0x{data[e.start]:02x} cannot be decoded",
                    Span(source, line, col, line, col + 1), hint="save the file as UTF-8")


def load(path_or_source, model: str | None = None) -> "Model":
    """Parse and check a .dln program (a path or the text), or open a compiled artifact
    (`dlc compile -o`), and return its model."""
    if _is_artifact(path_or_source):
        return _load_artifact(path_or_source)
    text, name = read_source(path_or_source)
    base = Path(name).parent if name != "<string>" else Path.cwd()
    m = Model(parse(text, name), model, name, base)
    m.source_text = text
    return m


def _is_artifact(path) -> bool:
    if not isinstance(path, (str, os.PathLike)) or "\n" in str(path) or "\0" in str(path):
        return False
    try:
        if not Path(path).is_file():
            return False
    except (OSError, ValueError):  # not a usable file name: read_source reports it
        return False
    from dlc.artifact import is_artifact
    return is_artifact(path)


def _load_artifact(path) -> "Model":
    """Everything in the file is checked before any of its code is loaded: the manifest,
    every blob's digest, the target, the backend's checks of the code, and that each step
    fits the model built from the embedded source."""
    from dlc import artifact, backends
    from dlc.core.diagnostics import ArtifactError
    manifest, steps = artifact.read(path)
    try:
        backend = backends.backend(manifest["backend"])
    except UsageError as e:
        raise ArtifactError(f"{path} cannot be used: {e.message}", hint=artifact.REBUILD) from None
    target = backend.target({})
    artifact.check_target(path, manifest, backend, target)
    artifact.check_code(path, steps, backend, target)
    source = manifest["source_name"]
    try:
        base = Path(source).parent if Path(source).parent.is_dir() else Path(path).parent
    except (OSError, ValueError):  # a damaged name
        base = Path(path).parent
    try:
        m = Model(parse(manifest["source"], source), manifest["model"], source, base)
    except DlcError as e:  # the source was checked when the file was written: it is damaged
        raise ArtifactError(f"{path} is damaged: its model does not build from the source inside it "
                            f"({e.message})", hint=artifact.REBUILD) from None
    m.source_text = manifest["source"]
    inputs = [name for name, _ in m.input_types]
    for batch, (_, layout) in steps.items():
        artifact.check_fits(path, batch, layout, inputs, m.state)
    m.preloaded = {(manifest["backend"], batch): step for batch, step in steps.items()}
    m.preloaded_recipe = m.source_key("train", m.train_config) if m.train_config else None
    return m


class Model:
    """A checked .dln model: summary, IR stages, parameters, training and inference."""

    def __init__(self, program, model: str | None = None, source_name: str = "<string>",
                 base_dir: Path | None = None):
        self.program = program
        self.source_name = source_name
        self.base_dir = base_dir or Path.cwd()
        self._eval = frontend.build(program, model, mode="eval")
        self.name = self._eval.model.name
        self._train = frontend.build(program, self.name, mode="train")
        self.train_config = self._eval.train
        for w in self._eval.warnings:  # likely mistakes, once per load (the train build repeats them)
            warnings.warn(w, stacklevel=3)
        self._seed = self.train_config.seed if self.train_config else 0
        self._state: dict[str, np.ndarray] | None = None  # created on first use: see `state`
        self.normalizer = None
        self._sessions: dict = {}
        self._mixing_checked = False  # predict's warning about a model that mixes samples, given once
        self._held_out = None  # (x, y) that fit(x, y) held out, shaped: what evaluate() scores
        self.preloaded: dict = {}  # (backend, batch) -> (blobs, layout) from an artifact
        self.preloaded_recipe: str | None = None  # the source key of its training step

    # --- inspection -----------------------------------------------------------------------------
    def built(self, mode: str = "eval") -> Built:
        return self._train if mode == "train" else self._eval

    def summary(self) -> str:
        return format_summary(self._eval, self.source_name)

    def ir(self, stage: str = "graph", batch: int | None = None, mode: str = "train") -> str:
        """The text of one IR stage (see `dlc compile --list-stages`); passes that run
        twice print once per run."""
        return "".join(text for _, text in self.stages([stage], batch=batch, mode=mode))

    def stages(self, names, batch: int | None = None, mode: str = "train", disabled=(),
               log=None, target: str = DEFAULT_TARGET, world: int = 1) -> list[tuple[str, str]]:
        """[(stage, text)] for the requested stages, in pipeline order (`target` prints its
        own stages: llvm, asm, ...; `world` > 1: the step of one rank of a data-parallel job)."""
        from dlc import pipeline
        if mode not in ("train", "eval"):
            raise ArgumentError(f"mode={mode!r}: give \"train\" (the training step) or \"eval\"")
        batch = checked("stages", "batch", batch)
        backend = backends.backend(target, runnable=False)  # printing code needs no GPU
        known = pipeline.stages_for(backend)
        for name in names:
            if name not in known:
                raise ArgumentError(f"unknown IR stage `{name}`", hint=f"stages: {', '.join(known)}")
        out = []
        if "ast" in names:
            out.append(("ast", format_ast(self.program)))
        if "graph" in names:
            out.append(("graph", print_graph(self.built(mode).graph)))
        passes = [n for n in names if n in pipeline.PASS_NAMES]
        later = [n for n in names if n not in pipeline.PASS_NAMES and n not in ("ast", "graph")]
        if passes or later or log is not None:
            log = log if log is not None else pipeline.Compilation()
            lowered = self.lower(mode, batch, disabled=disabled, log=log, world=world, verify=True)
            out += [(r.name, print_graph(r.graph)) for r in log.records if r.name in passes]
            if later:
                program = pipeline.kernel_program(lowered, backend.templates)
                if set(later) - {"kernel"}:
                    pipeline.check_collectives(program, backend)
                target_desc = backend.target({}) if set(later) - {"kernel"} else None
                out += [(n, format_program(program) if n == "kernel" else backend.dump(program, n, target_desc))
                        for n in later]
        return out

    def compile_graph(self, mode: str, config=None, log=None, disabled=(), world: int = 1,
                      bucket_bytes: int | None = None, verify: bool | None = None) -> Graph:
        """The training step ("train", after autodiff and the optimizer; of one of `world`
        data-parallel ranks) or the evaluation graph ("eval"), after the graph passes;
        shapes are still symbolic."""
        from dlc.pipeline import step_graph
        if mode == "train":
            config = config or self._require_config()
            if "loss" not in self._train.graph.outputs:
                raise ArgumentError(f"model {self.name} has no loss to train")
        else:
            config = None
        return step_graph(self.built(mode).graph, config, log, disabled, world, bucket_bytes, verify)

    def lower(self, mode: str, batch: int | None = None, config=None, log=None, disabled=(),
              world: int = 1, verify: bool | None = None) -> Graph:
        """The graph for one batch size after every pass: fused and memory-planned."""
        from dlc.pipeline import lower
        if mode == "train":
            config = config or self._require_config()
        batch = batch or (config.batch if config else self.train_config.batch if self.train_config else 1)
        return lower(self.compile_graph(mode, config, log, disabled, world, verify=verify), batch, log, disabled,
                     verify)

    def source_key(self, mode: str, config, world: int = 1, bucket_bytes: int | None = None) -> str:
        """Identifies a compiled graph without running the graph passes (compile-cache keys):
        the graph the frontend built, source locations included (profiles name them), and for
        training the optimizer, clipping and check_numerics -- not the learning rate, which
        the step takes as an input, as it takes the seed. So a new rate, epoch count, seed or
        data option, or a comment that moves none of the model's, loss's or optimizer's
        lines, compiles nothing. A training step of a data-parallel job (`world` ranks: the
        step is the same for any number > 1) differs."""
        recipe = ""
        if mode == "train" and config:
            optimizer = config.optimizer
            args = {k: v for k, v in sorted(optimizer.args.items()) if k != "lr"}
            at = config.span("optimizer")  # the update's nodes carry it
            recipe = f"{optimizer.name}{args}|clip={config.clip}|at={at.short if at else ''}"
            recipe += "|check_numerics" if config.check_numerics else ""
        if mode == "train" and world > 1:
            recipe += f"|data-parallel|buckets={bucket_bytes}"
        return "\0".join([print_graph(self.built(mode).graph), self.name, mode, recipe])

    def layer_state(self) -> list[str]:
        """State the layers update themselves (batchnorm's running statistics)."""
        return [k for k, spec in self._train.params.items() if spec.role == "state" and spec.type.dtype.is_float]

    def compile_artifact(self, path, batches=None, target: str = DEFAULT_TARGET, **options) -> list[tuple[str, int]]:
        """Compile the training and evaluation steps (one program, for the train block's
        batch size, plus any `batches`) into one file that `dlc run` / `dlc eval` load
        without compiling."""
        from dlc import artifact
        config = self._require_config()
        if Path(path).is_dir():
            raise ArgumentError(f"compile_artifact({str(path)!r}): that is a folder; give the name of the file "
                                "to write")
        batches = [checked("compile_artifact", "batch", b) for b in batches or ()]
        session = self.session(config, target, **options)
        program = session.program
        if not hasattr(program, "compiled"):
            raise UsageError(f"target `{target}` compiles nothing to write to {path}")
        steps = {b: program.compiled(b) for b in sorted({config.batch} | set(batches or ()))}
        artifact.write(path, str(Path(self.source_name).resolve()), self.source_text, self.name,
                       program.backend.name, program.target.to_json(), steps)
        return [("train+eval", b) for b in sorted(steps)]

    def _require_config(self):
        if self.train_config is None:
            raise ArgumentError(f"model {self.name} has no train block",
                                hint="add `train <model> { data = ..., loss = ... }`")
        return self.train_config

    def _require_one_input(self, config) -> None:
        """Data sources, fit(x, y) and predict(x) give one array per sample: a model with more
        inputs would fail after compiling, on the input left unfed."""
        if len(self.input_types) == 1:
            return
        names = [name for name, _ in self.input_types]
        second = [p for p in self._eval.model.params if p.name == names[1]]
        data = config.span("data") if config else None
        raise DataError(f"model `{self.name}` has {len(names)} inputs ({', '.join(names)}), but "
                        "training and prediction feed one input array",
                        second[0].span if second else None,
                        notes=[f"the data comes from `data = {config.data}` at {data}"] if data else (),
                        hint="stack them into one input with an extra axis (e.g. two f32[B, 64] as "
                             "`x: f32[B, 2, 64]`) and take it apart in the model (`x[:, 0]`, "
                             "`x[:, 1]`); from Python, forward(x, y) runs the model on several arrays")

    @property
    def state(self) -> dict[str, np.ndarray]:
        """Parameters and state by name: numpy arrays shared with the sessions, made on first
        use (so checking a model never allocates its weights) and current (a backend that
        keeps them in a GPU's memory between steps copies them back first)."""
        if self._state is None:
            self._state = init_state(self._train, self._seed)
        backends.sync_state(self._state)
        return self._state

    @property
    def params(self) -> "Params":
        """Parameters by name, frozen ones (`trainable=false`) included: numpy arrays shared
        with the model; `m.params["h.w"] = w` copies new values in."""
        return Params({k: v for k, v in self.state.items() if k in self._eval.params
                       and self._eval.params[k].role == "param"})

    @property
    def input_types(self):
        return self._eval.inputs

    def ensure_state(self, graph: Graph) -> None:
        """Zero-initialize state inputs the passes added (optimizer moments, step counter)."""
        for nid in graph.inputs("state") + graph.inputs("param"):
            a = graph.node(nid).attrs
            if a["name"] not in self.state:
                t = a["type"]
                self.state[a["name"]] = np.zeros(tuple(int(d) for d in t.shape), dtype=t.dtype.np)

    # --- running --------------------------------------------------------------------------------
    def forward(self, *xs: np.ndarray, float_dtype=np.float32, results: bool = False):
        """The model's output for a batch (evaluation mode), on the reference interpreter;
        with `results`, {"output": ..., NAME: ...} with the model's named results too. A
        model's `state`s hold their initial values."""
        feeds = self._feeds(xs)
        g = self._eval.graph.copy()
        keys = {"output": "output", **{name: f"output:{name}" for name, _ in self._eval.results}}
        g.outputs = {k: g.outputs[k] for k in (keys.values() if results else ["output"])}
        g.remove_unused(keep_inputs=False)
        out = backends.backend("reference").run_graph(g, feeds, float_dtype=float_dtype)
        return {k: out[v] for k, v in keys.items()} if results else out["output"]

    __call__ = forward

    def _feeds(self, xs) -> dict[str, np.ndarray]:
        if len(xs) != len(self.input_types):
            raise DataError(f"model {self.name} takes {len(self.input_types)} input(s), got {len(xs)}")
        feeds = dict(self.state)
        for (name, t), x in zip(self.input_types, xs):
            feeds[name] = check_input(name, t, x)
        rows = len(feeds[self.input_types[0][0]]) if xs and np.ndim(feeds[self.input_types[0][0]]) else 1
        for c in self._eval.carries:  # a `state` starts from its initial value
            feeds[c.input] = np.full((rows,) + tuple(int(d) for d in c.type.shape[1:]), c.value, c.type.dtype.np)
        return feeds

    def session(self, config=None, target: str = DEFAULT_TARGET, world=None, **options):
        """Compiled training and evaluation steps for a recipe (cached per target/recipe), of
        one rank of a data-parallel `world` if given.
        options: threads, verbose (a print function), no_cache, cache_dir, profile."""
        from dlc.runtime.trainer import Session
        config = config or self._require_config()
        key = (target, str(config.optimizer), config.clip, config.check_numerics,
               tuple(sorted(options.items(), key=str)), id(world))
        if key not in self._sessions:
            self._sessions[key] = Session(self, config, target, options, world)
        return self._sessions[key]

    def fit(self, x=None, y=None, *, epochs: int | None = None, batch: int | None = None,
            lr: float | None = None, seed: int | None = None, optimizer=None, target: str = DEFAULT_TARGET,
            test: float | None = None, validation=None, early_stop=None, keep_best: bool | None = None,
            callbacks=None, shuffle: bool | None = None, quiet: bool = True, log=None, csv=None,
            tensorboard=None, save=None, resume=None, on_epoch=None, batch_size: int | None = None,
            validation_split: float | None = None, validation_data=None, world="auto",
            check_numerics: bool | None = None, schedule=None, clip=None, augment=None, **options):
        """Train with the train block's recipe; any value can be overridden. Given x and y,
        trains on those arrays (a `test` share is held out, which evaluate() then scores)
        instead of the block's data.

        validation: a share of the training split (0.1), a data source (`'npz("v.npz")'`) or
        (x, y) arrays, scored after every epoch. early_stop: `"early_stop(patience=3)"` or a
        dlc.EarlyStopping (False turns off the train block's). keep_best: end with the weights of
        the best epoch by the early-stop metric (val_loss without one). callbacks: objects with
        on_epoch_end(epoch, logs), which stop training by returning True. log, csv,
        tensorboard: metrics as JSON lines, CSV, TensorBoard events (a folder). `save` is
        written after every epoch (keep_best: every better epoch) and on Ctrl-C once a step has
        run; a file already there (unless it is `resume`) is kept as NAME.prev.npz.
        optimizer, schedule: expressions as in the train block ("sgd(lr=0.1, momentum=0.9)").
        clip: the gradients' global norm bound (False: none). augment: random changes to each
        training batch's inputs, as in the train block ("[flip, crop(pad=4)]"; False: none).
        Keras' names work too: batch_size, validation_split, validation_data, verbose (0: quiet).
        check_numerics: a step whose gradients are not finite stops training too, naming the
        op (slower steps: every gradient is checked before any update).
        Started by mpiexec (`world="auto"`), or given a World, the process is one rank of a
        data-parallel job: `batch` is the global batch, and rank 0 alone reports, logs and saves.
        Returns a History (one record of metrics per epoch; `.test`: the test split's)."""
        from dlc.runtime import callbacks as cbs
        from dlc.runtime.prepare import prepare
        from dlc.runtime.trainer import FitOptions, Interrupted, fit, restore
        quiet = flag("quiet", keras_verbose(options, quiet))
        check_options(self.fit, options)
        if on_epoch is not None and not callable(on_epoch):
            raise ArgumentError(f"fit(on_epoch={on_epoch!r}): `on_epoch` takes a function of (epoch, logs)")
        batch = checked("fit", "batch", alias("batch", batch, "batch_size", batch_size))
        epochs, lr = checked("fit", "epochs", epochs), checked("fit", "lr", lr)
        seed, test = checked("fit", "seed", seed), checked("fit", "test", test)
        validation = alias("validation", validation, "validation_split", validation_split)
        validation = alias("validation", validation, "validation_data", validation_data)
        config = self._require_config()
        self._require_one_input(config)
        config = with_spec(config, "optimizer", optimizer, '"adam" or "sgd(lr=0.1, momentum=0.9)"')
        config = with_spec(config, "schedule", schedule, '"step(every=2, gamma=0.5)"')
        if clip is not None:
            config = dataclasses.replace(config, clip=None if clip is False else checked("fit", "clip", clip))
        if check_numerics is not None:
            config = dataclasses.replace(config, check_numerics=flag("check_numerics", check_numerics))
        if augment is not None:
            config = with_augment(config, augment)
        if lr is not None and config.schedule.name == "cyclic":
            raise ArgumentError("`cyclic` sets the learning rate itself (from base to max); "
                                "a learning rate given with it would be ignored", config.span("schedule"),
                                hint="change base and max in `cyclic(...)` instead of the learning rate")
        if x is not None:
            from dlc.language.recipe import Spec
            share = config.data.args.get("test", 0.2) if test is None else test
            config = dataclasses.replace(config, data=Spec("data", "arrays", {"test": share}),
                                         spans={k: v for k, v in config.spans.items() if k != "data"})
        validation = validation_value(validation)
        stopper = early_stop_value(early_stop, config)
        if shuffle and self._eval.carries:
            raise ArgumentError("a model with `state` reads its batches in order; shuffling would carry the "
                                "state into unrelated samples", hint="drop shuffle=True (such a model does not "
                                "shuffle by default)")
        from dlc.runtime.distributed import World, world_from_env
        if world == "auto":
            world = world_from_env()
        elif world is not None and not isinstance(world, World):
            raise ArgumentError(f"fit(world={world!r}): `world` takes \"auto\" (a job started by mpiexec), None "
                                "(this process alone) or a dlc.runtime.distributed.World")
        session = self.session(config, target, world, **options)
        meta, normalizer = None, self.normalizer
        if resume is not None:
            meta, normalizer = restore(self, Path(resume), self.state)
            session.global_step = int(self.state["step"]) if "step" in self.state else 0
        if seed is not None and seed != config.seed and resume is None:
            for k, v in init_state(self._train, seed).items():  # a fresh start with that seed
                self.state[k][...] = v
        seed = config.seed if seed is None else seed
        label_type = session._label_type()
        if x is not None:
            y = self._labels_given("fit", x, y)
        compiling = session.compile_in_background(batch or config.batch)  # while the data loads
        try:
            data, normalizer = prepare(self, config, label_type, self.base_dir, seed,
                                       arrays=(x, y) if x is not None else None, normalizer=normalizer,
                                       validation=validation)
            compiling.wait()
        except KeyboardInterrupt:
            kept = f"; {save} left as it was" if save else ""
            raise Interrupted(f"interrupted before the first training step{kept}") from None
        except BaseException:
            compiling.wait(quietly=True)  # the data's error first; no compile left running
            raise
        self.normalizer = normalizer
        # evaluate() without arrays scores the held-out share of these arrays, not the file's data
        self._held_out = (data.x_test, data.y_test) if x is not None else None
        # a file at `save` is kept as NAME.prev.npz, unless it is the checkpoint this run continues
        resumes_save = bool(resume and save) and Path(resume).resolve() == Path(save).resolve()
        opts = FitOptions(epochs=epochs or config.epochs, batch=batch or config.batch,
                          lr=lr if lr is not None else config.optimizer.args["lr"], seed=seed,
                          shuffle=config.shuffle if shuffle is None else flag("shuffle", shuffle),
                          quiet=quiet, log_path=Path(log) if log else None,
                          csv_path=Path(csv) if csv else None,
                          tensorboard_dir=Path(tensorboard) if tensorboard else None,
                          save_path=Path(save) if save else None, resume=meta, on_epoch=on_epoch,
                          keep_previous=not resumes_save, early_stop=stopper,
                          keep_best=config.keep_best if keep_best is None else flag("keep_best", keep_best),
                          callbacks=cbs.check_callbacks(callbacks))
        return fit(session, data, opts, normalizer)

    def evaluate(self, x=None, y=None, *, batch: int | None = None, target: str = DEFAULT_TARGET,
                 batch_size: int | None = None, **options) -> dict:
        """Loss and metrics on the given arrays; without them, on the held-out split: the
        share of fit(x, y)'s arrays it kept back, or else the train block's test split."""
        keras_verbose(options, True)  # Keras' verbose=0: evaluation prints nothing anyway
        check_options(self.evaluate, options)
        batch = checked("evaluate", "batch", alias("batch", batch, "batch_size", batch_size))
        config = self._require_config()
        x, y = self._labelled(x, y, config)
        return self.session(config, target, **options).evaluate(x, y, batch or config.batch)

    def _labelled(self, x, y, config) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and labels shaped for the model: the given arrays, or the held-out split."""
        from dlc.data.sources import check_arrays
        from dlc.runtime.prepare import classes_of, prepare, shape_inputs, shape_labels
        from dlc.runtime.trainer import Normalizer
        self._require_one_input(config)
        label_type = self._eval_label_type()
        if x is None:
            if self._held_out is not None:
                x, y = self._held_out
            else:
                data, _ = prepare(self, config, label_type, self.base_dir, config.seed,
                                  normalizer=self.normalizer)
                x, y = data.x_test, data.y_test
            if not len(x):
                raise DataError("there is no held-out split to evaluate on (its test share is 0)",
                                config.span("data") if self._held_out is None else None,
                                hint="pass the arrays to evaluate: evaluate(x, y)")
            return x, y
        y = self._labels_given("evaluate", x, y)
        norm = self.normalizer or Normalizer.fit(np.zeros((1, 1)), "none")
        check_arrays(np.asarray(x), np.asarray(y))  # (as fit's arrays: non-empty, numeric, finite, as many)
        return shape_inputs(self, x, norm), shape_labels(label_type, y, classes=classes_of(self, label_type))

    def _labels_given(self, method: str, x, y):
        """y, which a model whose loss reads no labels (an autoencoder's) need not be given."""
        if y is not None:
            return y
        if self._eval_label_type() is not None:
            raise ArgumentError(f"{method}(x) needs the labels too: {method}(x, y)")
        return np.zeros(len(np.asarray(x)) if np.ndim(x) else 0, np.float32)

    def _eval_label_type(self):
        g = self.built("eval").graph
        ids = g.inputs("label")
        return g.node(ids[0]).attrs["type"] if ids else None

    def predict(self, x, *, batch: int | None = None, target: str = DEFAULT_TARGET,
                batch_size: int | None = None, results: bool = False, **options):
        """The model's raw outputs for every sample of x (inputs normalized as in training): for
        a `cross_entropy` model these are logits (see predict_proba for probabilities). With
        `results`, a dict {"output": ..., NAME: ...} holding the model's named results too
        (`-> (f32[B, 10], h: f32[B, 64])`). A model that carries `state` reads x as it trains
        (row i of a batch continuing row i of the one before), from the states' initial values.
        A model without a train block (an imported one) compiles its evaluation graph alone."""
        from dlc.runtime.prepare import shape_inputs
        from dlc.runtime.trainer import Normalizer
        keras_verbose(options, True)
        check_options(self.predict, options)
        batch = checked("predict", "batch", alias("batch", batch, "batch_size", batch_size))
        self._require_one_input(self.train_config)
        norm = self.normalizer or Normalizer.fit(np.zeros((1, 1)), "none")
        x = shape_inputs(self, x, norm)
        if self.train_config is None:
            if self.built("eval").carries:  # (states stream: the interpreter's loop)
                return self.forward(x, results=results)
            self._warn_if_mixing(batch)
            return self._predict_alone(x, target, batch, results, options)
        self._warn_if_mixing(batch or self.train_config.batch)
        return self.session(self.train_config, target, **options).predict(x, batch or self.train_config.batch,
                                                                         results=results)

    def _warn_if_mixing(self, chunk: int | None) -> None:
        """Once per model: a warning when its outputs reduce over the batch axis (a softmax
        over axis 0, say), so that predict's results depend on how the rows are chunked."""
        if self._mixing_checked:
            return
        self._mixing_checked = True
        from dlc.passes.mask_batch import mixes_samples
        graph = self.built("eval").graph
        nid = mixes_samples(graph)
        if nid is not None:
            rows = f"chunks of {chunk} rows" if chunk else "all the rows given at once"
            warn(f"model {self.name} mixes the samples of a batch here (it reduces over the batch axis): "
                 f"predict runs it on {rows}, and each sample's output depends on the other rows of its "
                 "chunk", graph.node(nid).span,
                 hint="reduce over other axes than the batch (axis 0) if that is not what you meant")

    def _predict_alone(self, x: np.ndarray, target: str, batch: int | None, results: bool, options: dict):
        """predict() of a model without a train block (an imported one, say): its evaluation
        graph, compiled for `target` on its own (or interpreted), run on chunks of `batch`
        rows (all at once by default) -- on every target alike, which a model whose outputs
        mix the samples of a batch can tell apart."""
        if target == "reference":
            def run(rows):
                return self.forward(rows, results=True)
        else:
            from dlc.program import make_program
            key = ("predict", target, tuple(sorted(options.items(), key=str)))
            if key not in self._sessions:
                self._sessions[key] = make_program(target, lambda: self.compile_graph("eval"), self.state,
                                                   key=self.source_key("eval", None),
                                                   options={k: v for k, v in options.items() if k != "bucket_bytes"})
            program, name = self._sessions[key], self.input_types[0][0]

            def run(rows):
                out = program.run({name: rows})
                return {k.removeprefix("output:"): v for k, v in out.items()
                        if k == "output" or k.startswith("output:")}
        chunk = max(1, batch or len(x))
        parts = [run(x[at:at + chunk]) for at in range(0, len(x), chunk)]
        if not parts:
            return self.forward(x, results=results)  # no rows: the shapes alone
        joined = {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}
        return joined if results else joined["output"]

    def predict_proba(self, x, *, results: bool = False, **kwargs):
        """Class probabilities: softmax of the outputs for a `cross_entropy` model, sigmoid for
        `bce(..., from_logits=true)`, the outputs themselves when they are probabilities already
        (`bce`, or a model ending in `softmax`). Keywords as for predict; with `results`, the
        dict predict gives, its "output" the probabilities."""
        kind, from_logits = self._classifier("predict_proba()")
        loss = self._classifier_call()
        if loss.func.text in ("hinge", "multi_hinge"):
            raise ArgumentError(f"predict_proba() needs a model trained for probabilities; `{loss.func.text}` "
                                f"trains scores, which are no probabilities", loss.span,
                                hint="predict() gives the scores; the highest (or a positive one) is the class")
        got = self.predict(x, results=True, **kwargs)
        out = got["output"].astype(np.float64)
        if kind == "cross_entropy" and not self._ends_in_softmax():
            e = np.exp(out - out.max(axis=-1, keepdims=True))
            out = e / e.sum(axis=-1, keepdims=True)
        elif kind == "bce" and from_logits:
            out = 1.0 / (1.0 + np.exp(-out))
        got["output"] = out.astype(np.float32)
        return got if results else got["output"]

    def classification_report(self, x=None, y=None, *, top_k: int = 5, batch: int | None = None,
                              target: str = DEFAULT_TARGET, **options) -> dict:
        """Accuracy, top-k accuracy, precision, recall and F1 (per class and their macro
        averages) and the confusion matrix, on the given arrays or the held-out split."""
        from dlc.runtime.metrics import classification_report
        kind, from_logits = self._classifier("classification_report()")
        check_options(self.classification_report, options)
        batch = checked("classification_report", "batch", batch)
        top_k = checked("classification_report", "top_k", top_k)
        config = self._require_config()
        if self.masks_positions:
            raise ArgumentError("classification_report() scores every position of the output, but this model's "
                                "loss keeps only the unmasked steps", config.span("loss"),
                                hint="evaluate() gives the loss and the accuracy over the kept steps")
        x, y = self._labelled(x, y, config)
        out = self.session(config, target, **options).predict(x, batch or config.batch)
        return classification_report(out, y, kind, from_logits, top_k)

    def _classifier(self, what: str) -> tuple[str, bool]:
        """How the outputs give classes (see _loss_kind); an error when the model is no classifier."""
        found = self._loss_kind()
        if found is None:
            from dlc.language.nn import CLASSIFICATION_LOSSES
            raise ArgumentError(f"{what} needs a classifier: a model trained with {CLASSIFICATION_LOSSES}",
                                self._require_config().span("loss"), hint="predict() gives the model's outputs")
        return found

    @property
    def masks_positions(self) -> bool:
        """The loss counts only some positions of the output (a mask: `mask=`, or a masked
        sequence): classification_report(), which scores every position, does not apply."""
        return bool(self.built("eval").graph.meta.get("loss_masks_positions"))

    @property
    def is_classifier(self) -> bool:
        """Trained with a classification loss (accuracy, predict_proba, classification_report)."""
        return self.classifier is not None

    @property
    def classifier(self) -> tuple[str, bool] | None:
        """How the outputs give classes (see _loss_kind), or None when the model is no
        classifier."""
        return self._loss_kind() if self.train_config is not None else None

    def _loss_kind(self) -> tuple[str, bool] | None:
        """How the outputs give classes, as the metrics take it: ("cross_entropy", _) for an
        argmax over the last axis, ("bce", logits) for a threshold (0 on logits, hinge's
        scores; else 0.5)."""
        call = self._classifier_call()
        if call is None:
            return None
        from dlc.language.nn import CLASSIFIERS
        from dlc.language.syntax import ast
        if CLASSIFIERS[call.func.text] == "argmax":
            return "cross_entropy", False
        logits = call.func.text == "hinge" or any(
            k.name == "from_logits" and isinstance(k.value, ast.Name) and k.value.text == "true" for k in call.kwargs)
        return "bce", logits

    def _classifier_call(self):
        """The loss's call of a classification loss (nn.CLASSIFIERS), or None."""
        from dlc.language.nn import CLASSIFIERS
        from dlc.language.syntax import ast
        return next((c for c in ast.calls(self._require_config().loss) if c.func.text in CLASSIFIERS), None)

    def _ends_in_softmax(self) -> bool:
        return "output_is_softmax" in self.built("eval").graph.meta

    def save(self, path) -> None:
        """Write parameters, state and normalization to a checkpoint (.npz, no pickle)."""
        from dlc.runtime.trainer import Normalizer, save
        norm = self.normalizer or Normalizer.fit(np.zeros((1, 1)), "none")
        save(self, Path(path), norm, step=int(self.state.get("step", 0)))

    def load_weights(self, path) -> dict:
        """Load a checkpoint written by `save` or `dlc run --save`; returns its metadata."""
        from dlc.runtime.trainer import restore
        meta, self.normalizer = restore(self, Path(path), self.state)
        return meta

    load = load_weights


class Params(Mapping):
    """Model.params: the arrays themselves, so an in-place change (`m.params["h.w"] *= 0.5`)
    is the model's; assigning one checks the shape and copies the values in, since replacing
    the array would leave the model with the old one."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self._arrays = arrays

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            raise KeyError(f"no parameter `{name}`" + (f"; {h}" if (h := did_you_mean(name, self._arrays)) else ""))
        return self._arrays[name]

    def __setitem__(self, name: str, value) -> None:
        target, value = self[name], np.asarray(value)
        if value.shape != target.shape:
            raise ArgumentError(f"parameter `{name}` has shape {list(target.shape)}, got an array of shape "
                                f"{list(value.shape)}")
        if value.dtype.kind not in "biuf":
            raise ArgumentError(f"parameter `{name}` takes numbers, got dtype {value.dtype}")
        with np.errstate(over="ignore"):
            cast = value.astype(target.dtype)
        if not np.all(np.isfinite(cast)):
            raise ArgumentError(f"parameter `{name}` takes finite {target.dtype} values, got NaN, "
                                "infinite or out-of-range ones")
        target[...] = cast

    def __iter__(self):
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def __repr__(self) -> str:
        return "Params({" + ", ".join(f"{k!r}: {v.dtype}{list(v.shape)}" for k, v in self._arrays.items()) + "})"


def check_input(name: str, t, x) -> np.ndarray:
    """Convert a batch to the declared dtype and check its shape (symbols match anything)."""
    from dlc.data.sources import check_float32_range
    x = np.asarray(x)
    want = t.dtype.np
    if x.ndim != t.rank or any(isinstance(d, int) and d != s for d, s in zip(t.shape, x.shape)):
        raise DataError(f"input `{name}` should be {t}, got an array of shape {list(x.shape)}")
    if x.dtype != want:
        if want == np.float32:
            check_float32_range(x, f"input `{name}`")
        if want.kind in "iu" and x.dtype.kind == "f" and not np.all(np.mod(x, 1) == 0):
            raise DataError(f"input `{name}` should hold integers ({t}), got fractional values")
        x = x.astype(want)
    return x


def init_state(built: Built, seed: int) -> dict[str, np.ndarray]:
    """Fresh parameters (seeded per name) and state (running stats, counters)."""
    if not 0 <= seed <= INT_OPTION_MAX:  # dropout's generator takes an i32 seed
        raise ArgumentError(f"the seed must be an integer from 0 to {INT_OPTION_MAX:,}, got {seed:,}")
    out = {}
    for name, spec in built.params.items():
        shape = tuple(int(d) for d in spec.type.shape)
        if name == "seed":
            out[name] = np.array(seed, dtype=np.int32)
        elif spec.type.dtype.is_float:
            try:
                out[name] = spec.init.sample(param_rng(seed, name), shape, spec.fan_in, spec.fan_out)
            except MemoryError:
                raise ArgumentError(f"not enough memory for parameter `{name}` ({spec.type})", spec.span) from None
        else:
            out[name] = np.zeros(shape, dtype=spec.type.dtype.np)
    return out


__all__ = ["load", "Model", "DlcError"]
