"""Data sources for a train block: a `data = ...` Spec becomes numpy train/test arrays.

Everything here is numpy and the standard library only. Every problem a user can cause
(a missing file, a corrupt IDX header, a non-numeric CSV cell, a shape that cannot fit the
model) raises `DataError` carrying the span of the train block's `data` option.
"""
from __future__ import annotations

import contextlib
import csv as csv_module
import gzip
import math
import zipfile
import zlib
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Callable, Iterator, Sequence, Union

import numpy as np
from numpy.lib.npyio import NpzFile

from dlc.core.diagnostics import DataError, Span, did_you_mean
from dlc.language.recipe import Spec
from dlc.core.types import FLOAT32_MAX, DType

Normalize = Union[str, float]


@dataclass
class Dataset:
    """Train, test (and validation) arrays in their stored dtypes (test arrays may be empty)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str
    default_normalize: Normalize  # used when the train block gives no `normalize`
    x_val: np.ndarray | None = None  # the validation split (the train block's `validation`), if any
    y_val: np.ndarray | None = None


# --- the entry point --------------------------------------------------------------------------

def load_dataset(spec: Spec, base_dir: Path, seed: int, arrays: tuple | None = None,
                 span: Span | None = None) -> Dataset:
    """Load the data set a `data = ...` Spec names; relative paths are from `base_dir`."""
    try:
        loader = _LOADERS.get(spec.name)
        if loader is None:
            raise DataError(f"unknown data source `{spec.name}`",
                            hint=did_you_mean(spec.name, _LOADERS))
        return loader(spec.args, Path(base_dir), seed, arrays)
    except DataError as e:
        raise e.with_span(span) from None


def _bundled(name: str, args: dict, seed: int, default_normalize: Normalize) -> Dataset:
    # importlib.resources finds the shipped arrays wherever dlc is installed (even zipped).
    with files("dlc.data").joinpath(f"{name}.npz").open("rb") as f, np.load(f) as z:
        x, y = z["x"], z["y"]
    return _split(x, y, args["test"], seed, name, default_normalize)


def _load_digits(args: dict, base_dir: Path, seed: int, arrays) -> Dataset:
    # Pixels are 0..16, so dividing by 16 maps them onto 0..1.
    return _bundled("digits", args, seed, 16.0)


def _load_iris(args: dict, base_dir: Path, seed: int, arrays) -> Dataset:
    # Features are centimetres of different ranges: standardize them.
    return _bundled("iris", args, seed, "standard")


def _load_arrays(args: dict, base_dir: Path, seed: int, arrays) -> Dataset:
    if arrays is None:
        raise DataError("data = arrays() takes its data from Python, but none was given",
                        hint="call model.fit(x, y) from Python, or name a file source here")
    x, y = (np.asarray(a) for a in arrays)
    return _split(x, y, args.get("test", 0.0), seed, "arrays", "none")


def _load_npz(args: dict, base_dir: Path, seed: int, arrays) -> Dataset:
    path = _resolve(base_dir, args["path"])
    x, y = read_npz(path, args["x"], args["y"], shown=args["path"])
    return _split(x, y, args["test"], seed, "npz", "none")


def _load_csv(args: dict, base_dir: Path, seed: int, arrays) -> Dataset:
    path = _resolve(base_dir, args["path"])
    x, y = read_csv(path, args["label"], args["header"], shown=args["path"])
    return _split(x, y, args["test"], seed, "csv", "none")


def _load_mnist(args: dict, base_dir: Path, seed: int, arrays) -> Dataset:
    folder = _resolve(base_dir, args["dir"])
    if not folder.is_dir():
        raise DataError(f"no such folder: {args['dir']} (looked in {folder})")
    data = _split(*_idx_pair(folder, "train"), args["test"], seed, "mnist", 255.0)
    if args["test"] > 0:
        # A share of the training images is held out; the t10k files are not needed.
        return data
    data.x_test, data.y_test = _idx_pair(folder, "t10k")
    if data.x_test.shape[1:] != data.x_train.shape[1:]:
        raise DataError(f"t10k images are {_dims(data.x_test.shape[1:])} but training images "
                        f"are {_dims(data.x_train.shape[1:])}")
    return data


def _load_cifar10(args: dict, base_dir: Path, seed: int, arrays) -> Dataset:
    folder = _resolve(base_dir, args["dir"])
    if not folder.is_dir():
        raise DataError(f"no such folder: {args['dir']} (looked in {folder})")
    if not (folder / "data_batch_1.bin").is_file() and (folder / "cifar-10-batches-bin").is_dir():
        folder = folder / "cifar-10-batches-bin"  # the archive's folder, inside the one named
    train = [read_cifar_batch(_cifar_file(folder, f"data_batch_{i}.bin")) for i in range(1, 6)]
    data = _split(np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
                  args["test"], seed, "cifar10", 255.0)
    if args["test"] == 0:
        data.x_test, data.y_test = read_cifar_batch(_cifar_file(folder, "test_batch.bin"))
    return data


def _load_images(args: dict, base_dir: Path, seed: int, arrays) -> Dataset:
    folder = _resolve(base_dir, args["dir"])
    if not folder.is_dir():
        raise DataError(f"no such folder: {args['dir']} (looked in {folder})")
    x, y = read_image_folder(folder, args["dir"], args["size"], args["gray"])
    return _split(x, y, args["test"], seed, "images", 255.0)


_LOADERS: dict[str, Callable[..., Dataset]] = {
    "digits": _load_digits, "iris": _load_iris, "arrays": _load_arrays,
    "npz": _load_npz, "csv": _load_csv, "mnist": _load_mnist, "cifar10": _load_cifar10,
    "images": _load_images,
}


# --- splitting and checks ---------------------------------------------------------------------

def _split(x: np.ndarray, y: np.ndarray, test: float, seed: int, name: str,
           default_normalize: Normalize) -> Dataset:
    """Check x and y, then hold out a `test` share after a shuffle seeded by `seed`."""
    check_arrays(x, y)
    n = len(x)
    n_test = int(round(n * test))
    if n_test >= n:
        raise DataError(f"test={test} of {n} sample(s) leaves none to train on",
                        hint="use a smaller test fraction or more data")
    if n_test == 0:
        # Nothing held out: keep the arrays as given (no shuffle, no copy).
        return Dataset(x, y, x[:0], y[:0], name, default_normalize)
    order = np.random.default_rng(seed).permutation(n)
    test_idx, train_idx = order[:n_test], order[n_test:]
    return Dataset(x[train_idx], y[train_idx], x[test_idx], y[test_idx], name, default_normalize)


def check_arrays(x: np.ndarray, y: np.ndarray) -> None:
    """Inputs and labels must be non-empty, numeric, finite and equally long."""
    for what, a in (("inputs", x), ("labels", y)):
        if a.ndim == 0 or len(a) == 0:
            raise DataError(f"the {what} are empty (shape {list(a.shape)})")
        if a.dtype.kind not in "biuf":
            raise DataError(f"the {what} are not numbers (dtype {a.dtype})")
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            first = int(np.argmin(np.isfinite(a).reshape(len(a), -1).all(axis=1)))
            raise DataError(f"the {what} hold NaN or infinite values (first in sample {first})")
        check_float32_range(a, f"the {what}")
    if len(x) != len(y):
        raise DataError(f"{len(x)} input sample(s) but {len(y)} label(s)")


def check_float32_range(a: np.ndarray, what: str, span: Span | None = None) -> None:
    """Values beyond float32's range would silently become infinite when cast for the model."""
    if a.dtype.kind != "f" or a.dtype.itemsize <= 4 or a.size == 0:
        return
    beyond = np.abs(a.reshape(len(a), -1) if a.ndim else a.reshape(1, 1)) > FLOAT32_MAX
    if beyond.any():
        first = int(np.argmax(beyond.any(axis=1)))
        raise DataError(f"values beyond float32's range (±3.4e38) in {what}, the first in sample {first}",
                        span, hint="the model computes in float32: rescale the data")


