"""The `train` block's vocabulary: data sources, optimizers, schedules and options.

Each source/optimizer/schedule is a function whose Python signature is its .dln
signature (the frontend binds and checks arguments against it) and which returns a
plain spec. The runtime and the optimizer pass give the specs their meaning.
"""
from dataclasses import dataclass, field
from typing import Optional, Union

from dlc.core.diagnostics import ArgumentError, Span
from dlc.core.spec import Spec
from dlc.language.nn import Builtin, Pair, pair

RECIPE: dict[str, Builtin] = {}


def entry(kind: str):
    def register(fn):
        RECIPE[fn.__name__] = Builtin(fn.__name__, fn, kind, (fn.__doc__ or "").strip())
        return fn
    return register


def _fraction(v: float, name: str) -> float:
    if not (0.0 <= v < 1.0):
        raise ArgumentError(f"`{name}` must be in [0, 1), got {v}")
    return v


def _positive(v, name: str):
    if not (0 < v < float("inf")):
        raise ArgumentError(f"`{name}` must be a positive number, got {v}")
    return v


def _non_negative(v, name: str):
    if not (0 <= v < float("inf")):
        raise ArgumentError(f"`{name}` must be zero or positive, got {v}")
    return v


# --- data sources --------------------------------------------------------------------------

@entry("data")
def digits(test: float = 0.2) -> Spec:
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), shipped with dlc;
    pixels 0..16, divided by 16 unless the train block says `normalize`. Samples fit
    the model's input: [N, 64], [N, 1, 8, 8] or [N, 8, 8]."""
    return Spec("data", "digits", {"test": _fraction(test, "test")})


@entry("data")
def iris(test: float = 0.2) -> Spec:
    """Fisher's iris flowers (150 samples, 4 features, 3 classes), shipped with dlc."""
    return Spec("data", "iris", {"test": _fraction(test, "test")})


@entry("data")
def npz(path: str, x: str = "x", y: str = "y", test: float = 0.2) -> Spec:
    """Arrays from a NumPy .npz file: inputs under key `x`, labels under key `y`."""
    return Spec("data", "npz", {"path": path, "x": x, "y": y, "test": _fraction(test, "test")})


@entry("data")
def csv(path: str, label: Union[str, int] = -1, test: float = 0.2, header: bool = True) -> Spec:
    """A CSV file of numbers; `label` names (or numbers) the label column."""
    return Spec("data", "csv", {"path": path, "label": label, "test": _fraction(test, "test"),
                                "header": header})


@entry("data")
def mnist(dir: str, test: float = 0.0) -> Spec:
    """MNIST in its IDX files (train-images-idx3-ubyte[.gz] etc.) in `dir`; its own test set
    is used unless test > 0 takes a share of the training images instead."""
    return Spec("data", "mnist", {"dir": dir, "test": _fraction(test, "test")})


@entry("data")
def cifar10(dir: str, test: float = 0.0) -> Spec:
    """CIFAR-10 in its binary version (data_batch_1.bin .. data_batch_5.bin and
    test_batch.bin in `dir`, or in its cifar-10-batches-bin folder): 50,000 training and
    10,000 test images [3, 32, 32], 10 classes. Its test batch is used unless test > 0
    takes a share of the training images instead."""
    return Spec("data", "cifar10", {"dir": dir, "test": _fraction(test, "test")})


@entry("data")
def images(dir: str, size: Optional[Pair] = None, gray: bool = False, test: float = 0.2) -> Spec:
    """Image files (PNG, JPEG, BMP, GIF, TIFF, WebP) in one subfolder per class of `dir`
    (PyTorch's ImageFolder layout); the classes are the subfolders in sorted order. Each
    image becomes [3, H, W] (RGB; [1, H, W] with gray=true), resized to `size` [h, w] if
    given; pixels 0..255, divided by 255 unless `normalize` says otherwise. Needs Pillow
    (pip install 'dlc[images]')."""
    if size is not None and min(pair(size)) < 1:
        raise ArgumentError(f"`size` must be positive, got {list(pair(size))}")
    return Spec("data", "images", {"dir": dir, "size": None if size is None else list(pair(size)), "gray": gray,
                                   "test": _fraction(test, "test")})