def _resolve(base_dir: Path, path: str) -> Path:
    """A path from the .dln file: `~` expands, relative paths start at the file's folder."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else base_dir / p


def _require_file(path: Path, shown: str) -> None:
    if not path.is_file():
        what = ("is a folder, not a file" if path.is_dir() else
                "is a device, pipe or socket, not a file" if path.exists() else "no such file")
        raise DataError(f"cannot read {shown}: {what} (looked in {path})")


def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


# --- folders of images -----------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")  # as ImageFolder's


def read_image_folder(folder: Path, shown: str, size: Sequence[int] | None,
                      gray: bool) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, C, H, W] (channels first) and int32 labels: the index of each
    image's subfolder among the sorted subfolders. Other files are skipped, as ImageFolder
    skips them; an image file Pillow cannot read is an error that names it."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise DataError("images() reads image files with Pillow, which is not installed",
                        hint="pip install 'dlc[images]'") from None
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{shown} has no subfolders: images() takes one subfolder of images per class",
                        hint=f"for example {shown}/cat/1.png and {shown}/dog/1.png")
    pixels, labels, first = [], [], None
    for label, name in enumerate(classes):
        files = sorted(p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"{shown}/{name} holds no image files ({', '.join(IMAGE_SUFFIXES)})",
                            hint="remove the folder, or put its class's images in it")
        for path in files:
            try:
                with Image.open(path) as im:
                    im = im.convert("L" if gray else "RGB")
                    if size is not None and im.size != (size[1], size[0]):
                        im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                    a = np.asarray(im, dtype=np.uint8)
            except (UnidentifiedImageError, OSError, ValueError) as e:
                raise DataError(f"cannot read the image {path.relative_to(folder.parent)}: {e}") from None
            if first is None:
                first = (path, a.shape)
            elif a.shape != first[1]:
                raise DataError(f"{path.relative_to(folder.parent)} is {a.shape[1]}x{a.shape[0]} pixels but "
                                f"{first[0].relative_to(folder.parent)} is {first[1][1]}x{first[1][0]}",
                                hint="give images(..., size=[h, w]) to resize every image to one size")
            pixels.append(a.reshape(a.shape[:2] + (-1,)).transpose(2, 0, 1))
            labels.append(label)
    return np.stack(pixels), np.asarray(labels, np.int32)


# --- .npz archives ----------------------------------------------------------------------------

def read_npz(path: Path, x_key: str, y_key: str,
             shown: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The arrays under `x_key` and `y_key` in an .npz archive, never unpickling anything."""
    shown = shown or str(path)
    z = open_numpy(path, shown)
    if not isinstance(z, NpzFile):
        # A .npy file loads as one bare array, without the names x and y.
        raise DataError(f"{shown} is a single .npy array, not an .npz archive",
                        hint="save both arrays with np.savez(path, x=x, y=y)")
    with z, numpy_errors(shown):
        missing = [k for k in (x_key, y_key) if k not in z.files]
        if missing:
            raise DataError(f"{shown} has no array `{missing[0]}`; it holds: "
                            f"{', '.join(z.files) or 'nothing'}",
                            hint=did_you_mean(missing[0], z.files))
        return z[x_key], z[y_key]


_NUMPY_MAGIC = (b"\x93NUMPY", b"PK\x03\x04", b"PK\x05\x06")  # .npy; .npz: a first member, or empty


def open_numpy(path: Path, shown: str) -> np.ndarray | NpzFile:
    """An .npy file's array, or an .npz archive (a context manager whose arrays load on access);
    pickled data is never loaded: a data file must never be able to run code."""
    _require_file(path, shown)
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise DataError(f"cannot read {shown}: {e.strerror or e}") from None
    if not magic.startswith(_NUMPY_MAGIC):  # np.load would take anything else for a pickle
        raise DataError(f"{shown} is not a NumPy .npy or .npz file",
                        hint="write arrays with np.save (one array) or np.savez (named arrays)")
    with numpy_errors(shown):
        return np.load(path, allow_pickle=False)


@contextlib.contextmanager
def numpy_errors(shown: str) -> Iterator[None]:
    """What np.load and an .npz's members raise for a damaged, pickled or huge file, as a DataError."""
    try:
        yield
    except MemoryError as e:
        raise DataError(f"{shown} holds more data than fits in memory ({e or 'no detail'})",
                        hint="is the file damaged? If not, pass it in parts from Python "
                             "(fit(x, y), predict(x))") from None
    except ValueError as e:
        if "pickle" in str(e):
            raise DataError(f"{shown} holds Python objects (pickled), which dlc does not load",
                            hint="store plain numeric arrays") from None
        raise DataError(f"cannot read {shown}: {e}") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"cannot read {shown}: it is damaged ({e})") from None