@entry("data")
def arrays() -> Spec:
    """Arrays passed from Python (`model.fit(x, y)`)."""
    return Spec("data", "arrays", {})


# --- optimizers ------------------------------------------------------------------------------

# the range each optimizer option must lie in
_OPTIMIZER_RANGES = {"lr": _positive, "eps": _positive, "momentum": _fraction, "rho": _fraction,
                     "alpha": _fraction, "beta1": _fraction, "beta2": _fraction,
                     "weight_decay": _non_negative}


def _optimizer(name: str, **args) -> Spec:
    """An optimizer spec, each numeric option checked against its range (flags pass as given)."""
    return Spec("optimizer", name, {k: _OPTIMIZER_RANGES[k](v, k) if k in _OPTIMIZER_RANGES else v
                                    for k, v in args.items()})


@entry("optimizer")
def sgd(lr: float = 0.01, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0) -> Spec:
    """Stochastic gradient descent, with optional (Nesterov) momentum and L2 weight decay."""
    spec = _optimizer("sgd", lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    if nesterov and momentum <= 0:
        raise ArgumentError("`nesterov=true` needs `momentum` > 0")
    return spec


@entry("optimizer")
def adagrad(lr: float = 0.01, eps: float = 1e-10, weight_decay: float = 0.0) -> Spec:
    """Adagrad: per-parameter steps scaled by the root of the summed squared gradients."""
    return _optimizer("adagrad", lr=lr, eps=eps, weight_decay=weight_decay)


@entry("optimizer")
def adadelta(lr: float = 1.0, rho: float = 0.9, eps: float = 1e-6, weight_decay: float = 0.0) -> Spec:
    """Adadelta: steps scaled by running averages of squared gradients and squared updates."""
    return _optimizer("adadelta", lr=lr, rho=rho, eps=eps, weight_decay=weight_decay)


@entry("optimizer")
def rmsprop(lr: float = 0.01, alpha: float = 0.99, eps: float = 1e-8, momentum: float = 0.0,
            weight_decay: float = 0.0) -> Spec:
    """RMSprop: steps scaled by a running average of squared gradients."""
    return _optimizer("rmsprop", lr=lr, alpha=alpha, eps=eps, momentum=momentum, weight_decay=weight_decay)


@entry("optimizer")
def adam(lr: float = 0.001, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
         weight_decay: float = 0.0) -> Spec:
    """Adam with bias correction; weight_decay adds an L2 term to the gradient."""
    return _optimizer("adam", lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)


@entry("optimizer")
def adamw(lr: float = 0.001, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 0.01) -> Spec:
    """Adam with decoupled weight decay."""
    return _optimizer("adamw", lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)


@entry("optimizer")
def perceptron(lr: float = 1.0) -> Spec:
    """Rosenblatt's perceptron rule w <- w + lr * sum over the batch of (y - y_hat) * x, for a
    model whose output is `step` (or `sign`) of a linear layer: the update is taken from the
    error y - y_hat of the output, not from the train block's loss (which is only reported)."""
    return _optimizer("perceptron", lr=lr)


# --- learning-rate schedules (per epoch; cyclic per step; warmup=N: the first N steps rise to it) -

def _schedule(name: str, args: dict, warmup: int) -> Spec:
    """A schedule's Spec; `warmup` (steps) is kept only when set, so that the others print as
    they always have."""
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ArgumentError(f"`warmup` must be a number of steps (0 or more), got {warmup}")
    return Spec("schedule", name, {**args, "warmup": warmup} if warmup else args)


@entry("schedule")
def constant(warmup: int = 0) -> Spec:
    """The learning rate stays as given (after `warmup` steps rising to it linearly)."""
    return _schedule("constant", {}, warmup)


@entry("schedule")
def step(every: int, gamma: float = 0.1, warmup: int = 0) -> Spec:
    """Multiply the learning rate by gamma every `every` epochs."""
    return _schedule("step", {"every": _positive(every, "every"), "gamma": gamma}, warmup)


@entry("schedule")
def exponential(gamma: float, warmup: int = 0) -> Spec:
    """Multiply the learning rate by gamma after every epoch."""
    return _schedule("exponential", {"gamma": _positive(gamma, "gamma")}, warmup)


@entry("schedule")
def cosine(min_lr: float = 0.0, warmup: int = 0) -> Spec:
    """Cosine decay from the initial rate to min_lr over the run's epochs."""
    return _schedule("cosine", {"min_lr": min_lr}, warmup)


@entry("schedule")
def plateau(factor: float = 0.1, patience: int = 10, monitor: str = "val_loss", min_delta: float = 0.0,
            min_lr: float = 0.0) -> Spec:
    """Multiply the learning rate by `factor` once `monitor` has not improved by more than
    min_delta for `patience` epochs (and again after as many more), down to min_lr (Keras'
    ReduceLROnPlateau). Its state travels in checkpoints."""
    if not 0.0 < factor < 1.0:
        raise ArgumentError(f"`factor` must be in (0, 1), got {factor}")
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ArgumentError(f"`patience` must be a positive number of epochs, got {patience}")
    return Spec("schedule", "plateau", {"factor": factor, "patience": patience, "monitor": monitor,
                                        "min_delta": _non_negative(min_delta, "min_delta"),
                                        "min_lr": _non_negative(min_lr, "min_lr")})


@entry("schedule")
def cyclic(base: float, max: float, step_size: int) -> Spec:
    """Triangular cyclical rate (Smith 2017, PyTorch's CyclicLR): from base up to max over
    step_size training steps (batches), back down over the next step_size, and again; set
    every step. It replaces the optimizer's lr."""
    _positive(base, "base")
    if not base < max < float("inf"):
        raise ArgumentError(f"`max` must be larger than `base` ({base}), got {max}")
    if isinstance(step_size, bool) or not isinstance(step_size, int) or step_size < 1:
        raise ArgumentError(f"`step_size` must be a positive number of steps, got {step_size}")
    return Spec("schedule", "cyclic", {"base": base, "max": max, "step_size": step_size})


# --- early stopping ------------------------------------------------------------------------------

@entry("early_stop")
def early_stop(monitor: str = "val_loss", patience: int = 5, min_delta: float = 0.0) -> Spec:
    """Stop when `monitor` (val_loss, val_accuracy, train_loss, ...) has not improved by more
    than min_delta for `patience` epochs; losses must fall, other metrics rise."""
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ArgumentError(f"`patience` must be a positive number of epochs, got {patience}")
    split, _, metric = monitor.partition("_")
    if split not in ("train", "val") or not metric:
        raise ArgumentError(f"`monitor` must name a per-epoch metric like val_loss or "
                            f"val_accuracy, got `{monitor}`")
    return Spec("early_stop", "early_stop", {"monitor": monitor, "patience": patience,
                                             "min_delta": _non_negative(min_delta, "min_delta")})


@entry("metric")
def accuracy() -> Spec:
    """Fraction of correct predictions (classification losses only)."""
    return Spec("metric", "accuracy", {})


# --- data augmentation: random changes to the inputs of each training batch ------------------------

@entry("augment")
def flip(axis: int = -1, p: float = 0.5) -> Spec:
    """Mirror each sample along `axis` (an axis of one sample; -1, the last, is an image's
    width) with probability p."""
    if not 0.0 < p <= 1.0:
        raise ArgumentError(f"`p` must be in (0, 1], got {p}")
    return Spec("augment", "flip", {"axis": axis, "p": p})


@entry("augment")
def crop(pad: int, dims: int = 2) -> Spec:
    """A random shift of each sample by up to `pad` cells along its last `dims` axes (2: an
    image's height and width; 1: a signal's length), filled with zeros: the sample padded
    with `pad` zeros on each side and cut back to its size at a random place, as PyTorch's
    RandomCrop(size, padding=pad)."""
    for name, value in (("pad", pad), ("dims", dims)):
        if value < 1:
            raise ArgumentError(f"`{name}` must be 1 or more, got {value}")
    return Spec("augment", "crop", {"pad": pad, "dims": dims})


@entry("augment")
def cutout(size: int) -> Spec:
    """Zero a size x size square of each sample's last two axes (all its channels), centred
    on a random cell, so it may hang over the edge (DeVries and Taylor's Cutout)."""
    if size < 1:
        raise ArgumentError(f"`size` must be 1 or more, got {size}")
    return Spec("augment", "cutout", {"size": size})


@entry("augment")
def noise(std: float) -> Spec:
    """Add Gaussian noise of standard deviation `std` to every input value."""
    return Spec("augment", "noise", {"std": _positive(std, "std")})


def check_augment(spec: Spec, input_name: str, input_type) -> None:
    """An augmentation against the model's input it changes: float values, and the axes of a
    sample it names (the first axis is the batch)."""
    per_sample = tuple(input_type.shape[1:])
    if not input_type.dtype.is_float:
        raise ArgumentError(f"`{spec.name}` changes float inputs, but the model's input `{input_name}` is "
                            f"{input_type}", hint="integer inputs (token ids, classes) cannot be augmented")
    if spec.name == "flip" and not -len(per_sample) <= spec.args["axis"] < len(per_sample):
        raise ArgumentError(f"`flip`: a sample of `{input_name}` ({input_type}) has {len(per_sample)} "
                            f"ax{'i' if len(per_sample) == 1 else 'e'}s, so `axis` must be in "
                            f"[{-len(per_sample)}, {len(per_sample) - 1}], got {spec.args['axis']}",
                            hint="the batch axis is not counted: -1 is the last axis of a sample")
    if spec.name == "cutout" and len(per_sample) < 2:
        raise ArgumentError(f"`cutout` zeroes a square of a sample's last two axes, but a sample of "
                            f"`{input_name}` ({input_type}) has {len(per_sample)}",
                            hint="it is for images: [C, H, W] or [H, W] samples")
    if spec.name == "crop" and spec.args["dims"] > len(per_sample):
        raise ArgumentError(f"`crop` shifts the last {spec.args['dims']} axes of a sample, but a sample of "
                            f"`{input_name}` ({input_type}) has {len(per_sample)}",
                            hint="`dims=1` shifts a sample along its last axis")


# --- the options of a train block ------------------------------------------------------------

NORMALIZE = ("none", "standard", "minmax")


@dataclass
class TrainConfig:
    model: str
    data: Spec
    loss: object  # the AST of the loss expression; the frontend builds it into the graph
    optimizer: Spec
    batch: int = 32
    epochs: int = 10
    seed: int = 0
    metrics: tuple[str, ...] = ()
    schedule: Spec = field(default_factory=constant)
    clip: Optional[float] = None
    checkpoint: Optional[str] = None
    normalize: Union[str, float, None] = None  # None: the data source's default
    shuffle: bool = True
    validation: Union[float, Spec, None] = None  # a share of the training split, or a data source
    early_stop: Optional[Spec] = None
    keep_best: bool = False
    check_numerics: bool = False  # a step whose gradients are not finite fails too (slower steps)
    augment: tuple = ()  # Specs applied in order to each training batch's inputs
    spans: dict = field(default_factory=dict)  # option -> Span, for runtime errors

    def span(self, option: str) -> Optional[Span]:
        return self.spans.get(option)


# batch, epochs and seed are 32-bit integers where they are used (the step's batch dimension,
# the i32 step counter, the i32 seed of dropout's generator)
INT_OPTION_MAX = 2 ** 31 - 1

# option -> (kind of value, required)
OPTIONS = {
    "data": ("data", True), "loss": ("loss", True), "optimizer": ("optimizer", False),
    "batch": ("int", False), "epochs": ("int", False), "seed": ("int", False),
    "metrics": ("metrics", False), "schedule": ("schedule", False), "clip": ("float", False),
    "checkpoint": ("str", False), "normalize": ("normalize", False), "shuffle": ("bool", False),
    "validation": ("validation", False), "early_stop": ("early_stop", False), "keep_best": ("bool", False),
    "check_numerics": ("bool", False), "augment": ("augment", False),
}