# --- CSV --------------------------------------------------------------------------------------

def read_csv(path: Path, label: str | int, header: bool,
             shown: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A CSV of numbers -> (x float64 [N, F], y float64 [N]); `label` picks the label column."""
    shown = shown or str(path)
    _require_file(path, shown)
    try:
        # utf-8-sig drops the byte-order mark that spreadsheet programs write.
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = _csv_rows(f)
    except (OSError, UnicodeDecodeError, csv_module.Error) as e:
        raise DataError(f"cannot read {shown}: {e}") from None
    names = [c.strip() for c in rows.pop(0)[1]] if header and rows else None
    if not rows:
        raise DataError(f"{shown} holds no data rows")
    width = len(rows[0][1])
    col = _label_column(label, names, width, shown)
    values = np.empty((len(rows), width), dtype=np.float64)
    for i, (line, row) in enumerate(rows):
        if len(row) != width:
            raise DataError(f"{shown}:{line}: {len(row)} column(s), but the first row has {width}")
        for j, cell in enumerate(row):
            values[i, j] = _number(cell, shown, line, j, names)
    return np.delete(values, col, axis=1), values[:, col]


def _csv_rows(f) -> list[tuple[int, list[str]]]:
    """(line number, cells) of each non-blank row; the number is where the row ends."""
    reader = csv_module.reader(f)
    return [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]


def _label_column(label: str | int, names: list[str] | None, width: int, shown: str) -> int:
    """The index of the label column, from a header name or a (possibly negative) index."""
    if isinstance(label, str):
        if names is None:
            raise DataError(f"label=\"{label}\" names a column, but {shown} is read without a "
                            "header", hint="use header=true, or give the column's index")
        if label not in names:
            raise DataError(f"{shown} has no column `{label}`; its columns: {', '.join(names)}",
                            hint=did_you_mean(label, names))
        return names.index(label)
    if not -width <= label < width:
        raise DataError(f"label={label} is out of range for {shown}, which has {width} column(s)")
    if width < 2:
        raise DataError(f"{shown} has a single column: no inputs are left beside the label")
    return label % width


def _number(cell: str, shown: str, line: int, j: int, names: list[str] | None) -> float:
    """One CSV cell as a finite float, or an error naming file, line and column."""
    try:
        v = float(cell)
    except ValueError:
        v = None
    if v is None or not math.isfinite(v):
        column = f"column {j + 1}" + (f" (`{names[j]}`)" if names and j < len(names) else "")
        raise DataError(f"{shown}:{line}: {column} holds {cell.strip()!r}, which is not a "
                        "finite number", hint="CSV data must be numbers only")
    return v


# --- CIFAR-10's binary batches -----------------------------------------------------------------

_CIFAR_RECORD = 1 + 3 * 32 * 32  # a label byte, then the red, green and blue planes, row by row


def _cifar_file(folder: Path, name: str) -> Path:
    if not (folder / name).is_file():
        raise DataError(f"{folder} has no {name}",
                        hint="cifar10() reads CIFAR-10's binary version (cifar-10-binary.tar.gz, unpacked): "
                             "data_batch_1.bin .. data_batch_5.bin and test_batch.bin")
    return folder / name


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, 3, 32, 32] (uint8, channels first) and labels [N] of one binary batch."""
    try:
        raw = np.fromfile(path, np.uint8)
    except OSError as e:
        raise DataError(f"cannot read {path.name}: {e.strerror or e}") from None
    if raw.size == 0 or raw.size % _CIFAR_RECORD:
        raise DataError(f"{path.name} is not a CIFAR-10 binary batch: {raw.size} bytes is not a whole "
                        f"number of {_CIFAR_RECORD}-byte records", hint="is the file complete?")
    records = raw.reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0]
    if labels.max() > 9:
        raise DataError(f"{path.name} is not a CIFAR-10 binary batch: record {int(labels.argmax())} has "
                        f"label {int(labels.max())} (CIFAR-10's are 0..9; CIFAR-100's binary files "
                        "have two label bytes)")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels.astype(np.int64)


# --- MNIST's IDX files ------------------------------------------------------------------------

# IDX element types by their type byte (http://yann.lecun.com/exdb/mnist/).
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _idx_pair(folder: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """`train` or `t10k` images [N, H, W] and labels [N] from a folder of IDX files."""
    images = read_idx(_idx_file(folder, f"{prefix}-images-idx3-ubyte"), ndim=3)
    labels = read_idx(_idx_file(folder, f"{prefix}-labels-idx1-ubyte"), ndim=1)
    if len(images) != len(labels):
        raise DataError(f"{prefix} has {len(images)} images but {len(labels)} labels")
    return images, labels


def _idx_file(folder: Path, stem: str) -> Path:
    """The plain file if present, else its gzipped `.gz` twin."""
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder} has no {stem} (nor {stem}.gz)",
                    hint="the folder needs MNIST's four IDX files: train-images-idx3-ubyte, "
                         "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte "
                         "(each may be gzipped)")


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """One IDX file (plain or `.gz`) holding an array of `ndim` dimensions, validated."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {path.name}: {e}") from None
    return _parse_idx(raw, path.name, ndim)


def _parse_idx(raw: bytes, name: str, ndim: int) -> np.ndarray:
    """Header: two zero bytes, a type byte, the rank byte, then one big-endian u32 per dim."""
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_TYPES:
        raise DataError(f"{name} is not an IDX file (bad magic number {raw[:4].hex() or 'none'})",
                        hint="is it an MNIST file, and complete?")
    if raw[3] != ndim:
        raise DataError(f"{name} holds a {raw[3]}-dimensional array; expected {ndim} dimensions")
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DataError(f"{name} is truncated: its header is incomplete")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    want = math.prod(dims) * dtype.itemsize
    got = len(raw) - head
    if got < want:
        raise DataError(f"{name} is truncated: its header promises {_dims(dims)} values "
                        f"({want} bytes), but only {got} bytes follow")
    if got > want:
        raise DataError(f"{name} has {got - want} bytes after the {_dims(dims)} values its "
                        "header declares")
    # Native byte order so later arithmetic needs no conversion.
    return np.frombuffer(raw, dtype, offset=head).reshape(dims).astype(dtype.newbyteorder("="))


# --- making arrays fit the model --------------------------------------------------------------

def normalize(x_train: np.ndarray, x_test: np.ndarray, mode: Normalize,
              span: Span | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scale inputs by `mode` with statistics from the training split only; float32 out."""
    # float32 throughout keeps MNIST-sized data small; only the statistics use float64.
    train = np.asarray(x_train, dtype=np.float32)
    test = np.asarray(x_test, dtype=np.float32)
    shift, scale = normalization(train, mode, span)
    return (train - shift) / scale, (test - shift) / scale


def normalization(x_train: np.ndarray, mode: Normalize,
                  span: Span | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(shift, scale) per feature for `(x - shift) / scale`, float32, from training data."""
    if mode == "none":
        shift, scale = 0.0, 1.0
    elif mode == "standard":
        shift = x_train.mean(axis=0, dtype=np.float64)
        scale = x_train.std(axis=0, dtype=np.float64)
    elif mode == "minmax":
        shift, scale = x_train.min(axis=0), np.ptp(x_train, axis=0).astype(np.float64)
    elif isinstance(mode, (int, float)) and not isinstance(mode, bool) and mode > 0:
        shift, scale = 0.0, mode
    else:
        raise DataError(f"unknown normalization {mode!r}", span,
                        hint="use none, standard, minmax or a positive number to divide by")
    # A constant feature maps to 0 instead of dividing by zero.
    scale = np.where(np.asarray(scale) == 0, 1.0, scale)
    return np.asarray(shift, dtype=np.float32), scale.astype(np.float32)


def fit_inputs(x: np.ndarray, shape_without_batch: Sequence[int],
               span: Span | None = None) -> np.ndarray:
    """Reshape samples to the model's input shape when each holds the same number of values."""
    shape = tuple(shape_without_batch)
    if x.shape[1:] == shape:
        return x
    if math.prod(x.shape[1:]) == math.prod(shape):
        return x.reshape((len(x),) + shape)
    one_sample = x.shape == shape or (x.ndim == 1 and len(x) == math.prod(shape) > 1)
    raise DataError(f"the data's samples have shape [{_dims(x.shape[1:])}] "
                    f"({math.prod(x.shape[1:])} values), which does not fit the model's input "
                    f"[B, {_dims(shape)}] ({math.prod(shape)} values)", span,
                    hint=f"this looks like one sample of shape [{_dims(x.shape)}]: give a batch of one, "
                         "x[None]" if one_sample else "change the model's input shape to match the data")


def fit_labels(y: np.ndarray, dtype: Union[str, DType], shape_without_batch: Sequence[int],
               span: Span | None = None, classes: int | None = None) -> np.ndarray:
    """Labels in the dtype and per-sample shape the model's `label` input declares.

    Integer labels are class indices; given `classes`, each must lie in [0, classes).
    """
    dt = DType(str(dtype))
    shape = tuple(shape_without_batch)
    y = np.asarray(y)
    if y.shape[1:] != shape:
        if math.prod(y.shape[1:]) != math.prod(shape):
            hint = None
            if not shape and y.ndim == 2:
                hint = "cross_entropy takes class indices; turn one-hot labels into indices with y.argmax(axis=1)"
            elif y.ndim == 1 and len(shape) == 1 and y.dtype.kind in "iu":
                hint = (f"these look like class indices, which cross_entropy and multi_hinge take; this loss "
                        f"reads a row of {shape[0]} per sample (one-hot rows: np.eye({shape[0]})[y])")
            raise DataError(f"the labels have shape [{_dims(y.shape[1:])}] per sample, but the "
                            f"loss needs [{_dims(shape)}]", span, hint=hint)
        y = y.reshape((len(y),) + shape)
    if dt.is_float:
        check_float32_range(y, "the labels", span)
        return y.astype(dt.np)
    if y.dtype.kind == "f" and not np.all(np.mod(y, 1) == 0):
        raise DataError("the labels must be whole numbers (class indices), but some are "
                        "fractional", span, hint="a regression target needs a loss like mse")
    # An out-of-range index would make the compiled loss read outside its row.
    if y.size and y.min() < 0:
        raise DataError(f"class labels must not be negative, but one is {y.min():g}", span)
    if y.size and classes is not None and y.max() >= classes:
        raise DataError(f"class labels must lie in 0..{classes - 1} for {classes} classes, "
                        f"but one is {y.max():g}", span)
    return y.astype(dt.np)


def batches(n: int, batch: int, rng: np.random.Generator | None) -> Iterator[np.ndarray]:
    """Index arrays covering all n samples (shuffled given rng), the last partial batch too."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for start in range(0, n, batch):
        yield order[start:start + batch]


def stream_batches(n: int, batch: int, every: bool = False) -> Iterator[np.ndarray]:
    """Batches for a model that carries state from one batch to the next (Keras' stateful
    RNNs; PyTorch's word_language_model `batchify`). The n samples, in order (each one
    continuing the one before, like windows of a text), are cut into S = min(batch, n)
    streams of consecutive samples, and batch k holds sample k of every stream: row i of
    batch k+1 continues row i of batch k. Streams hold n // S samples and the n mod S left
    over are not read -- every batch is full -- unless `every` (evaluation, prediction):
    then streams hold ceil(n / S) samples, the last ones fewer, and the late batches are
    shorter, holding the first streams (their rows keep their places)."""
    if n == 0:
        return
    streams = min(batch, n)
    length = -(-n // streams) if every else n // streams
    starts = np.arange(streams) * length
    for k in range(length):
        idx = starts + k
        yield idx[idx < n]
